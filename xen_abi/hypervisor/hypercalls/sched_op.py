"""sched_op: shutdown, shutdown_code, poll, remote_shutdown.  SCHEDOP_yield
(shim.c hypercall) and SCHEDOP_block (events.c block) never leave the shim."""
from __future__ import annotations

import logging

from pyvmm.xen_abi.abi import (
    Hypercall,
    SchedOp,
    SchedPoll,
    SchedRemoteShutdown,
    SchedShutdown,
    XenErrno,
)
from pyvmm.xen_abi.hypervisor.hypercalls.context import U32, DomainShutdown, fail, is_self, other_domain_errno

log = logging.getLogger(__name__)

SCHED_POLL_MAX_PORTS = 128  # Xen refuses longer poll lists


def sched_op(dispatcher, ctx, cmd, arg, *_):
    cmd &= U32
    d = dispatcher.domain
    if cmd == SchedOp.shutdown:
        s = ctx.vm.read_struct(SchedShutdown, arg)
        log.info("guest vCPU %d: SCHEDOP_shutdown reason %d", ctx.vcpu_id, s.reason)
        raise _shutdown(dispatcher, s.reason)
    if cmd == SchedOp.shutdown_code:
        dispatcher.shutdown_code = ctx.vm.read_struct(SchedShutdown, arg).reason
        return 0
    if cmd == SchedOp.poll:
        p = ctx.vm.read_struct(SchedPoll, arg)
        if p.nr_ports > SCHED_POLL_MAX_PORTS:
            fail(XenErrno.EINVAL, "too many poll ports")
        ports = ctx.vm.read(p.ports, 4 * p.nr_ports)
        for i in range(p.nr_ports):
            port = int.from_bytes(ports[4 * i:4 * i + 4], "little")
            if port >= d.evtchn.nr_ports:
                fail(XenErrno.EINVAL, f"poll port {port}")
            if d.evtchn.is_pending(port):
                return 0
        d.yield_vcpu(ctx.vcpu_id)  # spurious wake-ups are allowed
        return 0
    if cmd == SchedOp.remote_shutdown:
        r = ctx.vm.read_struct(SchedRemoteShutdown, arg)
        if not is_self(d, r.domain_id):
            fail(other_domain_errno(r.domain_id), f"domain {r.domain_id}")
        raise _shutdown(dispatcher, r.reason)
    return dispatcher.unsupported(Hypercall.sched_op, cmd)


def _shutdown(dispatcher, reason: int) -> DomainShutdown:
    # As Xen's domain_shutdown(): a code preset with SCHEDOP_shutdown_code wins.
    code = reason if dispatcher.shutdown_code is None else dispatcher.shutdown_code
    return DomainShutdown(code)
