"""The guest-physical "VMM region": a second KVM memory slot above guest RAM
(not in the E820 map) holding what Xen would keep in its own memory: the
shared_info frame, grant-table frames, the M2P, the shim image, the shim's
page tables for the hypervisor hole and per-vCPU GDT/TSS/IDT/stacks/
trampoline/mailbox.

The whole region is mapped linearly at REGION_VA (L4 slot 257, supervisor
only, except each vCPU's syscall trampoline page on kvm_pvm), guest RAM is
mapped 1:1 at DIRECTMAP_VA (slot 258, 2 MiB pages, supervisor only) so the
shim can write page tables by machine address, and the M2P is mapped
read-only and guest-readable at MACH2PHYS_VIRT_START (slot 256).

This module is the single definition of the region's layout; the shim
gets the numbers it needs from the header shim/layout.py generates, which
also declares the blocks inside it that Python and the shim share.
"""
from __future__ import annotations

from array import array

from dataclasses import dataclass, field

from pyvmm.vmm import x86
from pyvmm.vmm.memory import GuestMemory

from pyvmm.xen_abi import abi
from pyvmm.xen_abi.memory.page_types import PAGE_TYPE_BYTES, TLB_STAMP_BYTES

PAGE = abi.PAGE_SIZE

# ---- virtual layout in the hypervisor hole (L4 slots 256..271) ----
M2P_VA = abi.MACH2PHYS_VIRT_START          # slot 256
REGION_VA = 0xFFFF_8080_0000_0000          # slot 257
DIRECTMAP_VA = 0xFFFF_8100_0000_0000       # slot 258
M2P_SLOT, REGION_SLOT, DIRECTMAP_SLOT = 256, 257, 258
# kvm_pvm quirk (measured): a CPL3 access anywhere in L4 slot 256 faults
# with a reserved-bit error, so the M2P is also mapped at slot 260 and
# XENMEM_machphys_mapping reports that alias there (Linux honours it).
M2P_ALIAS_SLOT = 260
M2P_ALIAS_VA = 0xFFFF_8200_0000_0000

# ---- fixed part of the region (byte offsets) ----
SHARED_INFO_OFF = 0x0
GRANT_OFF = 0x1000
MAX_GRANT_FRAMES = 32
# grant table v2's status frames (one grant_status_t per entry, 256 v2
# entries per shared frame): Xen's grant_to_status_frames(MAX_GRANT_FRAMES)
STATUS_OFF = GRANT_OFF + MAX_GRANT_FRAMES * PAGE       # 0x21000
MAX_STATUS_FRAMES = -(-MAX_GRANT_FRAMES * (PAGE // abi.GNTTAB_V2_ENTRY_SIZE) * abi.GNTTAB_STATUS_SIZE // PAGE)
GUEST_MAPPABLE_END = STATUS_OFF + MAX_STATUS_FRAMES * PAGE   # shared_info, grant and status frames
GLOBALS_OFF = GUEST_MAPPABLE_END                        # 0x25000
CPUID_OFF = GLOBALS_OFF + PAGE                          # 0x26000
IDT_OFF = CPUID_OFF + PAGE                              # 0x27000
ZERO_OFF = IDT_OFF + PAGE                               # 0x28000: backs unused GDT pages
PORT_MAP_OFF = ZERO_OFF + PAGE                          # 0x29000: event-channel routing (shim/layout.py)
FIFO_OFF = PORT_MAP_OFF + PAGE                          # 0x2a000: FIFO event channels (shim/layout.py FIFO)
SHIM_OFF = 0x40000
SHIM_MAX = 0x40000
VCPU_OFF = SHIM_OFF + SHIM_MAX                          # 0x80000
MAX_VCPUS = 8

# per-vCPU area (offsets inside it); the stack block is aligned to its size
# so the shim finds its percpu block from rsp alone (Xen's get_cpu_info).
PERCPU_BLOCK_SIZE = 0x10000
IST_DF_TOP, IST_NMI_TOP, IST_MC_TOP = 0x1000, 0x2000, 0x3000
STACK_TOP = 0xE000
PERCPU_IN_BLOCK = 0xE000            # 2 pages: boot block + traps table
VCPU_GDT_OFF = 0x10000              # 16 pages
GDT_PAGES = 16
VCPU_TSS_OFF = 0x20000
VCPU_TRAMP_OFF = 0x21000
VCPU_MAILBOX_OFF = 0x22000
VCPU_EVENTS_OFF = 0x23000           # time/timer/event block (shim/layout.py EVENTS)
VCPU_LDT_OFF = 0x30000              # 16 pages: the guest's validated LDT copy (shim/mmu.c)
VCPU_STRIDE = 0x40000
PT_OFF = VCPU_OFF + MAX_VCPUS * VCPU_STRIDE            # 0x280000

# the shim's private GDT entries, in GDT page 14 next to Xen's reserved ones
SHIM_CS = 0xE040
SHIM_DS = 0xE048
SHIM_TSS = 0xE050
SHIM_LDT = 0xE060      # 16-byte LDT descriptor the shim fills on MMUEXT_SET_LDT
IST_DF, IST_NMI, IST_MC = 1, 2, 3

# Vectors whose IDT gate is DPL 3 (Xen: int3, into); all others are DPL 0
# so a guest `int n` raises #GP((n<<3)|2) and the shim checks vDPL.  Xen's
# DPL-3 gate for 0x80 is only its int80 fast path: the shim does the same
# (a handler at 0x80 is taken whatever its DPL) from the #GP.
USER_GATES = (x86.VEC_BP, x86.VEC_OF)

TABLE_FLAGS = x86.PTE_P | x86.PTE_RW | x86.PTE_US | x86.PTE_A   # upper levels: leaves decide


def _up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass
class VcpuArea:
    index: int
    off: int

    @property
    def stack_block_off(self): return self.off
    @property
    def percpu_off(self): return self.off + PERCPU_IN_BLOCK
    @property
    def gdt_off(self): return self.off + VCPU_GDT_OFF
    @property
    def tss_off(self): return self.off + VCPU_TSS_OFF
    @property
    def tramp_off(self): return self.off + VCPU_TRAMP_OFF
    @property
    def mailbox_off(self): return self.off + VCPU_MAILBOX_OFF
    @property
    def events_off(self): return self.off + VCPU_EVENTS_OFF


@dataclass
class VmmRegion:
    """Layout and contents of the VMM region for one domain.

    gpa: where the region sits (default: the first 1 GiB boundary above RAM).
    """
    ram_size: int
    nr_vcpus: int = 1
    is_pvm: bool = False
    gpa: int | None = None
    mem: GuestMemory = field(init=False)

    def __post_init__(self):
        if not 1 <= self.nr_vcpus <= MAX_VCPUS:
            raise ValueError(f"nr_vcpus must be 1..{MAX_VCPUS}")
        if self.ram_size % PAGE:
            raise ValueError("RAM size must be a whole number of pages")
        self.ram_pages = self.ram_size // PAGE
        if self.gpa is None:
            self.gpa = _up(max(self.ram_size, 1), 1 << 30)
        if self.gpa < self.ram_size or self.gpa % (2 << 20):
            raise ValueError("the VMM region must be 2 MiB aligned and above RAM")
        self.m2p_pages = _up(self.ram_pages * 8, PAGE) // PAGE
        # counted page types, one word per RAM frame (memory/page_types.py),
        # and the shim's TLB clock stamp per frame (shim/mmu.c), after the M2P
        self.page_type_pages = _up(self.ram_pages * PAGE_TYPE_BYTES, PAGE) // PAGE
        self.tlb_stamp_pages = _up(self.ram_pages * TLB_STAMP_BYTES, PAGE) // PAGE
        # page-table frames: fixed point, the region maps itself
        nr_pt = 0
        while True:
            size = PT_OFF + nr_pt * PAGE + (self.m2p_pages + self.page_type_pages
                                             + self.tlb_stamp_pages) * PAGE
            pages = size // PAGE
            need = (2 + _up(self.m2p_pages, 512) // 512            # slot 256: L3 L2 L1s
                    + 1 + _up(pages, 512 * 512) // (512 * 512) + _up(pages, 512) // 512  # slot 257
                    + 1 + _up(_up(self.ram_size, 2 << 20) // (2 << 20), 512) // 512)     # slot 258
            if need <= nr_pt:
                break
            nr_pt = need
        self.nr_pt_frames = nr_pt
        self.m2p_off = PT_OFF + nr_pt * PAGE
        self.page_type_off = self.m2p_off + self.m2p_pages * PAGE
        self.tlb_stamp_off = self.page_type_off + self.page_type_pages * PAGE
        self.size = self.tlb_stamp_off + self.tlb_stamp_pages * PAGE
        self.mem = GuestMemory(self.size, name="vmm-region")
        self.vcpus = [VcpuArea(i, VCPU_OFF + i * VCPU_STRIDE) for i in range(self.nr_vcpus)]
        self.l4_entries: dict[int, int] = {}
        self._next_pt = PT_OFF

    # ---- addresses ----
    def va(self, off: int) -> int:
        return REGION_VA + off

    def gpa_of(self, off: int) -> int:
        return self.gpa + off

    @property
    def shared_info_gpa(self) -> int:
        return self.gpa + SHARED_INFO_OFF

    @property
    def shared_info_mfn(self) -> int:
        return self.shared_info_gpa >> abi.PAGE_SHIFT

    @property
    def shared_info_va(self) -> int:
        return self.va(SHARED_INFO_OFF)

    def grant_frame_mfn(self, i: int) -> int:
        if not 0 <= i < MAX_GRANT_FRAMES:
            raise ValueError("grant frame index out of range")
        return (self.gpa + GRANT_OFF) // PAGE + i

    def stack_top_va(self, v: int) -> int:
        return self.va(self.vcpus[v].off + STACK_TOP)

    def percpu_va(self, v: int) -> int:
        return self.va(self.vcpus[v].percpu_off)

    def lstar(self, v: int) -> int:
        return self.va(self.vcpus[v].tramp_off)

    def mailbox_gpa(self, v: int) -> int:
        return self.gpa_of(self.vcpus[v].mailbox_off)

    def percpu_gpa(self, v: int) -> int:
        return self.gpa_of(self.vcpus[v].percpu_off)

    # ---- page tables for the hole ----
    def _alloc_pt(self) -> int:
        off = self._next_pt
        if off >= self.m2p_off:
            raise RuntimeError("VMM region page-table budget exceeded (layout bug)")
        self._next_pt += PAGE
        return off

    def _map(self, va: int, target_gpa: int, npages: int, leaf_flags, page_size: int = PAGE):
        """Map [va, va+npages*page_size) -> target_gpa with tables in the region.
        leaf_flags: int, or a function(index) -> flags."""
        m = self.mem
        leaf_level = 1 if page_size == PAGE else 2
        for i in range(npages):
            v = va + i * page_size
            slot = x86.pt_index(v, 4)
            if slot not in self.l4_entries:
                t = self._alloc_pt()
                self.l4_entries[slot] = self.gpa_of(t) | TABLE_FLAGS
            table_off = (self.l4_entries[slot] & x86.PTE_ADDR_MASK) - self.gpa
            for level in (3, 2, 1):
                idx = x86.pt_index(v, level)
                if level == leaf_level:
                    flags = leaf_flags(i) if callable(leaf_flags) else leaf_flags
                    m.write_u64(table_off + idx * 8, (target_gpa + i * page_size) | flags)
                    break
                e = m.read_u64(table_off + idx * 8)
                if not e & x86.PTE_P:
                    t = self._alloc_pt()
                    e = self.gpa_of(t) | TABLE_FLAGS
                    m.write_u64(table_off + idx * 8, e)
                table_off = (e & x86.PTE_ADDR_MASK) - self.gpa

    def build_tables(self, shim_image_len: int):
        """Fill the hole's page tables (slots 256-258)."""
        P, RW, US, A, D, NX, PS = (x86.PTE_P, x86.PTE_RW, x86.PTE_US, x86.PTE_A, x86.PTE_D,
                                   x86.PTE_NX, x86.PTE_PS)
        # M2P: read-only, readable by the (ring-3) guest kernel
        self._map(M2P_VA, self.gpa_of(self.m2p_off), self.m2p_pages, P | US | A | NX)
        self.l4_entries[M2P_ALIAS_SLOT] = self.l4_entries[M2P_SLOT]
        # the region itself
        shim_pages = range(SHIM_OFF // PAGE, (SHIM_OFF + _up(shim_image_len, PAGE)) // PAGE)
        tramps = {v.tramp_off // PAGE for v in self.vcpus}

        def region_flags(i):
            if i in tramps:
                # kvm_pvm: CPL3 `syscall` lands here at CPL3 and must fetch
                # the first instruction (then #GP on swapgs); SMEP is off.
                return P | A | (US if self.is_pvm else 0)
            if i in shim_pages:
                return P | RW | A | D
            return P | RW | A | D | NX

        self._map(REGION_VA, self.gpa, self.size // PAGE, region_flags)
        # guest GDT pages 0..13 keep their own zeroed backing: set_gdt copies
        # the guest's validated descriptors there (shim/mmu.c)
        # guest RAM 1:1, 2 MiB pages, supervisor only
        n2m = _up(self.ram_size, 2 << 20) // (2 << 20)
        self._map(DIRECTMAP_VA, 0, n2m, P | RW | A | D | NX | PS, page_size=2 << 20)
        # M2P contents: identity
        first = self.m2p_off // 8
        self.mem.u64[first:first + self.ram_pages] = array("Q", range(self.ram_pages))

    def _set_leaf(self, va: int, entry: int):
        off = (self.l4_entries[x86.pt_index(va, 4)] & x86.PTE_ADDR_MASK) - self.gpa
        for level in (3, 2):
            off = (self.mem.read_u64(off + x86.pt_index(va, level) * 8) & x86.PTE_ADDR_MASK) - self.gpa
        self.mem.write_u64(off + x86.pt_index(va, 1) * 8, entry)

    def hypervisor_l4_entries(self) -> dict[int, int]:
        return dict(self.l4_entries)


# GDT pages 0..13 belong to the guest (set_gdt); none until it calls it.
FIRST_GUEST_GDT_PAGE = 0
