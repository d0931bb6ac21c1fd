"""Guest-virtual memory access for hypercall arguments (guest handles).

Every PV hypercall pointer is a guest-*virtual* address in the caller's
current address space. This walks the guest's 4-level x86-64 page tables in
guest memory (4 KiB / 2 MiB / 1 GiB pages), like Xen's copy_{from,to}_guest
would through the MMU, and refuses:
  * non-canonical addresses and addresses inside Xen's reserved hole
    (Xen's __addr_ok / access_ok: guest handles may never point at the
    hypervisor, which here is the shim and the M2P),
  * non-present entries, reserved PS bits, table/frame addresses that no
    slot backs, and (for writes) any level without RW.
The U/S bit is not checked: hypercalls arrive from the guest kernel, whose
mappings Xen makes user-accessible anyway, and Xen itself ignores U/S here.
A write also holds a writable reference on each RAM frame it writes
(page_types.py) from before the first byte to after the last, and refuses a
frame that is a page table: another vCPU may have dropped the mapping the
walk found and made the frame a page table since.
Failures raise GuestPageFault, which the dispatcher turns into -EFAULT.
"""
from __future__ import annotations

from pyvmm.vmm import x86
from pyvmm.xen_abi.abi import HYPERVISOR_VIRT_END, HYPERVISOR_VIRT_START, PAGE_SHIFT, PAGE_SIZE
from pyvmm.xen_abi.memory.page_types import NotWritable, PageTypes
from pyvmm.xen_abi.memory.physmem import GuestPhysicalFault

__all__ = ["GuestVirtualMemory", "GuestPageFault"]

_LEVEL_SHIFTS = (39, 30, 21, 12)  # L4, L3, L2, L1 index positions
_IDX_MASK = 0x1FF
_PAGE_MASK = PAGE_SIZE - 1
_2M = 1 << 21
_1G = 1 << 30
_ADDR_2M = x86.PTE_ADDR_MASK & ~(_2M - 1)
_ADDR_1G = x86.PTE_ADDR_MASK & ~(_1G - 1)
_VA_BITS = 48


class GuestPageFault(Exception):
    """A guest-virtual access that the guest's page tables do not allow."""

    def __init__(self, va: int, write: bool, why: str):
        super().__init__(f"{'write' if write else 'read'} at VA {va:#x}: {why}")
        self.va = va
        self.write = write


def is_canonical(va: int) -> bool:
    top = va >> (_VA_BITS - 1)
    return top == 0 or top == (1 << (64 - _VA_BITS + 1)) - 1


class GuestVirtualMemory:
    """Reads/writes guest-virtual ranges through the page tables rooted at cr3.
    Writing needs the guest's page_types; without them it only reads."""

    def __init__(self, phys, cr3: int, *, page_types: PageTypes | None = None,
                 allow_hypervisor_range: bool = False):
        self.phys = phys
        self.cr3 = cr3 & x86.PTE_ADDR_MASK  # PCID / PWT / PCD bits are not address bits
        self.page_types = page_types
        self.allow_hypervisor_range = allow_hypervisor_range

    # ---- translation ----
    def translate(self, va: int, write: bool = False) -> int:
        """Guest-physical address of one byte at va, or GuestPageFault."""
        if not isinstance(va, int) or va < 0 or va >= 1 << 64:
            raise GuestPageFault(int(va) & ((1 << 64) - 1), write, "not a 64-bit address")
        if not is_canonical(va):
            raise GuestPageFault(va, write, "non-canonical")
        if not self.allow_hypervisor_range and HYPERVISOR_VIRT_START <= va < HYPERVISOR_VIRT_END:
            raise GuestPageFault(va, write, "inside the hypervisor-reserved range")
        table = self.cr3
        for level, shift in enumerate(_LEVEL_SHIFTS):
            gpa = table + ((va >> shift) & _IDX_MASK) * 8
            try:
                entry = self.phys.read_u64(gpa)
            except GuestPhysicalFault:
                raise GuestPageFault(va, write, f"page table at {table:#x} not in guest memory") from None
            if not entry & x86.PTE_P:
                raise GuestPageFault(va, write, f"not present at level {4 - level}")
            if write and not entry & x86.PTE_RW:
                raise GuestPageFault(va, write, f"read-only at level {4 - level}")
            if entry & x86.PTE_PS:
                if shift == 39:
                    raise GuestPageFault(va, write, "PS set in an L4 entry (reserved)")
                if shift == 30:
                    return (entry & _ADDR_1G) | (va & (_1G - 1))
                if shift == 21:
                    return (entry & _ADDR_2M) | (va & (_2M - 1))
                # In an L1 entry bit 7 is PAT, not PS: fall through.
            table = entry & x86.PTE_ADDR_MASK
        return table | (va & _PAGE_MASK)

    def _pieces(self, va: int, n: int, write: bool):
        """(gpa, length) pieces of [va, va+n), split at page boundaries."""
        if n < 0:
            raise GuestPageFault(va, write, "negative length")
        if n and va + n - 1 >= 1 << 64:
            raise GuestPageFault(va, write, "range wraps the address space")
        out = []
        while n > 0:
            take = min(n, PAGE_SIZE - (va & _PAGE_MASK))
            out.append((self.translate(va, write), take))
            va += take
            n -= take
        return out

    # ---- access ----
    def read(self, va: int, n: int) -> bytes:
        parts = []
        for gpa, take in self._pieces(va, n, False):
            try:
                parts.append(self.phys.read(gpa, take))
            except GuestPhysicalFault:
                raise GuestPageFault(va, False, f"frame {gpa:#x} not in guest memory") from None
        return b"".join(parts)

    def write(self, va: int, data) -> None:
        if self.page_types is None:
            raise RuntimeError("this GuestVirtualMemory was made without page types: it only reads")
        data = memoryview(data).cast("B")
        pieces = self._pieces(va, data.nbytes, True)  # translate all first: no partial writes
        for gpa, take in pieces:
            if not self.phys.contains(gpa, take):
                raise GuestPageFault(va, True, f"frame {gpa:#x} not in guest memory")
        pos = 0
        try:
            with self.page_types.writing((gpa >> PAGE_SHIFT for gpa, _ in pieces), "hypercall output"):
                for gpa, take in pieces:
                    self.phys.write(gpa, data[pos:pos + take])
                    pos += take
        except NotWritable as e:     # as a read-only mapping would be
            raise GuestPageFault(va, True, str(e)) from None
        except GuestPhysicalFault as e:
            raise GuestPageFault(va, True, f"frame {e.gpa:#x} not in guest memory") from None

    def read_struct(self, struct, va: int):
        return struct.parse(self.read(va, struct.sizeof()))

    def write_struct(self, struct, va: int, value) -> None:
        self.write(va, struct.build(value))

    def read_u32(self, va: int) -> int:
        return int.from_bytes(self.read(va, 4), "little")

    def read_u64(self, va: int) -> int:
        return int.from_bytes(self.read(va, 8), "little")

    def write_u32(self, va: int, v: int) -> None:
        self.write(va, (v & 0xFFFFFFFF).to_bytes(4, "little"))

    def write_u64(self, va: int, v: int) -> None:
        self.write(va, (v & ((1 << 64) - 1)).to_bytes(8, "little"))
