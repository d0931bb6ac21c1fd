"""The FIFO event channel ABI, Python's half (evtchn.py): the three
hypercalls with Xen's answers, the raiser's protocol (PENDING, then the
target vCPU's "to link" bitmap and a kick), the switch from 2-level, and
hostile event words / frames.  Linking itself is the shim's
(events.c fifo_drain): guests/testguests/fifo.c tests it in a real shim."""
from __future__ import annotations

import threading

import pytest

from pvfake import SCRATCH, FakeDomain
from pyvmm.xen_abi.abi import (
    EVTCHN_FIFO_LINK_BITS,
    EVTCHN_FIFO_LINKED,
    EVTCHN_FIFO_MASKED,
    EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES,
    EVTCHN_FIFO_PENDING,
    EVTCHN_FIFO_PRIORITY_DEFAULT,
    PAGE_SHIFT,
    EvtchnInitControl,
    EvtchnOp,
    EvtchnSetPriority,
    Hypercall,
    HypercallError,
    XenErrno as E,
)
from pyvmm.xen_abi.hypervisor.evtchn import FifoShim
from pyvmm.xen_abi.memory.page_types import PGT_L1, PGT_TYPE_SHIFT, PGT_WRITABLE

ARG = SCRATCH + 0x1000
ARRAY_MFN = 0x500        # guest RAM frames of the fake domain (16 MiB)
CB_MFN = 0x501
CB1_MFN = 0x502
PENDING, MASKED, LINKED = 1 << EVTCHN_FIFO_PENDING, 1 << EVTCHN_FIFO_MASKED, 1 << EVTCHN_FIFO_LINKED


class RecordingShim(FifoShim):
    def __init__(self):
        self.on = False
        self.pages, self.cbs, self.prio, self.queued = {}, {}, {}, []

    def enable(self, on):
        self.on = on

    def set_array_page(self, index, gpa, nr_words):
        self.pages[index] = (gpa, nr_words)

    def set_control_block(self, vcpu, gpa):
        self.cbs[vcpu] = gpa

    def set_priority(self, port, priority):
        self.prio[port] = priority

    def queue(self, vcpu, port):
        self.queued.append((vcpu, port))


@pytest.fixture
def dom():
    d = FakeDomain(nr_vcpus=2)
    d.shim = d.evtchn.fifo_shim = RecordingShim()
    yield d
    d.close()


def evop(d, op, struct, value, vcpu=0):
    d.ctx().vm.write_struct(struct, ARG, value)
    return d.call(Hypercall.event_channel_op, op, ARG, vcpu=vcpu)


def init(d, vcpu=0, mfn=CB_MFN, offset=0):
    return evop(d, EvtchnOp.init_control, EvtchnInitControl,
                {"control_gfn": mfn, "offset": offset, "vcpu": vcpu, "link_bits": 0})


def expand(d, mfn=ARRAY_MFN):
    d.ctx().vm.write_u64(ARG, mfn)
    return d.call(Hypercall.event_channel_op, EvtchnOp.expand_array, ARG)


def word(d, port, mfn=ARRAY_MFN):
    return d.phys.read_u32((mfn << PAGE_SHIFT) + 4 * port)


def set_word(d, port, value, mfn=ARRAY_MFN):
    d.phys.write_u32((mfn << PAGE_SHIFT) + 4 * port, value)


def fifo_domain(d):
    assert init(d) == 0 and expand(d) == 0 and init(d, vcpu=1, mfn=CB1_MFN) == 0
    return d.evtchn


def test_init_control_answers(dom):
    vm = dom.ctx().vm
    assert init(dom, vcpu=2) == -E.ENOENT                  # no such vCPU
    assert init(dom, offset=4) == -E.EINVAL                # not 8-byte aligned
    assert init(dom, offset=4096 - 72 + 8) == -E.EINVAL    # crosses the page
    assert init(dom, mfn=1 << 40) == -E.EINVAL             # not the guest's RAM
    dom.types.set(0x600, (PGT_L1 << PGT_TYPE_SHIFT) | 1)   # a page table
    assert init(dom, mfn=0x600) == -E.EINVAL
    assert vm.read_struct(EvtchnInitControl, ARG).link_bits == 0   # OUT only on success
    assert not dom.evtchn.fifo
    assert init(dom, offset=4096 - 72) == 0
    assert vm.read_struct(EvtchnInitControl, ARG).link_bits == EVTCHN_FIFO_LINK_BITS
    assert dom.evtchn.fifo and dom.shim.on
    assert dom.shim.cbs[0] == (CB_MFN << PAGE_SHIFT) + 4096 - 72
    assert init(dom) == -E.EINVAL                          # twice on one vCPU
    assert init(dom, vcpu=1, mfn=CB1_MFN) == 0             # another vCPU: fine
    # the frames are held writable: they cannot become page tables
    assert dom.page_types.word(CB_MFN) >> PGT_TYPE_SHIFT & 7 == PGT_WRITABLE
    assert dom.page_types.in_use(CB_MFN)


def test_expand_array_answers(dom):
    assert expand(dom) == -E.EOPNOTSUPP                    # before init_control
    assert init(dom) == 0
    assert expand(dom, 1 << 40) == -E.EINVAL
    dom.types.set(0x600, (PGT_L1 << PGT_TYPE_SHIFT) | 1)
    assert expand(dom, 0x600) == -E.EINVAL
    assert expand(dom) == 0
    assert dom.shim.pages[0] == (ARRAY_MFN << PAGE_SHIFT, 1024)
    assert dom.page_types.in_use(ARRAY_MFN)
    # Xen's cap is the array's 128 pages, whatever the port limit
    for i in range(1, EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES):
        assert expand(dom, 0x700 + i) == 0
    assert expand(dom, 0x700) == -E.ENOSPC
    assert list(dom.shim.pages) == [0, 1, 2, 3]            # only the pages ports reach


def test_set_priority_answers(dom):
    ev = dom.evtchn
    assert evop(dom, EvtchnOp.set_priority, EvtchnSetPriority, {"port": 1, "priority": 3}) == -E.ENOSYS
    ev_ = fifo_domain(dom)
    p = ev_.bind_ipi(0)
    assert ev.priority(p) == EVTCHN_FIFO_PRIORITY_DEFAULT == 7
    assert evop(dom, EvtchnOp.set_priority, EvtchnSetPriority, {"port": p, "priority": 16}) == -E.EINVAL
    assert evop(dom, EvtchnOp.set_priority, EvtchnSetPriority, {"port": 1 << 20, "priority": 1}) == -E.EINVAL
    assert evop(dom, EvtchnOp.set_priority, EvtchnSetPriority, {"port": p, "priority": 15}) == 0
    assert ev.priority(p) == 15 and dom.shim.prio[p] == 15
    assert evop(dom, EvtchnOp.set_priority, EvtchnSetPriority, {"port": p, "priority": 0}) == 0
    ev.close(p)
    assert ev.bind_ipi(0) == p and ev.priority(p) == 7     # a new binding: the default again


def test_raise_queues_for_the_notify_vcpu_and_kicks(dom):
    ev = fifo_domain(dom)
    p = ev.bind_virq(5, 0)          # global VIRQ: vCPU 0
    ev.bind_vcpu(p, 1)
    dom.kicks.clear()
    assert ev.raise_port(p) == 1
    assert word(dom, p) == PENDING and dom.shim.queued == [(1, p)] and dom.kicks == [1]
    assert ev.is_pending(p)
    # nothing in the 2-level bitmaps any more
    assert dom.phys.read_u64(dom.shared_info_gpa + 2048) == 0


def test_masked_or_linked_port_is_not_queued(dom):
    ev = fifo_domain(dom)
    p = ev.bind_virq(5, 0)
    set_word(dom, p, MASKED)
    dom.kicks.clear()
    ev.raise_port(p)
    assert word(dom, p) == MASKED | PENDING and dom.shim.queued == []
    assert dom.kicks == [0]          # newly pending while masked: wakes a poller
    ev.raise_port(p)
    assert dom.kicks == [0]          # already pending: nothing more
    # unmask relinks a pending port
    ev.unmask(p)
    assert word(dom, p) == PENDING and dom.shim.queued == [(0, p)]
    # already LINKED: the guest will see PENDING when it walks the queue
    set_word(dom, p, LINKED)
    ev.raise_port(p)
    assert word(dom, p) == LINKED | PENDING and dom.shim.queued == [(0, p)]


def test_unmask_of_a_quiet_port_queues_nothing(dom):
    ev = fifo_domain(dom)
    p = ev.bind_ipi(1)
    set_word(dom, p, MASKED)
    ev.unmask(p)
    assert word(dom, p) == 0 and dom.shim.queued == []


def test_close_clears_pending_and_linked_ports_are_not_reused(dom):
    ev = fifo_domain(dom)
    p = ev.bind_ipi(0)
    ev.raise_port(p)
    set_word(dom, p, word(dom, p) | LINKED)
    ev.close(p)
    assert word(dom, p) == LINKED      # PENDING cleared; the guest unlinks it
    q = ev.bind_ipi(0)
    assert q != p                      # Xen's evtchn_is_busy
    set_word(dom, p, 0)
    assert ev.bind_ipi(0) == p


def test_switch_carries_pending_ports_over(dom):
    """Xen's setup_ports: a port pending under 2-level is raised once its
    event word exists."""
    ev = dom.evtchn
    p = ev.bind_ipi(1)
    q = ev.bind_ipi(0)
    ev.raise_port(p)
    assert init(dom) == 0 and init(dom, vcpu=1, mfn=CB1_MFN) == 0
    assert ev.is_masked(p)             # no event word yet
    ev.raise_port(q)                   # pending while its page is missing
    assert dom.shim.queued == []
    dom.kicks.clear()
    assert expand(dom) == 0
    assert sorted(dom.shim.queued) == [(0, q), (1, p)] and sorted(dom.kicks) == [0, 1]
    assert word(dom, p) == word(dom, q) == PENDING


def test_no_control_block_drops_the_event(dom):
    ev = dom.evtchn
    assert init(dom) == 0 and expand(dom) == 0
    p = ev.bind_ipi(1)
    ev.raise_port(p)
    assert word(dom, p) == 0 and dom.shim.queued == []


def test_reset_goes_back_to_two_level_and_gives_the_frames_back(dom):
    ev = fifo_domain(dom)
    p = ev.bind_ipi(0)
    dom.ctx().vm.write(ARG, (0x7FF0).to_bytes(2, "little"))
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.reset, ARG) == 0
    assert not ev.fifo and not dom.shim.on
    for mfn in (ARRAY_MFN, CB_MFN, CB1_MFN):
        assert not dom.page_types.in_use(mfn)
    p = ev.bind_ipi(0)
    ev.raise_port(p)
    assert ev.is_pending(p) and word(dom, p) == 0   # the 2-level bitmap again
    assert init(dom) == 0                            # and FIFO may start over


def test_hostile_event_words(dom):
    """Whatever the guest writes in its words, Python does a bounded
    number of locked operations and touches nothing else."""
    ev = fifo_domain(dom)
    ports = [ev.bind_ipi(i % 2) for i in range(1, 9)]
    before = dom.phys.read(ARRAY_MFN << PAGE_SHIFT, 4096)
    for value in (0xFFFFFFFF, LINKED | ports[0], 0x1FFFF, 1 << 28, MASKED | LINKED | 0x1FFFF):
        for p in ports:
            set_word(dom, p, value)
        dom.shim.queued.clear()
        for p in ports:
            ev.raise_port(p)
            ev.unmask(p)
            ev.is_pending(p)
        if value & (MASKED | LINKED) == 0:
            assert {p for _, p in dom.shim.queued} == set(ports)
        for p in ports:
            assert word(dom, p) & ~(MASKED) == (value | PENDING) & ~MASKED
    # neighbours of the ports' words were never written
    after = dom.phys.read(ARRAY_MFN << PAGE_SHIFT, 4096)
    assert all(after[4 * i:4 * i + 4] == before[4 * i:4 * i + 4]
               for i in range(1024) if i not in ports)


def test_hammer_raise_and_guest_unmask(dom):
    """Back-end threads raise while the "guest" flips MASKED and PENDING:
    every raise of an unmasked port either queues it or finds it LINKED /
    MASKED; the word's other bits are never lost."""
    ev = fifo_domain(dom)
    ports = [ev.bind_ipi(0) for _ in range(8)]
    stop = threading.Event()
    errors = []

    def guest():
        while not stop.is_set():
            for p in ports:
                ev.mask(p)
                ev.clear_pending(p)
                ev._fifo_and(p, ~MASKED)

    def raiser():
        try:
            for _ in range(300):
                for p in ports:
                    ev.raise_port(p)
        except Exception as e:      # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=guest)] + [threading.Thread(target=raiser) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert not errors
    for p in ports:
        ev.raise_port(p)
        assert word(dom, p) & PENDING


def test_bad_ports(dom):
    ev = fifo_domain(dom)
    for port in (ev.nr_ports, 1 << 20, 1 << 31):
        with pytest.raises(HypercallError) as e:
            ev.set_priority(port, 1)
        assert e.value.errno == E.EINVAL
