"""Counted page types: one 32-bit word per guest RAM frame, shared with the shim.

Xen keeps a type and a type count per frame (arch/x86/mm.c): a frame is a
page table of one level (L1..L4), or writable, or nothing, and it may change
type only when its count is zero. That is what stops a PV guest from
writing its own page tables behind the hypervisor's back. The shim owns the
guest's side of the model (shim/mmu.c: page-table entries, pins, base
pointers, validation on promotion); this module declares the word once
(shim/layout.py generates the C names from it) and is how pyvmm's own
writers take part: a back-end that writes into a guest frame (a writable
grant map, a copy to the guest, a shared ring) holds a *writable* reference
on it for as long as it may write, so the guest cannot make that frame a
page table meanwhile, and a frame that is already a page table is refused.

Both sides change a word only with a compare-and-swap, so a vCPU promoting
a frame and a back-end thread taking a reference on it cannot both win.

The word:
    bits  0..23  count: references of the current type (pins, base
                 pointers, entries of validated tables, writable mappings,
                 pyvmm's own writers)
    bits 24..26  type: PGT_NONE, PGT_L1..PGT_L4, PGT_WRITABLE
    bit  28      pinned (the pin holds one of the count)
At count 0 a frame keeps its last type (PGT_NONE: never used), so that the
shim sees a change of type and flushes what the TLBs may still hold of the
frame's former life.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from typing import Callable, Iterable, Iterator

from pyvmm.xen_abi.memory.physmem import SEQ_CST, atomics

__all__ = ["PGT_COUNT_MASK", "PGT_TYPE_SHIFT", "PGT_TYPE_MASK", "PGT_NONE", "PGT_L1", "PGT_L2",
           "PGT_L3", "PGT_L4", "PGT_WRITABLE", "PGT_PINNED", "PAGE_TYPE_BYTES", "TLB_STAMP_BYTES",
           "PageTypes", "NotWritable", "TypeWordError", "type_name"]

log = logging.getLogger(__name__)

PGT_COUNT_MASK = 0x00FF_FFFF
PGT_TYPE_SHIFT = 24
PGT_TYPE_MASK = 0x7 << PGT_TYPE_SHIFT
PGT_NONE = 0
PGT_L1, PGT_L2, PGT_L3, PGT_L4 = 1, 2, 3, 4
PGT_WRITABLE = 5
PGT_PINNED = 1 << 28

PAGE_TYPE_BYTES = 4   # one word per RAM frame
TLB_STAMP_BYTES = 8   # the shim's per-frame TLB clock (mmu.c), next to the words

_NAMES = {PGT_NONE: "none", PGT_L1: "L1", PGT_L2: "L2", PGT_L3: "L3", PGT_L4: "L4",
          PGT_WRITABLE: "writable"}


def type_name(word: int) -> str:
    t = (word & PGT_TYPE_MASK) >> PGT_TYPE_SHIFT
    name = _NAMES.get(t, f"type {t}")
    pinned = " pinned" if word & PGT_PINNED else ""
    return f"{name}{pinned} x{word & PGT_COUNT_MASK}"


class NotWritable(Exception):
    """take_writable refused a frame: it is a page table (or its count is full)."""

    def __init__(self, mfn: int, word: int):
        super().__init__(f"frame {mfn:#x} cannot be written ({type_name(word)})")
        self.mfn = mfn
        self.word = word


class TypeWordError(RuntimeError):
    """A writable reference given back finds a word that does not hold it:
    a pyvmm bug, or a guest that subverted the shim and rewrote the word."""

    def __init__(self, mfn: int, word: int):
        super().__init__(f"frame {mfn:#x}: dropping a writable reference it does not hold "
                         f"(word {word:#010x}: {type_name(word)})")
        self.mfn = mfn
        self.word = word


class PageTypes:
    """The type words of `ram_pages` frames at host address `address` (the
    VMM region's page-type array)."""

    def __init__(self, address: int, ram_pages: int):
        self.address = int(address)
        self.ram_pages = ram_pages
        # pyvmm's own takes against discard_if_unused: a frame found unused
        # is gone before a pyvmm writer can take it
        self._takes = threading.Lock()
        self._reported: set[int] = set()     # frames whose broken word was logged

    def _addr(self, mfn: int) -> int:
        if not 0 <= mfn < self.ram_pages:
            raise ValueError(f"frame {mfn:#x} is not guest RAM")
        return self.address + PAGE_TYPE_BYTES * mfn

    def word(self, mfn: int) -> int:
        return ctypes.c_uint32.from_address(self._addr(mfn)).value

    def is_ram(self, mfn: int) -> bool:
        """The frame has a type word (beyond RAM, the VMM region's frames
        can never be page tables)."""
        return 0 <= mfn < self.ram_pages

    def in_use(self, mfn: int) -> bool:
        """Any reference at all: a page table, or mapped writable by the
        guest, or written by pyvmm."""
        return self.word(mfn) & PGT_COUNT_MASK != 0

    def take_writable(self, mfn: int) -> bool:
        """One writable reference (Xen's get_page_type(PGT_writable_page)):
        False, and nothing taken, when the frame is a page table or its
        count is full."""
        addr = self._addr(mfn)
        with self._takes:
            seen = ctypes.c_uint32(ctypes.c_uint32.from_address(addr).value)
            while True:
                old = seen.value
                t = (old & PGT_TYPE_MASK) >> PGT_TYPE_SHIFT
                # a page table, even one with no references left, is refused:
                # only the shim can flush what the vCPUs may still cache of it
                if t not in (PGT_NONE, PGT_WRITABLE) or old & PGT_COUNT_MASK == PGT_COUNT_MASK:
                    return False
                new = (PGT_WRITABLE << PGT_TYPE_SHIFT) | ((old & PGT_COUNT_MASK) + 1)
                if atomics.cmpxchg_4(addr, ctypes.byref(seen), new, SEQ_CST, SEQ_CST):
                    return True

    def drop_writable(self, mfn: int) -> None:
        """Give back a reference take_writable gave."""
        addr = self._addr(mfn)
        seen = ctypes.c_uint32(ctypes.c_uint32.from_address(addr).value)
        while True:
            old = seen.value
            if (old & PGT_TYPE_MASK) >> PGT_TYPE_SHIFT != PGT_WRITABLE or not old & PGT_COUNT_MASK:
                raise TypeWordError(mfn, old)
            # at count 0 the frame stays "writable": a guest mapping that
            # went before may still be cached, and the shim flushes those
            # only when a frame changes type
            new = old - 1
            if atomics.cmpxchg_4(addr, ctypes.byref(seen), new, SEQ_CST, SEQ_CST):
                return

    # ---- pyvmm's writers ----

    def release_writable(self, mfn: int, holder: str) -> None:
        """drop_writable for a writer that must go on (a back-end thread, a
        hypercall that has written).  A word that does not hold the
        reference can only be a guest's doing, through a subverted shim: it
        is the guest's own memory and guards only the guest's own tables,
        so it is left as the guest made it, with one line per frame."""
        try:
            self.drop_writable(mfn)
        except TypeWordError as e:
            if mfn not in self._reported:
                self._reported.add(mfn)
                log.error("%s: %s; the guest rewrote its type word, left as it is", holder, e)

    def take_all_writable(self, frames: Iterable[int]) -> tuple[int, ...]:
        """A writable reference on each RAM frame of `frames`, all or none;
        the frames now held (for release_writable).  NotWritable, holding
        nothing, when one is refused."""
        held: list[int] = []
        for mfn in frames:
            if not self.is_ram(mfn):
                continue
            if not self.take_writable(mfn):
                for h in held:
                    self.release_writable(h, "undoing a refused take")
                raise NotWritable(mfn, self.word(mfn))
            held.append(mfn)
        return tuple(held)

    @contextlib.contextmanager
    def writing(self, frames: Iterable[int], holder: str) -> Iterator[None]:
        """Hold a writable reference on the RAM frames of `frames` while the
        block writes to them (NotWritable, nothing held, if one is a page
        table), so that no vCPU can make one a page table meanwhile."""
        held = self.take_all_writable(frames)
        try:
            yield
        finally:
            for mfn in held:
                self.release_writable(mfn, holder)

    def discard_if_unused(self, mfn: int, discard: Callable[[], None]) -> bool:
        """discard() when nothing references the frame, with no take_writable
        of pyvmm's in between: a frame pyvmm writes is never discarded under
        it.  False, nothing done, when the frame is in use."""
        with self._takes:
            if self.in_use(mfn):
                return False
            discard()
            return True
