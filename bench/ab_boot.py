"""Before and after: the default guest booted by two checkouts in turn.

    python bench/ab_boot.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 2]

Each checkout needs pyvmm importable by its own interpreter (a venv with
`pip install -e .` inside it, or the system one when the checkout is the
installed one: pass --python to choose).  The two boot alternately, A, B,
A, B, ..., so a machine whose load drifts penalises both alike; the table
gives the medians and the ratio B/A of the time to `Run /init`, to
poweroff, of the shim's entries (all its counters summed) and, where the
checkout has Vcpu.stats() and the KVM counts them (kvm_pvm), of the CPL0
instructions to `Run /init` (init_insns) and in all (insns): exact, whatever
the machine's load.
Figures, not pass/fail; progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ONE_BOOT = r'''
import json, time
from pyvmm.guests.default import POWEROFF_PARAM, build_default_guest
from pyvmm.xen_abi.hypervisor.domain import Domain
from pyvmm.xen_abi.shim import priv
g = build_default_guest(progress=False)
t0 = time.monotonic()
seen = {}
dom = Domain(g.kernel.read_bytes(), ram_size=256 << 20, cmdline=g.cmdline + " " + POWEROFF_PARAM,
             initrd=g.initrd.read_bytes())
# CPL0 instructions KVM interpreted (kvm_pvm), where the checkout can read them
stats = dom.vcpu.stats() if hasattr(dom.vcpu, "stats") else None
def insns():
    return stats.read().get("insn_emulation") if stats else None
recent = bytearray()
def watch(data):
    recent.extend(data)
    del recent[:-4096]
    if "init" not in seen and b"Run /init" in recent:
        seen["init"] = time.monotonic() - t0
        seen["init_insns"] = insns()     # console output runs on the vCPU thread: exact
dom.on_console_output.add(watch)
dom.run(timeout=1800)
entries = sum(priv.read_counters(dom.region.mem, dom.region.vcpus[0].percpu_off).values())
total_insns = insns()
dom.close()
print(json.dumps({"init": seen.get("init"), "poweroff": time.monotonic() - t0, "entries": entries,
                  "init_insns": seen.get("init_insns"), "insns": total_insns}))
'''


def interpreter(checkout: Path, given: str | None) -> str:
    if given:
        return given
    venv = checkout / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--python", help="interpreter for both checkouts (default: each one's .venv)")
    args = p.parse_args(argv)
    results: dict[Path, list[dict]] = {args.old: [], args.new: []}
    for n in range(args.rounds):
        for checkout in (args.old, args.new):
            print(f"ab_boot: round {n + 1}, {checkout}", file=sys.stderr, flush=True)
            proc = subprocess.run([interpreter(checkout, args.python), "-c", ONE_BOOT],
                                  cwd=checkout, capture_output=True, text=True)
            if proc.returncode:
                print(f"ab_boot: {checkout}: the boot failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            results[checkout].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'':10s} {'A (old)':>12s} {'B (new)':>12s}   B/A")
    for key in ("init", "poweroff", "entries", "init_insns", "insns"):
        a, b = (statistics.median(r[key] for r in results[c]) if all(r.get(key) is not None
                for r in results[c]) else None for c in (args.old, args.new))
        cell = [f"{v:12.1f}" if v is not None else f"{'n/a':>12s}" for v in (a, b)]
        ratio = f"{b / a:5.2f}" if a and b is not None else "  n/a"
        print(f"{key:10s} {cell[0]} {cell[1]}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
