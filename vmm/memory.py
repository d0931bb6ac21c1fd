"""Guest memory: a memfd with one shared mapping in this process.

The memfd lets other processes (out-of-process back-ends) map the same
pages later; the mapping's address is what KVM_SET_USER_MEMORY_REGION
needs. Every accessor range-checks its offset, because offsets here are
usually guest-controlled numbers.
"""
from __future__ import annotations

import ctypes
import mmap
import os


from .handles import FdHandle, unmap

__all__ = ["GuestMemory", "GuestMemoryError"]

PAGE_SIZE = mmap.PAGESIZE
_U64 = 8


class GuestMemoryError(ValueError):
    """An access outside the mapping (typically a bad guest-supplied address)."""


class GuestMemory(FdHandle):
    def __init__(self, size: int, name: str = "ram"):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size {size:#x} must be a positive multiple of "
                             f"{PAGE_SIZE:#x}")
        self.size = size
        self.name = name
        self.fd = os.memfd_create(f"pyvmm-{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        # The host virtual address of the mapping (for KVM and for C helpers).
        self._anchor = ctypes.c_char.from_buffer(self.mmap)
        self.address = ctypes.addressof(self._anchor)
        self.buf = memoryview(self.mmap)
        # 64-bit words (x86: little-endian, as the guest stores them); no
        # numpy here: its import alone is ~8 MiB of every guest process
        self.u64 = self.buf.cast("Q")

    # ---- checked accessors ----
    def check(self, off: int, n: int):
        if off < 0 or n < 0 or off + n > self.size:
            raise GuestMemoryError(
                f"{self.name}: access [{off:#x}, +{n:#x}) outside [0, {self.size:#x})")

    def contains(self, off: int, n: int = 1) -> bool:
        return 0 <= off and 0 <= n and off + n <= self.size

    def read(self, off: int, n: int) -> bytes:
        self.check(off, n)
        return self.mmap[off:off + n]

    def write(self, off: int, data) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self.check(off, n)
        self.buf[off:off + n] = data

    def view(self, off: int, n: int) -> memoryview:
        """A zero-copy window onto [off, off+n)."""
        self.check(off, n)
        return self.buf[off:off + n]

    def read_u64(self, off: int) -> int:
        self.check(off, _U64)
        return int.from_bytes(self.mmap[off:off + _U64], "little")

    def write_u64(self, off: int, v: int) -> None:
        self.check(off, _U64)
        self.buf[off:off + _U64] = (v & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(_U64, "little")

    def read_u32(self, off: int) -> int:
        self.check(off, 4)
        return int.from_bytes(self.mmap[off:off + 4], "little")

    def write_u32(self, off: int, v: int) -> None:
        self.check(off, 4)
        self.buf[off:off + 4] = (v & 0xFFFF_FFFF).to_bytes(4, "little")

    def fill(self, off: int, n: int, byte: int = 0) -> None:
        self.check(off, n)
        ctypes.memset(self.address + off, byte, n)

    def discard(self, off: int, n: int) -> None:
        """Give [off, off+n) (whole pages) back to the host: the memfd's
        pages are freed (MADV_REMOVE punches the hole), and the range
        reads as zeroes until written again."""
        self.check(off, n)
        if off % PAGE_SIZE or n % PAGE_SIZE:
            raise GuestMemoryError(f"{self.name}: discard [{off:#x}, +{n:#x}) is not whole pages")
        self.mmap.madvise(mmap.MADV_REMOVE, off, n)

    def allocated_bytes(self) -> int:
        """Host memory the memfd holds now (its allocated blocks)."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        """Unmap and close. Views handed out earlier must be dropped first."""
        if self.fd >= 0:
            self.u64.release()
            self.u64 = None
            self._anchor = None
            unmap(self.mmap, self.buf)
        super().close()

    def __repr__(self):
        return f"GuestMemory({self.name!r}, size={self.size:#x}, address={self.address:#x})"


def release_free_heap() -> None:
    """Give freed heap memory back to the host.  glibc keeps what a large
    temporary used (building a domain decompresses and parses a kernel of
    tens of MiB) in its arenas; each guest is a long-lived process of its
    own, so that would stay in its RSS for good."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):    # not glibc: nothing to do
        pass
