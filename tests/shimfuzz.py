"""Fuzzing the shim's non-MMU hypercalls and its privileged-instruction
emulation (xen_abi/shim/shim.c, events.c, priv.c; issue 11) through the
shimfuzz test guest (guests/testguests/shimfuzz.c), which issues a
generated sequence of them from a seed and puts back after each op what
the op may have changed, so that it keeps running.  The oracle:

  - the guest finishes its ops (its PASS line) and powers off;
  - the shim never faults itself (ShimPanic);
  - no hang (the run's timeout, DomainTimeout);
  - the domain is not crashed (a crash reason the shim gives for a guest
    fault is still a finding: this guest should survive everything);
  - pyvmm logs no traceback (a handler's exception, dispatch.py).

    res = run_seed(seed=7, ops=300)      # a ShimFuzzRun: .ok, .finding(), ...
    python3 tests/shimfuzz.py --seed 7 --ops 300 [--trace] [--minimise]

bench/fuzz.py's surface "shim-hc" runs this with seeds from its engine
(`Harness`).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from guestfuzz import GuestFuzzRun, GuestHarness, arg_parser, cmdline, ddmin, ranges
from pyvmm.guests.testguests import build_testguest
from pyvmm.xen_abi import abi
from pyvmm.xen_abi.hypervisor.domain import Domain, DomainTimeout, ShimPanic
from pyvmm.xen_abi.hypervisor.trace import describe_crash

PASS = "TESTGUEST shimfuzz: PASS"


@dataclass
class ShimFuzzRun(GuestFuzzRun):
    panic: str = ""                       # ShimPanic's text
    hang: str = ""                        # DomainTimeout's text
    tracebacks: list[str] = field(default_factory=list)   # pyvmm log records with a traceback
    traps: dict[int, int] = field(default_factory=dict)   # vector -> faults the guest took

    @property
    def ok(self) -> bool:
        return (self.reason == abi.ShutdownReason.poweroff and not self.panic and not self.hang
                and not self.tracebacks and self.tail.rstrip().endswith(PASS))

    def finding(self) -> str:
        """One line naming the kind of failure, for grouping many runs'."""
        if self.panic:
            return "shim fault: " + self.panic.splitlines()[0][:160]
        if self.hang:
            return "hang"
        if self.tracebacks:
            return "pyvmm traceback: " + self.tracebacks[0].splitlines()[0][:160]
        if self.reason == abi.ShutdownReason.crash:
            ci = self.crash_info or {}
            return f"domain crashed: {describe_crash(ci['info']) if 'info' in ci else ci}"
        if self.reason == abi.ShutdownReason.poweroff:
            lines = self.tail.strip().splitlines()
            return "guest did not finish: " + (lines[-1][:160] if lines else "no output")
        return f"guest ended: {self.reason.name if self.reason is not None else '?'}"

    def summary(self) -> str:
        head = f"seed {self.seed}: {self.ops_run} ops, {self.elapsed:.1f} s: "
        if self.ok:
            return head + "ok"
        return "\n".join([head + self.finding(), f"  crash {self.crash_info}; panic {self.panic[:600]}",
                          *self.tracebacks[:2], f"  console: ...{self.tail[-600:]}"])


class _Tracebacks(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.seen.append(self.format(record))


def run_seed(seed: int, ops: int, *, trace: bool = False, only: str | None = None,
             timeout: float = 120.0) -> ShimFuzzRun:
    """One guest run: `ops` ops from `seed` (those named by `only`, "A-B,C")."""
    out = ShimFuzzRun(seed, ops)
    tb = _Tracebacks()
    t0 = time.monotonic()
    root = logging.getLogger()
    root.addHandler(tb)
    try:
        with Domain(str(build_testguest("shimfuzz")), cmdline=cmdline(seed, ops, trace, only)) as dom:
            def on_output(data: bytes) -> None:
                if data.startswith(b"SHIMFUZZ STATS"):
                    out.take_stats(data)
                elif data.startswith(b"SHIMFUZZ TRAPS"):
                    out.traps = {int(k): int(v) for k, v in (f.split("=") for f in data.decode().split()[2:])}
                elif trace and data.startswith(b"op "):
                    out.trace.append(data.decode().rstrip("\n"))

            dom.on_console_output.add(on_output)
            try:
                res = dom.run(timeout=timeout)
            except ShimPanic as e:
                out.panic = str(e) or repr(e)
            except DomainTimeout as e:
                out.hang = str(e)
            if out.panic or out.hang:
                out.elapsed = time.monotonic() - t0
                out.tail = dom.console.decode(errors="replace")[-2000:]
                return out
    finally:
        root.removeHandler(tb)
        out.tracebacks = tb.seen
    out.reason, out.crash_info, out.elapsed = res.reason, res.crash_info, res.elapsed
    out.tail = res.text[-2000:]
    return out


def minimise(seed: int, ops: int, log=print) -> tuple[int, str]:
    """The shortest prefix of the seed's ops that still fails the same way
    (the same finding line), then ops dropped while it does (ddmin).
    Returns (ops, only)."""
    first = run_seed(seed, ops)
    if first.ok:
        raise ValueError(f"seed {seed}, {ops} ops: nothing to minimise")
    want = first.finding()
    lo, hi = 1, ops           # the shortest failing prefix, by bisection
    while lo < hi:
        mid = (lo + hi) // 2
        if run_seed(seed, mid).finding() == want:
            hi = mid
        else:
            lo = mid + 1
    keep = list(range(hi))
    log(f"prefix: {hi} ops ({want})")

    def fails(subset: list[int]) -> bool:
        r = run_seed(seed, hi, only=ranges(subset))
        return not r.ok and r.finding() == want

    return hi, ranges(ddmin(keep, fails, log))


class ShimFuzzFailure(AssertionError):
    """The shim faulted, hung, crashed the domain, or pyvmm logged a traceback."""


class Harness(GuestHarness):
    """bench/fuzz.py's surface "shim-hc" (guestfuzz.GuestHarness)."""
    Failure = ShimFuzzFailure

    def run(self, seed: int, ops: int) -> ShimFuzzRun:
        return run_seed(seed, ops)


def main(argv=None) -> int:
    ap = arg_parser("shimfuzz")
    ap.add_argument("--minimise", action="store_true", help="minimise the seed's failure")
    args = ap.parse_args(argv)
    if args.minimise:
        args.ops, args.only = minimise(args.seed, args.ops)
        args.trace = True
        print(f"minimal: --seed {args.seed} --ops {args.ops} --only {args.only} --trace")
    r = run_seed(args.seed, args.ops, trace=args.trace, only=args.only)
    print("\n".join(r.trace))
    print(r.summary())
    print(r.stats_line())
    print("traps: " + " ".join(f"{v}={n}" for v, n in sorted(r.traps.items())))
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
