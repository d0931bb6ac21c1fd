"""The 64-bit PV domain builder: lays a kernel out in guest RAM exactly as
Xen's toolstack does (tools/libs/guest/xg_dom_core.c xc_dom_build_image and
xg_dom_x86.c), with pseudo-physical == machine (identity p2m).

Allocation is linear from PFN 0 / VA virt_base:
  [pad to virt_kstart][kernel][mapped initrd if no MOD_START_PFN]
  [p2m if no INIT_P2M][start_info][xenstore][console]
  [page tables L4 L3 L2 L1...][boot stack][pad to virt_pgtab_end]
  [unmapped initrd (MOD_START_PFN)][p2m at INIT_P2M + its own L3/L2/L1]

Read-only rule (get_pg_prot): an L1 entry loses RW when the frame it maps
lies inside the page-table frames of *any* mapping, i.e. the bootstrap
tables and the p2m mapping's own L3/L2/L1 frames. The latter are never
mapped by the bootstrap tables (they sit after virt_pgtab_end), so in
practice only the bootstrap tables show up read-only; the rule is applied
to both ranges because Xen applies it to both.
"""
from __future__ import annotations

import dataclasses
import struct
from array import array


from pyvmm.vmm.x86 import PT_ENTRIES, PTE_A, PTE_D, PTE_P, PTE_RW, PTE_US

from pyvmm.xen_abi.abi import (
    E820_RAM,
    HYPERCALL_PAGE_SLOT_SIZE,
    HYPERVISOR_L4_FIRST_SLOT,
    HYPERVISOR_L4_LAST_SLOT,
    MAX_GUEST_CMDLINE,
    PAGE_SHIFT,
    PAGE_SIZE,
    SIF_MOD_START_PFN,
    SIF_VIRT_P2M_4TOOLS,
    START_INFO_MAGIC,
    Hypercall,
    StartInfo,
)
from pyvmm.xen_abi.boot.loader import KernelImage

__all__ = ["build_pv_domain", "cmdline_with_cpu_count", "PvLayout", "BuildError", "write_hypercall_page"]


class BuildError(Exception):
    """The domain cannot be built; str() is one human-readable line."""


PT_LEVELS = 4
PT_LEVEL_SHIFT = 9  # 512 entries per table
VIRT_BITS = 48
VADDR_MASK = (1 << VIRT_BITS) - 1

# xg_dom_x86.c x86_64_params.lvl_prot: L1 = P|RW|A, L2..L4 = P|RW|A|D|USER.
L1_PROT = PTE_P | PTE_RW | PTE_A  # 0x23
UPPER_PROT = PTE_P | PTE_RW | PTE_A | PTE_D | PTE_US  # 0x67
LEVEL_PROT = (L1_PROT, UPPER_PROT, UPPER_PROT, UPPER_PROT)

# alloc_pgtables_pv: 1 boot-stack page + 512 KiB of slack after the tables,
# and the mapping ends on a 4 MiB boundary.
PGTABLE_SLACK_BYTES = 512 * 1024
MAPPING_ALIGN_BITS = 22
P2M_ENTRY_SIZE = 8  # 64-bit guest: one u64 MFN per PFN
INVALID_MFN = (1 << 64) - 1
HYPERCALL_PAGE_FILL = 0xCC  # int3 in unused bytes

# Xen's 64-bit ring-3 hypercall stubs (pv_ring3_init_hypercall_page).
OP_PUSH_RCX = b"\x51"
OP_PUSH_R11 = b"\x41\x53"
OP_PUSH_RAX = b"\x50"
OP_MOV_EAX_IMM32 = b"\xb8"
OP_SYSCALL = b"\x0f\x05"
OP_POP_R11 = b"\x41\x5b"
OP_POP_RCX = b"\x59"
OP_RET = b"\xc3"


def _mask(bits: int) -> int:
    return (1 << bits) - 1


def _round_pg_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


@dataclasses.dataclass
class PvLayout:
    nr_pages: int
    virt_base: int
    entry: int  # rip
    stack_top: int  # rsp
    start_info_va: int  # rsi
    start_info_pfn: int
    xenstore_pfn: int
    console_pfn: int
    l4_pfn: int  # CR3 = l4_pfn << 12
    pt_base_va: int
    nr_pt_frames: int
    page_table_pfns: frozenset
    bootstack_pfn: int
    virt_pgtab_end: int  # end of the initial mapping (exclusive VA)
    initrd_pfn: int | None
    initrd_len: int  # page-rounded, as Xen passes it; 0 without an initrd
    p2m_va: int  # start_info.mfn_list
    p2m_pfn: int
    nr_p2m_frames: int  # p2m pages (+ its own table frames when at INIT_P2M)
    hypercall_page_va: int | None
    store_evtchn: int
    console_evtchn: int
    e820: list
    # Extras beyond the contract, handy for callers and tests.
    kernel_pfn: int = 0
    kernel_pages: int = 0
    shared_info_mfn: int = 0
    start_info_flags: int = 0
    mod_start: int = 0  # what start_info.mod_start holds (PFN or VA)
    initrd_mapped: bool = False  # initrd inside the initial mapping (no MOD_START_PFN note)
    p2m_pt_pfns: frozenset = frozenset()  # the p2m mapping's own L3/L2/L1 frames
    p2m_in_init_p2m: bool = False
    pfn_alloc_end: int = 0  # first PFN not used by the builder

    @property
    def cr3(self) -> int:
        return self.l4_pfn << PAGE_SHIFT


# ---------------------------------------------------------------------------
# Linear allocator (xc_dom_alloc_segment / xc_dom_alloc_pad / xc_dom_alloc_page)
# ---------------------------------------------------------------------------


class _Alloc:
    def __init__(self, ram, total_pages: int, virt_base: int, ram_is_zero: bool = False):
        self.ram = ram
        self.ram_is_zero = ram_is_zero   # fresh memory: zeroing it again only costs time
        self.total = total_pages
        self.pfn_end = 0
        self.virt_end = virt_base

    def _take(self, name: str, pages: int) -> None:
        if pages > self.total - self.pfn_end:
            short_mib = -(-(pages - (self.total - self.pfn_end)) * PAGE_SIZE // (1 << 20))
            raise BuildError(
                f"guest memory too small: the {name} does not fit in "
                f"{self.total * PAGE_SIZE >> 20} MiB (at least {short_mib} MiB more needed)"
            )
        self.pfn_end += pages
        self.virt_end += pages * PAGE_SIZE

    def pad(self, boundary: int, name: str = "padding") -> None:
        if boundary & (PAGE_SIZE - 1):
            raise BuildError(f"{name} boundary {boundary:#x} is not page aligned")
        if boundary < self.virt_end:
            raise BuildError(f"{name} boundary {boundary:#x} lies below the allocation end {self.virt_end:#x}")
        pfn = self.pfn_end
        pages = (boundary - self.virt_end) // PAGE_SIZE
        self._take(name, pages)
        self._zero(pfn, pages)

    def segment(self, name: str, size: int, start: int = 0) -> tuple[int, int, int]:
        """Allocate (and zero) a segment: returns (pfn, pages, vstart)."""
        if start:
            self.pad(start, name)
        pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
        pfn, vstart = self.pfn_end, self.virt_end
        self._take(name, pages)
        self._zero(pfn, pages)
        return pfn, pages, vstart

    def page(self, name: str) -> int:
        return self.segment(name, PAGE_SIZE)[0]

    def _zero(self, pfn: int, pages: int) -> None:
        if pages and not self.ram_is_zero:
            self.ram.fill(pfn << PAGE_SHIFT, pages << PAGE_SHIFT, 0)


# ---------------------------------------------------------------------------
# Page-table mappings (count_pgtables / setup_pgtables_pv / get_pg_prot)
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Range:
    vfrom: int = 0  # inclusive, 48-bit masked
    vto: int = 0  # inclusive
    pfn: int = 0  # first frame: of the tables (levels) or of the mapped area
    pgtables: int = 0


@dataclasses.dataclass
class _Mapping:
    area: _Range
    lvls: list  # index 0 = L1 ... 3 = L4


def _count_pgtables(maps: list[_Mapping], total: int, pfn_alloc_end: int, vfrom: int, vto: int, pfn: int) -> _Mapping:
    """Tables needed to map [vfrom, vto] (inclusive) onto frames from `pfn`,
    sharing upper-level tables with the mappings already in `maps`."""
    pfn_end = pfn + ((vto - vfrom) >> PAGE_SHIFT)
    if pfn_end >= total:
        raise BuildError(
            f"guest memory too small for the initial mapping: it needs "
            f"{(pfn_end + 1) * PAGE_SIZE >> 20} MiB, have {total * PAGE_SIZE >> 20} MiB"
        )
    for other in maps:
        if vfrom < other.area.vto and vto > other.area.vfrom:
            raise BuildError("overlapping initial mappings")
    m = _Mapping(_Range(vfrom & VADDR_MASK, vto & VADDR_MASK), [_Range() for _ in range(PT_LEVELS)])
    for lvl in range(PT_LEVELS - 1, -1, -1):
        r = m.lvls[lvl]
        r.pfn = pfn_alloc_end + m.area.pgtables  # order: [L4][L3][L2][L1...]
        if lvl == PT_LEVELS - 1:
            if not maps:  # the one top-level table belongs to the first mapping
                r.vfrom, r.vto, r.pgtables = 0, VADDR_MASK, 1
                m.area.pgtables += 1
            continue
        bits = PAGE_SHIFT + (lvl + 1) * PT_LEVEL_SHIFT
        mask = _mask(bits)
        r.vfrom = m.area.vfrom & ~mask
        r.vto = m.area.vto | mask
        for other in maps:  # reuse tables an earlier mapping already has
            o = other.lvls[lvl]
            if o.vfrom == o.vto:
                continue
            if r.vfrom >= o.vfrom and r.vto <= o.vto:
                r.vfrom = r.vto = 0
                break
            if o.vfrom <= r.vfrom <= o.vto:
                r.vfrom = o.vto + 1
            if o.vfrom <= r.vto <= o.vto:
                r.vto = o.vfrom - 1
        if r.vfrom < r.vto:
            r.pgtables = ((r.vto - r.vfrom) >> bits) + 1
        m.area.pgtables += r.pgtables
    return m


def _table_ranges(maps: list[_Mapping]) -> list[tuple[int, int]]:
    """[start, end) PFN ranges of every mapping's page-table frames."""
    return [(m.lvls[PT_LEVELS - 1].pfn, m.lvls[PT_LEVELS - 1].pfn + m.area.pgtables) for m in maps]


def _setup_pgtables(ram, maps: list[_Mapping]) -> None:
    u64 = ram.u64
    ro_ranges = _table_ranges(maps)
    for lvl in range(PT_LEVELS - 1, -1, -1):
        shift = PAGE_SHIFT + lvl * PT_LEVEL_SHIFT
        for m1 in maps:
            vfrom, vto = m1.lvls[lvl].vfrom, m1.lvls[lvl].vto
            base = m1.lvls[lvl].pfn * PT_ENTRIES  # u64 index of the first table's entry 0
            for m2 in maps:
                child = m2.lvls[lvl - 1] if lvl > 0 else m2.area
                if lvl > 0 and child.pgtables == 0:
                    continue
                if child.vfrom >= vto or child.vto <= vfrom:
                    continue
                p_s = (max(vfrom, child.vfrom) - vfrom) >> shift
                p_e = (min(vto, child.vto) - vfrom) >> shift
                pfn0 = ((max(vfrom, child.vfrom) - child.vfrom) >> shift) + child.pfn
                # identity p2m: machine frame == pseudo-physical frame
                count, prot = p_e - p_s + 1, LEVEL_PROT[lvl]
                entries = array("Q", range((pfn0 << PAGE_SHIFT) | prot,
                                           ((pfn0 + count) << PAGE_SHIFT) | prot, PAGE_SIZE))
                if lvl == 0:  # frames that are page tables are mapped read-only
                    for lo, hi in ro_ranges:
                        for pfn in range(max(lo, pfn0), min(hi, pfn0 + count)):
                            entries[pfn - pfn0] &= ~PTE_RW
                u64[base + p_s : base + p_e + 1] = entries


# ---------------------------------------------------------------------------
# Hypercall page
# ---------------------------------------------------------------------------


def hypercall_stub(nr: int) -> bytes:
    """Xen's 32-byte ring-3 stub for hypercall `nr`."""
    if nr == Hypercall.iret:
        # iret never returns and wants rax on the stack too: the guest jumps here.
        return OP_PUSH_RCX + OP_PUSH_R11 + OP_PUSH_RAX + OP_MOV_EAX_IMM32 + struct.pack("<I", nr) + OP_SYSCALL
    return (
        OP_PUSH_RCX + OP_PUSH_R11 + OP_MOV_EAX_IMM32 + struct.pack("<I", nr) + OP_SYSCALL + OP_POP_R11 + OP_POP_RCX + OP_RET
    )


def write_hypercall_page(ram, pfn: int) -> None:
    page = bytearray([HYPERCALL_PAGE_FILL]) * PAGE_SIZE
    for nr in range(PAGE_SIZE // HYPERCALL_PAGE_SLOT_SIZE):
        stub = hypercall_stub(nr)
        page[nr * HYPERCALL_PAGE_SLOT_SIZE : nr * HYPERCALL_PAGE_SLOT_SIZE + len(stub)] = stub
    ram.write(pfn << PAGE_SHIFT, page)


# ---------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------


def cmdline_with_cpu_count(cmdline: str, max_vcpus: int) -> str:
    """*cmdline* with `nr_cpus=MAX` appended, unless it sets nr_cpus itself
    or there is no room in start_info for it.

    A PV Linux learns which vCPUs exist by asking VCPUOP_is_up of every CPU
    id it was built for (8192 in Debian's kernels).  Ids past the domain's
    maximum answer -ENOENT and are dropped from the possible map, so the
    hint leaves that map exactly as it was; it saves ~8,000 hypercalls,
    ~0.7 s of a kvm_pvm boot where each costs ~90 us (bench/README.md).
    Other PV kernels ignore a word they do not know."""
    if any(word.startswith("nr_cpus=") for word in cmdline.split()):
        return cmdline
    hinted = f"{cmdline} nr_cpus={max_vcpus}".lstrip()
    return hinted if len(hinted.encode("utf-8")) < MAX_GUEST_CMDLINE else cmdline


def build_pv_domain(
    ram,
    kernel: KernelImage,
    *,
    initrd: bytes | None = None,
    cmdline: str = "",
    store_evtchn: int = 1,
    console_evtchn: int = 2,
    shared_info_mfn: int,
    hypervisor_l4_entries: dict[int, int] | None = None,
    ram_is_zero: bool = False,
) -> PvLayout:
    """Lay `kernel` (and `initrd`) out in `ram` (guest RAM at GPA 0) like
    Xen's domain builder; returns where everything went.  ram_is_zero:
    `ram` is fresh (an anonymous memfd reads as zeroes), so the segments
    need no zeroing, and pages the guest never touches stay unallocated."""
    notes = kernel.notes
    total = ram.size >> PAGE_SHIFT
    virt_base = notes.virt_base
    if store_evtchn <= 0 or console_evtchn <= 0:
        raise BuildError("store and console event channels must be non-zero")
    hv_l4 = dict(hypervisor_l4_entries or {})
    for slot in hv_l4:
        if not HYPERVISOR_L4_FIRST_SLOT <= slot <= HYPERVISOR_L4_LAST_SLOT:
            raise BuildError(f"L4 slot {slot} is not a hypervisor slot (256..271)")
    if virt_base & (PAGE_SIZE - 1):
        raise BuildError(f"VIRT_BASE {virt_base:#x} is not page aligned")
    if kernel.virt_kstart & (PAGE_SIZE - 1):
        raise BuildError(f"kernel start {kernel.virt_kstart:#x} is not page aligned")

    a = _Alloc(ram, total, virt_base, ram_is_zero)

    # 1. kernel, after padding from virt_base (Linux: 16 MiB of free RAM)
    kpfn, kpages, _ = a.segment("kernel", kernel.virt_kend - kernel.virt_kstart, start=kernel.virt_kstart)
    for seg in kernel.segments:
        ram.write((kpfn << PAGE_SHIFT) + seg.paddr - kernel.pstart, seg.data)  # bss stays zero

    # 2. initrd inside the initial mapping, if the kernel cannot take it unmapped
    initrd_pfn = None
    initrd_len = 0
    mod_start = 0
    flags = SIF_VIRT_P2M_4TOOLS  # xc_dom_allocate's default: tools handle a virtual p2m
    initrd_mapped = initrd is not None and not notes.mod_start_pfn
    if initrd_mapped:
        initrd_pfn, pages, vstart = a.segment("initrd", len(initrd))
        ram.write(initrd_pfn << PAGE_SHIFT, initrd)
        mod_start, initrd_len = vstart, pages * PAGE_SIZE

    # 3. p2m in the mapped region unless INIT_P2M can be honoured
    p2m_base = notes.init_p2m
    if p2m_base is not None and (p2m_base >= virt_base or p2m_base & (PAGE_SIZE - 1)):
        p2m_base = None  # xc_dom_build_image ignores such an INIT_P2M
    p2m_bytes = _round_pg_up(total * P2M_ENTRY_SIZE)
    maps: list[_Mapping] = []
    if p2m_base is None:
        p2m_pfn, nr_p2m, p2m_va = a.segment("phys2mach", p2m_bytes)

    # 4. magic pages
    start_info_pfn = a.page("start info")
    xenstore_pfn = a.page("xenstore")
    console_pfn = a.page("console")

    # 5. bootstrap page tables: grow the mapping until tables + stack + slack fit
    extra_pages = 1 + PGTABLE_SLACK_BYTES // PAGE_SIZE
    pages = extra_pages
    while True:
        try_virt_end = (a.virt_end + pages * PAGE_SIZE) | _mask(MAPPING_ALIGN_BITS)
        kmap = _count_pgtables(maps, total, a.pfn_end, virt_base, try_virt_end, 0)
        pages = kmap.area.pgtables + extra_pages
        if a.virt_end + pages * PAGE_SIZE <= try_virt_end + 1:
            break
    kmap.area.pfn = 0
    maps.append(kmap)
    virt_pgtab_end = (try_virt_end + 1) & 0xFFFFFFFFFFFFFFFF
    pt_pfn, nr_pt, pt_va = a.segment("page tables", kmap.area.pgtables * PAGE_SIZE)
    assert pt_pfn == kmap.lvls[PT_LEVELS - 1].pfn

    # 6. boot stack, 7. pad to the end of the initial mapping
    bootstack_pfn = a.page("boot stack")
    a.pad(virt_pgtab_end, "initial mapping")

    # 8. initrd outside the initial mapping, passed as a PFN
    if initrd is not None and not initrd_mapped:
        initrd_pfn, pages, _ = a.segment("initrd", len(initrd))
        ram.write(initrd_pfn << PAGE_SHIFT, initrd)
        flags |= SIF_MOD_START_PFN
        mod_start, initrd_len = initrd_pfn, pages * PAGE_SIZE

    # 9. p2m at INIT_P2M, followed by its own L3/L2/L1 frames
    p2m_pt_pfns: frozenset = frozenset()
    if p2m_base is not None:
        pmap = _count_pgtables(maps, total, a.pfn_end, p2m_base, p2m_base + p2m_bytes - 1, a.pfn_end)
        pmap.area.pfn = a.pfn_end
        for lvl in pmap.lvls:
            lvl.pfn += p2m_bytes >> PAGE_SHIFT
        maps.append(pmap)
        p2m_pfn, nr_p2m, _ = a.segment("phys2mach", p2m_bytes + pmap.area.pgtables * PAGE_SIZE)
        p2m_va = p2m_base
        first_tab = pmap.lvls[PT_LEVELS - 1].pfn
        p2m_pt_pfns = frozenset(range(first_tab, first_tab + pmap.area.pgtables))

    # identity p2m (entries past nr_pages in the last page stay invalid)
    p2m_words = p2m_bytes // P2M_ENTRY_SIZE
    p2m = ram.u64[p2m_pfn * PT_ENTRIES : p2m_pfn * PT_ENTRIES + p2m_words]
    p2m[:total] = array("Q", range(total))
    p2m[total:] = array("Q", [INVALID_MFN]) * (p2m_words - total)

    _setup_pgtables(ram, maps)
    l4 = pt_pfn * PT_ENTRIES
    for slot, entry in hv_l4.items():
        ram.u64[l4 + slot] = entry & 0xFFFFFFFFFFFFFFFF

    hcall_va = notes.hypercall_page
    if hcall_va is not None:
        write_hypercall_page(ram, (hcall_va - virt_base) >> PAGE_SHIFT)

    cmd = cmdline.encode("utf-8")[: MAX_GUEST_CMDLINE - 1]
    si = StartInfo.build(
        dict(
            magic=START_INFO_MAGIC.decode(),
            nr_pages=total,
            shared_info=shared_info_mfn << PAGE_SHIFT,
            flags=flags,
            store_mfn=xenstore_pfn,
            store_evtchn=store_evtchn,
            console_mfn=console_pfn,
            console_evtchn=console_evtchn,
            pt_base=pt_va,
            nr_pt_frames=kmap.area.pgtables,
            mfn_list=p2m_va,
            mod_start=mod_start,
            mod_len=initrd_len,
            cmd_line=cmd.ljust(MAX_GUEST_CMDLINE, b"\0"),
            first_p2m_pfn=p2m_pfn if p2m_base is not None else 0,
            nr_p2m_frames=nr_p2m if p2m_base is not None else 0,
        )
    )
    ram.write(start_info_pfn << PAGE_SHIFT, si)

    return PvLayout(
        nr_pages=total,
        virt_base=virt_base,
        entry=kernel.entry,
        stack_top=virt_base + ((bootstack_pfn + 1) << PAGE_SHIFT),
        start_info_va=virt_base + (start_info_pfn << PAGE_SHIFT),
        start_info_pfn=start_info_pfn,
        xenstore_pfn=xenstore_pfn,
        console_pfn=console_pfn,
        l4_pfn=pt_pfn,
        pt_base_va=pt_va,
        nr_pt_frames=nr_pt,
        page_table_pfns=frozenset(range(pt_pfn, pt_pfn + nr_pt)),
        bootstack_pfn=bootstack_pfn,
        virt_pgtab_end=virt_pgtab_end,
        initrd_pfn=initrd_pfn,
        initrd_len=initrd_len,
        p2m_va=p2m_va,
        p2m_pfn=p2m_pfn,
        nr_p2m_frames=nr_p2m,
        hypercall_page_va=hcall_va,
        store_evtchn=store_evtchn,
        console_evtchn=console_evtchn,
        e820=[(0, total << PAGE_SHIFT, E820_RAM)],
        kernel_pfn=kpfn,
        kernel_pages=kpages,
        shared_info_mfn=shared_info_mfn,
        start_info_flags=flags,
        mod_start=mod_start,
        initrd_mapped=initrd_mapped,
        p2m_pt_pfns=p2m_pt_pfns,
        p2m_in_init_p2m=p2m_base is not None,
        pfn_alloc_end=a.pfn_end,
    )
