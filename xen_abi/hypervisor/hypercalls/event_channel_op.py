"""event_channel_op: everything but EVTCHNOP_send to a back-end port, which
the shim turns into an `out` an ioeventfd absorbs (events.c send_to_backend),
including the FIFO ABI's init_control / expand_array / set_priority.
The bookkeeping itself is evtchn.EventChannels."""
from __future__ import annotations

from pyvmm.xen_abi.abi import (
    EvtchnAllocUnbound,
    EvtchnBindInterdomain,
    EvtchnBindIpi,
    EvtchnBindVcpu,
    EvtchnBindVirq,
    EvtchnExpandArray,
    EvtchnInitControl,
    EvtchnOp,
    EvtchnSetPriority,
    EvtchnStatus,
    EvtchnStatusArg,
    Hypercall,
    HypercallError,
    EVTCHN_FIFO_LINK_BITS,
)
from pyvmm.xen_abi.hypervisor.hypercalls.context import U32
from pyvmm.xen_abi.memory.guest_va import GuestPageFault


# The operations that make a port: their argument, the field Xen writes the
# new port into, and the binding made from the argument's fields.
_BINDS = {
    EvtchnOp.alloc_unbound: (EvtchnAllocUnbound, "port",
                             lambda ev, a: ev.alloc_unbound(a.dom, a.remote_dom)),
    EvtchnOp.bind_interdomain: (EvtchnBindInterdomain, "local_port",
                                lambda ev, a: ev.bind_interdomain(a.remote_dom, a.remote_port)),
    EvtchnOp.bind_virq: (EvtchnBindVirq, "port", lambda ev, a: ev.bind_virq(a.virq, a.vcpu)),
    EvtchnOp.bind_ipi: (EvtchnBindIpi, "port", lambda ev, a: ev.bind_ipi(a.vcpu)),
}


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
    if cmd in _BINDS:
        return _bind(vm, ev, arg, *_BINDS[cmd])
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
    if cmd == EvtchnOp.init_control:
        a = vm.read_struct(EvtchnInitControl, arg)
        ev.init_control(a.vcpu, a.control_gfn, a.offset)
        # link_bits is copied out on success only, as Xen does
        vm.write_struct(EvtchnInitControl, arg, dict(a, link_bits=EVTCHN_FIFO_LINK_BITS))
        return 0
    if cmd == EvtchnOp.expand_array:
        ev.expand_array(vm.read_struct(EvtchnExpandArray, arg).array_gfn)
        return 0
    if cmd == EvtchnOp.set_priority:
        a = vm.read_struct(EvtchnSetPriority, arg)
        ev.set_priority(a.port, a.priority)
        return 0
    return dispatcher.unsupported(Hypercall.event_channel_op, cmd)


def _bind(vm, ev, arg, struct, port_field: str, bind) -> int:
    """Read the argument, bind, copy the new port out; if the guest buffer
    vanished meanwhile, undo the binding (as Xen)."""
    a = vm.read_struct(struct, arg)
    port = bind(ev, a)
    try:
        vm.write_struct(struct, arg, dict(a, **{port_field: port}))
    except GuestPageFault:
        try:
            ev.close(port)
        except HypercallError:
            pass
        raise
    return 0
