"""The price list of the shim's hot paths: CPL0 instructions and time per operation.

    python bench/shim_costs.py [--repeat 3] [--json]

Runs the `shimcost` test guest (guests/testguests/shimcost.c), which does
each hot operation of a Linux guest (the hypercalls of a boot and of an
idle tick, an exception bounced to the guest and back, an event upcall)
COST_N times between two console lines.  At each line this reads the vCPU's
KVM statistics: on kvm_pvm, `insn_emulation` counts the CPL0 instructions
KVM interpreted, i.e. the shim's exact path length, whatever the machine's
load; `exits` counts the KVM exits.  Per operation: instructions, KVM exits,
exits to Python and wall time, each less the "empty" block's (the markers'
own cost).  Instruction counts are exact and repeatable; times move with
the host's load (median of --repeat runs).

On another KVM (the faithful lane's kvm_amd) nothing is interpreted:
instructions read 0 and only the times mean something.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def say(msg: str) -> None:
    print(f"shim_costs: {msg}", file=sys.stderr, flush=True)


def run_once() -> dict[str, dict[str, float]]:
    """One boot of the shimcost guest: {operation: {insns, exits, python, us}} per op."""
    from pyvmm.guests.testguests import build_testguest
    from pyvmm.xen_abi.hypervisor.domain import Domain

    marks: list[tuple[str, dict, int, float]] = []
    count = [0]             # COST_N, as the guest reports it
    pending = bytearray()
    with Domain(str(build_testguest("shimcost")), ram_size=32 << 20) as dom:
        stats = dom.vcpu.stats()

        def on_console(data: bytes) -> None:
            # the guest's console_io exits run on the vCPU thread: the
            # statistics read here are exact at the marker
            pending.extend(data)
            while b"\n" in pending:
                line, _, rest = bytes(pending).partition(b"\n")
                pending[:] = rest
                if line.startswith(b"COSTN "):
                    count[0] = int(line[6:])
                elif line.startswith(b"COST "):
                    marks.append((line[5:].decode(), stats.read(),
                                  sum(dom.exit_counts.values()), time.monotonic()))

        dom.on_console_output.add(on_console)
        dom.run(timeout=600)
        console = dom.console.decode(errors="replace")
    if "TESTGUEST shimcost: PASS" not in console:
        raise SystemExit(f"shim_costs: the shimcost guest failed:\n{console[-2000:]}")
    n = count[0]
    raw = {}
    for (name, s0, p0, t0), (_next, s1, p1, t1) in zip(marks, marks[1:]):
        raw[name] = {"insns": s1["insn_emulation"] - s0["insn_emulation"],
                     "exits": s1["exits"] - s0["exits"],
                     "fails": s1["insn_emulation_fail"] - s0["insn_emulation_fail"],
                     "python": p1 - p0, "us": (t1 - t0) * 1e6}
    empty = raw.pop("empty")
    return {name: {k: (v - empty[k]) / n for k, v in r.items()} for name, r in raw.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="boots of the guest (median of times)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    runs = []
    for i in range(args.repeat):
        say(f"run {i + 1}/{args.repeat}")
        runs.append(run_once())
    table = {}
    for name in runs[0]:
        table[name] = {k: statistics.median(r[name][k] for r in runs) for k in runs[0][name]}
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    print(f"{'operation':26s} {'CPL0 insns':>11s} {'KVM exits':>10s} {'emul. fails':>11s} {'to Python':>10s} {'µs':>9s}")
    for name, r in table.items():
        print(f"{name:26s} {r['insns']:11.1f} {r['exits']:10.2f} {r['fails']:11.2f} {r['python']:10.2f} {r['us']:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
