"""Fuzzing the Python hypercall handlers (HypercallDispatcher.dispatch) with
random hypercall numbers, sub-ops, arguments and guest memory, on the fake
PV domain of tests/pvfake.py with a balloon (Reservation) attached.

Each input is a short sequence of hypercalls (so that state carries: bind
then close, register then re-register, decrease then populate), from
either vCPU, now and then from user mode; pointer arguments mostly land in
a mapped scratch area whose contents the input writes as 8-byte words
(small counts, scratch pointers, boundary values, noise).

Oracles: dispatch() returns an int that is >= 0 or minus a Xen errno;
nothing but DomainShutdown leaves it; no handler bug is caught and logged
by the dispatcher (the Oracle sees any error logged with a traceback); the
reservation's frame count stays within [0, max_pages] and matches its
released-frame map.
"""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzlib import Finding, Input, Oracle, ci_settings
from pvfake import KBASE, PT_POOL, RAM_SIZE, SCRATCH, SCRATCH_GPA, FakeDomain

GRANT_VA = KBASE + 0x300000     # a 4 KiB-mapped kernel page: its L1 slot takes grant maps
from pyvmm.xen_abi.abi import (
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    DOMID_SELF,
    GnttabCopy,
    GnttabMapGrantRef,
    GnttabUnmapAndReplace,
    ConsoleIoCmd,
    EvtchnOp,
    GnttabOp,
    VCPU_INFO_SIZE,
    Hypercall,
    MemoryOp,
    PhysdevOp,
    SchedOp,
    VcpuOp,
    XenErrno,
    XenVer,
)
from pyvmm.xen_abi.hypervisor.grant_table import GrantTable
from pyvmm.xen_abi.hypervisor.hypercalls.context import DomainShutdown, ShimRequest
from pyvmm.xen_abi.hypervisor.hypercalls.dispatch import HypercallDispatcher
from pyvmm.xen_abi.hypervisor.reservation import Reservation
from pyvmm.xen_abi.memory.page_types import PGT_L1, PGT_TYPE_SHIFT

from pvfake import GNTTAB_GPA, GNTTAB_MAX_FRAMES, SHARED_INFO_GPA

H = Hypercall
SUBOPS = {
    H.memory_op: [int(x) for x in MemoryOp] + [11, 0x10000 | 1],
    H.grant_table_op: [int(x) for x in GnttabOp],
    H.event_channel_op: [int(x) for x in EvtchnOp],
    H.vcpu_op: [int(x) for x in VcpuOp],
    H.sched_op: [int(x) for x in SchedOp],
    H.xen_version: [int(x) for x in XenVer],
    H.console_io: [int(x) for x in ConsoleIoCmd],
    H.physdev_op: [int(x) for x in PhysdevOp],
    H.vm_assist: [0, 1, 2],
}
CALLS = list(SUBOPS) * 4 + [int(h) for h in Hypercall] + [49, 64, 0xFFFFFFFF]
ERRNOS = {int(e) for e in XenErrno}
SCRATCH_SIZE = 64 * 1024
PT_BYTES = 0x100000            # the fake's page tables live in [PT_POOL, +1 MiB)


class Harness:
    MAX_SIZE = 2048

    def __init__(self):
        self.d = FakeDomain()
        self.pt = self.d.phys.read(PT_POOL, PT_BYTES)

    def close(self):
        self.d.close()

    def _fresh(self):
        """The domain as built: page tables, event channels, grant table,
        dispatcher and balloon anew (RAM elsewhere keeps what it has)."""
        d = self.d
        d.phys.write(PT_POOL, self.pt)
        d.vmm.fill(0, d.vmm.size, 0)
        # the same EventChannels, its ports closed (building 4096 ports anew
        # costs 5 ms); ports are allocated lowest first: an input opens a few
        ev = d.evtchn
        for p in range(1, 64):
            if ev.ports[p].state:
                ev.close(p)
        ev._vcpu_info = [SHARED_INFO_GPA + v * VCPU_INFO_SIZE for v in range(d.nr_vcpus)]
        if any(ev.virq_to_port) or any(p.state for p in ev.ports[64:80]):
            raise Finding("closing every port left bindings behind")
        d.types.clear()
        d.gnttab = GrantTable(d.phys, GNTTAB_GPA, max_frames=GNTTAB_MAX_FRAMES, domid=1,
                              page_types=d.page_types)
        for va in (GRANT_VA, GRANT_VA + 4096):     # empty L1 slots for grant maps (the fake's
            d.pt.set_entry(va, 1, 0)                # tables are untyped: no references to undo)
        # a few grants of the domain to itself (refs the words often name)
        for ref in range(8, 24):
            d.gnttab.write_entry(ref, GTF_permit_access | (GTF_readonly if ref % 4 == 0 else 0), 1,
                                 0x200 + ref)
        d.m2p = {}
        d.reservation = Reservation(d.ram, m2p_write=d.m2p.__setitem__, page_types=d.page_types)
        d.dispatcher = HypercallDispatcher(d)
        d.console.clear()
        d.kicks.clear()

    @staticmethod
    def _word(inp: Input) -> int:
        k = inp.u8()
        if k < 70:
            return inp.below(64)
        if k < 140:
            return SCRATCH + inp.below(SCRATCH_SIZE // 8) * 8
        if k < 170:
            return inp.interesting(64)
        if k < 185:
            return inp.below(RAM_SIZE // 4096)           # a frame number
        if k < 215:
            return 0x7FF0 + inp.below(32)                  # near DOMID_SELF
        return inp.u64()

    def _pointer(self, inp: Input) -> int:
        k = inp.u8()
        if k < 200:
            return SCRATCH + inp.below(SCRATCH_SIZE // 8) * 8 + (inp.below(8) if k > 190 else 0)
        return inp.choice((0, 8, KBASE + RAM_SIZE, KBASE + RAM_SIZE - 4, 1 << 47, (1 << 64) - 8,
                           0xFFFF_8000_0000_0000, SCRATCH + SCRATCH_SIZE * 64 - 4, inp.u64()))

    def _grant_op(self, inp: Input, sub: int, va: int) -> None:
        """A map / unmap / copy op that is nearly right (refs the domain
        granted itself, its domid, slots of a kernel L1), written at va."""
        vm = self.d.ctx().vm
        ref = lambda: 8 + inp.below(16) if inp.chance(220) else inp.u32()          # noqa: E731
        dom = lambda: inp.choice((1, 1, 1, DOMID_SELF, 0, inp.u16()))              # noqa: E731
        addr = lambda: inp.choice((GRANT_VA, GRANT_VA + 4096, self.d.pt.slot(GRANT_VA, 1),   # noqa: E731
                                   0, 1 << 47, inp.u64()))
        try:
            if sub == GnttabOp.map_grant_ref:
                vm.write_struct(GnttabMapGrantRef, va, dict(host_addr=addr(), flags=inp.below(32),
                                                              ref=ref(), dom=dom(), status=0, handle=0,
                                                              dev_bus_addr=0))
            elif sub in (GnttabOp.unmap_grant_ref, GnttabOp.unmap_and_replace):
                vm.write_struct(GnttabUnmapAndReplace, va, dict(host_addr=addr(), new_addr=addr(),
                                                                handle=inp.below(4), status=0))
            elif sub == GnttabOp.copy:
                side = lambda: dict(u=inp.choice((ref(), 0x200 + inp.below(32))), domid=dom(),   # noqa: E731
                                    offset=inp.below(4200))
                vm.write_struct(GnttabCopy, va, dict(source=side(), dest=side(), len=inp.below(4200),
                                                     flags=inp.below(4), status=0))
        except Exception:      # va not mapped: the call will say -EFAULT
            pass

    def one(self, data: bytes) -> None:
        inp = Input(data)
        self._fresh()
        d = self.d
        ram = d.ram
        for _ in range(1 + inp.below(8)):
            if not inp.remaining():
                break
            # the argument area, as the guest filled it
            at = inp.below(SCRATCH_SIZE // 8) * 8
            words = [self._word(inp) for _ in range(inp.below(24))]
            blob = b"".join(w.to_bytes(8, "little") for w in words)
            ram.write(SCRATCH_GPA + at, blob[:SCRATCH_SIZE - at])
            nr = inp.choice(CALLS)
            sub = inp.choice(SUBOPS.get(nr, [0])) if inp.chance(230) else inp.interesting(32)
            args = [sub, self._pointer(inp), self._word(inp), self._word(inp), inp.u64(), inp.u64()]
            if nr == H.vcpu_op:
                args[1:3] = [inp.below(3) if inp.chance(230) else inp.u32(), self._pointer(inp)]
            elif nr == H.console_io:
                args[1:3] = [inp.below(300) if inp.chance(230) else inp.interesting(32), self._pointer(inp)]
            elif nr == H.grant_table_op:
                args[2] = 1 if inp.chance(220) else inp.interesting(32)
                if inp.chance(128):
                    self._grant_op(inp, sub, args[1])
            if inp.chance(40):      # the shim made a frame a page table
                d.types.set(inp.below(RAM_SIZE // 4096), PGT_L1 << PGT_TYPE_SHIFT | 1)
            ctx = d.ctx(inp.below(2))
            ctx.in_kernel_mode = inp.chance(245)
            try:
                rv = d.dispatcher.dispatch(ctx, nr, args)
                while isinstance(rv, ShimRequest):     # the shim's grant PTEs (pvfake)
                    rv = d.dispatcher.resume(ctx, d.grant_pte(*rv.args))
            except DomainShutdown:
                return
            if not isinstance(rv, int):
                raise Finding(f"hypercall {nr}({sub:#x}) returned {rv!r}")
            if rv < 0 and -rv not in ERRNOS:
                raise Finding(f"hypercall {nr}({sub:#x}) returned {rv}, not -errno")
            gt = d.gnttab
            for ref in range(min(64, gt.nr_entries)):
                e, pin = gt.read_entry(ref), gt._pins.get(ref)
                want = 0 if pin is None else GTF_reading | (GTF_writing if pin.writers else 0)
                if e.status != want:
                    raise Finding(f"grant ref {ref}: status {e.status:#x}, its pin wants {want:#x}")
            r = d.reservation
            if not 0 <= r.nr_pages <= r.max_pages or r.nr_pages != r.ram_pages - sum(r._released):
                raise Finding(f"reservation holds {r.nr_pages} of {r.max_pages} pages, "
                              f"{sum(r._released)} released")


@ci_settings(2000)
@given(st.binary(max_size=Harness.MAX_SIZE))
def test_fuzz_hypercalls(harness, data):
    with Oracle() as oracle:
        oracle.run(harness, data)


@pytest.fixture(scope="module")
def harness():
    h = Harness()
    yield h
    h.close()
