"""physdev_op: PHYSDEVOP_set_iopl is validated here; on success the shim
keeps the level (shim.c hypercall -> priv.c priv_set_iopl).  There are no
physical devices, so every other sub-op is -ENOSYS."""
from __future__ import annotations

from pyvmm.xen_abi.abi import Hypercall, PhysdevOp, PhysdevSetIopl, XenErrno
from pyvmm.xen_abi.hypervisor.hypercalls.context import U32, fail


def physdev_op(dispatcher, ctx, cmd, arg, *_):
    cmd &= U32
    if cmd == PhysdevOp.set_iopl:
        if ctx.vm.read_struct(PhysdevSetIopl, arg).iopl > 3:
            fail(XenErrno.EINVAL, "iopl > 3")
        return 0
    return dispatcher.unsupported(Hypercall.physdev_op, cmd)
