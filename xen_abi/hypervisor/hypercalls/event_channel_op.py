"""event_channel_op: everything but EVTCHNOP_send to a back-end port, which
the shim turns into an `out` an ioeventfd absorbs (events.c send_to_backend).
The bookkeeping itself is evtchn.EventChannels."""
from __future__ import annotations

from pyvmm.xen_abi.abi import (
    EvtchnAllocUnbound,
    EvtchnBindInterdomain,
    EvtchnBindIpi,
    EvtchnBindVcpu,
    EvtchnBindVirq,
    EvtchnOp,
    EvtchnStatus,
    EvtchnStatusArg,
    Hypercall,
    HypercallError,
)
from pyvmm.xen_abi.hypervisor.hypercalls.context import U32
from pyvmm.xen_abi.memory.guest_va import GuestPageFault


def event_channel_op(dispatcher, ctx, cmd, arg, *_):
    cmd &= U32
    ev = dispatcher.domain.evtchn
    vm = ctx.vm
    if cmd == EvtchnOp.send:
        ev.send(vm.read_u32(arg))  # evtchn_send: one u32 (EvtchnPort)
        return 0
    if cmd == EvtchnOp.unmask:
        ev.unmask(vm.read_u32(arg))  # evtchn_unmask: one u32 (EvtchnPort)
        return 0
    if cmd == EvtchnOp.alloc_unbound:
        a = vm.read_struct(EvtchnAllocUnbound, arg)
        port = ev.alloc_unbound(a.dom, a.remote_dom)
        return _write_back(vm, EvtchnAllocUnbound, arg, dict(a, port=port), ev, port)
    if cmd == EvtchnOp.bind_interdomain:
        a = vm.read_struct(EvtchnBindInterdomain, arg)
        port = ev.bind_interdomain(a.remote_dom, a.remote_port)
        return _write_back(vm, EvtchnBindInterdomain, arg, dict(a, local_port=port), ev, port)
    if cmd == EvtchnOp.bind_virq:
        a = vm.read_struct(EvtchnBindVirq, arg)
        port = ev.bind_virq(a.virq, a.vcpu)
        return _write_back(vm, EvtchnBindVirq, arg, dict(a, port=port), ev, port)
    if cmd == EvtchnOp.bind_ipi:
        a = vm.read_struct(EvtchnBindIpi, arg)
        port = ev.bind_ipi(a.vcpu)
        return _write_back(vm, EvtchnBindIpi, arg, dict(a, port=port), ev, port)
    if cmd == EvtchnOp.close:
        ev.close(vm.read_u32(arg))  # evtchn_close: one u32 (EvtchnPort)
        return 0
    if cmd == EvtchnOp.bind_vcpu:
        a = vm.read_struct(EvtchnBindVcpu, arg)
        ev.bind_vcpu(a.port, a.vcpu)
        return 0
    if cmd == EvtchnOp.status:
        a = vm.read_struct(EvtchnStatusArg, arg)
        s = ev.status(a.dom, a.port)
        if s["status"] == EvtchnStatus.interdomain:
            u = s["dom"].to_bytes(2, "little") + bytes(2) + s["port"].to_bytes(4, "little")
        elif s["status"] == EvtchnStatus.unbound:
            u = s["dom"].to_bytes(2, "little") + bytes(6)
        elif s["status"] == EvtchnStatus.virq:
            u = s["virq"].to_bytes(4, "little") + bytes(4)
        else:
            u = bytes(8)
        vm.write_struct(EvtchnStatusArg, arg, dict(a, status=int(s["status"]), vcpu=s["vcpu"], u=u))
        return 0
    if cmd == EvtchnOp.reset:
        dom = int.from_bytes(vm.read(arg, 2), "little")
        ev.reset(dom)
        return 0
    # init_control / expand_array / set_priority (FIFO ABI): -ENOSYS keeps Linux on 2-level.
    return dispatcher.unsupported(Hypercall.event_channel_op, cmd)


def _write_back(vm, struct, arg, value, ev, port) -> int:
    """Copy the result out; if the guest buffer vanished, undo the binding (as Xen)."""
    try:
        vm.write_struct(struct, arg, value)
    except GuestPageFault:
        try:
            ev.close(port)
        except HypercallError:
            pass
        raise
    return 0
