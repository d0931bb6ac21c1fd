"""What an idle guest costs: host CPU and shim entries per second.

    python bench/idle.py [--memory 96M] [--seconds 30] [--settle 10] [--extra-cmdline STR]

Boots the default guest (to its shell, which then waits on the console),
lets boot-time work settle, then measures this process's CPU time (the
vCPU thread and pyvmm's own threads) over --seconds, and which shim entries
the idle guest makes per second (the shim's counters).  Figures, not
pass/fail; on kvm_pvm every shim entry costs tens to hundreds of
microseconds (bench/cpl0_costs.py), so entries per second times that price
is the idle cost.
"""
from __future__ import annotations

import argparse
import resource
import sys
import threading
import time


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory", default="96M")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--settle", type=float, default=10.0)
    p.add_argument("--extra-cmdline", default="", metavar="STR",
                   help="appended to the guest's command line (to compare a kernel option)")
    args = p.parse_args(argv)

    from pyvmm.cli import parse_size
    from pyvmm.guests.default import BANNER, build_default_guest
    from pyvmm.xen_abi.hypervisor.domain import Domain
    from pyvmm.xen_abi.shim import priv

    guest = build_default_guest()
    cmdline = " ".join(filter(None, (guest.cmdline, args.extra_cmdline)))
    dom = Domain(guest.kernel.read_bytes(), ram_size=parse_size(args.memory), cmdline=cmdline,
                 initrd=guest.initrd.read_bytes())
    ready = threading.Event()
    recent = bytearray()

    def watch(data: bytes) -> None:
        recent.extend(data)
        del recent[:-4096]
        if BANNER.encode() in recent:
            ready.set()

    result: dict = {}

    def measure() -> None:
        if not ready.wait(1800):
            result["error"] = "the guest did not reach its shell"
            dom.stop()
            return
        print(f"idle: guest ready; settling {args.settle:g} s, then measuring {args.seconds:g} s",
              file=sys.stderr, flush=True)
        time.sleep(args.settle)
        percpu = dom.region.vcpus[0].percpu_off
        before, cpu0, t0 = priv.read_counters(dom.region.mem, percpu), cpu_seconds(), time.monotonic()
        time.sleep(args.seconds)
        after, cpu1, t1 = priv.read_counters(dom.region.mem, percpu), cpu_seconds(), time.monotonic()
        span = t1 - t0
        result["cpu_percent"] = 100 * (cpu1 - cpu0) / span
        result["entries"] = {k: (n - before.get(k, 0)) / span for k, n in after.items() if n != before.get(k, 0)}
        dom.stop()

    dom.on_console_output.add(watch)
    threading.Thread(target=measure, name="idle-measure", daemon=True).start()
    print("idle: booting the default guest (a minute or more on kvm_pvm)", file=sys.stderr, flush=True)
    try:
        dom.run(timeout=None)
    finally:
        dom.close()
    if "error" in result:
        print(f"idle: {result['error']}", file=sys.stderr)
        return 1
    print(f"idle guest ({args.memory}): {result['cpu_percent']:.2f}% of a core, "
          f"{sum(result['entries'].values()):.0f} shim entries/s")
    for kind, rate in sorted(result["entries"].items(), key=lambda kv: -kv[1]):
        print(f"  {rate:8.1f}/s  {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
