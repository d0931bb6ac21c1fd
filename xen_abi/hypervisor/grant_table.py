"""Grant tables (v1 and v2) with frames owned by the VMM, the back-ends'
side, and the domain's own use of its grants.

The guest's table lives in `max_frames` fixed frames of the VMM region
(guest-physical base_gpa ...), its v2 status frames in the frames right
after them. GNTTABOP_setup_table hands out the first nr_frames of them, so
the frame numbers never change when the table grows.

One implementation serves both versions (Xen's grant_table.c): a v1 entry
is 8 bytes with GTF_reading / GTF_writing in its flags; a v2 entry is 16
bytes (half as many per frame) whose `full_page` frame is 64 bits, and the
reading / writing bits live in a separate 16-bit status word per entry.
The entry header (flags, domid) is the same in both. A v2 `sub_page` entry
may be copied from or to within its range, never mapped; a `transitive`
entry is refused with GNTST_general_error, as Xen refuses one that names
the granting domain itself or a domain that does not exist (the only two a
single-domain host has).

A user (a back-end as domain 0, or the domain itself) resolves (ref, domid)
the way Xen's map_grant_ref / acquire_grant_for_copy do: the first use
(the "pin") checks the entry is GTF_permit_access for that domid, sets the
reading (and writing) bits with a cmpxchg on the entry (v1, racing the
guest's own cmpxchg in gnttab_end_foreign_access) or an atomic OR of the
status word then a second look at the entry (v2), and remembers the frame;
later users of a pinned entry get that frame whatever the guest has since
written into the entry. The bits are cleared when the last user of a kind
goes. Only the guest's RAM may be granted (Xen checks the page's owner;
the VMM region holds the shim and its tables). A writable map, and a copy
into a granted page, hold a writable reference on the frame's page type
(page_types.py) while they may write, as Xen's
get_page_type(PGT_writable_page) does. Failures raise GrantError carrying
a GNTST_* status: they concern only the guest that granted.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import NamedTuple, Optional

from pyvmm.xen_abi.abi import (
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_bad_copy_arg,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_eagain,
    GNTST_general_error,
    GNTST_no_space,
    GNTTAB_NR_RESERVED_ENTRIES,
    GNTTAB_RESERVED_CONSOLE,
    GNTTAB_RESERVED_XENSTORE,
    GNTTAB_STATUS_SIZE,
    GNTTAB_V1_ENTRY_SIZE,
    GNTTAB_V2_ENTRY_SIZE,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_sub_page,
    GTF_transitive,
    GTF_type_mask,
    GTF_writing,
    PAGE_SHIFT,
    PAGE_SIZE,
    GrantEntryV1,
    GrantEntryV2,
    GrantTransitiveV2,
    XenErrno,
    flat_struct,
)
from pyvmm.xen_abi.memory.page_types import NotWritable, PageTypes, type_name
from pyvmm.xen_abi.memory.physmem import GuestPhysicalFault

__all__ = ["GrantTable", "GrantMapping", "GrantError", "SelfMap", "GrantEntry", "ENTRIES_PER_FRAME",
           "DEFAULT_MAX_FRAMES", "MAX_MAPTRACK_HANDLES", "status_frames_for"]

ENTRIES_PER_FRAME = PAGE_SIZE // GNTTAB_V1_ENTRY_SIZE  # 512 (v1)
DEFAULT_MAX_FRAMES = 32
# Xen gives up after a few failed cmpxchg rounds on an entry the guest keeps changing.
_CMPXCHG_RETRIES = 4
_FRAME_MASK = 0xFFFFFFFF  # grant_entry_v1.frame is 32 bits
# read_entry runs on every grant map and copy (a back-end's per-segment and
# per-slot cost): abi.py's layouts, parsed at struct's speed
_ENTRY_V1 = flat_struct(GrantEntryV1)             # flags, domid, frame
_ENTRY_V2 = flat_struct(GrantEntryV2)             # flags, domid, page_off, length, frame
_TRANSITIVE_V2 = flat_struct(GrantTransitiveV2)   # flags, domid, trans_domid, gref
# Xen's pin counters are 8 bits per kind; a use that could reach the top
# bit is refused (GNTPIN_incr2oflow_mask)
_PIN_LIMIT = 128
# Xen's default gnttab_max_maptrack_frames (1024) of 16-byte grant_mapping
# entries: the most map handles one domain may hold at once
MAPTRACK_PER_FRAME = PAGE_SIZE // 16
MAX_MAPTRACK_FRAMES = 1024
MAX_MAPTRACK_HANDLES = MAX_MAPTRACK_FRAMES * MAPTRACK_PER_FRAME


def status_frames_for(grant_frames: int) -> int:
    """Xen's grant_to_status_frames: v2 status frames for that many shared frames."""
    per_frame = PAGE_SIZE // GNTTAB_V2_ENTRY_SIZE
    return -(-grant_frames * per_frame * GNTTAB_STATUS_SIZE // PAGE_SIZE)


class GrantError(Exception):
    """A grant operation refused; .status is the GNTST_* code Xen would give."""

    def __init__(self, status: int, why: str):
        super().__init__(f"GNTST {status}: {why}")
        self.status = status


class GrantEntry(NamedTuple):
    """An entry as read (either version). status: the reading/writing bits
    (v1: in flags too). page_off/length: a v2 sub_page's range (else the
    page); trans_domid/gref: a v2 transitive entry's target."""
    flags: int
    domid: int
    frame: int
    status: int = 0
    page_off: int = 0
    length: int = PAGE_SIZE
    trans_domid: int = 0
    gref: int = 0


@dataclass(slots=True)     # a back-end may keep thousands (blkback's persistent pools)
class GrantMapping:
    handle: int
    ref: int
    frame: int
    readonly: bool
    view: Optional[memoryview]
    active: bool = True


@dataclass(slots=True)     # up to MAX_MAPTRACK_HANDLES of them: ~170 bytes each, 45 MiB at most
class SelfMap:
    """A map handle of the domain's own (its maptrack entry): what
    GNTTABOP_map_grant_ref made of one of its own grants. host_addr is
    where the PTE went (a linear address, or the PTE's machine address
    with GNTMAP_contains_pte); pending until the PTE is in."""
    handle: int
    ref: int
    frame: int
    flags: int             # GNTMAP_* still mapped (device/host bits go as they are unmapped)
    host_addr: int = 0
    pending: bool = True
    holds_writable: bool = False   # a device map's writable type reference

    @property
    def readonly(self) -> bool:
        return bool(self.flags & GNTMAP_readonly)


@dataclass
class _Pin:
    """Xen's active entry: who uses the ref and which frame it resolved to."""
    domid: int
    frame: int
    sub_page: bool = False
    start: int = 0          # a sub-page grant's range (Xen's act->start/length)
    length: int = PAGE_SIZE
    readers: int = 0  # read-only users
    writers: int = 0  # writable users


class GrantTable:
    def __init__(self, phys, base_gpa: int, *, page_types: PageTypes,
                 max_frames: int = DEFAULT_MAX_FRAMES, initial_frames: int = 1, domid: int = 1,
                 status_gpa: Optional[int] = None):
        # page_types, with no default: every grant table serves a guest whose
        # frames can become page tables; its frames are the RAM a grant may name
        if base_gpa % PAGE_SIZE:
            raise ValueError("grant frames must be page aligned")
        if not 1 <= initial_frames <= max_frames:
            raise ValueError("initial_frames must be within 1..max_frames")
        if not phys.contains(base_gpa, max_frames * PAGE_SIZE):
            raise ValueError(f"grant frames [{base_gpa:#x}, +{max_frames} pages) not in guest memory")
        self.max_status_frames = status_frames_for(max_frames)
        # the status frames follow the shared ones (vmm_region.STATUS_OFF)
        self.status_base_gpa = base_gpa + max_frames * PAGE_SIZE if status_gpa is None else status_gpa
        if self.status_base_gpa % PAGE_SIZE or not phys.contains(self.status_base_gpa,
                                                                 self.max_status_frames * PAGE_SIZE):
            raise ValueError(f"status frames at {self.status_base_gpa:#x} not in guest memory")
        self.phys = phys
        self.base_gpa = base_gpa
        self.max_frames = max_frames
        self.nr_frames = initial_frames
        self.domid = domid
        self.version = 1
        self.page_types = page_types
        self.lock = threading.Lock()
        self._pins: dict[int, _Pin] = {}
        self._maps: dict[int, GrantMapping] = {}       # the back-ends' (domain 0's) maptrack
        self._next_backend_handle = 1
        self._own: dict[int, SelfMap] = {}             # the domain's own maptrack
        self._own_free: list[int] = []
        self._own_limit = 0                            # handles ever issued (Xen's maptrack_limit)

    # ---- table geometry ----
    @property
    def base_gfn(self) -> int:
        return self.base_gpa >> PAGE_SHIFT

    @property
    def entry_size(self) -> int:
        return GNTTAB_V1_ENTRY_SIZE if self.version == 1 else GNTTAB_V2_ENTRY_SIZE

    @property
    def entries_per_frame(self) -> int:
        return PAGE_SIZE // self.entry_size

    @property
    def nr_entries(self) -> int:
        return self.nr_frames * self.entries_per_frame

    @property
    def nr_status_frames(self) -> int:
        return status_frames_for(self.nr_frames) if self.version == 2 else 0

    def frame_gfns(self, n: Optional[int] = None) -> list[int]:
        n = self.nr_frames if n is None else n
        return [self.base_gfn + i for i in range(n)]

    def status_gfns(self, n: int) -> list[int]:
        return [(self.status_base_gpa >> PAGE_SHIFT) + i for i in range(n)]

    def entry_gpa(self, ref: int) -> int:
        return self.base_gpa + ref * self.entry_size

    def status_gpa(self, ref: int) -> int:
        return self.status_base_gpa + ref * GNTTAB_STATUS_SIZE

    def setup_table(self, nr_frames: int) -> list[int]:
        """Grow to nr_frames (never shrinks; under v2 the status frames grow
        with it); the GFNs of the first nr_frames."""
        if not 0 <= nr_frames <= self.max_frames:
            raise GrantError(GNTST_general_error,
                             f"nr_frames {nr_frames} beyond the maximum {self.max_frames}")
        with self.lock:
            self.nr_frames = max(self.nr_frames, nr_frames)
        return self.frame_gfns(nr_frames)

    def query_size(self) -> tuple[int, int]:
        return self.nr_frames, self.max_frames

    def get_status_frames(self, nr_frames: int) -> list[int]:
        """GNTTABOP_get_status_frames: the first nr_frames status GFNs
        (GNTST_general_error for more than the table has: none under v1)."""
        with self.lock:
            have = self.nr_status_frames
        if not 0 <= nr_frames <= have:
            raise GrantError(GNTST_general_error, f"{nr_frames} status frames asked, {have} exist")
        return self.status_gfns(nr_frames)

    # ---- entries ----
    def read_entry(self, ref: int) -> GrantEntry:
        self._check_ref(ref)
        raw = self.phys.read(self.entry_gpa(ref), self.entry_size)
        if self.version == 1:
            flags, domid, frame = _ENTRY_V1.unpack(raw)
            return GrantEntry(flags, domid, frame, status=flags & (GTF_reading | GTF_writing))
        flags, domid, page_off, length, frame = _ENTRY_V2.unpack(raw)
        _, _, trans_domid, gref = _TRANSITIVE_V2.unpack(raw)
        status = int.from_bytes(self.phys.read(self.status_gpa(ref), GNTTAB_STATUS_SIZE), "little")
        sub = bool(flags & GTF_sub_page)
        return GrantEntry(flags, domid, frame, status=status,
                          page_off=page_off if sub else 0, length=length if sub else PAGE_SIZE,
                          trans_domid=trans_domid, gref=gref)

    def write_entry(self, ref: int, flags: int, domid: int, frame: int, *,
                    page_off: int = 0, length: int = 0) -> None:
        """Builder/test helper: write an entry of the current version as the
        guest would (the rest first, flags last)."""
        self._check_ref(ref)
        gpa = self.entry_gpa(ref)
        if self.version == 1:
            raw = GrantEntryV1.build(dict(flags=0, domid=domid & 0xFFFF, frame=frame & _FRAME_MASK))
        else:
            raw = GrantEntryV2.build(dict(flags=0, domid=domid & 0xFFFF, page_off=page_off & 0xFFFF,
                                          length=length & 0xFFFF, frame=frame))
        self.phys.write(gpa + 2, raw[2:])
        self.phys.write(gpa, (flags & 0xFFFF).to_bytes(2, "little"))

    def seed_reserved(self, console_gfn: int, xenstore_gfn: int, backend_domid: int = 0) -> None:
        """Entries 0 and 1 as Xen's domain builder seeds them."""
        self.write_entry(GNTTAB_RESERVED_CONSOLE, GTF_permit_access, backend_domid, console_gfn)
        self.write_entry(GNTTAB_RESERVED_XENSTORE, GTF_permit_access, backend_domid, xenstore_gfn)

    def _check_ref(self, ref: int) -> None:
        if not isinstance(ref, int) or not 0 <= ref < self.nr_entries:
            raise GrantError(GNTST_bad_gntref, f"grant reference {ref} outside the table "
                                               f"({self.nr_entries} entries)")

    # ---- the version (GNTTABOP_set_version; caller answers with self.version) ----
    def set_version(self, version: int) -> int:
        """Xen's gnttab_set_version: 0, or -errno. Refused (-EBUSY) while an
        entry past the 8 reserved ones is in use; the reserved entries are
        carried over (-ERANGE when a v2 one cannot be said in v1), every
        other entry is cleared, the status frames come and go."""
        if version not in (1, 2):
            return -XenErrno.EINVAL
        with self.lock:
            if version == self.version:
                return 0
            busy = [r for r in self._pins if r >= GNTTAB_NR_RESERVED_ENTRIES]
            if busy:
                return -XenErrno.EBUSY
            reserved = min(GNTTAB_NR_RESERVED_ENTRIES, self.nr_entries)
            kept = []
            for ref in range(reserved):
                e = self.read_entry(ref)
                kind = e.flags & GTF_type_mask
                if self.version == 1:
                    kept.append((e.flags, e.domid, e.frame))
                    continue
                if (kind == GTF_permit_access and e.frame >> 32) or kind == GTF_transitive:
                    return -XenErrno.ERANGE
                kept.append((e.flags | e.status, e.domid, e.frame) if kind == GTF_permit_access
                            else (0, 0, 0))
            self.phys.write(self.base_gpa, bytes(self.nr_frames * PAGE_SIZE))
            self.phys.write(self.status_base_gpa, bytes(self.max_status_frames * PAGE_SIZE))
            self.version = version
            busy = GTF_reading | GTF_writing
            for ref, (flags, domid, frame) in enumerate(kept):
                if version == 1:
                    raw = GrantEntryV1.build(dict(flags=flags, domid=domid, frame=frame & _FRAME_MASK))
                else:
                    raw = GrantEntryV2.build(dict(flags=flags & ~busy, domid=domid, page_off=0, length=0,
                                                  frame=frame))
                    self.phys.write(self.status_gpa(ref), (flags & busy).to_bytes(2, "little"))
                self.phys.write(self.entry_gpa(ref), raw)
            return 0

    # ---- pinning (caller holds self.lock) ----
    def _set_status(self, ref: int, domid: int, readonly: bool, mapping: bool, pinned: bool) -> None:
        """Xen's _set_status_v1/_v2: check the entry (when not pinned yet) and
        set the reading (and writing) bits."""
        mask = GTF_type_mask | (GTF_sub_page if mapping else 0)
        want = GTF_reading if readonly else GTF_reading | GTF_writing
        gpa = self.entry_gpa(ref)

        def refused(flags, dom) -> Optional[str]:
            if not pinned and ((flags & mask) != GTF_permit_access or dom != domid):
                return f"ref {ref}: flags {flags:#x} dom {dom}, not permitted for domain {domid}"
            if not readonly and flags & GTF_readonly:
                return f"ref {ref}: writable use of a read-only grant"
            return None

        if self.version == 1:
            seen = self.phys.read_u32(gpa)  # flags | domid << 16
            for _ in range(_CMPXCHG_RETRIES):
                why = refused(seen & 0xFFFF, seen >> 16)
                if why:
                    raise GrantError(GNTST_general_error, why)
                ok, seen = self.phys.cmpxchg_u32(gpa, seen, seen | want)
                if ok:
                    return
            raise GrantError(GNTST_general_error, f"ref {ref}: entry unstable")
        seen = self.phys.read_u32(gpa)
        why = refused(seen & 0xFFFF, seen >> 16)
        if why:
            raise GrantError(GNTST_general_error, why)
        self.phys.atomic_or_u16(self.status_gpa(ref), want)
        seen = self.phys.read_u32(gpa)      # the guest may have changed it meanwhile
        why = refused(seen & 0xFFFF, seen >> 16)
        if why:
            self.phys.atomic_and_u16(self.status_gpa(ref), ~want if not pinned else ~GTF_writing)
            raise GrantError(GNTST_general_error, f"{why} (changed while pinning)")

    def _resolve(self, ref: int, mapping: bool) -> _Pin:
        """The frame (and the range of a sub-page grant) of an entry being pinned."""
        e = self.read_entry(ref)
        if self.version == 2 and e.flags & GTF_type_mask == GTF_transitive:
            # Xen: a transitive grant naming the granter itself is refused,
            # and no other domain exists here
            raise GrantError(GNTST_general_error, f"ref {ref}: transitive grant to domain {e.trans_domid}")
        sub_page = self.version == 2 and bool(e.flags & GTF_sub_page) and not mapping
        if not self.page_types.is_ram(e.frame):
            raise GrantError(GNTST_bad_page, f"ref {ref}: frame {e.frame:#x} is not guest RAM")
        return _Pin(0, e.frame, sub_page, e.page_off if sub_page else 0, e.length if sub_page else PAGE_SIZE)

    def _acquire(self, ref: int, domid: int, readonly: bool, mapping: bool = True) -> _Pin:
        """Pin ref for domid (Xen's map_grant_ref / acquire_grant_for_copy):
        the entry's checks and status bits on first use or on the first
        writable use, the frame remembered."""
        self._check_ref(ref)
        pin = self._pins.get(ref)
        if pin is not None:
            count = pin.readers if readonly else pin.writers
            if pin.domid != domid or count >= _PIN_LIMIT or (mapping and pin.sub_page):
                raise GrantError(GNTST_general_error, f"ref {ref}: in use by domain {pin.domid}, "
                                 f"{count} users, sub-page {pin.sub_page}")
        if pin is None or (not readonly and pin.writers == 0):
            self._set_status(ref, domid, readonly, mapping, pinned=pin is not None)
            if pin is None:
                try:
                    pin = self._resolve(ref, mapping)
                except GrantError:
                    self._clear_status(ref, GTF_reading | GTF_writing)
                    raise
                pin.domid = domid
                self._pins[ref] = pin
        if readonly:
            pin.readers += 1
        else:
            pin.writers += 1
        return pin

    def _clear_status(self, ref: int, bits: int) -> None:
        gpa = self.entry_gpa(ref) if self.version == 1 else self.status_gpa(ref)
        self.phys.atomic_and_u16(gpa, ~bits)

    def _release(self, ref: int, readonly: bool) -> None:
        pin = self._pins[ref]
        if readonly:
            pin.readers -= 1
        else:
            pin.writers -= 1
        clear = 0
        if pin.writers == 0:
            clear |= GTF_writing
        if pin.writers == 0 and pin.readers == 0:
            clear |= GTF_reading
            del self._pins[ref]
        if clear:
            self._clear_status(ref, clear)

    def pinned(self, ref: int) -> bool:
        return ref in self._pins

    def pinned_count(self) -> int:
        return len(self._pins)

    @staticmethod
    def _sub_range(pin: _Pin, ref: int, offset: int, length: int) -> None:
        """A copy stays inside the range the grant gives (the page, or a
        v2 sub-page: Xen's "copy out of bounds", GNTST_general_error)."""
        if offset < pin.start or offset + length > pin.start + pin.length:
            raise GrantError(GNTST_general_error, f"ref {ref}: [{offset}, +{length}) outside the "
                             f"granted [{pin.start}, +{pin.length})")

    # ---- back-end API (domain 0) ----
    def map(self, ref: int, domid: int = 0, readonly: bool = False) -> GrantMapping:
        """Map a granted frame: a memoryview of the whole page (read-only view
        for readonly maps)."""
        with self.lock:
            frame = self._acquire(ref, domid, readonly).frame
            try:
                view = self.phys.view(frame << PAGE_SHIFT, PAGE_SIZE)
            except GuestPhysicalFault:
                self._release(ref, readonly)
                raise GrantError(GNTST_bad_page, f"ref {ref}: frame {frame:#x} not mapped") from None
            if readonly:
                view = view.toreadonly()
            elif not self.page_types.take_writable(frame):     # held until unmap
                self._release(ref, readonly)
                raise GrantError(GNTST_general_error, f"ref {ref}: frame {frame:#x} cannot be mapped "
                                 f"writable ({type_name(self.page_types.word(frame))})")
            m = GrantMapping(self._next_backend_handle, ref, frame, readonly, view)
            self._next_backend_handle += 1
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
            self._release(m.ref, m.readonly)
            if not m.readonly:
                self.page_types.release_writable(m.frame, f"grant ref {m.ref} unmapped")

    def active_mappings(self) -> int:
        return len(self._maps)

    @staticmethod
    def _check_span(offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
            raise GrantError(GNTST_bad_copy_arg, f"copy [{offset}, +{length}) outside one page")

    def copy_from_guest(self, ref: int, offset: int, length: int, domid: int = 0) -> bytes:
        """GNTTABOP_copy with a granted source (back-end reads guest data)."""
        self._check_span(offset, length)
        with self.lock:
            pin = self._acquire(ref, domid, readonly=True, mapping=False)
            try:
                self._sub_range(pin, ref, offset, length)
                return self.phys.read((pin.frame << PAGE_SHIFT) + offset, length)
            except GuestPhysicalFault:
                raise GrantError(GNTST_bad_page, f"ref {ref}: frame {pin.frame:#x} not mapped") from None
            finally:
                self._release(ref, True)

    def copy_to_guest(self, ref: int, offset: int, data, domid: int = 0) -> None:
        """GNTTABOP_copy with a granted destination (back-end fills guest buffer)."""
        data = memoryview(data).cast("B")
        self._check_span(offset, data.nbytes)
        with self.lock:
            pin = self._acquire(ref, domid, readonly=False, mapping=False)
            frame = pin.frame
            try:
                self._sub_range(pin, ref, offset, data.nbytes)
                with self.page_types.writing((frame,), f"grant ref {ref} copied to"):
                    self.phys.write((frame << PAGE_SHIFT) + offset, data)
            except NotWritable as e:
                raise GrantError(GNTST_general_error, f"ref {ref}: {e}") from None
            except GuestPhysicalFault:
                raise GrantError(GNTST_bad_page, f"ref {ref}: frame {frame:#x} not mapped") from None
            finally:
                self._release(ref, False)

    # ---- the domain's own grants (GNTTABOP_map_grant_ref / unmap on itself) ----
    def own_map_begin(self, ref: int, flags: int) -> SelfMap:
        """The grant side of the domain mapping its own ref (Xen's
        map_grant_ref with ld == rd): a maptrack handle (GNTST_no_space past
        Xen's limit), the pin for each of device_map / host_map, and for a
        writable device map a writable type reference held until it is
        unmapped. A host map's PTE holds its own writable reference (the
        shim's, as any PTE), so that the guest overwriting or freeing it
        keeps the counts right; it is pending until own_map_end."""
        readonly = bool(flags & GNTMAP_readonly)
        kinds = [k for k in (GNTMAP_device_map, GNTMAP_host_map) if flags & k]
        with self.lock:
            if self._own_free:
                handle = self._own_free.pop()
            elif self._own_limit < MAX_MAPTRACK_HANDLES:
                handle = self._own_limit
                self._own_limit += 1
            else:
                raise GrantError(GNTST_no_space, f"{MAX_MAPTRACK_HANDLES} map handles in use")
            taken = 0
            try:
                frame = 0
                for _ in kinds:
                    frame = self._acquire(ref, self.domid, readonly).frame
                    taken += 1
                m = SelfMap(handle, ref, frame, flags)
                if flags & GNTMAP_device_map and not readonly:
                    if not self.page_types.take_writable(frame):
                        raise GrantError(GNTST_general_error,
                                         f"ref {ref}: frame {frame:#x} cannot be mapped writable "
                                         f"({type_name(self.page_types.word(frame))})")
                    m.holds_writable = True
            except GrantError:
                for _ in range(taken):
                    self._release(ref, readonly)
                self._own_free.append(handle)
                raise
            self._own[handle] = m
            return m

    def own_map_end(self, m: SelfMap, ok: bool, host_addr: int = 0) -> None:
        """The PTE went in (ok, at host_addr) or was refused: the map is
        live, or undone."""
        with self.lock:
            if ok:
                m.pending = False
                m.host_addr = host_addr
                return
            self._drop_own(m, m.flags)

    def _drop_own(self, m: SelfMap, kinds: int) -> None:
        """Give back what the device / host parts in `kinds` hold (lock held)."""
        for k in (GNTMAP_device_map, GNTMAP_host_map):
            if m.flags & kinds & k:
                self._release(m.ref, m.readonly)
                m.flags &= ~k
                if k == GNTMAP_device_map and m.holds_writable:
                    m.holds_writable = False
                    self.page_types.release_writable(m.frame, f"own grant ref {m.ref} unmapped")
        if not m.flags & (GNTMAP_device_map | GNTMAP_host_map):
            del self._own[m.handle]
            self._own_free.append(m.handle)

    def own_lookup(self, handle: int) -> SelfMap:
        """A live handle of the domain's own maps (Xen's unmap_common
        checks: beyond the maptrack limit, free, or mid-map: GNTST_bad_handle)."""
        with self.lock:
            m = self._own.get(handle) if 0 <= handle < self._own_limit else None
            if m is None or m.pending:
                raise GrantError(GNTST_bad_handle, f"no map handle {handle}")
            return m

    def own_unmap(self, m: SelfMap, kinds: int) -> None:
        """Unmap the device and/or host part of an own map (the PTE, for a
        host part, already cleared by the caller)."""
        with self.lock:
            if self._own.get(m.handle) is m:
                self._drop_own(m, kinds)

    def own_mappings(self) -> int:
        return len(self._own)


    # ---- GNTTABOP_swap_grant_ref ----
    def swap(self, ref_a: int, ref_b: int) -> None:
        """Exchange two entries (with their status words under v2); refused
        with GNTST_eagain while either is in use."""
        with self.lock:
            self._check_ref(ref_a)
            self._check_ref(ref_b)
            if ref_a == ref_b:
                return
            if ref_a in self._pins or ref_b in self._pins:
                raise GrantError(GNTST_eagain, f"ref {ref_a if ref_a in self._pins else ref_b} busy")
            size = self.entry_size
            a, b = self.entry_gpa(ref_a), self.entry_gpa(ref_b)
            ea, eb = self.phys.read(a, size), self.phys.read(b, size)
            self.phys.write(a, eb)
            self.phys.write(b, ea)
            if self.version == 2:
                sa, sb = self.status_gpa(ref_a), self.status_gpa(ref_b)
                va, vb = self.phys.read(sa, 2), self.phys.read(sb, 2)
                self.phys.write(sa, vb)
                self.phys.write(sb, va)

    # ---- GNTTABOP_copy between the domain's own pages ----
    def _claim(self, is_gref: bool, ref_or_gmfn: int, readonly: bool, held: list) -> _Pin:
        """One side of a copy (Xen's gnttab_copy_claim_buf): a granted ref
        of the domain's own, pinned for it, or a frame of its RAM; a
        destination is held writable (GNTST_general_error on a page table)."""
        if is_gref:
            pin = self._acquire(ref_or_gmfn & 0xFFFFFFFF, self.domid, readonly, mapping=False)
            held.append(("pin", ref_or_gmfn & 0xFFFFFFFF, readonly))
        else:
            if not self.page_types.is_ram(ref_or_gmfn):
                raise GrantError(GNTST_bad_page, f"frame {ref_or_gmfn:#x} is not guest RAM")
            pin = _Pin(self.domid, ref_or_gmfn)
        if not readonly:
            if not self.page_types.take_writable(pin.frame):
                raise GrantError(GNTST_general_error, f"frame {pin.frame:#x} cannot be written "
                                 f"({type_name(self.page_types.word(pin.frame))})")
            held.append(("type", pin.frame, False))
        return pin

    def copy_own(self, src: tuple[bool, int, int], dst: tuple[bool, int, int], length: int) -> None:
        """Copy length bytes; each side (is_gref, ref or gmfn, offset).
        Checks in Xen's order: the source, the destination, the page
        (GNTST_bad_copy_arg), the granted range (GNTST_general_error)."""
        held: list = []
        with self.lock:
            try:
                s = self._claim(src[0], src[1], True, held)
                d = self._claim(dst[0], dst[1], False, held)
                if src[2] + length > PAGE_SIZE or dst[2] + length > PAGE_SIZE:
                    raise GrantError(GNTST_bad_copy_arg, "copy beyond the page")
                self._sub_range(s, src[1], src[2], length)
                self._sub_range(d, dst[1], dst[2], length)
                data = self.phys.read((s.frame << PAGE_SHIFT) + src[2], length)
                self.phys.write((d.frame << PAGE_SHIFT) + dst[2], data)
            except GuestPhysicalFault as e:
                raise GrantError(GNTST_bad_page, str(e)) from None
            finally:
                for what, x, ro in reversed(held):
                    if what == "pin":
                        self._release(x, ro)
                    else:
                        self.page_types.release_writable(x, "grant copy")
