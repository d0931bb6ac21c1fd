"""Guest-physical memory across several KVM slots, bounds-checked, with atomics.

Every guest-physical address that reaches this module is guest-controlled,
so every access is checked against the slots it was built with and fails
with GuestPhysicalFault (never an IndexError/ValueError from deeper down,
never an access outside the mappings).

The atomic helpers are real LOCK-prefixed read-modify-writes on the shared
mapping (through libatomic's sized entry points, which ctypes calls with the
GIL released), so they are safe against a guest vCPU running concurrently on
another host CPU and using lock-bitops on the same words (event channel
bitmaps, grant entry flags).
"""
from __future__ import annotations

import bisect
import ctypes
import ctypes.util
from dataclasses import dataclass

__all__ = ["PhysicalMemory", "GuestPhysicalFault", "Slot", "atomics"]

SEQ_CST = 5  # __ATOMIC_SEQ_CST (the memory order the atomics below use)
_U64_MASK = (1 << 64) - 1


class GuestPhysicalFault(Exception):
    """A guest-physical access outside every slot (or straddling a hole)."""

    def __init__(self, gpa: int, n: int, why: str = "not backed by any slot"):
        super().__init__(f"guest-physical [{gpa:#x}, +{n:#x}): {why}")
        self.gpa = gpa
        self.n = n


class _Atomics:
    """Sized atomics from libatomic.so.1 on raw host addresses."""

    def __init__(self):
        name = ctypes.util.find_library("atomic") or "libatomic.so.1"
        lib = ctypes.CDLL(name)  # CDLL: the GIL is released during the call
        vp, u8, u16, u32, u64, i = (ctypes.c_void_p, ctypes.c_uint8, ctypes.c_uint16,
                                    ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int)

        def fn(sym, res, *args):
            f = getattr(lib, sym)
            f.restype = res
            f.argtypes = list(args)
            return f

        self.fetch_or_8 = fn("__atomic_fetch_or_8", u64, vp, u64, i)
        self.fetch_and_8 = fn("__atomic_fetch_and_8", u64, vp, u64, i)
        self.fetch_or_1 = fn("__atomic_fetch_or_1", u8, vp, u8, i)
        self.fetch_and_1 = fn("__atomic_fetch_and_1", u8, vp, u8, i)
        self.exchange_1 = fn("__atomic_exchange_1", u8, vp, u8, i)
        self.fetch_and_2 = fn("__atomic_fetch_and_2", u16, vp, u16, i)
        self.fetch_or_2 = fn("__atomic_fetch_or_2", u16, vp, u16, i)
        self.load_8 = fn("__atomic_load_8", u64, vp, i)
        self.exchange_8 = fn("__atomic_exchange_8", u64, vp, u64, i)
        self.exchange_4 = fn("__atomic_exchange_4", u32, vp, u32, i)
        self.cmpxchg_2 = fn("__atomic_compare_exchange_2", ctypes.c_bool, vp,
                            ctypes.POINTER(u16), u16, i, i)
        self.cmpxchg_4 = fn("__atomic_compare_exchange_4", ctypes.c_bool, vp,
                            ctypes.POINTER(u32), u32, i, i)


atomics = _Atomics()


@dataclass(frozen=True)
class Slot:
    gpa: int
    mem: object  # pyvmm.vmm.memory.GuestMemory (size, address, buf, mmap)

    @property
    def end(self) -> int:
        return self.gpa + self.mem.size


def _host_base(mem) -> int:
    return int(mem.address)


class PhysicalMemory:
    """Guest-physical address space made of non-overlapping GuestMemory slots."""

    def __init__(self, slots):
        ordered = sorted((Slot(int(gpa), mem) for gpa, mem in slots), key=lambda s: s.gpa)
        for a, b in zip(ordered, ordered[1:]):
            if a.end > b.gpa:
                raise ValueError(f"slots overlap at {b.gpa:#x}")
        for s in ordered:
            if s.gpa < 0 or s.gpa % 4096:
                raise ValueError(f"slot base {s.gpa:#x} must be page aligned")
        self.slots = ordered
        self._starts = [s.gpa for s in ordered]
        self._ends = [s.end for s in ordered]     # _find runs on every grant use: no property calls
        self._bases = [_host_base(s.mem) for s in ordered]

    # ---- lookup ----
    def _find(self, gpa: int, n: int):
        """(slot index, offset) for [gpa, gpa+n) lying wholly inside one slot."""
        if not isinstance(gpa, int) or not isinstance(n, int) or gpa < 0 or n < 0:
            raise GuestPhysicalFault(int(gpa), int(n), "negative or non-integer")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0:
            raise GuestPhysicalFault(gpa, n)
        end = self._ends[i]
        if gpa + n > end or (n == 0 and gpa >= end):
            raise GuestPhysicalFault(gpa, n)
        return i, gpa - self._starts[i]

    def contains(self, gpa: int, n: int = 1) -> bool:
        try:
            self._find(gpa, n)
            return True
        except GuestPhysicalFault:
            return False

    def _chunks(self, gpa: int, n: int):
        """Split [gpa, gpa+n) at slot boundaries; every byte must be backed."""
        out = []
        while n > 0:
            if gpa < 0:
                raise GuestPhysicalFault(gpa, n, "negative")
            i = bisect.bisect_right(self._starts, gpa) - 1
            if i < 0 or gpa >= self.slots[i].end:
                raise GuestPhysicalFault(gpa, n)
            s = self.slots[i]
            take = min(n, s.end - gpa)
            out.append((s.mem, gpa - s.gpa, take))
            gpa += take
            n -= take
        return out

    # ---- plain access ----
    def read(self, gpa: int, n: int) -> bytes:
        if n < 0:
            raise GuestPhysicalFault(gpa, n, "negative length")
        try:
            i, off = self._find(gpa, n)
        except GuestPhysicalFault:
            return b"".join(bytes(m.buf[o:o + k]) for m, o, k in self._chunks(gpa, n))
        return bytes(self.slots[i].mem.buf[off:off + n])

    def write(self, gpa: int, data) -> None:
        data = memoryview(data).cast("B")
        n = data.nbytes
        try:
            i, off = self._find(gpa, n)
        except GuestPhysicalFault:
            pos = 0
            for m, o, k in self._chunks(gpa, n):
                m.buf[o:o + k] = data[pos:pos + k]
                pos += k
            return
        self.slots[i].mem.buf[off:off + n] = data

    def view(self, gpa: int, n: int) -> memoryview:
        """Zero-copy window; the range must lie inside one slot."""
        i, off = self._find(gpa, n)
        return self.slots[i].mem.buf[off:off + n]

    def read_u64(self, gpa: int) -> int:
        i, off = self._find(gpa, 8)
        return int.from_bytes(self.slots[i].mem.buf[off:off + 8], "little")

    def write_u64(self, gpa: int, v: int) -> None:
        i, off = self._find(gpa, 8)
        self.slots[i].mem.buf[off:off + 8] = (v & _U64_MASK).to_bytes(8, "little")

    def read_u32(self, gpa: int) -> int:
        i, off = self._find(gpa, 4)
        return int.from_bytes(self.slots[i].mem.buf[off:off + 4], "little")

    def write_u32(self, gpa: int, v: int) -> None:
        i, off = self._find(gpa, 4)
        self.slots[i].mem.buf[off:off + 4] = (v & 0xFFFFFFFF).to_bytes(4, "little")

    def read_u8(self, gpa: int) -> int:
        i, off = self._find(gpa, 1)
        return self.slots[i].mem.buf[off]

    def write_u8(self, gpa: int, v: int) -> None:
        i, off = self._find(gpa, 1)
        self.slots[i].mem.buf[off] = v & 0xFF

    # ---- atomics (natural alignment required, as the CPU's LOCK ops want) ----
    def host_address(self, gpa: int, n: int, align: int = 1) -> int:
        if align > 1 and gpa % align:
            raise GuestPhysicalFault(gpa, n, f"not {align}-byte aligned")
        i, off = self._find(gpa, n)
        return self._bases[i] + off

    def atomic_or_u64(self, gpa: int, bits: int) -> int:
        """LOCK OR; returns the old value."""
        return atomics.fetch_or_8(self.host_address(gpa, 8, 8), bits & _U64_MASK, SEQ_CST)

    def atomic_and_u64(self, gpa: int, bits: int) -> int:
        """LOCK AND; returns the old value."""
        return atomics.fetch_and_8(self.host_address(gpa, 8, 8), bits & _U64_MASK, SEQ_CST)

    def atomic_xchg_u64(self, gpa: int, v: int) -> int:
        return atomics.exchange_8(self.host_address(gpa, 8, 8), v & _U64_MASK, SEQ_CST)

    def atomic_load_u64(self, gpa: int) -> int:
        return atomics.load_8(self.host_address(gpa, 8, 8), SEQ_CST)

    def atomic_or_u8(self, gpa: int, bits: int) -> int:
        return atomics.fetch_or_1(self.host_address(gpa, 1), bits & 0xFF, SEQ_CST)

    def atomic_xchg_u8(self, gpa: int, v: int) -> int:
        return atomics.exchange_1(self.host_address(gpa, 1), v & 0xFF, SEQ_CST)

    def atomic_and_u16(self, gpa: int, bits: int) -> int:
        return atomics.fetch_and_2(self.host_address(gpa, 2, 2), bits & 0xFFFF, SEQ_CST)

    def atomic_or_u16(self, gpa: int, bits: int) -> int:
        return atomics.fetch_or_2(self.host_address(gpa, 2, 2), bits & 0xFFFF, SEQ_CST)

    def cmpxchg_u16(self, gpa: int, expected: int, new: int) -> tuple[bool, int]:
        """LOCK CMPXCHG; returns (swapped, value seen)."""
        exp = ctypes.c_uint16(expected & 0xFFFF)
        ok = atomics.cmpxchg_2(self.host_address(gpa, 2, 2), ctypes.byref(exp), new & 0xFFFF,
                               SEQ_CST, SEQ_CST)
        return bool(ok), exp.value

    def cmpxchg_u32(self, gpa: int, expected: int, new: int) -> tuple[bool, int]:
        exp = ctypes.c_uint32(expected & 0xFFFFFFFF)
        ok = atomics.cmpxchg_4(self.host_address(gpa, 4, 4), ctypes.byref(exp), new & 0xFFFFFFFF,
                               SEQ_CST, SEQ_CST)
        return bool(ok), exp.value
