"""A small fake PV domain for the hypercall-layer tests: real GuestMemory RAM
plus a VMM region, 4-level page tables built in guest RAM, page-type words
(typewords.py), and the real EventChannels / GrantTable / HypercallDispatcher
on top."""
from __future__ import annotations

from pyvmm.vmm import x86
from pyvmm.vmm.memory import GuestMemory
from pyvmm.xen_abi.abi import E820_RAM, GNTMAP_contains_pte, GNTST_general_error, GNTST_okay, PAGE_SIZE
from pyvmm.xen_abi.hypervisor.evtchn import EventChannels
from pyvmm.xen_abi.hypervisor.grant_table import GrantTable
from pyvmm.xen_abi.memory.guest_va import GuestVirtualMemory
from pyvmm.xen_abi.hypervisor.hypercalls.context import HypercallContext, PvDomainBase, ShimRequest
from pyvmm.xen_abi.shim.layout import GrantPte
from pyvmm.xen_abi.hypervisor.hypercalls.dispatch import HypercallDispatcher
from pyvmm.xen_abi.memory.physmem import PhysicalMemory
from typewords import TypeWords

RAM_SIZE = 16 << 20
VMM_GPA = 0x1000_0000  # VMM region above RAM (shared_info, grant frames)
VMM_SIZE = 1 << 20
SHARED_INFO_GPA = VMM_GPA
GNTTAB_GPA = VMM_GPA + PAGE_SIZE
GNTTAB_MAX_FRAMES = 32
PT_POOL = 0x0010_0000  # page-table frames are allocated from here (1 MiB)
KBASE = 0xFFFF_FFFF_8000_0000  # kernel VA -> GPA 0 (4K pages for 4 MiB, then 2M pages)
SCRATCH_GPA = 0x0040_0000
SCRATCH = KBASE + SCRATCH_GPA  # a 4 MiB scratch area for hypercall arguments
SIZE_4K, SIZE_2M, SIZE_1G = 1 << 12, 1 << 21, 1 << 30


class PageTables:
    def __init__(self, phys: PhysicalMemory, pool: int = PT_POOL):
        self.phys = phys
        self.next = pool
        self.cr3 = self._alloc()

    def _alloc(self) -> int:
        gpa = self.next
        self.next += PAGE_SIZE
        self.phys.write(gpa, bytes(PAGE_SIZE))
        return gpa

    def map(self, va: int, gpa: int, size: int, *, rw: bool = True, page: int = SIZE_4K,
            present: bool = True):
        flags = (x86.PTE_P if present else 0) | (x86.PTE_RW if rw else 0) | x86.PTE_US
        leaf_level = {SIZE_4K: 3, SIZE_2M: 2, SIZE_1G: 1}[page]
        for off in range(0, size, page):
            v = (va + off) & ((1 << 48) - 1)
            table = self.cr3
            for level, shift in enumerate((39, 30, 21, 12)):
                slot = table + ((v >> shift) & 0x1FF) * 8
                if level == leaf_level:
                    e = (gpa + off) | flags | (x86.PTE_PS if page != SIZE_4K else 0)
                    self.phys.write_u64(slot, e)
                    break
                e = self.phys.read_u64(slot)
                if not e & x86.PTE_P:
                    e = self._alloc() | x86.PTE_P | x86.PTE_RW | x86.PTE_US
                    self.phys.write_u64(slot, e)
                table = e & x86.PTE_ADDR_MASK

    def slot(self, va: int, level: int):
        """The guest-physical address of va's entry at level, or None where
        a table above is missing (or a large page ends the walk)."""
        table = self.cr3
        v = va & ((1 << 48) - 1)
        for lvl, shift in zip((4, 3, 2, 1), (39, 30, 21, 12)):
            slot = table + ((v >> shift) & 0x1FF) * 8
            if lvl == level:
                return slot
            e = self.phys.read_u64(slot)
            if not e & x86.PTE_P or e & x86.PTE_PS:
                return None
            table = e & x86.PTE_ADDR_MASK
        return None

    def set_entry(self, va: int, level: int, value: int):
        """Overwrite the entry for va at level (4 = L4 ... 1 = L1)."""
        table = self.cr3
        v = va & ((1 << 48) - 1)
        for lvl, shift in zip((4, 3, 2, 1), (39, 30, 21, 12)):
            slot = table + ((v >> shift) & 0x1FF) * 8
            if lvl == level:
                self.phys.write_u64(slot, value)
                return
            table = self.phys.read_u64(slot) & x86.PTE_ADDR_MASK


class FakeDomain(PvDomainBase):
    def __init__(self, nr_vcpus: int = 2, now: int = 1_000_000_000):
        self.ram = GuestMemory(RAM_SIZE, name="test-ram")
        self.vmm = GuestMemory(VMM_SIZE, name="test-vmm")
        phys = PhysicalMemory([(0, self.ram), (VMM_GPA, self.vmm)])
        self.kicks = []
        self.types = TypeWords(RAM_SIZE // PAGE_SIZE)
        evtchn = EventChannels(phys, SHARED_INFO_GPA, nr_vcpus, domid=1, kick=self._kick)
        gnttab = GrantTable(phys, GNTTAB_GPA, max_frames=GNTTAB_MAX_FRAMES, domid=1,
                            page_types=self.types.page_types)
        super().__init__(phys=phys, nr_vcpus=nr_vcpus, e820=[(0, RAM_SIZE, E820_RAM)],
                         shared_info_gpa=SHARED_INFO_GPA, evtchn=evtchn, gnttab=gnttab,
                         page_types=self.types.page_types, domid=1, handle=bytes(range(16)))
        self.now = now
        self.console = bytearray()
        self.yields = 0
        self.moved = []
        self.initialised = {}
        self.ups = []
        self.downs = []
        self.pt = PageTables(phys)
        # kernel mapping: 4 MiB of 4K pages then 12 MiB of 2M pages
        self.pt.map(KBASE, 0, 4 << 20, page=SIZE_4K)
        self.pt.map(KBASE + (4 << 20), 4 << 20, 12 << 20, page=SIZE_2M)
        self.dispatcher = HypercallDispatcher(self)
        self.shim_requests = []

    # hooks
    def _kick(self, v):
        self.kicks.append(v)

    def now_ns(self):
        return self.now

    def console_write(self, data):
        self.console += data

    def yield_vcpu(self, vcpu_id):
        self.yields += 1

    def vcpu_info_moved(self, vcpu_id, gpa):
        self.moved.append((vcpu_id, gpa))

    def vcpu_initialise(self, vcpu_id, ctx):
        self.initialised[vcpu_id] = ctx

    def vcpu_up(self, vcpu_id):
        self.ups.append(vcpu_id)

    def vcpu_down(self, vcpu_id):
        self.downs.append(vcpu_id)

    # helpers
    def ctx(self, vcpu: int = 0) -> HypercallContext:
        return HypercallContext(vcpu, GuestVirtualMemory(self.phys, self.pt.cr3, page_types=self.page_types),
                                self.phys)

    def call(self, nr, *args, vcpu: int = 0):
        """dispatch, answering the handler's ShimRequests as the shim would."""
        ctx = self.ctx(vcpu)
        rc = self.dispatcher.dispatch(ctx, int(nr), args)
        while isinstance(rc, ShimRequest):
            self.shim_requests.append(rc)
            rc = self.dispatcher.resume(ctx, self.grant_pte(*rc.args))
        return rc

    # ---- the shim's grant PTEs (shim/mmu.c mmu_grant_pte), on the fake's tables ----
    def l1_frames(self) -> set:
        """The L1 tables of the 4 KiB kernel mapping (the "validated" L1s)."""
        return {self.pt.slot(KBASE + off, 1) >> 12 for off in range(0, 4 << 20, 2 << 20)}

    def grant_slot(self, addr: int, flags: int):
        if flags & GNTMAP_contains_pte:
            slot = addr if not addr & 7 else None
        else:
            slot = self.pt.slot(addr, 1)
        return slot if slot is not None and slot >> 12 in self.l1_frames() else None

    def _put(self, pte: int) -> None:
        if pte & x86.PTE_P and pte & x86.PTE_RW and (pte & x86.PTE_ADDR_MASK) < RAM_SIZE:
            self.page_types.release_writable((pte & x86.PTE_ADDR_MASK) >> 12, "fake shim")

    def grant_pte(self, kind, addr, flags, a3, a4, a5) -> int:
        if kind == GrantPte.INSTALL:
            slot = self.grant_slot(addr, flags)
            if slot is None:
                return GNTST_general_error
            if a3 & x86.PTE_RW and not self.page_types.take_writable((a3 & x86.PTE_ADDR_MASK) >> 12):
                return GNTST_general_error
            self._put(self.phys.read_u64(slot))
            self.phys.write_u64(slot, a3)
            return GNTST_okay
        moved = 0
        if a5:
            q = None if flags & GNTMAP_contains_pte else self.grant_slot(a5, 0)
            if q is None:
                return GNTST_general_error
            moved = self.phys.read_u64(q)
            self.phys.write_u64(q, 0)
        slot = self.grant_slot(addr, flags)
        old = self.phys.read_u64(slot) if slot is not None else 0
        if slot is not None and (old & x86.PTE_ADDR_MASK) >> 12 == a3 and not (old ^ a4) & 3:
            self.phys.write_u64(slot, moved)
            self._put(old)
            return GNTST_okay
        self._put(moved)
        return GNTST_general_error

    def close(self):
        self.ram.close()
        self.vmm.close()
        self.types.close()
