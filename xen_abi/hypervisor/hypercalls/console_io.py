"""console_io: CONSOLEIO_write appends to the domain's console; there is
no input through this path."""
from __future__ import annotations

from pyvmm.xen_abi.abi import ConsoleIoCmd, Hypercall, XenErrno
from pyvmm.xen_abi.hypervisor.hypercalls.context import U32, fail

CONSOLE_IO_MAX = 64 * 1024  # longest CONSOLEIO_write accepted in one call


def console_io(dispatcher, ctx, cmd, count, buffer, *_):
    cmd &= U32
    count &= U32
    if cmd == ConsoleIoCmd.write:
        if count > CONSOLE_IO_MAX:
            fail(XenErrno.EINVAL, f"console write of {count} bytes")
        if count:
            dispatcher.domain.console_write(ctx.vm.read(buffer, count))
        return 0
    if cmd == ConsoleIoCmd.read:
        return 0  # no input through this path
    return dispatcher.unsupported(Hypercall.console_io, cmd)
