"""Many guests on one host: time until all are up, then each idle guest's
CPU and memory.

    python bench/density.py [--guests 10] [--wave 10] [--memory 96M]
                            [--settle 10] [--seconds 20] [--json]

Starts --guests default guests (the CLI, `--detach`, each its own pyvmm
process), --wave of them at a time (the next wave once the previous one
reached its shell), and times each from its start to the default guest's
banner in its log (`Run /init` too).  Once all are up and --settle seconds
have passed, it measures over --seconds each process's CPU time
(/proc/PID/stat) and memory (/proc/PID/smaps_rollup: RSS, the guest RAM
the guest touched (the memfd, Shmem), anonymous memory, and PSS, which
splits shared libraries between the processes that map them), then shuts
them all down.  "Overhead" is what a guest costs beyond the RAM it
touched: PSS minus Shmem.

Figures, not pass/fail; progress on stderr, the table (or --json) on
stdout.  Guests are named density-N; any left from an interrupted run are
destroyed first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BANNER = b"pyvmm default guest ready"
INIT = b"Run /init as init process"


def say(msg: str) -> None:
    print(f"density: {msg}", file=sys.stderr, flush=True)


def pyvmm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def running() -> dict[str, int]:
    """{name: pid} of the guests `pyvmm list` shows."""
    out = pyvmm("list").stdout.splitlines()[1:]
    return {f[0]: int(f[1]) for f in (line.split() for line in out) if len(f) > 1 and f[1].isdigit()}


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])        # utime + stime


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss", "Pss_Anon", "Pss_Shmem", "Anonymous"):
            out[key] = int(value.split()[0])
    return out


def boot_wave(names: list[str], memory: str, log_dir: Path, timeout: float) -> dict[str, dict]:
    starts = {}
    for name in names:
        starts[name] = time.monotonic()
        p = pyvmm("--default-guest", "--memory", memory, "--name", name, "--detach")
        if p.returncode:
            raise SystemExit(f"density: {name} did not start: {p.stderr.strip()}")
    seen: dict[str, dict] = {n: {} for n in names}
    deadline = time.monotonic() + timeout
    while any("banner" not in s for s in seen.values()):
        if time.monotonic() > deadline:
            late = [n for n, s in seen.items() if "banner" not in s]
            raise SystemExit(f"density: not up after {timeout:.0f} s: {', '.join(late)}")
        for name, s in seen.items():
            if "banner" in s:
                continue
            try:
                log = (log_dir / f"{name}.log").read_bytes()
            except FileNotFoundError:
                continue
            now = time.monotonic() - starts[name]
            if "init" not in s and INIT in log:
                s["init"] = now
            if BANNER in log:
                s["banner"] = now
                say(f"{name} up after {now:.1f} s")
        time.sleep(0.5)
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=10)
    ap.add_argument("--wave", type=int, default=0, help="guests started at once (default: all)")
    ap.add_argument("--memory", default="96M")
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="per wave, to all banners")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from pyvmm.control import runtime_dir
    from pyvmm.guests.default import build_default_guest

    build_default_guest()                     # fetched and cached once, before the clock starts
    names = [f"density-{i}" for i in range(args.guests)]
    for name in set(names) & set(running()):
        say(f"destroying {name}, left from an earlier run")
        pyvmm("destroy", name)
    wave = args.wave or args.guests
    boots: dict[str, dict] = {}
    t0 = time.monotonic()
    try:
        for i in range(0, len(names), wave):
            say(f"starting {', '.join(names[i:i + wave])}")
            boots.update(boot_wave(names[i:i + wave], args.memory, runtime_dir(), args.timeout))
        all_up = time.monotonic() - t0
        pids = {n: p for n, p in running().items() if n in names}
        say(f"all {len(pids)} up after {all_up:.1f} s; settling {args.settle:g} s, "
            f"then measuring {args.seconds:g} s")
        time.sleep(args.settle)
        hz = os.sysconf("SC_CLK_TCK")
        before = {n: cpu_ticks(p) for n, p in pids.items()}
        time.sleep(args.seconds)
        cpu = {n: 100.0 * (cpu_ticks(p) - before[n]) / hz / args.seconds for n, p in pids.items()}
        mem = {n: memory_kib(p) for n, p in pids.items()}
    finally:
        say("shutting the guests down")
        for name in names:
            pyvmm("destroy", name)

    def med(values) -> float:
        return statistics.median(values)

    r = {"guests": args.guests, "wave": wave, "memory": args.memory, "all_up_s": all_up,
         "init_s": med(b["init"] for b in boots.values() if "init" in b),
         "banner_s": med(b["banner"] for b in boots.values()),
         "slowest_banner_s": max(b["banner"] for b in boots.values()),
         "idle_cpu_pct": med(cpu.values()), "idle_cpu_pct_sum": sum(cpu.values()),
         "rss_mib": med(m["Rss"] for m in mem.values()) / 1024,
         "pss_mib": med(m["Pss"] for m in mem.values()) / 1024,
         "touched_ram_mib": med(m["Pss_Shmem"] for m in mem.values()) / 1024,
         "anon_mib": med(m["Anonymous"] for m in mem.values()) / 1024,
         "overhead_mib": med((m["Pss"] - m["Pss_Shmem"]) for m in mem.values()) / 1024,
         "per_guest": {n: {"boot": boots[n], "cpu_pct": cpu[n], "memory_kib": mem[n]} for n in pids}}
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"{args.guests} guests of {args.memory}, {wave} started at a time (medians per guest)")
    print(f"  all at their shell after   {r['all_up_s']:.1f} s "
          f"(each: Run /init {r['init_s']:.1f} s, shell {r['banner_s']:.1f} s, "
          f"slowest {r['slowest_banner_s']:.1f} s)")
    print(f"  idle CPU                   {r['idle_cpu_pct']:.2f}% of a core each, "
          f"{r['idle_cpu_pct_sum']:.1f}% together")
    print(f"  RSS                        {r['rss_mib']:.1f} MiB, of which guest RAM touched "
          f"{r['touched_ram_mib']:.1f} MiB")
    print(f"  overhead (PSS - guest RAM) {r['overhead_mib']:.1f} MiB (anonymous {r['anon_mib']:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
