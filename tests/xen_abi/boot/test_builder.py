"""PV domain builder: layout rules of Xen's xg_dom_x86.c checked on the
built guest memory (page-table walks from CR3, start_info, p2m)."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from pyvmm.vmm.memory import GuestMemory
from pyvmm.xen_abi.abi import (
    MAX_GUEST_CMDLINE, SIF_MOD_START_PFN, SIF_VIRT_P2M_4TOOLS, START_INFO_MAGIC, Hypercall, StartInfo,
)
from pyvmm.xen_abi.boot.builder import BuildError, PvLayout, build_pv_domain, cmdline_with_cpu_count, hypercall_stub
from pyvmm.xen_abi.boot.loader import load_kernel

from kernels import LINUX_INIT_P2M, LINUX_PHYS_START, LINUX_VIRT_BASE, Seg, debian_cloud_kernel, linux_notes, make_elf, make_linux_like, pattern

PAGE = 4096
MiB = 1 << 20
ADDR_MASK = 0x000F_FFFF_FFFF_F000


def u8(ram):
    """numpy bytes over guest RAM, for the checks (pyvmm itself has no numpy)."""
    return np.frombuffer(ram.mmap, dtype=np.uint8)


def u64(ram):
    return np.frombuffer(ram.mmap, dtype="<u8")


P, RW, US, A, D = 1, 2, 4, 0x20, 0x40
SHINFO_MFN = 0x7FFF0


@pytest.fixture
def mem():
    made = []

    def make(size):
        m = GuestMemory(size)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def walk(ram, cr3: int, va: int):
    """Translate va through the 4-level tables at cr3: (pfn, [flags L4..L1]) or None."""
    table = cr3 & ADDR_MASK
    flags = []
    for lvl in (3, 2, 1, 0):
        e = ram.read_u64(table + ((va >> (12 + 9 * lvl)) & 511) * 8)
        if not e & P:
            return None
        flags.append(e & 0xFFF)
        table = e & ADDR_MASK
    return table >> 12, flags


def start_info(ram, L: PvLayout):
    return StartInfo.parse(ram.read(L.start_info_pfn * PAGE, StartInfo.sizeof()))


def check_invariants(ram, L: PvLayout, k) -> None:
    """Every rule of XEN_PV_ABI.md §1.4-1.6 that can be seen in memory."""
    vb = L.virt_base
    end_pfn = (L.virt_pgtab_end - vb) // PAGE
    # the initial mapping ends on a 4 MiB boundary with >= 512 KiB unused after the stack
    assert L.virt_pgtab_end % (4 * MiB) == 0
    assert L.virt_pgtab_end - L.stack_top >= 512 * 1024
    # order of the bootstrap elements
    kend_pfn = (k.virt_kend - vb + PAGE - 1) // PAGE
    assert L.start_info_pfn >= kend_pfn
    assert (L.xenstore_pfn, L.console_pfn) == (L.start_info_pfn + 1, L.start_info_pfn + 2)
    assert L.l4_pfn == L.console_pfn + 1
    assert L.page_table_pfns == frozenset(range(L.l4_pfn, L.l4_pfn + L.nr_pt_frames))
    assert L.bootstack_pfn == L.l4_pfn + L.nr_pt_frames
    assert L.stack_top == vb + (L.bootstack_pfn + 1) * PAGE
    assert L.start_info_va == vb + L.start_info_pfn * PAGE
    assert L.pt_base_va == vb + L.l4_pfn * PAGE
    assert L.entry == k.entry
    # [L4][L3][L2][L1...]: L4 -> L3 -> L2 -> first L1 for virt_base
    l4e = ram.read_u64(L.l4_pfn * PAGE + ((vb >> 39) & 511) * 8)
    assert l4e == ((L.l4_pfn + 1) * PAGE) | 0x67
    l3e = ram.read_u64((L.l4_pfn + 1) * PAGE + ((vb >> 30) & 511) * 8)
    assert l3e == ((L.l4_pfn + 2) * PAGE) | 0x67
    # every mapped frame: VA virt_base + pfn*4K -> pfn; RO exactly for page tables
    for pfn in range(end_pfn):
        r = walk(ram, L.cr3, vb + pfn * PAGE)
        assert r is not None, hex(pfn)
        got, flags = r
        assert got == pfn
        assert flags[:3] == [0x67, 0x67, 0x67]
        assert flags[3] == (0x21 if pfn in L.page_table_pfns else 0x23), hex(pfn)
    assert walk(ram, L.cr3, L.virt_pgtab_end) is None  # nothing beyond the mapping
    if vb >= PAGE:
        assert walk(ram, L.cr3, vb - PAGE) is None
    # the stack page itself is mapped RW
    assert walk(ram, L.cr3, L.stack_top - PAGE)[1][3] & RW
    # start_info
    si = start_info(ram, L)
    assert si.magic == START_INFO_MAGIC.decode()
    assert si.nr_pages == L.nr_pages == ram.size // PAGE
    assert si.shared_info == SHINFO_MFN << 12
    assert si.store_mfn == L.xenstore_pfn and si.console_mfn == L.console_pfn
    assert si.store_evtchn == L.store_evtchn != 0 and si.console_evtchn == L.console_evtchn != 0
    assert si.pt_base == L.pt_base_va and si.nr_pt_frames == L.nr_pt_frames
    assert si.mfn_list == L.p2m_va
    assert si.flags & SIF_VIRT_P2M_4TOOLS
    # p2m: identity, reachable at mfn_list through the guest's own tables
    p2m = u64(ram)[L.p2m_pfn * 512 : L.p2m_pfn * 512 + L.nr_pages]
    assert np.array_equal(p2m, np.arange(L.nr_pages, dtype=np.uint64))
    p2m_pages = (L.nr_pages * 8 + PAGE - 1) // PAGE
    for i in range(p2m_pages):
        got, flags = walk(ram, L.cr3, L.p2m_va + i * PAGE)
        assert got == L.p2m_pfn + i
        assert flags[3] & RW
    for idx in (0, 1, L.nr_pages // 2, L.nr_pages - 1):
        pfn, _ = walk(ram, L.cr3, L.p2m_va + idx * 8)
        assert ram.read_u64(pfn * PAGE + (idx * 8) % PAGE) == idx
    if L.p2m_in_init_p2m:
        assert L.p2m_va == LINUX_INIT_P2M
        assert ram.read_u64(L.l4_pfn * PAGE + 1 * 8) & ADDR_MASK == min(L.p2m_pt_pfns) * PAGE  # L4 slot 1
        assert si.first_p2m_pfn == L.p2m_pfn and si.nr_p2m_frames == L.nr_p2m_frames
        assert L.nr_p2m_frames == p2m_pages + len(L.p2m_pt_pfns)
        assert min(L.p2m_pt_pfns) == L.p2m_pfn + p2m_pages
        assert L.p2m_pfn >= end_pfn  # outside the initial mapping
    else:
        assert si.first_p2m_pfn == 0 and si.nr_p2m_frames == 0
        assert vb <= L.p2m_va < L.virt_pgtab_end
    assert L.e820 == [(0, L.nr_pages * PAGE, 1)]


# --------------------------------------------------------------------------- worked example


@pytest.fixture
def worked_example(mem):
    """XEN_PV_ABI.md §1.5: 1 GiB guest, PT_LOAD 0x1000000-0x3800000, 20 MiB initrd."""
    entry = LINUX_VIRT_BASE + LINUX_PHYS_START
    e = make_elf([Seg(LINUX_PHYS_START, pattern(0x30000), memsz=0x2800000)], linux_notes(entry), entry=entry,
                 virt_base=LINUX_VIRT_BASE)
    k = load_kernel(e)
    ram = mem(1 << 30)
    initrd = pattern(20 * MiB, 7)
    L = build_pv_domain(ram, k, initrd=initrd, cmdline="console=hvc0 root=/dev/xvda", shared_info_mfn=SHINFO_MFN)
    return ram, L, k, initrd


def test_worked_example_pfns(worked_example):
    ram, L, k, initrd = worked_example
    assert L.kernel_pfn == 0x1000 and L.kernel_pages == 0x2800
    assert (L.start_info_pfn, L.xenstore_pfn, L.console_pfn) == (0x3800, 0x3801, 0x3802)
    assert L.l4_pfn == 0x3803 and L.nr_pt_frames == 33 and max(L.page_table_pfns) == 0x3823
    assert L.pt_base_va == 0xFFFFFFFF83803000 and L.cr3 == 0x3803000
    assert L.bootstack_pfn == 0x3824
    assert L.stack_top == 0xFFFFFFFF83825000 and L.start_info_va == 0xFFFFFFFF83800000
    assert L.virt_pgtab_end == 0xFFFFFFFF83C00000
    assert L.initrd_pfn == 0x3C00 and L.initrd_len == 20 * MiB
    assert L.p2m_pfn == 0x5000 and L.nr_p2m_frames == 515
    assert L.p2m_va == 0x8000000000


def test_worked_example_invariants(worked_example):
    ram, L, k, _ = worked_example
    check_invariants(ram, L, k)
    # 30 L1 tables: the mapping spans 0xffffffff80000000..0xffffffff83c00000 = 60 MiB
    assert L.nr_pt_frames - 3 == 30


def test_worked_example_contents(worked_example):
    ram, L, k, initrd = worked_example
    si = start_info(ram, L)
    assert si.flags == SIF_MOD_START_PFN | SIF_VIRT_P2M_4TOOLS
    assert si.mod_start == 0x3C00 and si.mod_len == 20 * MiB
    assert si.cmd_line.rstrip(b"\0") == b"console=hvc0 root=/dev/xvda"
    assert ram.read(0x3C00 * PAGE, len(initrd)) == initrd
    # kernel bytes at PFN 0x1000, bss and the low padding zero
    assert ram.read(0x1000 * PAGE, 0x30000) == pattern(0x30000)
    assert not u8(ram)[(0x1000 * PAGE + 0x30000) : 0x3800 * PAGE].any()
    assert not u8(ram)[: 0x1000 * PAGE].any()
    # no hypercall page note: nothing written, layout says so
    assert L.hypercall_page_va is None


def test_cmdline_learns_the_domains_cpu_count_unless_it_says_its_own():
    """nr_cpus=MAX spares a PV Linux ~8,000 VCPUOP_is_up probes; a command
    line that sets nr_cpus keeps it, and one with no room for the hint
    (start_info holds 1023 bytes) is left whole rather than cut."""
    assert cmdline_with_cpu_count("console=hvc0", 3) == "console=hvc0 nr_cpus=3"
    assert cmdline_with_cpu_count("", 1) == "nr_cpus=1"
    assert cmdline_with_cpu_count("nr_cpus=8 quiet", 2) == "nr_cpus=8 quiet"
    assert cmdline_with_cpu_count("x.nr_cpus=8", 2) == "x.nr_cpus=8 nr_cpus=2"
    full = "a" * 1015
    assert cmdline_with_cpu_count(full, 4) == full
    assert cmdline_with_cpu_count("a" * 1013, 4) == "a" * 1013 + " nr_cpus=4"   # 1023 bytes: fits


def test_builder_zeroes_what_it_allocates(mem):
    k = load_kernel(make_linux_like())
    ram = mem(64 * MiB)
    ram.fill(0, ram.size, 0xAA)
    L = build_pv_domain(ram, k, shared_info_mfn=SHINFO_MFN)
    for pfn in (L.xenstore_pfn, L.console_pfn, L.bootstack_pfn):
        assert not u8(ram)[pfn * PAGE : (pfn + 1) * PAGE].any()
    assert not u8(ram)[: L.kernel_pfn * PAGE].any()
    bss_start = L.kernel_pfn * PAGE + (k.segments[1].paddr - k.pstart) + len(k.segments[1].data)
    assert not u8(ram)[bss_start : bss_start + 0x10000].any()
    # memory past the builder's allocations is the caller's: untouched
    assert (u8(ram)[L.pfn_alloc_end * PAGE :] == 0xAA).all()
    check_invariants(ram, L, k)


def test_fresh_ram_needs_no_zeroing(mem):
    """ram_is_zero (Domain's fresh memfd) skips the zeroing: the same
    layout and the same bytes as a build that zeroes."""
    k = load_kernel(make_linux_like())
    zeroed, fresh = mem(64 * MiB), mem(64 * MiB)
    a = build_pv_domain(zeroed, k, initrd=b"initrd", shared_info_mfn=SHINFO_MFN)
    b = build_pv_domain(fresh, k, initrd=b"initrd", shared_info_mfn=SHINFO_MFN, ram_is_zero=True)
    assert a == b
    assert (u8(zeroed) == u8(fresh)).all()


# --------------------------------------------------------------------------- variants


def test_no_initrd(mem):
    k = load_kernel(make_linux_like())
    ram = mem(128 * MiB)
    L = build_pv_domain(ram, k, shared_info_mfn=SHINFO_MFN, store_evtchn=3, console_evtchn=4)
    si = start_info(ram, L)
    assert si.mod_start == 0 and si.mod_len == 0 and not si.flags & SIF_MOD_START_PFN
    assert L.initrd_pfn is None and L.initrd_len == 0
    assert (si.store_evtchn, si.console_evtchn) == (3, 4)
    # the p2m follows the mapping directly
    assert L.p2m_pfn == (L.virt_pgtab_end - L.virt_base) // PAGE
    check_invariants(ram, L, k)


def test_without_init_p2m_and_mod_start_pfn(mem):
    """Older kernels: p2m and initrd inside the initial mapping."""
    k = load_kernel(make_linux_like(init_p2m=None, mod_start_pfn=False))
    ram = mem(96 * MiB)
    initrd = pattern(3 * MiB + 123, 3)
    L = build_pv_domain(ram, k, initrd=initrd, shared_info_mfn=SHINFO_MFN)
    kend_pfn = (k.virt_kend - L.virt_base + PAGE - 1) // PAGE
    assert L.initrd_mapped and L.initrd_pfn == kend_pfn
    assert L.initrd_len == (3 * MiB + 123 + PAGE - 1) // PAGE * PAGE
    p2m_pages = (L.nr_pages * 8 + PAGE - 1) // PAGE
    assert L.p2m_pfn == L.initrd_pfn + L.initrd_len // PAGE and L.nr_p2m_frames == p2m_pages
    assert L.start_info_pfn == L.p2m_pfn + p2m_pages
    si = start_info(ram, L)
    assert si.mod_start == L.virt_base + L.initrd_pfn * PAGE  # a VA in this mode
    assert not si.flags & SIF_MOD_START_PFN
    assert si.mfn_list == L.virt_base + L.p2m_pfn * PAGE
    # the initrd is readable through the initial mapping
    pfn, _ = walk(ram, L.cr3, si.mod_start + 5 * PAGE)
    assert ram.read(pfn * PAGE, PAGE) == initrd[5 * PAGE : 6 * PAGE]
    check_invariants(ram, L, k)


def test_init_p2m_above_virt_base_is_ignored(mem):
    # xc_dom_build_image drops an INIT_P2M that is not below virt_base.
    k = load_kernel(make_linux_like(init_p2m=0xFFFFFFFFC0000000))
    ram = mem(64 * MiB)
    L = build_pv_domain(ram, k, shared_info_mfn=SHINFO_MFN)
    assert not L.p2m_in_init_p2m
    check_invariants(ram, L, k)


def test_large_guest_pagetables(mem):
    """8 GiB guest: the 16 MiB p2m needs 8 L1s at INIT_P2M; the mapping grows to fit."""
    k = load_kernel(make_linux_like())
    ram = mem(8 << 30)
    L = build_pv_domain(ram, k, initrd=b"x" * 10, shared_info_mfn=SHINFO_MFN)
    assert L.initrd_len == PAGE
    assert len(L.p2m_pt_pfns) == 1 + 1 + 8
    assert L.nr_p2m_frames == 4096 + 10
    check_invariants(ram, L, k)


def test_hypercall_page(mem):
    text = bytearray(pattern(0x20000, 1))
    hpage = LINUX_VIRT_BASE + LINUX_PHYS_START + 0x3000
    entry = LINUX_VIRT_BASE + LINUX_PHYS_START
    e = make_elf([Seg(LINUX_PHYS_START, bytes(text))], linux_notes(entry, hypercall_page=hpage), entry=entry,
                 virt_base=LINUX_VIRT_BASE)
    k = load_kernel(e)
    ram = mem(64 * MiB)
    L = build_pv_domain(ram, k, shared_info_mfn=SHINFO_MFN)
    assert L.hypercall_page_va == hpage
    pfn, _ = walk(ram, L.cr3, hpage)
    page = ram.read(pfn * PAGE, PAGE)
    # slot 0 (set_trap_table): push rcx; push r11; mov eax,0; syscall; pop r11; pop rcx; ret
    assert page[0:14] == bytes.fromhex("51 41 53 b8 00000000 0f05 415b 59 c3")
    assert page[14:32] == b"\xcc" * 18
    # console_io (18)
    assert page[18 * 32 : 18 * 32 + 14] == bytes.fromhex("51 41 53 b8 12000000 0f05 415b 59 c3")
    # iret (23): pushes rax too and never returns
    assert page[23 * 32 : 23 * 32 + 11] == bytes.fromhex("51 41 53 50 b8 17000000 0f05")
    assert page[23 * 32 + 11 : 24 * 32] == b"\xcc" * 21
    assert page[127 * 32 : 127 * 32 + 14] == hypercall_stub(127)
    assert struct.unpack_from("<I", page, 127 * 32 + 4)[0] == 127
    assert hypercall_stub(Hypercall.iret)[4:9] == b"\xb8\x17\x00\x00\x00"
    # the rest of the kernel is as loaded
    assert ram.read(L.kernel_pfn * PAGE, 0x3000) == bytes(text[:0x3000])
    assert ram.read(L.kernel_pfn * PAGE + 0x4000, 0x1000) == bytes(text[0x4000:0x5000])


def test_hypervisor_l4_entries(mem):
    k = load_kernel(make_linux_like())
    ram = mem(64 * MiB)
    entries = {256: 0x3FF0000 | 0x63, 271: 0x3FF1000 | 0x63}
    L = build_pv_domain(ram, k, shared_info_mfn=SHINFO_MFN, hypervisor_l4_entries=entries)
    for slot, val in entries.items():
        assert ram.read_u64(L.l4_pfn * PAGE + slot * 8) == val
    for slot in range(257, 271):
        assert ram.read_u64(L.l4_pfn * PAGE + slot * 8) == 0
    with pytest.raises(BuildError, match="not a hypervisor slot"):
        build_pv_domain(ram, k, shared_info_mfn=SHINFO_MFN, hypervisor_l4_entries={511: 0x1063})


def test_cmdline_truncated_and_terminated(mem):
    k = load_kernel(make_linux_like())
    ram = mem(64 * MiB)
    L = build_pv_domain(ram, k, shared_info_mfn=SHINFO_MFN, cmdline="a" * 5000)
    si = start_info(ram, L)
    assert si.cmd_line == b"a" * (MAX_GUEST_CMDLINE - 1) + b"\0"


def test_memory_too_small(mem):
    k = load_kernel(make_linux_like())
    for size in (4 * MiB, 16 * MiB, 20 * MiB):
        with pytest.raises(BuildError) as ei:
            build_pv_domain(mem(size), k, shared_info_mfn=SHINFO_MFN)
        assert "too small" in str(ei.value) and "\n" not in str(ei.value)
    # a large initrd overflows where the kernel alone fits
    ram = mem(32 * MiB)
    build_pv_domain(ram, k, shared_info_mfn=SHINFO_MFN)
    with pytest.raises(BuildError, match="too small"):
        build_pv_domain(ram, k, initrd=bytes(16 * MiB), shared_info_mfn=SHINFO_MFN)


def test_smallest_memory_sizes_never_crash(mem):
    """Every size from tiny up to comfortable either builds a valid layout or raises BuildError."""
    k = load_kernel(make_linux_like())
    built = 0
    for pages in range(4096, 9000, 97):
        ram = mem(pages * PAGE)
        try:
            L = build_pv_domain(ram, k, initrd=b"\x01" * 5000, shared_info_mfn=SHINFO_MFN)
        except BuildError:
            continue
        built += 1
        assert L.pfn_alloc_end <= pages
        assert (L.virt_pgtab_end - L.virt_base) // PAGE < pages
        ram.close()
    assert built > 10


def test_bad_evtchn(mem):
    k = load_kernel(make_linux_like())
    with pytest.raises(BuildError, match="non-zero"):
        build_pv_domain(mem(64 * MiB), k, shared_info_mfn=SHINFO_MFN, store_evtchn=0)


# --------------------------------------------------------------------------- Debian kernel


def test_debian_cloud_kernel_layout(mem):
    p = debian_cloud_kernel()
    if p is None:
        pytest.skip("Debian cloud kernel not available (apt-get download failed)")
    k = load_kernel(p)
    ram = mem(512 * MiB)
    initrd = pattern(2 * MiB + 5, 9)
    L = build_pv_domain(ram, k, initrd=initrd, cmdline="console=hvc0 earlyprintk=xen", shared_info_mfn=SHINFO_MFN)
    check_invariants(ram, L, k)
    assert L.kernel_pfn == 0x1000
    assert L.p2m_in_init_p2m and L.p2m_va == 0x8000000000
    assert L.nr_p2m_frames == 256 + 3  # 512 MiB -> 1 MiB of p2m (256 pages) + one L3/L2/L1
    si = start_info(ram, L)
    assert si.flags & SIF_MOD_START_PFN and si.mod_start == L.initrd_pfn
    assert L.initrd_pfn * PAGE == L.virt_pgtab_end - L.virt_base
    # startup_xen at the entry begins with cld, seen through the built tables
    pfn, flags = walk(ram, L.cr3, L.entry)
    assert ram.read(pfn * PAGE + (L.entry & 0xFFF), 1) == b"\xfc"
    assert flags[3] == 0x23
