"""Boot benchmark: pyvmm booting the default guest, next to QEMU booting the
same kernel natively, on this machine's KVM and in the faithful lane.

    python bench/boot.py [--runs 3] [--lanes host,faithful] [--json]

For each lane it boots the default guest (Debian's cloud kernel + the busybox
initramfs, command line plus ``pyvmm.poweroff`` so /init powers off right
after its banner) ``--runs`` times with pyvmm, each boot in a subprocess of
its own, and records from the console stream the time (seconds since that
subprocess was spawned) to each milestone:

    linux      "Linux version "              the kernel's first line
    init       "Run /init as init process"   the kernel hands over to /init
    banner     the default guest's banner    /init loaded the front-ends
    poweroff   the guest shut down           (pyvmm: SCHEDOP_shutdown poweroff;
                                              QEMU: the process exited after
                                              "reboot: Power down")

plus the number of exits to Python by reason (``Domain.exit_counts``:
hypercall[:sub-op] for the shim's slow path, ``io:PORT``, KVM exit reasons).
A boot that does not get everywhere within ``--timeout`` still reports the
milestones it reached and its exits so far.

The baseline is QEMU with KVM booting the same kernel and initramfs natively
(``-cpu host``, serial console, ``earlyprintk=serial`` to match pyvmm's
``earlyprintk=xen``).  The faithful lane (KVM inside QEMU/TCG, see
``pyvmm.guests.faithful``) runs this very script with ``--inner`` inside the
L1 and parses its JSON back.  Medians over the runs; figures, not pass/fail.
Timings on kvm_pvm mean something only as ratios measured side by side.
Progress goes to stderr, the table (or ``--json``) to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from pyvmm.vmm.quirks import on_kvm_pvm

#: Console markers, in boot order: (key, bytes to look for, table heading).
MILESTONES = (
    ("linux", b"Linux version ", "Linux version"),
    ("init", b"Run /init as init process", "Run /init"),
    ("banner", None, "banner"),        # None: the default guest's BANNER
)
#: The last milestone, not a console line: the guest powered off.
POWEROFF = "poweroff"
MILESTONE_KEYS = tuple(k for k, _, _ in MILESTONES) + (POWEROFF,)
HEADINGS = {k: h for k, _, h in MILESTONES} | {POWEROFF: "poweroff"}

DEFAULT_RUNS = 3
DEFAULT_TIMEOUT = 600.0        # seconds per boot
DEFAULT_MEMORY = "256M"
TOP_REASONS = 10
#: Seconds a boot subprocess gets beyond --timeout to report before it is killed.
REPORT_GRACE = 60.0
#: Seconds the faithful lane gets for booting the L1 and starting Python.
FAITHFUL_OVERHEAD = 900.0
#: Console the QEMU baseline boots with (the cloud kernel has
#: CONFIG_SERIAL_8250_CONSOLE=y); earlyprintk prints in real time, as
#: earlyprintk=xen does under pyvmm.
QEMU_CMDLINE = "console=ttyS0 earlyprintk=serial"
#: The line Linux prints when poweroff reaches the machine.
POWER_DOWN = b"reboot: Power down"
#: Prefix of the JSON line a child (a boot, or the inner lane) prints.
JSON_TAG = "BOOTBENCH-JSON "
#: Console tail kept per boot (to show why a boot stopped).
TAIL_CHARS = 1500


def say(msg: str) -> None:
    print(f"bench/boot: {msg}", file=sys.stderr, flush=True)


def banner_marker() -> bytes:
    from pyvmm.guests.default import BANNER
    return BANNER.encode()


def poweroff_param() -> str:
    from pyvmm.guests.default import POWEROFF_PARAM
    return POWEROFF_PARAM


class MilestoneWatch:
    """First time each milestone marker shows up in a byte stream, across
    chunk boundaries (absolute time.monotonic() values)."""

    def __init__(self, banner: bytes, clock=time.monotonic):
        self.markers = [(k, m if m is not None else banner) for k, m, _ in MILESTONES]
        self.keep = max(len(m) for _, m in self.markers)
        self.clock = clock
        self.tail = b""
        self.seen: dict[str, float] = {}
        self.text = bytearray()
        self._lock = threading.Lock()   # console_io and the console back-end thread

    def feed(self, data: bytes) -> list[str]:
        """Record markers completed by *data*; return their keys."""
        with self._lock:
            now = self.clock()
            self.text += data
            window = self.tail + data
            hits = []
            for key, marker in self.markers:
                if key not in self.seen and marker in window:
                    self.seen[key] = now
                    hits.append(key)
            self.tail = window[-self.keep:]
            return hits


#: printk's time prefix "[   12.345678] " (CONFIG_PRINTK_TIME)
PRINTK_TIME = re.compile(rb"\[\s*(\d+\.\d+)\] ")


def printk_times(console: bytes, banner: bytes) -> dict[str, float]:
    """The kernel's own clock (seconds since its clock started) on the line
    of each milestone, where that line carries a printk time stamp: tells
    guest-side progress apart from the moment the host saw the text."""
    out = {}
    for key, marker in ((k, m if m is not None else banner) for k, m, _ in MILESTONES):
        at = console.find(marker)
        if at < 0:
            continue
        line = console[console.rfind(b"\n", 0, at) + 1:at]
        m = PRINTK_TIME.search(line)
        if m:
            out[key] = float(m.group(1))
    return out


# ---------------------------------------------------------------------------
# one boot (a child process: isolation, and a clean kill on a hang)
# ---------------------------------------------------------------------------

def one_pyvmm_boot(args) -> dict:
    """Boot once in this process; milestones as absolute monotonic times."""
    from pyvmm.cli import parse_size
    from pyvmm.xen_abi.abi import ShutdownReason
    from pyvmm.xen_abi.hypervisor.domain import Domain, DomainTimeout

    watch = MilestoneWatch(banner_marker())
    out: dict = {"system": "pyvmm", "t_start": time.monotonic()}

    def watch_console(data: bytes) -> None:
        for key in watch.feed(data):
            say(f"pyvmm: {HEADINGS[key]} after {watch.seen[key] - args.t0:.2f} s")

    kernel = Path(args.kernel).read_bytes()
    initrd = Path(args.initrd).read_bytes() if args.initrd else None
    dom = Domain(kernel, ram_size=parse_size(args.memory), cmdline=args.cmdline,
                 initrd=initrd)
    dom.on_console_output.add(watch_console)
    out["t_built"] = time.monotonic()
    try:
        try:
            r = dom.run(timeout=args.timeout)
        except DomainTimeout:
            out["end"] = f"timeout after {args.timeout:.0f} s"
        except Exception as e:        # a shim panic etc.: still report what was reached
            out["end"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        else:
            out["end"] = r.reason.name
            if r.reason == ShutdownReason.poweroff:
                watch.seen[POWEROFF] = time.monotonic()
            if r.crash_info:
                out["crash_info"] = {k: hex(v) for k, v in r.crash_info.items()}
        out["t_end"] = time.monotonic()
        # console text the back-end drains at close() arrives after the run:
        # it counts for the printk clock, not as seen-at-that-time
        seen = dict(watch.seen)
        out["exit_counts"] = dict(dom.exit_counts)
        out["slow_exits"] = dom.slow_exits
        out["cost"] = boot_cost(dom)
    finally:
        dom.close()
    out["milestones"] = seen
    out["printk"] = printk_times(bytes(watch.text), banner_marker())
    out["console_tail"] = bytes(watch.text[-TAIL_CHARS:]).decode(errors="replace")
    return out


def boot_cost(dom) -> dict:
    """What the whole boot cost the guest's vCPUs: CPL0 instructions KVM
    interpreted (kvm_pvm's insn_emulation; 0 where KVM interprets none)
    and shim entries (traps, interrupts, syscall-instruction entries, as
    bench/devices.py counts them)."""
    from pyvmm.xen_abi.hypervisor import trace
    insns = 0
    for vcpu in dom.vcpus:
        try:
            insns += vcpu.stats().read().get("insn_emulation", 0)
        except Exception:       # a KVM without binary stats
            pass
    counters = trace.shim_counters(dom)
    entries = sum(v for k, v in counters.items()
                  if k.startswith("trap") or k in ("interrupts", "syscall entries"))
    return {"cpl0_insns": insns, "shim_entries": entries}


def pyvmm_boot(args, t_timeout: float) -> dict:
    """Spawn one pyvmm boot; times relative to the spawn."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", "pyvmm",
           "--kernel", str(args.kernel), "--memory", args.memory,
           "--cmdline", args.cmdline, "--timeout", str(t_timeout)]
    if args.initrd:
        cmd += ["--initrd", str(args.initrd)]
    t0 = time.monotonic()
    cmd += ["--t0", repr(t0)]
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True,
                           timeout=t_timeout + REPORT_GRACE)
    except subprocess.TimeoutExpired:
        return {"system": "pyvmm", "end": "boot process killed (no report)", "milestones": {},
                "exit_counts": {}, "wall": time.monotonic() - t0}
    child = _tagged_json(p.stdout)
    if child is None:
        return {"system": "pyvmm", "end": f"boot process failed (status {p.returncode})",
                "milestones": {}, "exit_counts": {}, "wall": time.monotonic() - t0}
    rel = {k: v - t0 for k, v in child.pop("milestones").items()}
    res = {"system": "pyvmm", "end": child["end"], "milestones": rel,
           "startup": child["t_start"] - t0, "build": child["t_built"] - child["t_start"],
           "wall": child["t_end"] - t0, "exit_counts": child["exit_counts"],
           "printk": child.get("printk", {}),
           "console_tail": child.get("console_tail", "")}
    if "crash_info" in child:
        res["crash_info"] = child["crash_info"]
    if "cost" in child:
        res["cost"] = child["cost"]
    return res


#: On kvm_pvm, QEMU aborts at start-up with plain -cpu host ("failed to set
#: MSR 0x10a", IA32_ARCH_CAPABILITIES): leave that feature out there.
QEMU_CPU_PVM = "host,-arch-capabilities"


def qemu_command(qemu: str, args) -> list[str]:
    cpu = args.qemu_cpu or (QEMU_CPU_PVM if on_kvm_pvm() else "host")
    return [qemu, "-accel", "kvm", "-cpu", cpu, "-m", args.memory, "-smp", "1",
            "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-net", "none",
            "-kernel", str(args.kernel), "-initrd", str(args.initrd),
            "-append", f"{QEMU_CMDLINE} {poweroff_param()}"]


def qemu_boot(cmd: list[str], timeout: float) -> dict:
    """Boot once under QEMU; milestones from its serial console on stdout."""
    watch = MilestoneWatch(banner_marker())
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        return {"system": "qemu", "end": f"cannot start QEMU: {e.strerror}", "milestones": {},
                "wall": 0.0}

    def pump():
        while chunk := proc.stdout.read1(4096):
            for key in watch.feed(chunk):
                say(f"qemu: {HEADINGS[key]} after {watch.seen[key] - t0:.2f} s")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
        end = f"exit status {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        rc = None
        end = f"timeout after {timeout:.0f} s (killed)"
    t_end = time.monotonic()
    reader.join(5)
    seen = dict(watch.seen)
    if rc == 0 and POWER_DOWN in watch.text:
        seen[POWEROFF] = t_end
        end = "poweroff"
    return {"system": "qemu", "end": end, "milestones": {k: v - t0 for k, v in seen.items()},
            "wall": t_end - t0, "printk": printk_times(bytes(watch.text), banner_marker()),
            "console_tail": bytes(watch.text[-TAIL_CHARS:]).decode(errors="replace")}


# ---------------------------------------------------------------------------
# one lane: N pyvmm boots and N QEMU boots here
# ---------------------------------------------------------------------------

def lane_name() -> str:
    from pyvmm.guests.faithful import LANE_ENV, LANE_NAME
    if on_kvm_pvm():
        return "host"
    return "faithful" if os.environ.get(LANE_ENV) == LANE_NAME else "host"


def kvm_kind() -> str:
    if on_kvm_pvm():
        return "kvm_pvm"
    for mod in ("kvm_amd", "kvm_intel"):
        if os.path.exists(f"/sys/module/{mod}"):
            return mod
    return "unknown"


def summarize(boots: list[dict]) -> dict:
    """Medians of the milestones (over the boots that reached each one), mean
    exits per boot by reason, and the boots themselves."""
    out: dict = {"boots": boots, "n": len(boots)}
    med, reached = {}, {}
    for k in MILESTONE_KEYS:
        vals = [b["milestones"][k] for b in boots if k in b.get("milestones", {})]
        reached[k] = len(vals)
        if vals:
            med[k] = statistics.median(vals)
    out["median"] = med
    out["reached"] = reached
    if any("exit_counts" in b for b in boots):
        counted = [b["exit_counts"] for b in boots if "exit_counts" in b]
        reasons: dict[str, float] = {}
        for c in counted:
            for r, n in c.items():
                reasons[r] = reasons.get(r, 0) + n / len(counted)
        out["exits"] = statistics.median(sum(c.values()) for c in counted) if counted else 0
        out["exit_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    costs = [b["cost"] for b in boots if "cost" in b]
    if costs:        # pyvmm: CPL0 instructions and shim entries, whole boot
        out["cost"] = {k: statistics.median(c[k] for c in costs) for k in costs[0]}
    out["ends"] = [b["end"] for b in boots]
    pk = {}
    for k in MILESTONE_KEYS:
        vals = [b["printk"][k] for b in boots if k in b.get("printk", {})]
        if vals:
            pk[k] = statistics.median(vals)
    out["printk_median"] = pk
    setups = [b["startup"] + b["build"] for b in boots if "build" in b]
    if setups:       # pyvmm: spawn -> Python up -> domain built (guest starts)
        out["setup"] = statistics.median(setups)
    return out


def run_lane(args) -> dict:
    """Both systems on this machine's KVM."""
    lane = {"lane": lane_name(), "kvm": kvm_kind()}
    boots = []
    for i in range(args.runs):
        say(f"{lane['lane']} lane: pyvmm boot {i + 1}/{args.runs} (timeout {args.timeout:.0f} s)")
        b = pyvmm_boot(args, args.timeout)
        say(f"{lane['lane']} lane: pyvmm boot {i + 1}: {b['end']}, "
            f"{sum(b['exit_counts'].values())} exits, wall {b['wall']:.1f} s")
        boots.append(b)
    lane["pyvmm"] = summarize(boots)
    if args.no_qemu or not args.initrd:
        lane["qemu"] = {"skipped": "--no-qemu" if args.no_qemu else "no initrd (not a Linux guest)"}
        return lane
    try:
        from pyvmm.guests.faithful import find_qemu
        qemu = str(find_qemu(args.qemu, progress=say))
    except Exception as e:
        lane["qemu"] = {"skipped": f"no QEMU: {e}"}
        return lane
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        lane["qemu"] = {"skipped": "no usable /dev/kvm"}
        return lane
    cmd = qemu_command(qemu, args)
    lane["qemu_command"] = shlex.join(cmd)
    boots = []
    for i in range(args.runs):
        say(f"{lane['lane']} lane: QEMU boot {i + 1}/{args.runs} (timeout {args.qemu_timeout:.0f} s)")
        b = qemu_boot(cmd, args.qemu_timeout)
        say(f"{lane['lane']} lane: QEMU boot {i + 1}: {b['end']}, wall {b['wall']:.1f} s")
        boots.append(b)
        if POWEROFF not in b["milestones"]:
            say("QEMU did not boot to poweroff: not repeating it")
            break
    lane["qemu"] = summarize(boots)
    return lane


def ratios(lane: dict) -> dict:
    """pyvmm / QEMU per milestone both reached."""
    a = lane.get("pyvmm", {}).get("median", {})
    b = lane.get("qemu", {}).get("median", {})
    return {k: a[k] / b[k] for k in MILESTONE_KEYS if k in a and k in b and b[k] > 0}


# ---------------------------------------------------------------------------
# the faithful lane: this script with --inner inside the L1
# ---------------------------------------------------------------------------

def run_faithful(args) -> dict:
    from pyvmm.guests.faithful import PEER_SMP, FaithfulLaneError, default_smp, run_in_faithful_lane

    argv = [sys.executable, os.path.abspath(__file__), "--inner", "--runs", str(args.runs),
            "--timeout", str(args.faithful_timeout), "--qemu-timeout", str(args.qemu_timeout),
            "--memory", args.memory, "--kernel", str(args.kernel), "--cmdline", args.cmdline]
    if args.initrd:
        argv += ["--initrd", str(args.initrd)]
    if args.no_qemu:
        argv.append("--no-qemu")
    if args.qemu:
        argv += ["--qemu", args.qemu]
    if args.qemu_cpu:
        argv += ["--qemu-cpu", args.qemu_cpu]
    # The guest images live in the host's cache, which the L1 does not
    # mount: share it (writable, so the shim compiled here is reused there
    # instead of being rebuilt by gcc at TCG speed on every boot).
    from pyvmm.guests.debian import cache_root
    shares = {(str(cache_root().resolve()), False)}
    shares |= {(str(Path(p).resolve().parent), True) for p in (args.kernel, args.initrd)
               if p and not Path(p).resolve().is_relative_to(cache_root().resolve())}
    shares = sorted(shares)
    per_boot = args.faithful_timeout + REPORT_GRACE + (0 if args.no_qemu else args.qemu_timeout)
    total = FAITHFUL_OVERHEAD + args.runs * per_boot
    say(f"faithful lane: {shlex.join(argv[1:])} (up to {total:.0f} s)")

    def relay(stream: str, chunk: bytes) -> None:
        if stream == "stderr":
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()

    t0 = time.monotonic()
    try:
        r = run_in_faithful_lane(argv, cwd=str(Path(__file__).resolve().parent.parent),
                                 env={k: v for k, v in os.environ.items()
                                      if k.startswith("PYVMM_") and k != "PYVMM_LANE"},
                                 timeout=total, shares=shares, progress=say, on_output=relay,
                                 smp=default_smp(PEER_SMP))   # pyvmm and QEMU on the same L1
    except FaithfulLaneError as e:
        return {"lane": "faithful", "error": str(e)}
    lane = _tagged_json(r.stdout)
    if lane is None:
        return {"lane": "faithful",
                "error": f"inner benchmark gave no result (status {r.returncode}): "
                         + " | ".join(r.stderr.strip().splitlines()[-3:])}
    lane["l1_boot"] = r.boot_time
    lane["l1_wall"] = time.monotonic() - t0
    return lane


def _tagged_json(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(JSON_TAG):
            try:
                return json.loads(line[len(JSON_TAG):])
            except ValueError:
                return None
    return None


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------

def _fmt_t(summary: dict, key: str) -> str:
    if "median" not in summary:
        return "-"
    v = summary["median"].get(key)
    n, tot = summary["reached"][key], summary["n"]
    if v is None:
        return "not reached"
    return f"{v:.2f} s" + (f" ({n}/{tot})" if n != tot else "")


def format_table(report: dict) -> str:
    lines = []
    g = report["guest"]
    lines.append(f"boot benchmark: {g['kernel']} + {g['initrd'] or '(no initrd)'}, "
                 f"{g['memory']}, {report['runs']} run(s), medians; times from process spawn "
                 f"(setup: pyvmm's Python start-up + domain build, included in the times)")
    lines.append(f"  pyvmm cmdline: {g['cmdline']!r}; QEMU cmdline: "
                 f"{QEMU_CMDLINE + ' ' + poweroff_param()!r}")
    head = ["lane", "system", "setup"] + [HEADINGS[k] for k in MILESTONE_KEYS] + ["exits to Python", "ended"]
    rows = []
    for name, lane in report["lanes"].items():
        if "error" in lane:
            rows.append([name, "-", "-"] + ["-"] * len(MILESTONE_KEYS) + ["-", lane["error"]])
            continue
        label = f"{name} ({lane.get('kvm', '?')})"
        for system in ("pyvmm", "qemu"):
            s = lane.get(system, {})
            if "skipped" in s:
                rows.append([label, system, "-"] + ["-"] * len(MILESTONE_KEYS) + ["-", f"skipped: {s['skipped']}"])
                continue
            exits = f"{s['exits']:.0f}" if "exits" in s else "n/a"
            ends = sorted(set(s.get("ends", [])))
            setup = f"{s['setup']:.2f} s" if "setup" in s else "-"
            rows.append([label, system, setup] + [_fmt_t(s, k) for k in MILESTONE_KEYS] + [exits, "; ".join(ends)])
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head) - 1)]
    for r in [head] + rows:
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + str(r[-1]))
    for name, lane in report["lanes"].items():
        reasons = lane.get("pyvmm", {}).get("exit_reasons")
        if reasons:
            top = list(reasons.items())[:TOP_REASONS]
            lines.append(f"  {name} lane, pyvmm exits by reason (mean per boot, top {len(top)}):")
            lines.append("    " + ", ".join(f"{r} {n:.0f}" for r, n in top))
        cost = lane.get("pyvmm", {}).get("cost")
        if cost:
            lines.append(f"  {name} lane, pyvmm boot cost (median): {cost['cpl0_insns']:.0f} CPL0 "
                         f"instructions interpreted, {cost['shim_entries']:.0f} shim entries")
        q = lane.get("qemu", {})
        if q.get("boots") and POWEROFF not in q.get("median", {}):
            tail = q["boots"][-1].get("console_tail", "").strip().splitlines()[-3:]
            lines.append(f"  {name} lane, QEMU ended: {q['boots'][-1]['end']}; last console lines:")
            lines += [f"    | {t}" for t in tail]
        for system in ("pyvmm", "qemu"):
            pk = lane.get(system, {}).get("printk_median")
            if pk:
                lines.append(f"  {name} lane, {system}, kernel's printk clock at: "
                             + ", ".join(f"{HEADINGS[k]} {v:.2f} s" for k, v in pk.items()))
        if "l1_boot" in lane:
            lines.append(f"  {name} lane: L1 up in {lane['l1_boot']:.1f} s, whole lane {lane['l1_wall']:.0f} s")
    for name, rat in report["ratios"].items():
        if rat:
            lines.append(f"  ratio pyvmm/QEMU, {name} lane: "
                         + ", ".join(f"{HEADINGS[k]} {v:.2g}x" for k, v in rat.items()))
        else:
            lines.append(f"  ratio pyvmm/QEMU, {name} lane: no milestone reached by both")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/boot.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="boots per lane and system")
    p.add_argument("--lanes", default="host,faithful", help="comma list of host, faithful")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds per pyvmm boot on the host lane")
    p.add_argument("--faithful-timeout", type=float, default=None,
                   help="seconds per pyvmm boot in the faithful lane (default: --timeout)")
    p.add_argument("--qemu-timeout", type=float, default=None,
                   help="seconds per QEMU boot (default: --timeout)")
    p.add_argument("--memory", default=DEFAULT_MEMORY)
    p.add_argument("--kernel", help="guest kernel (default: the default guest's)")
    p.add_argument("--initrd", help="initramfs (default: the default guest's)")
    p.add_argument("--cmdline", help="pyvmm guest command line (default: the default "
                                     "guest's plus pyvmm.poweroff)")
    p.add_argument("--no-qemu", action="store_true", help="skip the QEMU baseline")
    p.add_argument("--qemu", default=None, help="QEMU binary (default: found or installed)")
    p.add_argument("--qemu-cpu", default=None,
                   help=f"QEMU -cpu (default: host; {QEMU_CPU_PVM} on kvm_pvm)")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("--inner", action="store_true",
                   help="run this machine's lane only and print its JSON (used in the L1)")
    p.add_argument("--one", choices=("pyvmm",), help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:
        print(JSON_TAG + json.dumps(one_pyvmm_boot(args)), flush=True)
        return 0
    if args.qemu_timeout is None:
        args.qemu_timeout = args.timeout
    if args.faithful_timeout is None:
        args.faithful_timeout = args.timeout
    if args.kernel is None:
        from pyvmm.guests.default import build_default_guest
        g = build_default_guest(progress=True)
        args.kernel, args.initrd = str(g.kernel), args.initrd or str(g.initrd)
        args.cmdline = args.cmdline or f"{g.cmdline} {poweroff_param()}"
    args.cmdline = args.cmdline or ""
    if args.inner:
        print(JSON_TAG + json.dumps(run_lane(args)), flush=True)
        return 0
    lanes = [x.strip() for x in args.lanes.split(",") if x.strip()]
    bad = [x for x in lanes if x not in ("host", "faithful")]
    if bad:
        build_parser().error(f"unknown lane(s): {', '.join(bad)}")
    report = {"runs": args.runs, "guest": {"kernel": str(args.kernel), "initrd": args.initrd,
                                           "cmdline": args.cmdline, "memory": args.memory},
              "lanes": {}}
    for name in lanes:
        report["lanes"][name] = run_lane(args) if name == "host" else run_faithful(args)
    report["ratios"] = {n: ratios(l) for n, l in report["lanes"].items() if "error" not in l}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
