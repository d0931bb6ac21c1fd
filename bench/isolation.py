"""Isolation: how much noisy neighbours slow a quiet guest, without and
with limits (pyvmm/limits.py cgroups, backends/ratelimit.py buckets).

    python bench/isolation.py [--repeat 3] [--only CONDITION]... [--png isolation.png] [--json]

The quiet guest is the default guest, in this process (Domain API), with a
32 MiB disk and an interface on a bridge the bench makes (pviso0,
10.78.0.1/24 on the host side, removed at the end); in its shell it times,
with busybox `time`, a CPU-bound shell loop and a read of its whole disk
with the page cache dropped first, and pings the host (mean round trip of
20 pings 0.1 s apart).  Each condition starts its neighbours through the
CLI (`--detach`, each its own pyvmm process), measures the quiet guest
--repeat times (median), then destroys them:

    alone                  no neighbours
    cpu hogs               two `spinner` test guests (one per host core)
    cpu hogs, capped       the same with --cpu-cap 25 each
    disk storm             a default guest re-reading its own disk in a loop
    disk storm, limited    the same with --cpu-cap 25 and its disk at rate=4M
    net flood              a default guest on the same bridge sending zeros
                           to a TCP sink on the host (a process of its own)
                           as fast as it can
    net flood, limited     the same with --cpu-cap 25 and its vif at rate=4M

Slowdown is each figure over the same one alone.  Figures, not pass/fail;
progress on stderr, the table (or --json) on stdout, and with matplotlib
(the optional `bench` extra) a chart of the slowdowns (--png).  Neighbours
are named iso-N; any left from an interrupted run are destroyed first.
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
BRIDGE, NET = "pviso0", "10.78.0"
HOST_IP, QUIET_IP, FLOOD_IP, SINK_PORT = f"{NET}.1", f"{NET}.2", f"{NET}.3", 5001
PING = f"ping -q -c 20 -i 0.1 {HOST_IP}"
PING_RTT = re.compile(rb"min/avg/max = [\d.]+/([\d.]+)/")
FLOOD = (f"ifconfig eth0 {FLOOD_IP} netmask 255.255.255.0 up;"
         f" while :; do cat /dev/zero | nc {HOST_IP} {SINK_PORT}; sleep 1; done &")
# the flood's sink: a process of its own, so that it takes no GIL from the quiet guest's back-ends
SINK = ("import socket, threading\n"
        "s = socket.create_server((%r, %d))\n"
        "def drain(c):\n"
        "    b = bytearray(1 << 20)\n"
        "    while c.recv_into(b): pass\n"
        "while True: threading.Thread(target=drain, args=(s.accept()[0],), daemon=True).start()\n")


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
    ping = [float(con.run(PING, PING_RTT).group(1)) for _ in range(repeat)]
    return {"cpu_loop_s": statistics.median(cpu), "disk_read_s": statistics.median(disk),
            "ping_ms": statistics.median(ping)}


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


def make_bridge() -> None:
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)   # one left by a killed run
    ip("link", "add", BRIDGE, "type", "bridge")
    ip("addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")


def draw(results: dict, path: Path) -> bool:
    """The slowdowns as grouped bars, one group per condition; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = list(results)
    kinds = [("cpu_slowdown", "CPU loop"), ("disk_slowdown", "disk read"), ("ping_slowdown", "ping")]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(kinds)
    for i, (key, name) in enumerate(kinds):
        ax.bar([x + i * width for x in range(len(labels))], [results[c][key] for c in labels], width, label=name)
    ax.axhline(1.05, color="grey", linestyle="--", linewidth=1, label="target with limits (1.05)")
    ax.set_xticks([x + width for x in range(len(labels))], labels, rotation=15)
    ax.set(ylabel="quiet guest's time / time alone", title="a quiet guest beside noisy neighbours")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", action="append", default=[], metavar="CONDITION",
                    help="run this condition (and alone) only; repeatable")
    ap.add_argument("--png", default="isolation.png", help="the chart (needs matplotlib: pip install 'pyvmm[bench]')")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from pyvmm.backends.blkback import BlockBackend, DiskImage
    from pyvmm.backends.netback import NetBackend, TapDevice
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
        ("net flood", [("iso-4", boot + ["--net", f"bridge={BRIDGE}"], BANNER)]),
        ("net flood, limited", [("iso-4", boot + ["--net", f"bridge={BRIDGE},rate=4M", "--cpu-cap", "25"],
                                 BANNER)]),
    ]
    storms = {"iso-3": STORM, "iso-4": FLOOD}
    if args.only:
        wanted = {"alone", *args.only}
        unknown = wanted - {label for label, _ in conditions}
        if unknown:
            ap.error(f"--only: no condition {', '.join(sorted(unknown))} "
                     f"(have {', '.join(label for label, _ in conditions)})")
        conditions = [c for c in conditions if c[0] in wanted]
    results: dict[str, dict] = {}
    image = DiskImage.open(str(quiet_img))
    make_bridge()
    sink = subprocess.Popen([sys.executable, "-c", SINK % (HOST_IP, SINK_PORT)])
    tap = TapDevice(f"vif{os.getpid()}.0")
    tap.join_bridge(BRIDGE)
    with Domain(str(g.kernel), ram_size=256 << 20, cmdline=g.cmdline, initrd=g.initrd.read_bytes()) as dom:
        dom.attach(BlockBackend(dom, 0, image))
        dom.attach(NetBackend(dom, 0, tap, "00:16:3e:00:0c:02"))
        box: dict = {}
        th = threading.Thread(target=lambda: box.setdefault("r", dom.run(timeout=None)), daemon=True)
        say("booting the quiet guest")
        th.start()
        con = Console(dom)
        con.expect(PROMPT, BOOT_TIMEOUT, "the quiet guest's first prompt")
        con.run(f"ifconfig eth0 {QUIET_IP} netmask 255.255.255.0 up")
        try:
            for label, neighbours in conditions:
                for name, argv, ready in neighbours:
                    say(f"{label}: starting {name}")
                    start(name, *argv)
                for name, argv, ready in neighbours:
                    wait_log(name, ready)
                    if name in storms:
                        type_into(name, storms[name])
                say(f"{label}: measuring")
                results[label] = measure(con, args.repeat)
                destroy_all()
        finally:
            destroy_all()
            dom.stop()
            th.join(60)
            sink.kill()
            tap.close()
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    image.close()
    alone = results["alone"]
    for r in results.values():
        r["cpu_slowdown"] = round(r["cpu_loop_s"] / alone["cpu_loop_s"], 3)
        r["disk_slowdown"] = round(r["disk_read_s"] / alone["disk_read_s"], 3)
        r["ping_slowdown"] = round(r["ping_ms"] / alone["ping_ms"], 3)
    drawn = draw(results, Path(args.png))
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{'condition':<22} {'cpu loop s':>10} {'x alone':>8} {'disk read s':>11} {'x alone':>8} "
          f"{'ping ms':>8} {'x alone':>8}")
    for label, r in results.items():
        print(f"{label:<22} {r['cpu_loop_s']:>10.2f} {r['cpu_slowdown']:>8.2f} {r['disk_read_s']:>11.2f} "
              f"{r['disk_slowdown']:>8.2f} {r['ping_ms']:>8.2f} {r['ping_slowdown']:>8.2f}")
    print(f"  chart: {args.png}" if drawn else "  (no chart: pip install 'pyvmm[bench]' for matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
