"""What the guest-facing fuzz harnesses share (tests/fuzz/test_*.py).

Each harness module has a `Harness` class: built once, then `one(data)`
plays one input, a byte string, against a real surface; the bytes are read
through `Input` (a FuzzedDataProvider that pads with zeros), so any engine
that makes bytes can drive it: hypothesis in the CI slice (fixed seed, small
budget), hypothesis or atheris in the long run (bench/fuzz.py).

`one()` raises `Finding` when an oracle fails; any other exception out of
it is a finding too (it escaped the surface).  `Oracle` adds the checks
common to every surface: no exception reported by a thread
(threading.excepthook), no error logged with a traceback (the surfaces
catch their own bugs and log them so: a caught bug is still a bug), and
the Python memory one input may take (tracemalloc peak).
"""
from __future__ import annotations

import logging
import resource
import struct
import threading
import time
import tracemalloc
from pathlib import Path

from hypothesis.configuration import set_hypothesis_home_dir

from byte_rings import ByteRing, GuestRingPage

# hypothesis keeps a cache of constants even without an example database:
# out of the checkout with it
set_hypothesis_home_dir(Path.home() / ".cache" / "pyvmm" / "hypothesis")


class Finding(AssertionError):
    """An oracle failed: a host-side defect (or a harness bug)."""


class Input:
    """Typed values from fuzz bytes; zeros once they run out."""

    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def raw(self, n: int) -> bytes:
        b = self.data[self.pos:self.pos + n]
        self.pos += len(b)
        return b + bytes(n - len(b))

    def u8(self) -> int:
        p = self.pos
        if p < len(self.data):
            self.pos = p + 1
            return self.data[p]
        return 0

    def u16(self) -> int:
        return struct.unpack("<H", self.raw(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.raw(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.raw(8))[0]

    def below(self, n: int) -> int:
        """0 <= value < n (n <= 2**32)."""
        if n <= 1:
            return 0
        return (self.u8() if n <= 256 else self.u32()) % n

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def chance(self, num: int, den: int = 256) -> bool:
        """True with probability about num/den (den <= 256); once the bytes
        run out, the likelier way (zero padding must not make every rare
        event happen at once)."""
        if self.pos >= len(self.data):
            return 2 * num > den
        return self.u8() * den < num * 256

    def blob(self, limit: int) -> bytes:
        """A length-prefixed byte string of at most `limit` bytes."""
        n = self.u16() % (limit + 1)
        return self.raw(min(n, self.remaining()))

    def interesting(self, bits: int) -> int:
        """An integer of `bits` bits, often at a boundary."""
        top = (1 << bits) - 1
        k = self.u8()
        if k < 64:
            return (0, 1, 2, top, top - 1, 1 << (bits - 1), (1 << (bits - 1)) - 1, 8)[k % 8]
        return int.from_bytes(self.raw(bits // 8), "little") & top


def ci_settings(max_examples: int):
    """The CI slice: a fixed seed, a small budget, nothing written into the
    checkout (no example database, no explain phase's patch files)."""
    from hypothesis import HealthCheck, Phase, settings

    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=list(HealthCheck))


class _RecordErrors(logging.Handler):
    """Error records with a traceback: a surface caught a bug of its own."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        if record.exc_info:
            self.records.append(record)


class Oracle:
    """The checks every surface shares, around each input.

    `mem_limit`: the Python memory (tracemalloc peak, bytes) one input may
    take; measured on every `mem_every`-th input, tracing only that input
    (tracing all the time would slow everything down several times); None
    never measures.  The host process as a whole is held to `rss_limit`
    (peak resident set, checked every 256 inputs) whatever is measured."""

    def __init__(self, mem_limit: int | None = 32 << 20, mem_every: int = 16,
                 rss_limit: int = 2 << 30):
        self.mem_limit = mem_limit
        self.mem_every = mem_every
        self.rss_limit = rss_limit
        self.count = 0
        self.thread_errors: list = []
        self._handler = _RecordErrors()
        self._old_hook = None

    def __enter__(self):
        self._old_hook = threading.excepthook
        threading.excepthook = self._thread_died
        logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(self, *exc):
        threading.excepthook = self._old_hook
        logging.getLogger().removeHandler(self._handler)

    def run(self, harness, data: bytes) -> None:
        """One input through `harness.one`, with the shared oracles."""
        self.count += 1
        measure = (self.mem_limit is not None and self.count % self.mem_every == 0
                   and not tracemalloc.is_tracing())
        if measure:
            tracemalloc.start()
        try:
            harness.one(data)
            peak = tracemalloc.get_traced_memory()[1] if measure else 0
        finally:
            if measure:
                tracemalloc.stop()
        if peak > (self.mem_limit or 0):
            raise Finding(f"one input took {peak >> 20} MiB of Python memory "
                          f"(limit {self.mem_limit >> 20} MiB)")
        if self.count % 256 == 0:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if rss > self.rss_limit:
                raise Finding(f"the fuzzing process grew to {rss >> 20} MiB")
        self.check()

    def run_or_reset(self, harness, data: bytes) -> None:
        """run(), and the harness reset if the input failed (so that the
        next input hypothesis tries, e.g. while shrinking, starts clean)."""
        try:
            self.run(harness, data)
        except BaseException:
            harness.reset()
            raise

    def _thread_died(self, args):
        self.thread_errors.append(args)

    def check(self) -> None:
        if self.thread_errors:
            a = self.thread_errors.pop(0)
            self.thread_errors.clear()
            raise Finding(f"thread {a.thread.name if a.thread else '?'} died: "
                          f"{a.exc_type.__name__}: {a.exc_value}")
        if self._handler.records:
            r = self._handler.records[0]
            self._handler.records.clear()
            etype, evalue = r.exc_info[0], r.exc_info[1]
            raise Finding(f"{r.name}: {r.getMessage()}: caught {etype.__name__}: {evalue}")


class SliceRingPage(GuestRingPage):
    """byte_rings' guest end of a ring page, with put/take by slices (the
    fuzzers move many bytes)."""

    def put(self, ring: ByteRing, data: bytes) -> int:
        cons, prod = self.get(ring.cons), self.get(ring.prod)
        n = min(ring.size - ((prod - cons) & 0xFFFFFFFF), len(data))
        if n <= 0:
            return 0
        start = prod % ring.size
        first = min(n, ring.size - start)
        self.page[ring.data + start:ring.data + start + first] = data[:first]
        self.page[ring.data:ring.data + n - first] = data[first:n]
        self.set(ring.prod, prod + n)
        return n

    def take(self, ring: ByteRing, limit: int | None = None) -> bytes:
        cons, prod = self.get(ring.cons), self.get(ring.prod)
        used = (prod - cons) & 0xFFFFFFFF
        n = used if limit is None else min(used, limit)
        start = cons % ring.size
        first = min(n, ring.size - start)
        data = bytes(self.page[ring.data + start:ring.data + start + first]
                     + self.page[ring.data:ring.data + n - first])
        self.set(ring.cons, cons + n)
        return data


def quiet_logging() -> None:
    """Guest-caused warnings are expected by the thousand: keep them off the
    console and cheap; errors still reach the Oracle's handler."""
    root = logging.getLogger()
    root.setLevel(logging.ERROR)
    root.addHandler(logging.NullHandler())     # instead of printing them (lastResort)


class Stats:
    """Inputs, time and findings of one long run."""

    def __init__(self, surface: str):
        self.surface = surface
        self.inputs = 0
        self.findings: dict[str, tuple[int, bytes]] = {}   # first line -> (count, first input)
        self.t0 = time.monotonic()

    def record(self, exc: BaseException, data: bytes) -> None:
        key = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        n, first = self.findings.get(key, (0, data))
        self.findings[key] = (n + 1, first)

    def rate(self) -> float:
        return self.inputs / max(time.monotonic() - self.t0, 1e-9)
