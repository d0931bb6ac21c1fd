"""vm_assist: the virtual-machine assists a 64-bit PV guest may switch.
The bits are read back by xen_version (get_features) and the runstate area
(RUNSTATE_UPDATE_FLAG)."""
from __future__ import annotations

from pyvmm.xen_abi.abi import VMASST_CMD_DISABLE, VMASST_CMD_ENABLE, VmAssistType, XenErrno
from pyvmm.xen_abi.hypervisor.hypercalls.context import U32

VM_ASSIST_VALID = frozenset({VmAssistType.FOUR_GB_SEGMENTS, VmAssistType.WRITABLE_PAGETABLES,
                             VmAssistType.PAE_EXTENDED_CR3, VmAssistType.RUNSTATE_UPDATE_FLAG})


def vm_assist(dispatcher, ctx, cmd, kind, *_):
    cmd &= U32
    kind &= U32
    if cmd not in (VMASST_CMD_ENABLE, VMASST_CMD_DISABLE):
        return -XenErrno.ENOSYS
    if kind not in VM_ASSIST_VALID:
        return -XenErrno.EINVAL
    with dispatcher.lock:
        if cmd == VMASST_CMD_ENABLE:
            dispatcher.vm_assist |= 1 << kind
        else:
            dispatcher.vm_assist &= ~(1 << kind)
        dispatcher.domain.vm_assist_changed(dispatcher.vm_assist)
    return 0

