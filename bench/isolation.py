"""Isolation: how much noisy neighbours slow a quiet guest, without and
with limits (pyvmm/limits.py cgroups, backends/ratelimit.py buckets).

    python bench/isolation.py [--repeat 3] [--json]

The quiet guest is the default guest, in this process (Domain API), with a
32 MiB disk; in its shell, timed by busybox `time`, a CPU-bound shell loop
and a read of its whole disk with the page cache dropped first.  Each
condition starts its neighbours through the CLI (`--detach`, each its own
pyvmm process), measures the quiet guest --repeat times (median), then
destroys them:

    alone                  no neighbours
    cpu hogs               two `spinner` test guests (one per host core)
    cpu hogs, capped       the same with --cpu-cap 25 each
    disk storm             a default guest re-reading its own disk in a loop
    disk storm, limited    the same with --cpu-cap 25 and its disk at rate=4M

Slowdown is each time over the time alone.  No network flood yet (the
quiet guest has no interface here).  Figures, not pass/fail; progress on
stderr, the table (or --json) on stdout.  Neighbours are named iso-N; any
left from an interrupted run are destroyed first.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devices import PROMPT, Console  # noqa: E402  (the same console driver)

BANNER = "pyvmm default guest ready"
CPU_LOOP = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done"
DISK_READ = "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/xvda of=/dev/null bs=1M 2>/dev/null"
STORM = ("while :; do echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/xvda of=/dev/null bs=1M 2>/dev/null;"
         " done &")
BOOT_TIMEOUT = 900.0


def say(msg: str) -> None:
    print(f"isolation: {msg}", file=sys.stderr, flush=True)


def pyvmm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def runtime_log(name: str) -> Path:
    from pyvmm.control import runtime_dir

    return runtime_dir() / f"{name}.log"


def start(name: str, *argv: str) -> None:
    p = pyvmm(*argv, "--name", name, "--detach", timeout=600)
    if p.returncode:
        raise RuntimeError(f"{name}: {p.stderr.strip()}")


def wait_log(name: str, marker: str, timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while marker not in runtime_log(name).read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: no {marker!r} in its log after {timeout:.0f} s")
        time.sleep(0.5)


def type_into(name: str, line: str) -> None:
    """A command line into a detached guest's shell (pyvmm console, then gone)."""
    con = subprocess.Popen([sys.executable, "-m", "pyvmm", "console", name], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = bytearray()

    def pump():
        for chunk in iter(lambda: con.stdout.read1(4096), b""):
            out.extend(chunk)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    con.stdin.write((line + "\n").encode())
    con.stdin.flush()
    deadline = time.monotonic() + 300
    while len(PROMPT.findall(bytes(out))) < 2 and time.monotonic() < deadline:   # replayed + after ours
        time.sleep(0.2)
    con.kill()
    con.wait()


def destroy_all(prefix: str = "iso-") -> None:
    for line in pyvmm("list").stdout.splitlines()[1:]:
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            pyvmm("destroy", name)


def measure(con: Console, repeat: int) -> dict:
    cpu = [con.timed(CPU_LOOP) for _ in range(repeat)]
    disk = [con.timed(DISK_READ) for _ in range(repeat)]
    return {"cpu_loop_s": statistics.median(cpu), "disk_read_s": statistics.median(disk)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from pyvmm.backends.blkback import BlockBackend, DiskImage
    from pyvmm.guests.default import build_default_guest
    from pyvmm.guests.testguests import build_testguest
    from pyvmm.xen_abi.hypervisor.domain import Domain

    destroy_all()
    g = build_default_guest(progress=True)
    spinner = str(build_testguest("spinner"))
    work = Path(tempfile.mkdtemp(prefix="pyvmm-iso-"))
    quiet_img, storm_img = work / "quiet.img", work / "storm.img"
    for img in (quiet_img, storm_img):
        img.write_bytes(os.urandom(32 << 20))
    boot = ["--default-guest", "--memory", "128M"]
    conditions = [
        ("alone", []),
        ("cpu hogs", [("iso-1", ["--xen-pv", spinner, "--memory", "32M"], "spinning"),
                      ("iso-2", ["--xen-pv", spinner, "--memory", "32M"], "spinning")]),
        ("cpu hogs, capped", [("iso-1", ["--xen-pv", spinner, "--memory", "32M", "--cpu-cap", "25"], "spinning"),
                              ("iso-2", ["--xen-pv", spinner, "--memory", "32M", "--cpu-cap", "25"], "spinning")]),
        ("disk storm", [("iso-3", boot + ["--disk", str(storm_img)], BANNER)]),
        ("disk storm, limited", [("iso-3", boot + ["--disk", f"{storm_img},rate=4M", "--cpu-cap", "25"], BANNER)]),
    ]
    results: dict[str, dict] = {}
    image = DiskImage.open(str(quiet_img))
    with Domain(str(g.kernel), ram_size=256 << 20, cmdline=g.cmdline, initrd=g.initrd.read_bytes()) as dom:
        dom.attach(BlockBackend(dom, 0, image))
        box: dict = {}
        th = threading.Thread(target=lambda: box.setdefault("r", dom.run(timeout=None)), daemon=True)
        say("booting the quiet guest")
        th.start()
        con = Console(dom)
        con.expect(PROMPT, BOOT_TIMEOUT, "the quiet guest's first prompt")
        try:
            for label, neighbours in conditions:
                for name, argv, ready in neighbours:
                    say(f"{label}: starting {name}")
                    start(name, *argv)
                for name, argv, ready in neighbours:
                    wait_log(name, ready)
                    if name == "iso-3":
                        type_into(name, STORM)
                say(f"{label}: measuring")
                results[label] = measure(con, args.repeat)
                destroy_all()
        finally:
            destroy_all()
            dom.stop()
            th.join(60)
    image.close()
    alone = results["alone"]
    for r in results.values():
        r["cpu_slowdown"] = round(r["cpu_loop_s"] / alone["cpu_loop_s"], 3)
        r["disk_slowdown"] = round(r["disk_read_s"] / alone["disk_read_s"], 3)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{'condition':<22} {'cpu loop s':>10} {'x alone':>8} {'disk read s':>11} {'x alone':>8}")
    for label, r in results.items():
        print(f"{label:<22} {r['cpu_loop_s']:>10.2f} {r['cpu_slowdown']:>8.2f} {r['disk_read_s']:>11.2f} "
              f"{r['disk_slowdown']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
