"""A small guest for fuzzing the split-driver back-ends: RAM filled with a
canary, a grant table whose entries the "guest" may rewrite at the moment
the back-end uses them (`RacingGrantTable.race`), and the bookkeeping of
which frames were ever granted writable (only those may change)."""
from __future__ import annotations

import array
import sys
import time

from fuzzlib import Finding
from pyvmm.backends.xenbus import BackendHost
from pyvmm.vmm.memory import GuestMemory
from pyvmm.xen_abi.abi import (
    GTF_permit_access,
    GTF_readonly,
    GTF_reading,
    GTF_writing,
    PAGE_SIZE,
    XenbusState,
)
from pyvmm.xen_abi.hypervisor.evtchn import EventChannels
from pyvmm.xen_abi.hypervisor.grant_table import ENTRIES_PER_FRAME, GrantTable
from pyvmm.xen_abi.memory.physmem import PhysicalMemory
from pyvmm.xen_abi.xenstore.store import XenstoreStore
from typewords import TypeWords

DOMID = 1
RAM_PAGES = 64
VMM_GPA = 0x1000_0000
GNT_FRAMES = 1
NR_REFS = GNT_FRAMES * ENTRIES_PER_FRAME


def canary(pfn: int) -> bytes:
    return bytes([(pfn * 37 + 0x5A) & 0xFF]) * 7 + bytes([pfn & 0xFF])


class RacingGrantTable(GrantTable):
    """GrantTable whose back-end entry points first call `race(ref)`: the
    guest rewriting grant entries under the back-end, at its worst moment."""

    race = None

    def map(self, ref, domid=0, readonly=False):
        if self.race:
            self.race(ref)
        return super().map(ref, domid, readonly)

    def copy_from_guest(self, ref, offset, length, domid=0):
        if self.race:
            self.race(ref)
        return super().copy_from_guest(ref, offset, length, domid)

    def copy_to_guest(self, ref, offset, data, domid=0):
        if self.race:
            self.race(ref)
        return super().copy_to_guest(ref, offset, data, domid)


class FuzzHost:
    """RAM_PAGES of guest RAM, a one-frame grant table and a store."""

    def __init__(self):
        self.ram = GuestMemory(RAM_PAGES * PAGE_SIZE, name="fuzz-ram")
        self.vmm = GuestMemory(16 * PAGE_SIZE, name="fuzz-vmm")
        self.types = TypeWords(RAM_PAGES)
        phys = PhysicalMemory([(0, self.ram), (VMM_GPA, self.vmm)])
        self.gnttab = RacingGrantTable(phys, VMM_GPA + PAGE_SIZE, max_frames=GNT_FRAMES,
                                       initial_frames=GNT_FRAMES, domid=DOMID,
                                       page_types=self.types.page_types)
        self.host = BackendHost(domid=DOMID, store=XenstoreStore(),
                                evtchn=EventChannels(phys, VMM_GPA, 1, domid=DOMID),
                                gnttab=self.gnttab)
        self.mv = self.ram.view(0, RAM_PAGES * PAGE_SIZE)
        self.canaries = b"".join(canary(p) * (PAGE_SIZE // 8) for p in range(RAM_PAGES))
        self.writable: set[int] = set()       # frames granted writable to dom0 this input
        self.expected = bytearray(self.canaries)   # RAM as the guest wrote it

    def close(self):
        self.mv.release()
        self.ram.close()
        self.vmm.close()
        self.types.close()

    def page(self, pfn: int) -> memoryview:
        return self.mv[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]

    def guest_write(self, gpa: int, data: bytes) -> None:
        self.mv[gpa:gpa + len(data)] = data
        self.expected[gpa:gpa + len(data)] = data

    def fill_canary(self, skip: set[int]) -> None:
        self.expected[:] = self.canaries
        for p in range(RAM_PAGES):
            if p not in skip:
                self.mv[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = self.canaries[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]

    def grant(self, ref: int, flags: int, domid: int, frame: int) -> None:
        """Write an entry as the guest does; remember writable dom0 grants."""
        self.gnttab.write_entry(ref, flags, domid, frame)
        if flags & 3 == GTF_permit_access and not flags & GTF_readonly and domid == 0:
            self.writable.add(frame)

    def _table(self) -> memoryview:
        return self.vmm.view(PAGE_SIZE, GNT_FRAMES * PAGE_SIZE)

    def clear_grants(self, keep: set[int]) -> None:
        saved = {ref: bytes(self._table()[ref * 8:ref * 8 + 8]) for ref in keep}
        self._table()[:] = bytes(GNT_FRAMES * PAGE_SIZE)
        for ref, entry in saved.items():
            self._table()[ref * 8:ref * 8 + 8] = entry

    def check_untouched(self, skip: set[int]) -> None:
        """Frames never granted writable still hold their canary."""
        for p in range(RAM_PAGES):
            if p in skip or p in self.writable:
                continue
            lo, hi = p * PAGE_SIZE, (p + 1) * PAGE_SIZE
            if self.mv[lo:hi] != self.expected[lo:hi]:
                raise Finding(f"frame {p:#x}, never granted writable, was written")

    def check_released(self, keep_mapped: int) -> None:
        """No mapping left behind, no GTF_reading/GTF_writing left set."""
        n = self.gnttab.active_mappings()
        if n != keep_mapped:
            raise Finding(f"{n} grant mappings active after the batch, expected {keep_mapped}")
        entries = array.array("Q", bytes(self._table()))
        busy = GTF_reading | GTF_writing
        for ref, e in enumerate(entries):
            if e & busy and ref not in self.pinned_refs:
                raise Finding(f"grant {ref} left with flags {e & 0xFFFF:#x}")

    pinned_refs: set = set()       # refs the back-end keeps mapped (its rings)


def wait(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise Finding(f"timed out waiting for {what}")
        time.sleep(0.0002)


def track_busy(be) -> None:
    """be.busy: True while its worker serves the ring, follows a state
    change or fails the device; be.calls: how many times it went in.  So
    that a harness can wait for the worker to be done before the next input
    changes RAM or looks at the device's state."""
    be.busy = 0
    be.calls = 0

    def tracked(fn):
        def run(*args):
            be.calls += 1
            be.busy += 1
            try:
                return fn(*args)
            finally:
                be.busy -= 1
        return run
    for name in ("process", "_frontend_changed", "_fail"):
        setattr(be, name, tracked(getattr(be, name)))


def _asleep(be) -> bool:
    """The worker is blocked waiting for work (or gone): inspected on its stack."""
    frame = sys._current_frames().get(be._thread.ident)
    if frame is None:
        return True
    if frame.f_code.co_name != "wait" or not frame.f_code.co_filename.endswith("threading.py"):
        return False
    while frame is not None and frame.f_code.co_name != "_worker":
        frame = frame.f_back
    return frame is not None


def wait_idle(be) -> None:
    """Until the worker sleeps with nothing to do."""
    wait(lambda: not (be._kicked or be._state_seen or be.busy or be._queue_failure is not None) and _asleep(be),
         "the worker idle")


def handshake(store, be, fe_path: str, keys: dict) -> None:
    """The frontend's side of the xenbus handshake, up to Connected."""
    for k, v in keys.items():
        store.write(f"{fe_path}/{k}", str(v))
    wait(lambda: be.backend_state() == XenbusState.InitWait, "backend InitWait")
    store.write(f"{fe_path}/state", str(int(XenbusState.Initialised)))
    wait(lambda: be.connected or be.failed, "backend connected")
    if be.failed:
        raise Finding(f"backend failed to connect: {be.failed}")
    store.write(f"{fe_path}/state", str(int(XenbusState.Connected)))
    wait_idle(be)       # it looks at the ring once connected: not while the input is set up
