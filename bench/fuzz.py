"""Long fuzz runs of the guest-facing surfaces (the harnesses in tests/fuzz/).

    .venv/bin/python bench/fuzz.py --surface xenstore --inputs 200000 [--engine hypothesis|atheris] [--seed N]
    .venv/bin/python bench/fuzz.py --surface all --inputs 1000000     # split evenly
    .venv/bin/python bench/fuzz.py --surface shim-mmu --inputs 500     # a test guest per input
    .venv/bin/python bench/fuzz.py --surface shim-hc --inputs 500

The byte-level surfaces (tests/fuzz/) take thousands of inputs a second;
"shim-mmu" and "shim-hc" run a test guest per input (tests/mmufuzz.py,
tests/shimfuzz.py: a seed and an op count, seconds each; they also print
ops/s) and are not in "all".

Prints inputs, inputs/s and the findings (distinct first lines, with a count
and the first input that gave each, hex, to replay with --replay).  A
finding does not stop the run: it is recorded and the next input goes on.
The CI slice is the same harnesses under pytest (tests/fuzz/, fixed seed).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "fuzz"), str(ROOT / "tests")]

SURFACES = ("xenstore", "blkif", "netif", "xenbus", "hypercalls", "console", "loader")
GUEST_SURFACES = {"shim-mmu": "mmufuzz", "shim-hc": "shimfuzz"}     # surface -> module in tests/ with its Harness


def load(surface: str):
    return importlib.import_module(GUEST_SURFACES.get(surface) or f"test_fuzz_{surface}")


def one(oracle, harness, stats, data: bytes) -> None:
    stats.inputs += 1
    try:
        oracle.run(harness, data)
    except Exception as e:          # a finding: keep it, go on
        stats.record(e, data)
        reset = getattr(harness, "reset", None)
        if reset:
            reset()


def run_hypothesis(mod, harness, oracle, stats, n: int, seed: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    chunk = 20000       # one hypothesis run per chunk: its per-run bookkeeping stays small
    done = 0
    while done < n:
        k = min(chunk, n - done)

        @hseed(seed + done)
        @settings(max_examples=k, database=None, deadline=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(st.binary(max_size=harness.MAX_SIZE))
        def body(data):
            one(oracle, harness, stats, data)

        before = stats.inputs
        body()
        if stats.inputs == before:
            break
        done += stats.inputs - before


def run_atheris(mod, harness, oracle, stats, n: int, seed: int, done) -> None:
    import atheris

    def test_one(data: bytes) -> None:
        one(oracle, harness, stats, data)
        if stats.inputs >= n:
            done()              # libFuzzer's exit skips Python's atexit: report from here
            os._exit(0)

    atheris.Setup([sys.argv[0], f"-runs={n + 1}", f"-seed={seed}", f"-max_len={harness.MAX_SIZE}",
                   "-print_final_stats=0", "-close_fd_mask=0"], test_one)
    atheris.Fuzz()


def report(stats, args, out: dict, harness=None) -> None:
    elapsed = time.monotonic() - stats.t0
    rate = stats.rate()
    ops = getattr(harness, "ops_total", None)     # a guest surface: the ops inside its inputs
    per_s = f"{rate:.0f} inputs/s" if ops is None else (
        f"{rate:.3f} inputs/s, {len(harness.seeds)} distinct seeds, {ops} ops, {ops / elapsed:.0f} ops/s")
    print(f"{stats.surface}: {stats.inputs} inputs in {elapsed:.0f} s, {per_s}, "
          f"{len(stats.findings)} distinct findings", flush=True)
    for key, (count, data) in stats.findings.items():
        print(f"  FINDING x{count}: {key}\n    first input: {data.hex()}", flush=True)
    out[stats.surface] = {"inputs": stats.inputs, "seconds": round(elapsed, 1),
                          "inputs_per_s": round(rate) if ops is None else round(rate, 3), "engine": args.engine,
                          "findings": {k: c for k, (c, _) in stats.findings.items()}}
    if ops is not None:
        out[stats.surface].update(ops=ops, seeds=len(harness.seeds))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--surface", choices=SURFACES + tuple(GUEST_SURFACES) + ("all",), required=True)
    ap.add_argument("--inputs", type=int, default=10000, help="inputs in total (split evenly with 'all')")
    ap.add_argument("--engine", choices=("hypothesis", "atheris"), default="hypothesis")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mem-every", type=int, default=10,
                    help="measure the tracemalloc peak on every Nth input (0: never; it costs speed)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--replay", help="hex of one input to run alone (with --surface), showing the traceback")
    args = ap.parse_args(argv)
    from fuzzlib import Oracle, Stats, quiet_logging

    quiet_logging()
    surfaces = SURFACES if args.surface == "all" else (args.surface,)
    if args.engine == "atheris" and len(surfaces) > 1:
        ap.error("atheris runs one surface per process")
    per = args.inputs // len(surfaces)
    out: dict = {}
    for surface in surfaces:
        if args.engine == "atheris":
            import atheris

            # coverage feedback from pyvmm's own code (instrumenting everything
            # loaded, hypothesis included, takes minutes)
            with atheris.instrument_imports(include=["pyvmm"]):
                mod = load(surface)
        else:
            mod = load(surface)
        harness = mod.Harness()
        mem_limit = getattr(harness, "MEM_LIMIT", 32 << 20) if args.mem_every else None
        if args.replay:
            with Oracle(mem_limit) as oracle:
                oracle.run(harness, bytes.fromhex(args.replay))
            print("no finding")
            return 0
        stats = Stats(surface)
        with Oracle(mem_limit, max(args.mem_every, 1)) as oracle:
            if args.engine == "atheris":
                run_atheris(mod, harness, oracle, stats, per, args.seed,
                            lambda: report(stats, args, out, harness))
            else:
                run_hypothesis(mod, harness, oracle, stats, per, args.seed)
        report(stats, args, out, harness)
        close = getattr(harness, "close", None)
        if close:
            close()
    return 0


if __name__ == "__main__":
    os.nice(0)
    sys.exit(main())
