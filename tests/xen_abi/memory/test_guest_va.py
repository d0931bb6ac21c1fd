"""GuestVirtualMemory page walks and PhysicalMemory bounds/atomics."""
from __future__ import annotations

import pytest

from pvfake import (KBASE, RAM_SIZE, SCRATCH, SCRATCH_GPA, SIZE_1G, SIZE_4K, VMM_GPA,
                    VMM_SIZE, FakeDomain)
from pyvmm.vmm import x86
from pyvmm.vmm.memory import GuestMemory
from pyvmm.xen_abi.abi import HYPERVISOR_VIRT_START, EvtchnBindVirq, Hypercall, XenErrno, XenVer
from pyvmm.xen_abi.memory.guest_va import GuestPageFault, GuestVirtualMemory
from pyvmm.xen_abi.memory.page_types import PGT_L2, PGT_TYPE_SHIFT
from pyvmm.xen_abi.memory.physmem import GuestPhysicalFault, PhysicalMemory


@pytest.fixture
def dom():
    d = FakeDomain()
    yield d
    d.close()


def vm_of(d):
    return GuestVirtualMemory(d.phys, d.pt.cr3, page_types=d.page_types)


def test_4k_read_write_roundtrip_and_translation(dom):
    vm = vm_of(dom)
    vm.write(SCRATCH + 0x10, b"hello")
    assert dom.ram.read(SCRATCH_GPA + 0x10, 5) == b"hello"
    assert vm.read(SCRATCH + 0x10, 5) == b"hello"
    assert vm.translate(KBASE + 0x1234) == 0x1234


def test_range_crossing_pages_with_scattered_frames(dom):
    # Two consecutive VAs backed by non-consecutive frames: the copy must follow the tables.
    va = 0x0000_7000_0000_0000
    dom.pt.map(va, 0x80_0000, SIZE_4K)
    dom.pt.map(va + SIZE_4K, 0x30_0000, SIZE_4K)
    vm = vm_of(dom)
    data = bytes(range(256)) * 40  # 10240 bytes, crosses into a third page -> fault
    with pytest.raises(GuestPageFault):
        vm.write(va + 100, data)
    assert dom.ram.read(0x80_0000 + 100, 16) == bytes(16), "no partial write on a faulting range"
    vm.write(va + SIZE_4K - 3, b"abcdef")
    assert dom.ram.read(0x80_0000 + SIZE_4K - 3, 3) == b"abc"
    assert dom.ram.read(0x30_0000, 3) == b"def"
    assert vm.read(va + SIZE_4K - 3, 6) == b"abcdef"


def test_2m_and_1g_pages(dom):
    vm = vm_of(dom)
    # KBASE + 6 MiB lies in the 2 MiB-page part of the fake kernel mapping
    vm.write(KBASE + (6 << 20) + 0x1FFFFE, b"xyzw")  # crosses a 2M boundary
    assert dom.ram.read((6 << 20) + 0x1FFFFE, 4) == b"xyzw"
    va = 0x0000_0040_0000_0000
    dom.pt.map(va, 0, SIZE_1G, page=SIZE_1G)
    assert vm.translate(va + 0x123456) == 0x123456
    assert vm.read(va + SCRATCH_GPA, 4) == dom.ram.read(SCRATCH_GPA, 4)
    # inside the 1G page but beyond guest RAM: fault, not a host error
    with pytest.raises(GuestPageFault):
        vm.read(va + RAM_SIZE + 8, 8)


def test_not_present_and_read_only(dom):
    va = 0x0000_5000_0000_0000
    dom.pt.map(va, 0x90_0000, SIZE_4K, rw=False)
    dom.pt.map(va + SIZE_4K, 0x91_0000, SIZE_4K, present=False)
    vm = vm_of(dom)
    dom.ram.write(0x90_0000, b"RO!")
    assert vm.read(va, 3) == b"RO!"
    with pytest.raises(GuestPageFault, match="read-only"):
        vm.write(va, b"x")
    with pytest.raises(GuestPageFault, match="not present"):
        vm.read(va + SIZE_4K, 1)
    with pytest.raises(GuestPageFault):
        vm.read(0x0000_1234_0000_0000, 1)  # nothing mapped at all


def test_read_only_upper_level_blocks_writes(dom):
    va = 0x0000_6000_0000_0000
    dom.pt.map(va, 0x92_0000, SIZE_4K)
    vm = vm_of(dom)
    vm.write(va, b"ok")
    # clear RW in the L3 entry: writes must fault even though the leaf is RW
    table = dom.pt.cr3
    l4e = dom.phys.read_u64(table + ((va >> 39) & 0x1FF) * 8)
    l3 = l4e & x86.PTE_ADDR_MASK
    slot = l3 + ((va >> 30) & 0x1FF) * 8
    dom.phys.write_u64(slot, dom.phys.read_u64(slot) & ~x86.PTE_RW)
    with pytest.raises(GuestPageFault):
        vm.write(va, b"no")
    assert vm.read(va, 2) == b"ok"


def test_malformed_addresses_and_tables(dom):
    vm = vm_of(dom)
    for bad in (0x0000_8000_0000_0000, 0xFFFF_0000_0000_0000, -1, 1 << 64):
        with pytest.raises(GuestPageFault):
            vm.read(bad, 1)
    with pytest.raises(GuestPageFault, match="hypervisor"):
        vm.read(HYPERVISOR_VIRT_START + 0x1000, 8)
    with pytest.raises(GuestPageFault):
        vm.read(0xFFFF_FFFF_FFFF_FFF0, 0x20)  # wraps the address space
    # L4 entry pointing far outside guest memory
    va = 0x0000_3000_0000_0000
    dom.pt.set_entry(va, 4, 0x7FFF_0000_0000 | x86.PTE_P | x86.PTE_RW)
    with pytest.raises(GuestPageFault, match="not in guest memory"):
        vm.read(va, 8)
    # PS in an L4 entry is reserved
    dom.pt.set_entry(va, 4, x86.PTE_P | x86.PTE_PS)
    with pytest.raises(GuestPageFault, match="PS"):
        vm.read(va, 8)
    # a CR3 outside guest memory
    with pytest.raises(GuestPageFault):
        GuestVirtualMemory(dom.phys, 0x7_0000_0000).read(KBASE, 1)


L2_TABLE = PGT_L2 << PGT_TYPE_SHIFT | 1


def test_a_write_into_a_page_table_faults(dom):
    """The walk says writable, but the frame is a page table by now (another
    vCPU dropped the mapping and pinned it): nothing is written, anywhere."""
    va = 0x0000_6100_0000_0000
    dom.pt.map(va, 0x93_0000, SIZE_4K)
    dom.pt.map(va + SIZE_4K, 0x94_0000, SIZE_4K)
    vm = vm_of(dom)
    dom.types.set(0x940, L2_TABLE)
    with pytest.raises(GuestPageFault, match="0x940"):
        vm.write(va + SIZE_4K - 2, b"spans")
    assert dom.ram.read(0x93_0000 + SIZE_4K - 2, 2) == bytes(2), "no partial write"
    assert not dom.page_types.in_use(0x930), "the first frame's reference was given back"
    assert dom.page_types.word(0x940) == L2_TABLE
    vm.write(va, b"ok")
    assert not dom.page_types.in_use(0x930), "held only while writing"


def test_a_hypercall_writing_into_a_page_table_gets_efault(dom):
    dom.types.set(SCRATCH_GPA >> 12, L2_TABLE)
    assert dom.call(Hypercall.xen_version, XenVer.platform_parameters, SCRATCH) == -XenErrno.EFAULT
    assert dom.page_types.word(SCRATCH_GPA >> 12) == L2_TABLE


def test_a_view_made_without_page_types_only_reads(dom):
    vm = GuestVirtualMemory(dom.phys, dom.pt.cr3)
    assert vm.read(SCRATCH, 4) == dom.ram.read(SCRATCH_GPA, 4)
    with pytest.raises(RuntimeError):
        vm.write(SCRATCH, b"x")


def test_struct_helpers(dom):
    vm = vm_of(dom)
    vm.write_struct(EvtchnBindVirq, SCRATCH, {"virq": 0, "vcpu": 1, "port": 7})
    assert vm.read_struct(EvtchnBindVirq, SCRATCH).vcpu == 1
    assert vm.read_u32(SCRATCH + 8) == 7
    vm.write_u64(SCRATCH + 16, 0x1122334455667788)
    assert vm.read_u64(SCRATCH + 16) == 0x1122334455667788


def test_physical_memory_bounds(dom):
    p = dom.phys
    assert p.contains(0, RAM_SIZE) and not p.contains(0, RAM_SIZE + 1)
    assert p.contains(VMM_GPA, VMM_SIZE)
    for gpa, n in ((RAM_SIZE, 1), (RAM_SIZE - 4, 8), (VMM_GPA + VMM_SIZE, 1), (-8, 8), (1 << 62, 8)):
        with pytest.raises(GuestPhysicalFault):
            p.read(gpa, n)
        with pytest.raises(GuestPhysicalFault):
            p.write(gpa, bytes(n))
    with pytest.raises(GuestPhysicalFault):
        p.view(RAM_SIZE - 8, 16)
    with pytest.raises(GuestPhysicalFault):
        p.atomic_or_u64(3, 1)  # misaligned atomic
    assert p.read(RAM_SIZE - 2, 2) == b"\0\0"


def test_physical_memory_adjacent_slots():
    a, b = GuestMemory(0x2000, name="a"), GuestMemory(0x1000, name="b")
    try:
        p = PhysicalMemory([(0x2000, b), (0, a)])
        p.write(0x1FFE, b"1234")  # straddles the two slots
        assert a.read(0x1FFE, 2) == b"12" and b.read(0, 2) == b"34"
        assert p.read(0x1FFE, 4) == b"1234"
        with pytest.raises(ValueError):
            PhysicalMemory([(0, a), (0x1000, b)])  # overlap
    finally:
        a.close()
        b.close()


def test_atomics_return_old_values(dom):
    p = dom.phys
    g = VMM_GPA + 0x800
    assert p.atomic_or_u64(g, 0b1010) == 0
    assert p.atomic_or_u64(g, 0b0110) == 0b1010
    assert p.atomic_and_u64(g, ~0b0010) == 0b1110
    assert p.atomic_load_u64(g) == 0b1100
    assert p.atomic_or_u8(g + 8, 1) == 0 and p.atomic_or_u8(g + 8, 1) == 1
    ok, seen = p.cmpxchg_u32(g + 16, 5, 9)
    assert not ok and seen == 0
    ok, seen = p.cmpxchg_u32(g + 16, 0, 9)
    assert ok and p.read_u32(g + 16) == 9
    ok, seen = p.cmpxchg_u16(g + 16, 9, 0x21)
    assert ok and p.read_u32(g + 16) == 0x21
    assert p.atomic_and_u16(g + 16, ~1) == 0x21 and p.read_u32(g + 16) == 0x20
