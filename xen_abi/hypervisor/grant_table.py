"""Grant tables (v1) with frames owned by the VMM, and the back-end side.

The guest's table lives in `max_frames` fixed frames of the VMM region
(guest-physical base_gpa ...). GNTTABOP_setup_table hands out the first
nr_frames of them, so the frame numbers never change when the table grows.

A back-end resolves (ref, domid) to a slice of the guest-memory mapping the
way Xen's grant map does for domain 0: the entry must be GTF_permit_access
for that domid, a writable mapping needs an entry without GTF_readonly, and
the GTF_reading / GTF_writing bits are set with a cmpxchg on the entry
(racing the guest's own cmpxchg in gnttab_end_foreign_access) and cleared
when the last mapping of that kind goes away. Only the guest's RAM may be
granted (Xen checks the page's owner; the VMM region holds the shim and its
tables). A writable map, and a copy into a granted page, hold a writable
reference on the frame's page type (page_types.py) while they may write, as
Xen's get_page_type(PGT_writable_page) does: the guest cannot make the frame
a page table under a back-end, and a frame that already is one is refused.
Failures raise GrantError carrying a GNTST_* status: they concern only the
guest that granted.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Optional

from pyvmm.xen_abi.abi import (
    GNTST_bad_copy_arg,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_general_error,
    GNTTAB_RESERVED_CONSOLE,
    GNTTAB_RESERVED_XENSTORE,
    GNTTAB_V1_ENTRY_SIZE,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_type_mask,
    GTF_writing,
    PAGE_SHIFT,
    PAGE_SIZE,
    GrantEntryV1,
)
from pyvmm.xen_abi.memory.page_types import NotWritable, PageTypes, type_name
from pyvmm.xen_abi.memory.physmem import GuestPhysicalFault

__all__ = ["GrantTable", "GrantMapping", "GrantError", "ENTRIES_PER_FRAME",
           "DEFAULT_MAX_FRAMES"]

ENTRIES_PER_FRAME = PAGE_SIZE // GNTTAB_V1_ENTRY_SIZE  # 512
DEFAULT_MAX_FRAMES = 32
# Xen gives up after a few failed cmpxchg rounds on an entry the guest keeps changing.
_CMPXCHG_RETRIES = 4
_FRAME_MASK = 0xFFFFFFFF  # grant_entry_v1.frame is 32 bits


class GrantError(Exception):
    """A grant operation refused; .status is the GNTST_* code Xen would give."""

    def __init__(self, status: int, why: str):
        super().__init__(f"GNTST {status}: {why}")
        self.status = status


@dataclass
class GrantMapping:
    handle: int
    ref: int
    frame: int
    readonly: bool
    view: Optional[memoryview]
    active: bool = True


@dataclass
class _Pin:
    readers: int = 0  # read-only users
    writers: int = 0  # writable users
    handles: set = field(default_factory=set)


class GrantTable:
    def __init__(self, phys, base_gpa: int, *, page_types: PageTypes,
                 max_frames: int = DEFAULT_MAX_FRAMES, initial_frames: int = 1, domid: int = 1):
        # page_types, with no default: every grant table serves a guest whose
        # frames can become page tables; its frames are the RAM a grant may name
        if base_gpa % PAGE_SIZE:
            raise ValueError("grant frames must be page aligned")
        if not 1 <= initial_frames <= max_frames:
            raise ValueError("initial_frames must be within 1..max_frames")
        if not phys.contains(base_gpa, max_frames * PAGE_SIZE):
            raise ValueError(f"grant frames [{base_gpa:#x}, +{max_frames} pages) not in guest memory")
        self.phys = phys
        self.base_gpa = base_gpa
        self.max_frames = max_frames
        self.nr_frames = initial_frames
        self.domid = domid
        self.version = 1
        self.page_types = page_types
        self.lock = threading.Lock()
        self._pins: dict[int, _Pin] = {}
        self._maps: dict[int, GrantMapping] = {}
        self._handles = itertools.count(1)

    # ---- table geometry ----
    @property
    def base_gfn(self) -> int:
        return self.base_gpa >> PAGE_SHIFT

    @property
    def nr_entries(self) -> int:
        return self.nr_frames * ENTRIES_PER_FRAME

    def frame_gfns(self, n: Optional[int] = None) -> list[int]:
        n = self.nr_frames if n is None else n
        return [self.base_gfn + i for i in range(n)]

    def entry_gpa(self, ref: int) -> int:
        return self.base_gpa + ref * GNTTAB_V1_ENTRY_SIZE

    def setup_table(self, nr_frames: int) -> list[int]:
        """Grow to nr_frames (never shrinks); the GFNs of the first nr_frames."""
        if not 0 <= nr_frames <= self.max_frames:
            raise GrantError(GNTST_general_error,
                             f"nr_frames {nr_frames} beyond the maximum {self.max_frames}")
        with self.lock:
            self.nr_frames = max(self.nr_frames, nr_frames)
        return self.frame_gfns(nr_frames)

    def query_size(self) -> tuple[int, int]:
        return self.nr_frames, self.max_frames

    # ---- entries ----
    def read_entry(self, ref: int):
        self._check_ref(ref)
        return GrantEntryV1.parse(self.phys.read(self.entry_gpa(ref), GNTTAB_V1_ENTRY_SIZE))

    def write_entry(self, ref: int, flags: int, domid: int, frame: int) -> None:
        """Builder/test helper: write an entry as the guest would (frame and
        domid first, flags last)."""
        self._check_ref(ref)
        gpa = self.entry_gpa(ref)
        self.phys.write_u32(gpa + 4, frame & _FRAME_MASK)
        self.phys.write(gpa + 2, (domid & 0xFFFF).to_bytes(2, "little"))
        self.phys.write(gpa, (flags & 0xFFFF).to_bytes(2, "little"))

    def seed_reserved(self, console_gfn: int, xenstore_gfn: int, backend_domid: int = 0) -> None:
        """Entries 0 and 1 as Xen's domain builder seeds them."""
        self.write_entry(GNTTAB_RESERVED_CONSOLE, GTF_permit_access, backend_domid, console_gfn)
        self.write_entry(GNTTAB_RESERVED_XENSTORE, GTF_permit_access, backend_domid, xenstore_gfn)

    def _check_ref(self, ref: int) -> None:
        if not isinstance(ref, int) or not 0 <= ref < self.nr_entries:
            raise GrantError(GNTST_bad_gntref, f"grant reference {ref} outside the table "
                                               f"({self.nr_entries} entries)")

    # ---- pinning (caller holds self.lock) ----
    def _acquire(self, ref: int, domid: int, readonly: bool) -> int:
        """Set GTF_reading (and GTF_writing) with cmpxchg; returns the frame."""
        self._check_ref(ref)
        gpa = self.entry_gpa(ref)
        want = GTF_reading if readonly else GTF_reading | GTF_writing
        seen = self.phys.read_u32(gpa)  # flags | domid << 16
        for _ in range(_CMPXCHG_RETRIES):
            flags, dom = seen & 0xFFFF, seen >> 16
            if (flags & GTF_type_mask) != GTF_permit_access or dom != domid:
                raise GrantError(GNTST_general_error,
                                 f"ref {ref}: flags {flags:#x} dom {dom}, not permitted for domain {domid}")
            if not readonly and flags & GTF_readonly:
                raise GrantError(GNTST_general_error, f"ref {ref}: writable use of a read-only grant")
            ok, seen = self.phys.cmpxchg_u32(gpa, seen, seen | want)
            if ok:
                break
        else:
            raise GrantError(GNTST_general_error, f"ref {ref}: entry unstable")
        frame = self.phys.read_u32(gpa + 4)
        if not self.page_types.is_ram(frame):
            self._release_flags(ref, readonly, just_acquired=True)
            raise GrantError(GNTST_bad_page, f"ref {ref}: frame {frame:#x} is not guest RAM")
        pin = self._pins.setdefault(ref, _Pin())
        if readonly:
            pin.readers += 1
        else:
            pin.writers += 1
        return frame

    def _release_flags(self, ref: int, readonly: bool, just_acquired: bool = False) -> None:
        pin = self._pins.get(ref, _Pin())
        if not just_acquired:
            if readonly:
                pin.readers -= 1
            else:
                pin.writers -= 1
        clear = 0
        if pin.writers == 0:
            clear |= GTF_writing
        if pin.writers == 0 and pin.readers == 0:
            clear |= GTF_reading
            self._pins.pop(ref, None)
        if clear:
            self.phys.atomic_and_u16(self.entry_gpa(ref), ~clear)

    # ---- back-end API ----
    def map(self, ref: int, domid: int = 0, readonly: bool = False) -> GrantMapping:
        """Map a granted frame: a memoryview of the whole page (read-only view
        for readonly maps)."""
        with self.lock:
            frame = self._acquire(ref, domid, readonly)
            try:
                view = self.phys.view(frame << PAGE_SHIFT, PAGE_SIZE)
            except GuestPhysicalFault:
                self._release_flags(ref, readonly)
                raise GrantError(GNTST_bad_page, f"ref {ref}: frame {frame:#x} not mapped") from None
            if readonly:
                view = view.toreadonly()
            elif not self.page_types.take_writable(frame):     # held until unmap
                self._release_flags(ref, readonly)
                raise GrantError(GNTST_general_error, f"ref {ref}: frame {frame:#x} cannot be mapped "
                                 f"writable ({type_name(self.page_types.word(frame))})")
            m = GrantMapping(next(self._handles), ref, frame, readonly, view)
            self._maps[m.handle] = m
            return m

    def unmap(self, mapping) -> None:
        handle = mapping.handle if isinstance(mapping, GrantMapping) else mapping
        with self.lock:
            m = self._maps.pop(handle, None)
            if m is None:
                raise GrantError(GNTST_bad_handle, f"no grant mapping with handle {handle}")
            m.active = False
            m.view = None
            self._release_flags(m.ref, m.readonly)
            if not m.readonly:
                self.page_types.release_writable(m.frame, f"grant ref {m.ref} unmapped")

    def active_mappings(self) -> int:
        return len(self._maps)

    def _check_span(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
            raise GrantError(GNTST_bad_copy_arg, f"copy [{offset}, +{length}) outside one page")

    def copy_from_guest(self, ref: int, offset: int, length: int, domid: int = 0) -> bytes:
        """GNTTABOP_copy with a granted source (back-end reads guest data)."""
        self._check_span(offset, length)
        with self.lock:
            frame = self._acquire(ref, domid, readonly=True)
            try:
                return self.phys.read((frame << PAGE_SHIFT) + offset, length)
            except GuestPhysicalFault:
                raise GrantError(GNTST_bad_page, f"ref {ref}: frame {frame:#x} not mapped") from None
            finally:
                self._release_flags(ref, True)

    def copy_to_guest(self, ref: int, offset: int, data, domid: int = 0) -> None:
        """GNTTABOP_copy with a granted destination (back-end fills guest buffer)."""
        data = memoryview(data).cast("B")
        self._check_span(offset, data.nbytes)
        with self.lock:
            frame = self._acquire(ref, domid, readonly=False)
            try:
                with self.page_types.writing((frame,), f"grant ref {ref} copied to"):
                    self.phys.write((frame << PAGE_SHIFT) + offset, data)
            except NotWritable as e:
                raise GrantError(GNTST_general_error, f"ref {ref}: {e}") from None
            except GuestPhysicalFault:
                raise GrantError(GNTST_bad_page, f"ref {ref}: frame {frame:#x} not mapped") from None
            finally:
                self._release_flags(ref, False)
