"""physdev_op: PHYSDEVOP_set_iopl and set_iobitmap are validated here as
Xen's physdev.c does (-EFAULT for an unreadable argument, -EINVAL for an
iopl above 3, a bitmap address outside the guest's half or more than 65536
ports); on success the shim keeps them (shim.c events_or_python ->
priv.c priv_physdev_op) and checks port I/O against them.  There are no
physical devices, so every other sub-op is -ENOSYS."""
from __future__ import annotations

from pyvmm.xen_abi.abi import (
    HYPERVISOR_VIRT_END,
    Hypercall,
    PhysdevOp,
    PhysdevSetIobitmap,
    PhysdevSetIopl,
    XenErrno,
)
from pyvmm.xen_abi.hypervisor.hypercalls.context import U32, fail

LOWER_HALF_END = 1 << 47


def physdev_op(dispatcher, ctx, cmd, arg, *_):
    cmd &= U32
    if cmd == PhysdevOp.set_iopl:
        if ctx.vm.read_struct(PhysdevSetIopl, arg).iopl > 3:
            fail(XenErrno.EINVAL, "iopl > 3")
        return 0
    if cmd == PhysdevOp.set_iobitmap:
        m = ctx.vm.read_struct(PhysdevSetIobitmap, arg)   # 16 bytes, as Xen copies
        # guest_handle_okay(bitmap, IOBMP_BYTES) looks at its start only
        if not (m.bitmap < LOWER_HALF_END or m.bitmap >= HYPERVISOR_VIRT_END):
            fail(XenErrno.EINVAL, f"I/O bitmap at {m.bitmap:#x}")
        if m.nr_ports > 65536:
            fail(XenErrno.EINVAL, f"{m.nr_ports} ports")
        return 0
    return dispatcher.unsupported(Hypercall.physdev_op, cmd)
