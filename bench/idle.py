"""What an idle guest costs: host CPU and shim entries per second.

    python bench/idle.py [--memory 96M] [--seconds 30] [--settle 10] [--extra-cmdline STR]

Boots the default guest (to its shell, which then waits on the console),
lets boot-time work settle, then measures this process's CPU time (the
vCPU thread and pyvmm's own threads) over --seconds, which shim entries
the idle guest makes per second (the shim's counters), the vCPU's KVM
statistics (CPL0 instructions interpreted, exits, halts) and each host
thread's CPU time and context switches (no pyvmm thread should wake while
the guest idles).  Figures, not pass/fail; on kvm_pvm every shim entry
costs tens to hundreds of microseconds (bench/cpl0_costs.py), so entries
per second times that price is the idle cost.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def thread_ticks() -> dict[int, tuple[int, int]]:
    """{tid: (CPU clock ticks, context switches)} of this process's threads."""
    import os
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            with open(f"/proc/self/task/{tid}/status") as f:
                switches = sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except OSError:
            continue            # the thread ended
        out[int(tid)] = (int(fields[11]) + int(fields[12]), switches)   # utime + stime
    return out


def thread_name(tid: int) -> str:
    for t in threading.enumerate():
        if t.native_id == tid:
            return t.name
    return f"thread {tid} (not Python's)"


# the vCPU's KVM statistics worth a line: CPL0 instructions KVM interpreted
# (kvm_pvm), exits, the halts (SCHEDOP_block's hlt), their wake-ups and the
# time KVM spent polling before it let the thread sleep (halt_poll_ns)
KVM_STATS = ("insn_emulation", "exits", "halt_exits", "halt_wakeup", "halt_poll_success_ns", "halt_poll_fail_ns")


def kvm_stats(dom):
    try:
        return dom.vcpu.stats()
    except Exception:       # KVM without KVM_GET_STATS_FD: figures without them
        return None


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
        stats = kvm_stats(dom)
        k0, py0, th0 = stats.read() if stats else {}, sum(dom.exit_counts.values()), thread_ticks()
        before, cpu0, t0 = priv.read_counters(dom.region.mem, percpu), cpu_seconds(), time.monotonic()
        time.sleep(args.seconds)
        after, cpu1, t1 = priv.read_counters(dom.region.mem, percpu), cpu_seconds(), time.monotonic()
        k1, py1, th1 = stats.read() if stats else {}, sum(dom.exit_counts.values()), thread_ticks()
        span = t1 - t0
        result["cpu_percent"] = 100 * (cpu1 - cpu0) / span
        result["entries"] = {k: (n - before.get(k, 0)) / span for k, n in after.items() if n != before.get(k, 0)}
        result["kvm"] = {k: (k1[k] - k0.get(k, 0)) / span for k in KVM_STATS if k in k1}
        result["kvm"]["exits to Python"] = (py1 - py0) / span
        # which host threads ran (no pyvmm thread should wake while the guest idles)
        result["threads"] = {thread_name(tid): (ticks - th0.get(tid, (0, 0))[0], sw - th0.get(tid, (0, 0))[1])
                             for tid, (ticks, sw) in th1.items()}
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
    # each way into the shim once (bench/console.py's shim_entries): a
    # hypercall is a "syscall entry" (kvm_pvm) *and* its "hypercall" line
    entries = sum(v for k, v in result["entries"].items()
                  if k.startswith(("trap ", "fast ")) or k in ("interrupts", "syscall entries"))
    print(f"idle guest ({args.memory}): {result['cpu_percent']:.2f}% of a core, "
          f"{entries:.1f} shim entries/s (hypercalls among them by kind below)")
    for kind, rate in sorted(result["entries"].items(), key=lambda kv: -kv[1]):
        print(f"  {rate:8.2f}/s  {kind}")
    print("vCPU 0 (KVM statistics, exits to Python):")
    for kind, rate in result["kvm"].items():
        print(f"  {rate:8.2f}/s  {kind}")
    hz = os.sysconf("SC_CLK_TCK")
    print(f"host threads (CPU, context switches in {args.seconds:g} s):")
    for name, (ticks, switches) in sorted(result["threads"].items()):
        print(f"  {ticks / hz:6.2f} s  {switches:6d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
