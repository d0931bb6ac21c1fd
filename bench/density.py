"""Many guests on one host: time until all are up, then each idle guest's
CPU and memory.

    python bench/density.py [--guests 10] [--wave 10] [--memory 96M]
                            [--settle 10] [--seconds 20] [--png density.png] [--json]

Starts --guests default guests (the CLI, `--detach`, each its own pyvmm
process), --wave of them at a time (the next wave once the previous one
reached its shell), and times each from its start to the default guest's
banner in its log (`Run /init` too).  After each wave, once --settle
seconds have passed, it measures over --seconds each running process's CPU
time (/proc/PID/stat) and memory (/proc/PID/smaps_rollup: RSS, the guest
RAM the guest touched (the memfd, Shmem), anonymous memory, and PSS, which
splits shared libraries between the processes that map them), and the
host's MemAvailable; at the end it shuts them all down.  "Overhead" is
what a guest costs beyond the RAM it touched: PSS minus Shmem; the host's
view (MemAvailable's drop per guest) adds what the kernel holds for each
(KVM, page tables).  The per-wave points are a table and, with matplotlib
(`pip install 'pyvmm[bench]'`), a chart against the number of guests.

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
    starts, offsets = {}, {}
    for name in names:
        try:            # a log left by an earlier guest of this name: only what follows counts
            offsets[name] = (log_dir / f"{name}.log").stat().st_size
        except FileNotFoundError:
            offsets[name] = 0
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
            if len(log) < offsets[name]:        # the log was started afresh
                offsets[name] = 0
            log = log[offsets[name]:]
            now = time.monotonic() - starts[name]
            if "init" not in s and INIT in log:
                s["init"] = now
            if BANNER in log:
                s["banner"] = now
                say(f"{name} up after {now:.1f} s")
        time.sleep(0.5)
    return seen


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def measure(pids: dict[str, int], seconds: float) -> tuple[dict, dict]:
    """Each guest's CPU (% of a core over `seconds`) and memory (KiB, smaps_rollup)."""
    hz = os.sysconf("SC_CLK_TCK")
    before = {n: cpu_ticks(p) for n, p in pids.items()}
    time.sleep(seconds)
    cpu = {n: 100.0 * (cpu_ticks(p) - before[n]) / hz / seconds for n, p in pids.items()}
    return cpu, {n: memory_kib(p) for n, p in pids.items()}


def draw(series: list[dict], path: Path, title: str) -> bool:
    """CPU and memory per guest against the number of guests, as a PNG;
    False without matplotlib (the optional `bench` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n = [p["guests"] for p in series]
    fig, (cpu_ax, mem_ax) = plt.subplots(1, 2, figsize=(10, 4))
    cpu_ax.plot(n, [p["idle_cpu_pct"] for p in series], "o-", label="per guest (median)")
    cpu_ax.plot(n, [p["idle_cpu_pct_sum"] / p["guests"] for p in series], "s--", label="all guests / N")
    cpu_ax.set(xlabel="guests running", ylabel="idle CPU, % of a core", title="idle CPU per guest")
    cpu_ax.legend()
    mem_ax.plot(n, [p["overhead_mib"] for p in series], "o-", label="PSS - guest RAM (median)")
    mem_ax.plot(n, [p["host_mib_per_guest"] for p in series], "s--", label="host MemAvailable drop / N")
    mem_ax.plot(n, [p["touched_ram_mib"] for p in series], "^:", label="guest RAM touched (median)")
    mem_ax.set(xlabel="guests running", ylabel="MiB", title="memory per guest")
    mem_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=10)
    ap.add_argument("--wave", type=int, default=0, help="guests started at once (default: all)")
    ap.add_argument("--memory", default="96M")
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="per wave, to all banners")
    ap.add_argument("--png", default="density.png", help="the chart (needs matplotlib: pip install 'pyvmm[bench]')")
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
    series: list[dict] = []         # one point per wave: the guests up so far, idle
    host_before = mem_available_kib()
    t0 = time.monotonic()
    try:
        for i in range(0, len(names), wave):
            say(f"starting {', '.join(names[i:i + wave])}")
            boots.update(boot_wave(names[i:i + wave], args.memory, runtime_dir(), args.timeout))
            up = time.monotonic() - t0
            pids = {n: p for n, p in running().items() if n in names}
            say(f"{len(pids)} up after {up:.1f} s; settling {args.settle:g} s, "
                f"then measuring {args.seconds:g} s")
            time.sleep(args.settle)
            cpu, mem = measure(pids, args.seconds)
            series.append(summarize(pids, cpu, mem, host_before - mem_available_kib(), up))
        all_up = series[-1]["up_s"]
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
         **{k: v for k, v in series[-1].items() if k not in ("guests", "up_s")},
         "series": series,
         "per_guest": {n: {"boot": boots[n], "cpu_pct": cpu[n], "memory_kib": mem[n]} for n in pids}}
    title = f"{args.guests} guests of {args.memory}, {wave} started at a time"
    drawn = draw(series, Path(args.png), title)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"{title} (medians per guest)")
    print(f"  all at their shell after   {r['all_up_s']:.1f} s "
          f"(each: Run /init {r['init_s']:.1f} s, shell {r['banner_s']:.1f} s, "
          f"slowest {r['slowest_banner_s']:.1f} s)")
    print(f"  idle CPU                   {r['idle_cpu_pct']:.2f}% of a core each, "
          f"{r['idle_cpu_pct_sum']:.1f}% together")
    print(f"  RSS                        {r['rss_mib']:.1f} MiB, of which guest RAM touched "
          f"{r['touched_ram_mib']:.1f} MiB")
    print(f"  overhead (PSS - guest RAM) {r['overhead_mib']:.1f} MiB (anonymous {r['anon_mib']:.1f} MiB)")
    print(f"  host memory per guest      {r['host_mib_per_guest']:.1f} MiB (MemAvailable's drop / guests)")
    print()
    print(f"  {'guests':>6} {'up after s':>10} {'idle CPU %':>10} {'all CPU %':>9} "
          f"{'overhead MiB':>12} {'host MiB/guest':>14}")
    for p in series:
        print(f"  {p['guests']:>6} {p['up_s']:>10.1f} {p['idle_cpu_pct']:>10.2f} {p['idle_cpu_pct_sum']:>9.1f} "
              f"{p['overhead_mib']:>12.1f} {p['host_mib_per_guest']:>14.1f}")
    print(f"  chart: {args.png}" if drawn else "  (no chart: pip install 'pyvmm[bench]' for matplotlib)")
    return 0


def summarize(pids: dict, cpu: dict, mem: dict, host_used_kib: int, up_s: float) -> dict:
    """One point of the series: the guests up so far, idle."""
    med = statistics.median
    return {"guests": len(pids), "up_s": up_s,
            "idle_cpu_pct": med(cpu.values()), "idle_cpu_pct_sum": sum(cpu.values()),
            "rss_mib": med(m["Rss"] for m in mem.values()) / 1024,
            "pss_mib": med(m["Pss"] for m in mem.values()) / 1024,
            "touched_ram_mib": med(m["Pss_Shmem"] for m in mem.values()) / 1024,
            "anon_mib": med(m["Anonymous"] for m in mem.values()) / 1024,
            "overhead_mib": med((m["Pss"] - m["Pss_Shmem"]) for m in mem.values()) / 1024,
            "host_mib_per_guest": host_used_kib / 1024 / max(len(pids), 1)}


if __name__ == "__main__":
    sys.exit(main())
