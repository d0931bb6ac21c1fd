"""What the host sides of the fuzzing test guests (tests/mmufuzz.py,
tests/shimfuzz.py; guests/testguests/fuzzguest.h) share: the guest's
command line, the run's result and its "STATS" line, the minimiser's
op ranges and ddmin, bench/fuzz.py's `Harness` and the command line
tool's common options and output.  Each file keeps its own oracle.
"""
from __future__ import annotations

import argparse
import struct
from dataclasses import dataclass, field
from typing import Callable

from pyvmm.xen_abi import abi


def cmdline(seed: int, ops: int, trace: bool, only: str | None, **extra: int) -> str:
    """The guest's command line: seed=N ops=K [extra...] [trace=1] [only=A-B,C]."""
    parts = [f"seed={seed}", f"ops={ops}", *(f"{k}={v}" for k, v in extra.items())]
    if trace:
        parts.append("trace=1")
    if only:
        parts.append(f"only={only}")
    return " ".join(parts)


@dataclass
class GuestFuzzRun:
    """One guest run; the guest-specific files add their oracle's fields."""
    seed: int
    ops: int
    reason: abi.ShutdownReason | None = None
    crash_info: dict | None = None
    stats: dict[str, tuple[int, int]] = field(default_factory=dict)   # kind -> (succeeded, tried)
    ops_run: int = 0
    elapsed: float = 0.0
    trace: list[str] = field(default_factory=list)
    tail: str = ""                        # the console's end

    def take_stats(self, data: bytes) -> None:
        """The guest's "<NAME> STATS ops=N kind=ok/tried ..." line."""
        fields = data.decode().split()
        self.ops_run = int(fields[2].split("=")[1])
        for f in fields[3:]:
            k, v = f.split("=")
            ok, tried = v.split("/")
            self.stats[k] = (int(ok), int(tried))

    def stats_line(self) -> str:
        return "stats: " + " ".join(f"{k}={ok}/{tried}" for k, (ok, tried) in self.stats.items())


def ranges(ops: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the guest's only=)."""
    out, i = [], 0
    while i < len(ops):
        j = i
        while j + 1 < len(ops) and ops[j + 1] == ops[j] + 1:
            j += 1
        out.append(str(ops[i]) if i == j else f"{ops[i]}-{ops[j]}")
        i = j + 1
    return ",".join(out)


def ddmin(keep: list[int], fails: Callable[[list[int]], bool], log=print) -> list[int]:
    """Ops dropped from `keep`, in chunks halving down to one, while
    `fails(the rest)`."""
    chunk = max(len(keep) // 2, 1)
    while chunk >= 1:
        i, changed = 0, False
        while i < len(keep):
            trial = keep[:i] + keep[i + chunk:]
            if trial and len(ranges(trial)) < 900 and fails(trial):
                keep, changed = trial, True
                log(f"  {len(keep)} ops left")
            else:
                i += chunk
        if not changed:
            chunk //= 2
    return keep


class GuestHarness:
    """bench/fuzz.py's surface for a fuzzing guest: an input is a seed (4
    bytes) and an op count (2 bytes: MIN_OPS + a share of SPAN).  A
    subclass gives `run(seed, ops)` (a run with .ok, .ops_run, .finding()
    and .summary()) and `Failure`."""
    MAX_SIZE = 6
    MIN_OPS, SPAN = 500, 2000
    MEM_LIMIT = 64 << 20
    Failure: type[AssertionError] = AssertionError

    def __init__(self):
        self.ops_total = 0
        self.seeds: set[int] = set()       # distinct seeds run (an engine may repeat an input)

    def run(self, seed: int, ops: int):
        raise NotImplementedError

    def one(self, data: bytes) -> None:
        seed, ops = struct.unpack("<IH", bytes(data[:6]).ljust(6, b"\0"))
        ops = self.MIN_OPS + ops % (self.SPAN + 1)
        r = self.run(seed, ops)
        self.seeds.add(seed)
        self.ops_total += r.ops_run
        if not r.ok:
            raise self.Failure(f"{r.finding()}\n{r.summary()}")


def arg_parser(guest: str) -> argparse.ArgumentParser:
    """The command line tool's options every fuzzing guest has."""
    ap = argparse.ArgumentParser(description=f"run the {guest} guest once, or minimise a failing seed")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ops", type=int, default=300)
    ap.add_argument("--only", help="run only these ops: A-B,C,...")
    ap.add_argument("--trace", action="store_true", help="print each op and its answer")
    return ap
