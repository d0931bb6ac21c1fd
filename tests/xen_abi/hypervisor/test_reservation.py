"""The balloon (reservation.py) and pyvmm's writers: a frame the guest gives
back while pyvmm holds it writable keeps its memory until pyvmm lets go."""
from __future__ import annotations

import pytest

from pvfake import SCRATCH, FakeDomain
from pyvmm.xen_abi.abi import DOMID_SELF, PAGE_SIZE, Hypercall, MemoryOp, XenMemoryReservation
from pyvmm.xen_abi.hypervisor.reservation import Reservation

HELD = 0x800        # a RAM frame a back-end has mapped writable
FREE = 0x801        # one nobody uses
LIST = SCRATCH + 0x1000


@pytest.fixture
def dom():
    d = FakeDomain(nr_vcpus=1)
    d.m2p = {}
    d.reservation = Reservation(d.ram, m2p_write=d.m2p.__setitem__, page_types=d.page_types)
    yield d
    d.close()


def decrease(d, *frames) -> int:
    vm = d.ctx().vm
    for i, f in enumerate(frames):
        vm.write_u64(LIST + 8 * i, f)
    vm.write_struct(XenMemoryReservation, SCRATCH, {"extent_start": LIST, "nr_extents": len(frames),
                                                    "extent_order": 0, "mem_flags": 0, "domid": DOMID_SELF})
    return d.call(Hypercall.memory_op, MemoryOp.decrease_reservation, SCRATCH)


def contents(d, frame: int) -> bytes:
    return d.ram.read(frame * PAGE_SIZE, 8)


def test_a_frame_pyvmm_writes_is_not_discarded_until_it_is_let_go(dom):
    for f in (HELD, FREE):
        dom.ram.write(f * PAGE_SIZE, b"contents")
    assert dom.page_types.take_writable(HELD)
    assert decrease(dom, HELD, FREE) == 2
    r = dom.reservation
    assert r._free == [FREE] and r._typed_out == [HELD]
    assert contents(dom, FREE) == bytes(8), "discarded: its memory went back to the host"
    assert contents(dom, HELD) == b"contents"
    dom.page_types.drop_writable(HELD)
    assert decrease(dom) == 0           # the next balloon operation reaps it
    assert sorted(r._free) == [HELD, FREE] and r._typed_out == []
    assert contents(dom, HELD) == bytes(8)
