"""2-level event channels: raise semantics on the real shared page, the port
table, back-end ends, bad input, and a concurrency hammer."""
from __future__ import annotations

import random
import threading

import pytest

from pvfake import SHARED_INFO_GPA, FakeDomain
from pyvmm.xen_abi.abi import (
    DOMID_SELF,
    SHARED_INFO_EVTCHN_MASK,
    SHARED_INFO_EVTCHN_PENDING,
    VCPU_INFO_PENDING_SEL,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_PENDING,
    EvtchnStatus,
    HypercallError,
    Virq,
    XenErrno,
)
from pyvmm.xen_abi.hypervisor.evtchn import EventChannels

PENDING = SHARED_INFO_GPA + SHARED_INFO_EVTCHN_PENDING
MASK = SHARED_INFO_GPA + SHARED_INFO_EVTCHN_MASK


@pytest.fixture
def dom():
    d = FakeDomain(nr_vcpus=2)
    yield d
    d.close()


def vi(v):
    return SHARED_INFO_GPA + v * VCPU_INFO_SIZE


def sel(d, v):
    return d.phys.read_u64(vi(v) + VCPU_INFO_PENDING_SEL)


def upcall(d, v):
    return d.phys.read_u8(vi(v) + VCPU_INFO_UPCALL_PENDING)


def errno_of(excinfo):
    return excinfo.value.errno


def test_set_pending_full_path_and_idempotence(dom):
    ev = dom.evtchn
    p = ev.alloc_unbound(DOMID_SELF, 0)
    port = 130  # word 2, bit 2: make sure the port table has it bound
    while p < port:
        p = ev.alloc_unbound(DOMID_SELF, 0)
    assert ev.set_pending(port) == 0
    assert dom.phys.read_u64(PENDING + 16) == 1 << 2
    assert sel(dom, 0) == 1 << 2 and upcall(dom, 0) == 1
    # already pending: nothing else happens
    assert ev.set_pending(port) is None
    # another port in the same word: selector already set -> no kick
    assert ev.set_pending(131) is None
    assert dom.phys.read_u64(PENDING + 16) == 0b1100
    # guest consumed upcall_pending but not the selector: still no kick
    dom.phys.write_u8(vi(0) + VCPU_INFO_UPCALL_PENDING, 0)
    assert ev.set_pending(132) is None
    # selector clear but upcall_pending already 1 -> no kick, selector set
    dom.phys.write_u64(vi(0) + VCPU_INFO_PENDING_SEL, 0)
    dom.phys.write_u8(vi(0) + VCPU_INFO_UPCALL_PENDING, 1)
    assert ev.set_pending(200) is None  # word 3
    assert sel(dom, 0) == 1 << 3


def test_masked_port_stays_pending_without_selector(dom):
    ev = dom.evtchn
    ev.mask(70)
    assert ev.set_pending(70) is None
    assert ev.is_pending(70) and sel(dom, 0) == 0 and upcall(dom, 0) == 0
    # unmask re-raises: selector + upcall + kick
    dom.kicks.clear()
    assert ev.unmask(70) == 0
    assert sel(dom, 0) == 1 << 1 and upcall(dom, 0) == 1 and dom.kicks == [0]
    # unmasking an unmasked port does nothing
    assert ev.unmask(70) is None


def test_notify_vcpu_and_relocated_vcpu_info(dom):
    ev = dom.evtchn
    port = ev.bind_virq(Virq.TIMER, 1)
    assert ev.set_pending(port) == 1
    assert sel(dom, 1) == 1 << (port // 64) and sel(dom, 0) == 0
    # move vCPU 1's vcpu_info into RAM: the next raise lands there
    new = 0x5000 + 64
    ev.set_vcpu_info_gpa(1, new)
    ev.clear_pending(port)
    assert ev.set_pending(port) == 1
    assert dom.phys.read_u64(new + VCPU_INFO_PENDING_SEL) == 1 << (port // 64)
    assert dom.phys.read_u8(new + VCPU_INFO_UPCALL_PENDING) == 1
    # raise_virq goes through the kick callback
    ev.clear_pending(port)
    dom.phys.write_u64(new + VCPU_INFO_PENDING_SEL, 0)
    dom.phys.write_u8(new + VCPU_INFO_UPCALL_PENDING, 0)
    dom.kicks.clear()
    assert ev.raise_virq(Virq.TIMER, 1) == 1 and dom.kicks == [1]
    assert ev.raise_virq(Virq.TIMER, 0) is None  # not bound on vCPU 0
    assert ev.raise_virq(Virq.TIMER, 99) is None


def test_backend_bind_send_notify_close(dom):
    ev = dom.evtchn
    events, notes, closed = [], [], []
    ev.listeners.append(lambda what, gp, be: events.append((what, gp, be.port)))
    gp = ev.alloc_unbound(DOMID_SELF, 0)
    be = ev.backend_bind(gp, lambda: notes.append(1), lambda: closed.append(1))
    assert events == [("bind", gp, be.port)]
    st = ev.status(DOMID_SELF, gp)
    assert st["status"] == EvtchnStatus.interdomain and st["dom"] == 0 and st["port"] == be.port
    ev.send(gp)
    ev.send(gp)
    assert notes == [1, 1]
    dom.kicks.clear()
    assert be.notify() == 0 and dom.kicks == [0] and ev.is_pending(gp)
    # binding twice fails
    with pytest.raises(HypercallError) as e:
        ev.backend_bind(gp, lambda: None)
    assert errno_of(e) == XenErrno.EINVAL
    ev.close(gp)
    assert closed == [1] and events[-1] == ("close", gp, be.port)
    assert not ev.is_pending(gp), "close clears the stale pending bit"
    assert be.notify() is None  # the back-end end is dead
    assert ev.status(DOMID_SELF, gp)["status"] == EvtchnStatus.closed


def test_guest_binds_to_backend_offer(dom):
    ev = dom.evtchn
    notes = []
    be = ev.backend_alloc_unbound(lambda: notes.append("n"))
    dom.kicks.clear()
    gp = ev.bind_interdomain(0, be.port)
    assert be.guest_port == gp
    assert ev.is_pending(gp) and dom.kicks == [0], "bind raises the new local port, as Xen"
    ev.send(gp)
    assert notes == ["n"]
    with pytest.raises(HypercallError) as e:
        ev.bind_interdomain(0, be.port)  # already connected
    assert errno_of(e) == XenErrno.EINVAL
    with pytest.raises(HypercallError) as e:
        ev.bind_interdomain(0, 9999)
    assert errno_of(e) == XenErrno.EINVAL
    # the back-end closes: the guest end goes back to unbound
    be.close()
    assert ev.status(DOMID_SELF, gp)["status"] == EvtchnStatus.unbound
    ev.send(gp)  # dropped silently
    assert notes == ["n"]


def test_loopback_interdomain_and_ipi(dom):
    ev = dom.evtchn
    a = ev.alloc_unbound(DOMID_SELF, DOMID_SELF)
    b = ev.bind_interdomain(DOMID_SELF, a)
    ev.clear_pending(b)
    ev.send(b)
    assert ev.is_pending(a)
    ev.send(a)
    assert ev.is_pending(b)
    ev.close(b)
    assert ev.status(DOMID_SELF, a)["status"] == EvtchnStatus.unbound
    ipi = ev.bind_ipi(1)
    ev.send(ipi)
    assert ev.is_pending(ipi) and sel(dom, 1) & (1 << (ipi // 64))


def test_virq_rules(dom):
    ev = dom.evtchn
    with pytest.raises(HypercallError) as e:
        ev.bind_virq(24, 0)
    assert errno_of(e) == XenErrno.EINVAL
    with pytest.raises(HypercallError) as e:
        ev.bind_virq(Virq.CONSOLE, 1)  # global VIRQ on vCPU 1
    assert errno_of(e) == XenErrno.EINVAL
    with pytest.raises(HypercallError) as e:
        ev.bind_virq(Virq.TIMER, 7)
    assert errno_of(e) == XenErrno.ENOENT
    p = ev.bind_virq(Virq.TIMER, 0)
    with pytest.raises(HypercallError) as e:
        ev.bind_virq(Virq.TIMER, 0)
    assert errno_of(e) == XenErrno.EEXIST
    assert ev.status(DOMID_SELF, p)["virq"] == Virq.TIMER
    with pytest.raises(HypercallError):
        ev.send(p)  # cannot send on a VIRQ port
    with pytest.raises(HypercallError):
        ev.bind_vcpu(p, 1)  # per-vCPU VIRQ cannot move
    g = ev.bind_virq(Virq.CONSOLE, 0)
    ev.bind_vcpu(g, 1)
    assert ev.status(DOMID_SELF, g)["vcpu"] == 1
    ev.close(p)
    assert ev.bind_virq(Virq.TIMER, 0) == p, "closing frees both the port and the VIRQ"


@pytest.mark.parametrize("port", [-1, 4096, 1 << 31, (1 << 32) - 1])
def test_wild_ports(dom, port):
    ev = dom.evtchn
    for op in (ev.send, ev.close, ev.unmask, ev.set_pending, lambda p: ev.status(DOMID_SELF, p),
               lambda p: ev.bind_vcpu(p, 0)):
        with pytest.raises(HypercallError) as e:
            op(port)
        assert errno_of(e) == XenErrno.EINVAL


def test_closed_and_reserved_ports(dom):
    ev = dom.evtchn
    for op in (ev.send, ev.close):
        with pytest.raises(HypercallError):
            op(0)
        with pytest.raises(HypercallError):
            op(5)
    with pytest.raises(HypercallError) as e:
        ev.alloc_unbound(0, 0)
    assert errno_of(e) == XenErrno.EPERM
    with pytest.raises(HypercallError) as e:
        ev.alloc_unbound(DOMID_SELF, 77)
    assert errno_of(e) == XenErrno.ESRCH
    with pytest.raises(HypercallError) as e:
        ev.bind_ipi(2)
    assert errno_of(e) == XenErrno.ENOENT


def test_port_exhaustion_and_reset():
    d = FakeDomain(nr_vcpus=1)
    try:
        ev = EventChannels(d.phys, 0x2000, 1, nr_ports=64)
        ports = [ev.bind_ipi(0) for _ in range(63)]
        assert ports == list(range(1, 64))
        with pytest.raises(HypercallError) as e:
            ev.bind_ipi(0)
        assert errno_of(e) == XenErrno.ENOSPC
        ev.reset()
        assert ev.bind_ipi(0) == 1
    finally:
        d.close()


def test_set_pending_hammer_no_lost_bits(dom):
    """Raisers on several threads race a consumer doing what Linux's upcall
    handler does (clear upcall_pending, xchg the selector, fetch-and-clear the
    pending words it names). Every raise must be consumed exactly once."""
    ev = dom.evtchn
    nports = 2048
    rounds = 3
    raisers = 3
    ports = list(range(1, nports))
    chunks = [ports[i::raisers] for i in range(raisers)]
    seen = [0] * nports
    stop = threading.Event()
    phys = dom.phys

    def consume():
        if not phys.atomic_xchg_u8(vi(0) + VCPU_INFO_UPCALL_PENDING, 0) and stop.is_set():
            pass
        words = phys.atomic_xchg_u64(vi(0) + VCPU_INFO_PENDING_SEL, 0)
        while words:
            w = (words & -words).bit_length() - 1
            words &= words - 1
            bits = phys.atomic_and_u64(PENDING + 8 * w, 0)
            while bits:
                b = (bits & -bits).bit_length() - 1
                bits &= bits - 1
                seen[w * 64 + b] += 1

    def consumer():
        while not stop.is_set():
            consume()
        consume()

    raised = [0] * nports

    def raiser(chunk, seed):
        rnd = random.Random(seed)
        for _ in range(rounds):
            order = list(chunk)
            rnd.shuffle(order)
            for p in order:
                # raise only when the previous raise was consumed, so counts must match
                while phys.atomic_load_u64(PENDING + 8 * (p // 64)) >> (p % 64) & 1:
                    pass
                ev.set_pending(p)
                raised[p] += 1

    c = threading.Thread(target=consumer)
    c.start()
    ts = [threading.Thread(target=raiser, args=(ch, i)) for i, ch in enumerate(chunks)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    stop.set()
    c.join(60)
    assert not c.is_alive() and not any(t.is_alive() for t in ts)
    assert sum(raised) == rounds * len(ports)
    left = [p for p in ports if ev.is_pending(p)]
    assert left == [], f"pending bits stranded without a selector bit: {left[:10]}"
    assert seen[1:] == raised[1:], "every raise consumed exactly once"
