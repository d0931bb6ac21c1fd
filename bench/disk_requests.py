"""What one small disk request costs: 4 KiB direct reads, one at a time.

    python bench/disk_requests.py [--reads 1000] [--bs 4k] [--json]

Boots the default guest with a 16 MiB disk (bench/devices.py's machinery)
and times `dd if=/dev/xvda of=/dev/null bs=BS count=N iflag=direct` for N =
--reads/10 and N = --reads; the difference over the extra reads is the
marginal cost of one request (the command's start-up cancels out): wall
time, CPL0 instructions interpreted, shim entries and interrupts, KVM exits,
and the back-end's wall time.  With direct I/O and one request in flight
each read is a full round trip: the guest's syscall, blkfront, the
notification, blkback's preadv, the completion's interrupt, the guest's
wake-up from idle.  Figures, not pass/fail; progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import devices


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reads", type=int, default=1000)
    ap.add_argument("--bs", default="4k")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from pyvmm.backends.blkback import BlockBackend, DiskImage
    from pyvmm.guests.default import build_default_guest
    from pyvmm.xen_abi.hypervisor.domain import Domain

    g = build_default_guest(progress=True)
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as work:
        img = Path(work) / "disk.img"
        img.write_bytes(os.urandom(16 << 20))
        image = DiskImage.open(str(img))
        runs = {}
        try:
            with Domain(str(g.kernel), ram_size=256 << 20, cmdline=g.cmdline,
                        initrd=g.initrd.read_bytes()) as dom:
                dom.attach(BlockBackend(dom, 0, image))
                devices.say("booting the default guest")
                th, con = devices.start_guest(dom)
                meter = devices.CostMeter(dom)
                for n in (max(1, args.reads // 10), args.reads):
                    devices.say(f"{n} reads of {args.bs}")
                    before = meter.snapshot()
                    t = con.timed(f"dd if=/dev/xvda of=/dev/null bs={args.bs} count={n} iflag=direct 2>/dev/null")
                    runs[n] = (t, meter.delta(before, meter.snapshot()))
                devices.stop_guest(dom, th)
        finally:
            image.close()
    (n0, (t0, c0)), (n1, (t1, c1)) = sorted(runs.items())
    extra = n1 - n0

    def per(key: str) -> float:
        return (c1.get(key, 0) - c0.get(key, 0)) / extra

    r = {"bs": args.bs, "reads": [n0, n1], "ms": (t1 - t0) / extra * 1000,
         "cpl0_insns": per("cpl0_insns"), "kvm_exits": per("kvm_exits"),
         "shim_entries": (sum(devices.shim_entries(c1).values()) - sum(devices.shim_entries(c0).values())) / extra,
         "interrupts": per("shim interrupts"), "backend_wall_us": per("BlockBackend[0] worker_wall_us"),
         "backend_wakeups": per("BlockBackend[0] worker_runs")}
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"one {args.bs} direct read, marginal over {n0} -> {n1} reads")
    print(f"  wall time          {r['ms']:.2f} ms ({1000 / max(r['ms'], 1e-6):.0f} per second)")
    print(f"  CPL0 instructions  {r['cpl0_insns']:.0f}")
    print(f"  shim entries       {r['shim_entries']:.1f} (interrupts {r['interrupts']:.1f})")
    print(f"  KVM exits          {r['kvm_exits']:.1f}")
    print(f"  back-end           {r['backend_wall_us']:.0f} us wall, {r['backend_wakeups']:.2f} wake-ups")
    return 0


if __name__ == "__main__":
    sys.exit(main())
