"""Console throughput: the default guest flooding hvc0, through the console
ring into Domain's console output, next to the host running the same
commands into /dev/null.

    python bench/console.py [--size-kb 64] [--workloads file,flat,od] [--json]

Boots the default guest (in process, Domain API) and runs each workload at
its shell, output on hvc0, between two marker lines:

    file    cat /flood          (a file of N bytes without newlines, made
                                 beforehand in the initramfs, untimed)
    flat    head -c N /dev/zero | tr '\\0' x
    od      head -c N/4 /dev/zero | od -v | head -c N     (64-byte lines)
    lines   yes 0123456789abcdef | head -c N              (17-byte lines; slow,
                                                           not run by default)

The time is taken on the host, from the first marker's arrival to the
second's, so it covers the guest writing, the ring and the back-end's
drain; the bytes are what arrived in between (the tty adds a CR per line).
Meanwhile it counts, per write the guest's console driver made (one
EVTCHNOP_send to the console port each): the shim's entries (traps,
interrupts, hypercalls; ~0.25 ms each on kvm_pvm), the guest's context
switches (stack_switch hypercalls), the event-check interrupts that carry
the back-end's notifications, timer interrupts, and how often the guest
found the ring full (SCHEDOP_yield, hvc_xen's wait) or idled (blocks).
Figures, not pass/fail; progress on stderr, the tables (or --json) on stdout.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
import threading
import time

PROMPT = re.compile(rb"pyvmm:/# ")
BOOT_TIMEOUT, COMMAND_TIMEOUT = 900.0, 3600.0
# the shell echoes the command line: the quotes keep the echo from matching
MARKED = "echo 'CONSOLE-BENCH-'START; {command}; echo 'CONSOLE-BENCH-'END\n"
START, END = re.compile(rb"CONSOLE-BENCH-START\r\n"), re.compile(rb"CONSOLE-BENCH-END")
FLOOD = "/flood"
# name: (untimed set-up, the timed command)
WORKLOADS = {
    "file": (f"head -c {{n}} /dev/zero | tr '\\0' x > {FLOOD}", f"cat {FLOOD}"),
    "flat": ("", "head -c {n} /dev/zero | tr '\\0' x"),
    "od": ("", "head -c {quarter} /dev/zero | od -v | head -c {n}"),
    "lines": ("", "yes 0123456789abcdef | head -c {n}"),
}
DEFAULT_WORKLOADS = "file,flat,od"


def say(msg: str) -> None:
    print(f"console: {msg}", file=sys.stderr, flush=True)


def commands(name: str, size: int) -> tuple[str, str]:
    return tuple(s.format(n=size, quarter=size // 4) for s in WORKLOADS[name])


class ArrivalLog:
    """Console output as it arrives, and when a pattern first appeared."""

    def __init__(self):
        self.text = bytearray()
        self.cond = threading.Condition()

    def feed(self, data: bytes) -> None:
        with self.cond:
            self.text += data
            self.cond.notify_all()

    def wait_for(self, rx: re.Pattern, pos: int, timeout: float, what: str) -> tuple[re.Match, float]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = rx.search(self.text, pos)
                if m:
                    return m, time.monotonic()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{what}: nothing after {timeout:.0f} s; console tail:\n"
                                       + self.text[-1500:].decode(errors="replace"))
                pos = max(pos, len(self.text) - 100)   # a flood is megabytes: rescan only the tail
                self.cond.wait(min(left, 1.0))

    def forget(self, pos: int) -> None:
        """Drop what came before pos; positions restart at 0."""
        with self.cond:
            del self.text[:pos]


def snapshot(dom) -> dict:
    from pyvmm.xen_abi.hypervisor import trace
    return {"events": dict(dom.clock.counters()), "shim": trace.shim_counters(dom),
            "exits": collections.Counter(dom.exit_counts)}


def difference(after: dict, before: dict) -> dict:
    return {group: {k: v - before[group].get(k, 0) for k, v in after[group].items()
                    if v != before[group].get(k, 0)} for group in after}


def shim_entries(shim: dict) -> int:
    """Every way into the shim is counted once: traps (on kvm_pvm syscalls and
    hypercalls arrive as #GP), interrupts, syscalls, the #GP fast paths."""
    return sum(v for k, v in shim.items()
               if k.startswith(("trap ", "fast ")) or k in ("interrupts", "syscall entries"))


def guest_run(size: int, workloads: list[str]) -> dict:
    from pyvmm.guests.default import build_default_guest
    from pyvmm.xen_abi.hypervisor.domain import Domain

    g = build_default_guest(progress=True)
    results = {}
    log = ArrivalLog()
    with Domain(str(g.kernel), ram_size=256 << 20, cmdline=g.cmdline,
                initrd=g.initrd.read_bytes()) as dom:
        dom.on_console_output.add(log.feed)
        box: dict = {}
        th = threading.Thread(target=lambda: box.setdefault("r", dom.run(timeout=None)), daemon=True)
        say("booting the default guest")
        th.start()
        pos = log.wait_for(PROMPT, 0, BOOT_TIMEOUT, "first prompt")[0].end()
        for name in workloads:
            setup, command = commands(name, size)
            if setup:
                dom.send_console_input(f"{setup}\n".encode())
                pos = log.wait_for(PROMPT, pos, COMMAND_TIMEOUT, f"set-up of {name}")[0].end()
            say(f"guest: {name}: {command}")
            before = snapshot(dom)
            dom.send_console_input(MARKED.format(command=command).encode())
            start, t_start = log.wait_for(START, pos, COMMAND_TIMEOUT, f"{name} start")
            end, t_end = log.wait_for(END, start.end(), COMMAND_TIMEOUT, f"{name} end")
            after = snapshot(dom)
            pos = log.wait_for(PROMPT, end.end(), COMMAND_TIMEOUT, f"prompt after {name}")[0].end()
            results[name] = {"command": command, "bytes": end.start() - start.end(),
                             "seconds": t_end - t_start, "counts": difference(after, before)}
            log.forget(pos)
            pos = 0
        dom.send_console_input(b"poweroff -f\n")
        th.join(120)
        if th.is_alive():
            dom.stop()
            th.join(30)
    return results


def host_run(size: int, workloads: list[str]) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as work:
        for name in workloads:
            setup, command = (s.replace(FLOOD, f"{work}/flood") for s in commands(name, size))
            if setup:
                subprocess.run(["sh", "-c", setup], check=True)
            t = time.monotonic()
            subprocess.run(["sh", "-c", f"{command} > /dev/null"], check=True)
            out[name] = {"command": command, "seconds": time.monotonic() - t}
    return out


def per_write(counts: dict) -> dict:
    """What one console write of the guest cost, on average."""
    ev, shim = counts["events"], counts["shim"]
    writes = max(ev.get("backend_sends", 0), 1)
    return {"shim entries": shim_entries(shim) / writes,
            "context switches": shim.get("hypercall stack_switch", 0) / writes,
            "event-check irqs": ev.get("check_irqs", 0) / writes,
            "timer irqs": ev.get("timer_irqs", 0) / writes,
            # sched_op is yield (hvc_xen waiting for room in `out`) or block
            "ring-full yields": max(shim.get("hypercall sched_op", 0) - ev.get("blocks", 0), 0) / writes,
            "idle blocks": ev.get("blocks", 0) / writes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-kb", type=int, default=64, help="bytes each workload writes, in KiB")
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                    help=f"comma-separated, from {', '.join(WORKLOADS)} (default {DEFAULT_WORKLOADS})")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    size = args.size_kb << 10
    guest = guest_run(size, workloads)
    say("host baseline")
    host = host_run(size, workloads)
    if args.json:
        print(json.dumps({"size": size, "guest": guest, "host": host}, indent=1))
        return 0
    print(f"{'workload':9} {'guest KB/s':>10} {'host KB/s':>10} {'guest/host':>10} "
          f"{'guest writes':>12} {'bytes/write':>11}")
    for name in workloads:
        gr, hr = guest[name], host[name]
        g_rate, h_rate = gr["bytes"] / gr["seconds"] / 1000, size / hr["seconds"] / 1000
        writes = gr["counts"]["events"].get("backend_sends", 0)
        print(f"{name:9} {g_rate:10.1f} {h_rate:10.0f} {g_rate / h_rate:10.5f} "
              f"{writes:12d} {gr['bytes'] / max(writes, 1):11.0f}")
    print("\nper guest console write:")
    columns = list(per_write(guest[workloads[0]]["counts"]))
    print(f"{'workload':9} " + " ".join(f"{c:>16}" for c in columns))
    for name in workloads:
        costs = per_write(guest[name]["counts"])
        print(f"{name:9} " + " ".join(f"{costs[c]:16.2f}" for c in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
