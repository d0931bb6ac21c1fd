"""The guest's end of a page of Xen byte rings, played from Python.

The console page (io/console.h) and the xenstore page (io/xs_wire.h) both
hold byte rings: a data area of a power-of-two size with free-running u32
cons/prod indices, each advanced by one side. The back-end under test is
handed the page and `notify`, which counts its kicks."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.xen_abi.abi import PAGE_SIZE

U32 = struct.Struct("<I")


@dataclass(frozen=True)
class ByteRing:
    """Where one ring lies in the page."""
    data: int
    cons: int
    prod: int
    size: int


class GuestRingPage:
    """One shared page as the guest sees it; every index starts at `start`."""

    def __init__(self, rings: tuple[ByteRing, ...], start: int = 0):
        self.page = bytearray(PAGE_SIZE)
        for ring in rings:
            self.set(ring.cons, start)
            self.set(ring.prod, start)
        self.kicks = 0

    def notify(self):
        self.kicks += 1

    def get(self, off):
        return U32.unpack_from(self.page, off)[0]

    def set(self, off, v):
        U32.pack_into(self.page, off, v & 0xFFFFFFFF)

    def put(self, ring: ByteRing, data: bytes) -> int:
        """Produce as much of `data` as fits; returns how many bytes."""
        cons, prod = self.get(ring.cons), self.get(ring.prod)
        n = min(ring.size - ((prod - cons) & 0xFFFFFFFF), len(data))
        for i in range(n):
            self.page[ring.data + ((prod + i) % ring.size)] = data[i]
        self.set(ring.prod, prod + n)
        return n

    def take(self, ring: ByteRing, limit: int | None = None) -> bytes:
        """Consume what the back-end produced (at most `limit` bytes)."""
        cons, prod = self.get(ring.cons), self.get(ring.prod)
        used = (prod - cons) & 0xFFFFFFFF
        assert used <= ring.size, "the back-end overran the ring"
        n = used if limit is None else min(used, limit)
        data = bytes(self.page[ring.data + ((cons + i) % ring.size)] for i in range(n))
        self.set(ring.cons, cons + n)
        return data
