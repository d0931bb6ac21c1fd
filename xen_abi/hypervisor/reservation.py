"""A PV domain's memory reservation: which of its RAM frames it holds, as
the balloon protocol moves them (xen/common/memory.c's decrease_reservation,
increase_reservation and populate_physmap for a non-translated guest).

* decrease: the guest hands back machine frames (its balloon driver has
  unmapped them and dropped them from its p2m); each one's M2P entry becomes
  invalid and its memory goes back to the host (MADV_REMOVE on the RAM
  memfd), so the host's memory use falls with the guest's reservation;
* increase / populate: the guest asks for frames back and gets previously
  released ones, zero-filled (a released page reads as zeroes), their
  numbers written into its list (populate also sets their M2P entries to
  the guest frames it names);
* limits as Xen's: never more than max_pages held; an extent order above
  DOMU_MAX_ORDER does nothing; a frame not the guest's (or already
  released) or an extent list it cannot reach ends the batch there; the
  answer is the number of extents done.

Differences from Xen, each harmless to the host:
* Xen frees a page once its last reference is gone.  Here a released frame
  whose type word still counts references (a page table, a writable
  mapping, a writer of pyvmm's: page_types.py) keeps its contents, and is
  neither discarded nor handed out again, until its count is zero; the
  guest's reservation falls at once, as in Xen (Linux's balloon BUG()s on
  a partial decrease).  A frame is discarded only with no pyvmm writer
  able to take it in between (PageTypes.discard_if_unused);
* a hostile guest may keep a mapping of a frame it released and touch it
  again; that re-allocates host memory, but never beyond the RAM it was
  built with (the memfd's size).
"""
from __future__ import annotations

import threading

from pyvmm.xen_abi.abi import PAGE_SHIFT, PAGE_SIZE, XenMemoryReservation
from pyvmm.xen_abi.memory.guest_va import GuestPageFault
from pyvmm.xen_abi.memory.physmem import GuestPhysicalFault

#: Xen's CONFIG_DOMU_MAX_ORDER: the largest extent a domU may ask for.
DOMU_MAX_ORDER = 9
#: An M2P entry for a frame the guest does not hold (Xen's INVALID_M2P_ENTRY).
INVALID_M2P_ENTRY = (1 << 64) - 1


class Reservation:
    """One owner for the domain's frame holdings.

    ram: the RAM GuestMemory; m2p_write(mfn, value) reaches the shim's
    M2P, page_types the frames' type words."""

    def __init__(self, ram, m2p_write, page_types):
        self.ram = ram
        self.ram_pages = ram.size >> PAGE_SHIFT
        self.max_pages = self.ram_pages
        self._released = bytearray(self.ram_pages)   # 1: handed back to the host
        self._free: list[int] = []                   # released frames, for increase/populate
        self._typed_out: list[int] = []              # released but still in use (see _release)
        self._to_discard: list[int] = []
        self.nr_pages = self.ram_pages
        self._m2p_write = m2p_write
        self._page_types = page_types
        self._lock = threading.Lock()                # one balloon operation at a time

    # ---- the hypercalls ----
    def exchange_extents(self, ctx, op: str, arg: int) -> int:
        """XENMEM_decrease_reservation / increase_reservation /
        populate_physmap with its xen_memory_reservation at `arg`.  As in
        Xen, what goes wrong after the request itself was read (an extent
        list the guest cannot read or write, a frame that is not its own, no
        frames left) ends the batch and the answer is the count done."""
        r = ctx.vm.read_struct(XenMemoryReservation, arg)      # a fault here: -EFAULT
        if r.extent_order > DOMU_MAX_ORDER:
            return 0
        pages = 1 << r.extent_order
        done = 0
        with self._lock:
            self._reap()
            try:
                for i in range(r.nr_extents):
                    slot = r.extent_start + 8 * i
                    if op == "decrease":
                        if not self._release(ctx.vm.read_u64(slot), pages):
                            break
                        done += 1
                        continue
                    gpfn = ctx.vm.read_u64(slot) if op == "populate" else None
                    first = self._take(pages)
                    if first is None:
                        break
                    try:
                        if r.extent_start:      # increase may pass no list
                            ctx.vm.write_u64(slot, first)
                    except (GuestPageFault, GuestPhysicalFault):
                        self._give_back(first, pages)
                        raise
                    if gpfn is not None:
                        for k in range(pages):
                            self._m2p_write(first + k, gpfn + k)
                    done += 1
            except (GuestPageFault, GuestPhysicalFault):
                pass
        return done

    # ---- frames ----
    def _release(self, mfn: int, pages: int) -> bool:
        if mfn % pages or not 0 <= mfn <= self.ram_pages - pages:
            return False
        frames = range(mfn, mfn + pages)
        if any(self._released[f] for f in frames):
            return False
        self.nr_pages -= pages
        for f in frames:
            self._released[f] = 1
            self._m2p_write(f, INVALID_M2P_ENTRY)
            self._to_discard.append(f)
        self._discard_pending()
        return True

    def _discard_pending(self) -> None:
        """Free the frames to discard, but those still in use: a page table
        may be live, a writer may still write; they keep their contents
        until their count is zero (_reap), as Xen frees a page only when its
        last reference is dropped."""
        for f in self._to_discard:
            if self._page_types.discard_if_unused(f, lambda: self.ram.discard(f << PAGE_SHIFT, PAGE_SIZE)):
                self._free.append(f)
            else:
                self._typed_out.append(f)
        self._to_discard.clear()

    def _reap(self) -> None:
        """Released frames no longer in use: free now."""
        self._to_discard.extend(self._typed_out)
        self._typed_out = []
        self._discard_pending()

    def _take(self, pages: int) -> int | None:
        """`pages` contiguous released frames (aligned), or None."""
        if self.nr_pages + pages > self.max_pages or len(self._free) < pages:
            return None
        if pages == 1:
            first = self._free.pop()
        else:
            have = set(self._free)
            first = next((f for f in sorted(have) if f % pages == 0
                          and all(f + k in have for k in range(pages))), None)
            if first is None:
                return None
            for k in range(pages):
                self._free.remove(first + k)
        for f in range(first, first + pages):
            self._released[f] = 0
        self.nr_pages += pages
        return first

    def _give_back(self, first: int, pages: int) -> None:
        """Undo _take (the guest could not be told the frames' numbers)."""
        for f in range(first, first + pages):
            self._released[f] = 1
        self._free.extend(range(first, first + pages))
        self.nr_pages -= pages
