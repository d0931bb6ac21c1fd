"""Page-type words for a fake guest's RAM (memory/page_types.py), in memory
of their own as the VMM region holds them, so that tests can set a frame's
word as the shim would (make it a page table) and read what pyvmm left."""
from __future__ import annotations

from pyvmm.vmm.memory import GuestMemory
from pyvmm.xen_abi.abi import PAGE_SIZE
from pyvmm.xen_abi.memory.page_types import PAGE_TYPE_BYTES, PageTypes


class TypeWords:
    def __init__(self, ram_pages: int):
        size = (ram_pages * PAGE_TYPE_BYTES + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        self.mem = GuestMemory(size, name="page-types")
        self.page_types = PageTypes(self.mem.address, ram_pages)

    def set(self, mfn: int, word: int) -> None:
        self.mem.write(mfn * PAGE_TYPE_BYTES, word.to_bytes(PAGE_TYPE_BYTES, "little"))

    def clear(self) -> None:
        self.mem.fill(0, self.mem.size)

    def close(self) -> None:
        self.mem.close()
