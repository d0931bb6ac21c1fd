"""Disk and network with real tools: fio and iperf3 in the default guest,
next to the same runs on the host.

    python bench/tools.py [--size-mb 256] [--runtime 10] [--no-disk] [--no-net] [--json]
    python bench/tools.py --lane faithful --qemu-peer [...]

fio and iperf3 come from Debian's packages (``apt-get download``, cached
under the pyvmm cache by ``pyvmm.guests.debian``) with every shared library
they load and the dynamic loader (``pyvmm.guests.bundle``), in an initramfs
layer appended to the default guest's (``build_default_guest(extra_files=)``).
The guest boots in process through the Domain API (bench/devices.py's
console driver and TAP-in-a-namespace), with one disk, a raw image of
--size-mb random bytes, and, as root with /dev/net/tun and iproute2, one
network interface on a TAP device in a network namespace this benchmark
creates, with an ``iperf3 -s`` on its host end.

In the guest (``--output-format=json`` / ``-J``, the JSON read back from
the console and parsed here):

    fio  sequential read, 1 MiB blocks, direct=1, queue depth --seq-iodepth (8)
    fio  sequential write, the same
    fio  random read, 4 KiB blocks, direct=1, queue depth --rand-iodepth (32)
         (each --runtime seconds, time based, engine libaio; io_uring, then
         psync if the kernel refuses it: the table says which)
    iperf3 TCP guest -> host and host -> guest (-R), 1 and 4 streams (-P 4)

Side by side on the host, after the guest has powered off: the same fio
jobs on the same image file and iperf3 over loopback (client and server in
the namespace), the same binaries run with the fetched libraries.

--qemu-peer adds the same kernel and initramfs under QEMU/KVM: the cloud
kernel's virtio modules ride in the tools layer and are loaded over the
serial console, virtio-blk on the same image, virtio-net on the same TAP
(QEMU started inside the namespace), the same fio and iperf3 steps; the
table gets a qemu column and guest/qemu.  QEMU cannot run this kernel on
kvm_pvm, so that is for real KVM or --lane faithful, which runs this script
inside the faithful lane's L1 (pyvmm.guests.faithful, the pyvmm cache
shared) and prints its table here.  Figures,
not pass/fail; guest/host is the ratio (for latencies a multiple: above 1 is
slower).  Progress on stderr, the table (or --json) on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devices import (GUEST_IP, HOST_IP, CostMeter, Namespace, net_available,  # noqa: E402
                     start_guest, stop_guest)

PROGRAMS = {"fio": ["usr/bin/fio"], "iperf3": ["usr/bin/iperf3"]}
ENGINES = ("libaio", "io_uring", "psync")
#: queue depth of the 4 KiB random reads unless --rand-iodepth says otherwise
RAND_IODEPTH = 32
#: (key, label, fio options); each runs on its own, --runtime seconds.
FIO_JOBS = (("seqread", "fio seq read 1 MiB", ["--rw=read", "--bs=1M"]),
            ("seqwrite", "fio seq write 1 MiB", ["--rw=write", "--bs=1M"]),
            ("randread", "fio rand read 4 KiB", ["--rw=randread", "--bs=4k"]))
#: (key, label, iperf3 options)
IPERF_RUNS = (("tx1", "iperf3 guest->host 1 stream", []),
              ("tx4", "iperf3 guest->host 4 streams", ["-P", "4"]),
              ("rx1", "iperf3 host->guest 1 stream", ["-R"]),
              ("rx4", "iperf3 host->guest 4 streams", ["-R", "-P", "4"]))
IPERF_PORT = 5201
GUEST_RAM_MB = 512
OUT = re.compile(rb"@@rc=(\d+)\r?\n@@BEGIN\r?\n(.*?)@@ERR\r?\n(.*?)@@END", re.S)


_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"tools: [{time.monotonic() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


class ToolError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# running a tool and reading its JSON

def guest_capture(con, command: str, tmp: str = "/tmp") -> tuple[int, str, str]:
    """Exit status, stdout and the tail of stderr of *command* in the guest's
    shell (kept in files under *tmp* meanwhile).  The markers are split in
    the typed line so that its echo does not match them."""
    o, e = f"{tmp}/tools-o", f"{tmp}/tools-e"
    m = con.run(f'{{ {command}; }} >{o} 2>{e}; echo "@@rc=$?"; echo @@BE""GIN; cat {o}; '
                f'echo @@E""RR; tail -c 1500 {e}; echo @@E""ND', OUT)
    clean = [g.replace(b"\r\n", b"\n").decode(errors="replace") for g in m.groups()[1:]]
    return int(m.group(1)), clean[0], clean[1]


def json_of(text: str, what: str) -> dict:
    """The JSON object in *text* (a tool's output; kernel messages may come before it)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ToolError(f"{what}: no JSON in its output: {text[-300:]!r}")
    try:
        return json.loads(text[start:end + 1])
    except ValueError as e:
        raise ToolError(f"{what}: bad JSON ({e}): {text[-300:]!r}") from None


def fio_figures(report: dict) -> dict:
    """MB/s, IOPS and completion latency p50/p99 (µs) of a one-job fio report."""
    job = report["jobs"][0]
    side = max((job[d] for d in ("read", "write")), key=lambda s: s.get("io_bytes", 0))
    pct = side.get("clat_ns", {}).get("percentile", {})

    def p(q: str):
        v = next((v for k, v in pct.items() if float(k) == float(q)), None)
        return None if v is None else v / 1000.0
    return {"MB/s": side["bw_bytes"] / 1e6, "IOPS": side["iops"],
            "p50 us": p("50"), "p99 us": p("99"), "io_bytes": side["io_bytes"]}


def iperf_figures(report: dict) -> dict:
    if "error" in report:
        raise ToolError(f"iperf3: {report['error']}")
    end = report["end"]
    return {"Gbit/s": end["sum_received"]["bits_per_second"] / 1e9,
            "sent Gbit/s": end["sum_sent"]["bits_per_second"] / 1e9,
            "retransmits": end["sum_sent"].get("retransmits")}


def fio_argv(filename: str, engine: str, runtime: float, iodepth: int, opts: list[str],
             direct: bool = True) -> list[str]:
    # --thread and --disk_util=0 on both sides: a job thread instead of a
    # forked process with shared memory, and no /sys/block polling, keep
    # fio's own bookkeeping small (on kvm_pvm every guest context switch
    # is interpreted CPL0 code: a forked job ran a 16 MiB read 2.5x longer)
    argv = ["fio", "--output-format=json", "--thread", "--disk_util=0", "--name=job",
            f"--filename={filename}", f"--direct={int(direct)}",
            f"--ioengine={engine}", "--time_based", f"--runtime={runtime:g}", f"--iodepth={iodepth}"]
    return argv + opts


def iperf_argv(server: str, runtime: float, opts: list[str]) -> list[str]:
    return ["iperf3", "-c", server, "-p", str(IPERF_PORT), "-t", f"{runtime:g}", "-J", *opts]


# --------------------------------------------------------------------------

class HostTools:
    """The fetched binaries run on the host with the fetched libraries."""

    def __init__(self, bundle):
        self.bundle = bundle
        self.env = dict(os.environ, LD_LIBRARY_PATH=bundle.library_path)

    def argv(self, argv: list[str]) -> list[str]:
        return [str(self.bundle.host_programs[argv[0]]), *argv[1:]]

    def run(self, argv: list[str], ns: Namespace | None = None, timeout: float = 600) -> tuple[int, str, str]:
        full = self.argv(argv)
        if ns is not None:
            full = ns.argv(["env", f"LD_LIBRARY_PATH={self.bundle.library_path}", *full])
        p = subprocess.run(full, capture_output=True, text=True, env=self.env, timeout=timeout)
        return p.returncode, p.stdout, p.stderr[-1500:]


def run_fio(run, filename: str, runtime: float, seq_iodepth: int, engine: str | None,
            on_job=None, out: dict | None = None, rand_iodepth: int = RAND_IODEPTH) -> tuple[str, dict]:
    """The fio jobs through *run* (argv -> rc, out, err); the engine used
    (the first of ENGINES that works unless *engine* is given) and figures,
    each job's added to *out* as it ends (kept if a later one fails)."""
    out = {} if out is None else out
    engines = [engine] if engine else list(ENGINES)
    direct = True
    for key, label, opts in FIO_JOBS:
        say(label)
        while True:
            before = on_job() if on_job else None
            depth = rand_iodepth if key == "randread" else seq_iodepth
            rc, text, err = run(fio_argv(filename, engines[0], runtime, depth, opts, direct))
            if rc == 0:
                break
            if direct and "O_DIRECT" in err and not out:
                # a tmpfs (the faithful L1's /tmp) has no O_DIRECT: buffered, and the table says so
                say(f"no O_DIRECT on {filename}'s file system: buffered I/O (direct=0)")
                direct = False
                continue
            if len(engines) > 1 and not out:
                say(f"fio with --ioengine={engines[0]} failed ({err.strip().splitlines()[-1:]}): "
                    f"trying {engines[1]}")
                engines.pop(0)
                continue
            raise ToolError(f"{label} failed (exit {rc}): {err.strip()[-500:]}")
        out[key] = fio_figures(json_of(text, label))
        out[key]["direct"] = direct
        if on_job:
            out[key]["costs"] = on_job(before)
    return engines[0], out


def run_iperf(run, server: str, runtime: float, out: dict | None = None) -> dict:
    out = {} if out is None else out
    for key, label, opts in IPERF_RUNS:
        say(label)
        for attempt in range(3):
            rc, text, err = run(iperf_argv(server, runtime, opts))
            if rc == 0 or attempt == 2 or "connect" not in (text + err):
                break
            time.sleep(1.0)             # the server not listening yet
        report = json_of(text, label) if "{" in text else {"error": err.strip()[-300:] or f"exit {rc}"}
        out[key] = iperf_figures(report)
    return out


def wait_listening(ns: Namespace, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = subprocess.run(ns.argv(["ss", "-ltnH", f"sport = :{port}"]), capture_output=True, text=True)
        if p.stdout.strip():
            return
        time.sleep(0.2)
    raise ToolError(f"iperf3 -s in {ns.name} is not listening on port {port} after {timeout:.0f} s")


def guest_phase(con, disk: str | None, with_net: bool, runtime: float, seq_iodepth: int,
                engine: str | None, costs=None, out: dict | None = None, rand_iodepth: int = RAND_IODEPTH) -> dict:
    """The fio jobs on *disk* and the iperf3 runs from a guest at its shell,
    their figures added to *out* as each ends."""
    out = {} if out is None else out

    def grun(argv: list[str]):
        return guest_capture(con, " ".join(argv))
    rc, text, err = grun(["fio", "--version"])
    if rc != 0:
        raise ToolError(f"fio does not run in the guest (exit {rc}): {err.strip()[-300:]}")
    say(f"the guest runs {text.strip()}")
    if disk is not None:
        out["fio_engine"], _ = run_fio(grun, disk, runtime, seq_iodepth, engine, costs,
                                       out=out.setdefault("fio", {}), rand_iodepth=rand_iodepth)
    if with_net:
        con.run(f"ifconfig eth0 {GUEST_IP} netmask 255.255.255.0 up")
        con.run(f"ping -c 1 -W 10 {HOST_IP} >/dev/null")
        run_iperf(grun, HOST_IP, runtime, out=out.setdefault("iperf3", {}))
    return out


def run_pyvmm(g, img: Path | None, tap, memory_mb: int, **phase) -> dict:
    """The default guest with the tools layer under pyvmm (Domain API, in process)."""
    from pyvmm.backends.blkback import BlockBackend, DiskImage
    from pyvmm.backends.netback import NetBackend
    from pyvmm.xen_abi.hypervisor.domain import Domain

    image = DiskImage.open(str(img)) if img is not None else None
    try:
        with Domain(str(g.kernel), ram_size=memory_mb << 20, cmdline=g.cmdline,
                    initrd=g.initrd.read_bytes()) as dom:
            if image is not None:
                dom.attach(BlockBackend(dom, 0, image))
            if tap is not None:
                dom.attach(NetBackend(dom, 0, tap, "00:16:3e:00:0b:02"))
            say(f"booting the default guest with the tools layer ({g.initrd.stat().st_size >> 20} MiB "
                f"initrd, {memory_mb} MiB RAM)")
            th, con = start_guest(dom)
            meter = CostMeter(dom)

            def costs(before=None):
                return meter.snapshot() if before is None else meter.delta(before, meter.snapshot())
            try:
                return guest_phase(con, "/dev/xvda" if image is not None else None, tap is not None,
                                   costs=costs, **phase)
            finally:
                stop_guest(dom, th)
    finally:
        if image is not None:
            image.close()


# --------------------------------------------------------------------------
# the QEMU peer: the same kernel and initramfs, virtio-blk and virtio-net

#: Front-ends the QEMU guest loads over its console (the cloud kernel builds them as modules).
VIRTIO_MODULES = ("virtio_pci", "virtio_blk", "virtio_net")
VIRTIO_DIR = "lib/modules/pyvmm-virtio"
QEMU_CMDLINE = "console=ttyS0"


def virtio_modules(g) -> tuple[dict[str, Path], list[str]]:
    """The virtio modules of the default guest *g*'s kernel, decompressed
    into the cache: (image path -> file, insmod order of image paths).  The
    kernel package is found from *g*, without apt (the L1 has none)."""
    from pyvmm.cache import cache_dir
    from pyvmm.guests import kmod

    root = Path(g.kernel).parent.parent          # <package>/boot/vmlinuz-<version>
    modules_dir = next((d for d in (root / "lib" / "modules" / g.kernel_version,
                                    root / "usr" / "lib" / "modules" / g.kernel_version) if d.is_dir()),
                       None)
    if modules_dir is None:
        raise ToolError(f"no modules of {g.kernel_version} next to {g.kernel}")
    index = kmod.ModuleIndex(modules_dir)
    out_dir = cache_dir("tools") / f"virtio-{g.kernel_version}"
    out_dir.mkdir(parents=True, exist_ok=True)
    files, order = {}, []
    for name in index.load_order(list(VIRTIO_MODULES)):
        f = out_dir / f"{name}.ko"
        if not f.is_file():
            tmp = f.with_suffix(".tmp")
            tmp.write_bytes(kmod.module_bytes(index.path(name)))
            tmp.replace(f)
        files[f"{VIRTIO_DIR}/{name}.ko"] = f
        order.append(f"/{VIRTIO_DIR}/{name}.ko")
    return files, order


class QemuConsole:
    """QEMU's ``-serial stdio`` behind the two Domain methods bench/devices.py's
    Console uses (read_console, send_console_input)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.buf, self.lock = proc, bytearray(), threading.Lock()
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            with self.lock:
                self.buf += chunk

    def read_console(self, offset: int = 0) -> tuple[bytes, int]:
        if not self.reader.is_alive() and self.proc.poll() is not None:
            # QEMU is gone (no KVM, a bad option): say so now, not at the prompt's timeout
            raise ToolError(f"QEMU exited with status {self.proc.returncode}; its output ends: "
                            + bytes(self.buf[-800:]).decode(errors="replace"))
        with self.lock:
            return bytes(self.buf[offset:]), len(self.buf)

    def send_console_input(self, data: bytes) -> int:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        return len(data)


def qemu_argv(qemu: str, g, img: Path | None, tap: str | None, memory_mb: int) -> list[str]:
    argv = [qemu, "-accel", "kvm", "-cpu", "host", "-m", f"{memory_mb}M", "-smp", "1",
            "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio",
            "-kernel", str(g.kernel), "-initrd", str(g.initrd), "-append", QEMU_CMDLINE]
    if img is not None:
        argv += ["-drive", f"file={img},format=raw,if=virtio"]
    if tap is not None:
        argv += ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                 "-device", "virtio-net-pci,netdev=n0,mac=00:16:3e:00:0b:03"]
    else:
        argv += ["-net", "none"]
    return argv


#: Seconds for the QEMU guest to reach its shell.  In the faithful lane a
#: native kernel under nested KVM on TCG boots far slower than the PV guest
#: (its printk clock reached 4-7 s in 150-900 s of wall time, 2026-12-07).
QEMU_BOOT_TIMEOUT = 900.0


def run_qemu(g, modules: list[str], img: Path | None, ns: Namespace | None, memory_mb: int,
             boot_timeout: float = QEMU_BOOT_TIMEOUT, **phase) -> dict:
    """The same guest under QEMU/KVM, started inside the namespace so that
    it opens the TAP there."""
    from pyvmm.guests.faithful import find_qemu
    from devices import PROMPT, Console

    argv = qemu_argv(str(find_qemu(progress=say)), g, img, ns.tap if ns else None, memory_mb)
    say(f"booting the same guest under QEMU (virtio-blk, virtio-net), {memory_mb} MiB RAM")
    proc = subprocess.Popen(ns.argv(argv) if ns else argv, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    qc = QemuConsole(proc)
    con = Console(qc)
    out: dict = {}
    try:
        con.expect(PROMPT, boot_timeout, "QEMU guest's first prompt")
        for path in modules:
            rc, _, err = guest_capture(con, f"insmod {path}")
            if rc != 0 and "File exists" not in err:
                raise ToolError(f"QEMU guest: insmod {path} failed: {err.strip()[-200:]}")
        if img is not None:
            con.run("i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done")
        return guest_phase(con, "/dev/vda" if img is not None else None, ns is not None, out=out, **phase)
    except (ToolError, RuntimeError) as e:
        # the peer is a baseline: what it did measure stays in the table,
        # and the rest of the run (the host side) goes on
        out["error"] = str(e).splitlines()[0]
        say(f"QEMU peer stopped: {out['error']}")
        return out
    finally:
        try:
            qc.send_console_input(b"poweroff -f\n")
            proc.wait(60)
        except (subprocess.TimeoutExpired, OSError):
            proc.kill()
            proc.wait(30)


# --------------------------------------------------------------------------

def run(size_mb: int, runtime: float, seq_iodepth: int, with_disk: bool, with_net: bool,
        engine: str | None = None, memory_mb: int = GUEST_RAM_MB, qemu_peer: bool = False,
        qemu_boot_timeout: float = QEMU_BOOT_TIMEOUT, rand_iodepth: int = RAND_IODEPTH) -> dict:
    from pyvmm.guests.bundle import bundle_programs
    from pyvmm.guests.default import build_default_guest

    say(f"fetching {' and '.join(PROGRAMS)} with their libraries (Debian packages, cached)")
    bundle = bundle_programs(PROGRAMS, progress=True)
    extra, modules = dict(bundle.files), []
    if qemu_peer:
        vfiles, modules = virtio_modules(build_default_guest(progress=True))
        extra.update(vfiles)
    g = build_default_guest(progress=True, extra_files=extra)
    host = HostTools(bundle)
    work = Path(tempfile.mkdtemp(prefix="tools-bench-"))
    results: dict = {"config": {"size_mb": size_mb, "runtime_s": runtime, "seq_iodepth": seq_iodepth,
                                "rand_iodepth": rand_iodepth, "guest_ram_mb": memory_mb,
                                "packages": bundle.packages}, "guest": {}, "host": {}}
    phase = {"runtime": runtime, "seq_iodepth": seq_iodepth, "rand_iodepth": rand_iodepth, "engine": engine}
    ns = server = None
    try:
        img = work / "disk.img" if with_disk else None
        if img is not None:
            say(f"writing a {size_mb} MiB image of random bytes")
            with open(img, "wb") as f:
                for _ in range(size_mb):
                    f.write(os.urandom(1 << 20))
        if with_net:
            ns = Namespace()
            server = subprocess.Popen(ns.argv(["env", f"LD_LIBRARY_PATH={bundle.library_path}",
                                               *host.argv(["iperf3", "-s", "-p", str(IPERF_PORT)])]),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_listening(ns, IPERF_PORT)
        tap = ns.open_tap() if ns is not None else None
        try:
            results["guest"] = run_pyvmm(g, img, tap, memory_mb, **phase)
        finally:
            if tap is not None:
                tap.close()
        if qemu_peer:
            qg = dataclasses.replace(g, cmdline=QEMU_CMDLINE)
            results["qemu"] = run_qemu(qg, modules, img, ns, memory_mb, qemu_boot_timeout, **phase)
        say("host side: the same runs")
        if img is not None:
            results["host"]["fio_engine"], results["host"]["fio"] = run_fio(
                host.run, str(img), runtime, seq_iodepth, engine, rand_iodepth=rand_iodepth)
        if ns is not None:
            results["host"]["iperf3"] = run_iperf(lambda argv: host.run(argv, ns), "127.0.0.1", runtime)
    finally:
        if server is not None:
            server.kill()
            server.wait(30)
        if ns is not None:
            ns.close()
        shutil.rmtree(work, ignore_errors=True)
    return results


# --------------------------------------------------------------------------

def rows(r: dict) -> list[tuple[str, str, float | None, float | None, float | None]]:
    """(test, metric, guest, host, QEMU guest) for every figure present on any side."""
    out = []
    sides = [r.get(k, {}) for k in ("guest", "host", "qemu")]
    for key, label, _ in FIO_JOBS:
        jobs = [s.get("fio", {}).get(key) for s in sides]
        if not any(jobs):
            continue
        label += f" QD{r['config'].get('rand_iodepth', RAND_IODEPTH) if key == 'randread' else r['config']['seq_iodepth']}"
        for metric in ("MB/s", "IOPS", "p50 us", "p99 us"):
            out.append((label, metric, *((j or {}).get(metric) for j in jobs)))
    for key, label, _ in IPERF_RUNS:
        runs = [s.get("iperf3", {}).get(key) for s in sides]
        if not any(runs):
            continue
        out.append((label, "Gbit/s", *((x or {}).get("Gbit/s") for x in runs)))
    return out


def ratio(guest: float | None, host: float | None) -> float | None:
    if guest is None or host is None or host <= 0:
        return None
    return guest / host


def table(r: dict) -> str:
    def num(v):
        if v is None:
            return "-"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"

    def q(v):
        return "-" if v is None else f"{v:.3g}"
    c = r["config"]
    peer = "qemu" in r
    engines = ", ".join(f"{side} {r[side].get('fio_engine', '-')}" for side in ("guest", "qemu", "host")
                        if side in r)
    head = (f"fio: {c['size_mb']} MiB image, {c['runtime_s']:g} s per job, direct=1, engine "
            f"{engines}; iperf3: TCP, {c['runtime_s']:g} s per run; latency = fio clat percentiles")
    buffered = [side for side in ("guest", "qemu", "host")
                if any(not j.get("direct", True) for j in r.get(side, {}).get("fio", {}).values())]
    if buffered:
        head += f"; fio buffered (direct=0, no O_DIRECT there) on: {', '.join(buffered)}"
    if r.get("lane"):
        head = f"{r['lane']}: {head}"
    cols = f"{'test':<30} {'metric':<7} {'guest':>10} {'host':>10} {'guest/host':>11}"
    if peer:
        cols += f" {'qemu':>10} {'guest/qemu':>11}"
    lines = [head, cols]
    for test, metric, gv, hv, qv in rows(r):
        line = f"{test:<30} {metric:<7} {num(gv):>10} {num(hv):>10} {q(ratio(gv, hv)):>11}"
        if peer:
            line += f" {num(qv):>10} {q(ratio(gv, qv)):>11}"
        lines.append(line)
    if peer and r["qemu"].get("error"):
        lines.append(f"qemu: stopped early ({r['qemu']['error']}); '-' where it has no figure")
    return "\n".join(lines)


JSON_TAG = "TOOLSBENCH-JSON "
#: Seconds a faithful-lane run may take, L1 boot included (everything at TCG speed).
FAITHFUL_TIMEOUT = 5400.0


def run_faithful(args) -> dict:
    """This script with --inner inside the faithful lane's L1 (kvm_amd
    under QEMU/TCG), the pyvmm cache shared so the tools and images built
    here are used there; its JSON line parsed back."""
    from pyvmm.guests.debian import cache_root
    from pyvmm.guests.faithful import PEER_SMP, FaithfulLaneError, default_smp, run_in_faithful_lane
    from pyvmm.guests.bundle import bundle_programs
    from pyvmm.guests.default import build_default_guest

    # fetch and build here, where apt works (the L1 has no network)
    bundle = bundle_programs(PROGRAMS, progress=True)
    extra = dict(bundle.files)
    if args.qemu_peer:
        extra.update(virtio_modules(build_default_guest(progress=True))[0])
    build_default_guest(progress=True, extra_files=extra)
    argv = [sys.executable, os.path.abspath(__file__), "--inner", "--size-mb", str(args.size_mb),
            "--runtime", f"{args.runtime:g}", "--seq-iodepth", str(args.seq_iodepth),
            "--rand-iodepth", str(args.rand_iodepth), "--memory-mb", str(args.memory_mb),
            "--qemu-boot-timeout", f"{args.qemu_boot_timeout:g}"]
    argv += ["--ioengine", args.ioengine] if args.ioengine else []
    argv += [f for f, on in (("--no-disk", args.no_disk), ("--no-net", args.no_net),
                             ("--qemu-peer", args.qemu_peer)) if on]
    say(f"faithful lane: {' '.join(argv[1:])} (up to {args.faithful_timeout:.0f} s)")

    def relay(stream: str, chunk: bytes) -> None:
        if stream == "stderr":
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
    try:
        r = run_in_faithful_lane(argv, cwd=str(Path(__file__).resolve().parent.parent),
                                 env={k: v for k, v in os.environ.items()
                                      if k.startswith("PYVMM_") and k != "PYVMM_LANE"},
                                 timeout=args.faithful_timeout, shares=[(str(cache_root()), False)],
                                 progress=say, on_output=relay,
                                 smp=default_smp(PEER_SMP))   # pyvmm and QEMU on the same L1
    except FaithfulLaneError as e:
        raise ToolError(str(e)) from None
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(JSON_TAG):
            out = json.loads(line[len(JSON_TAG):])
            out["lane"] = "faithful lane"
            return out
    raise ToolError(f"faithful lane: no result (status {r.returncode}): "
                    + " | ".join(r.stderr.strip().splitlines()[-3:]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=256, help="disk image size (default 256)")
    ap.add_argument("--runtime", type=float, default=10.0, help="seconds per fio job and iperf3 run")
    ap.add_argument("--seq-iodepth", type=int, default=8, help="queue depth of the sequential jobs")
    ap.add_argument("--rand-iodepth", type=int, default=RAND_IODEPTH,
                    help=f"queue depth of the 4 KiB random reads (default {RAND_IODEPTH})")
    ap.add_argument("--ioengine", choices=ENGINES, default=None,
                    help="fio engine (default: the first of libaio, io_uring, psync that works)")
    ap.add_argument("--memory-mb", type=int, default=GUEST_RAM_MB, help="guest RAM")
    ap.add_argument("--no-disk", action="store_true", help="skip fio")
    ap.add_argument("--no-net", action="store_true", help="skip iperf3")
    ap.add_argument("--lane", choices=("host", "faithful"), default="host",
                    help="host: this machine's KVM; faithful: inside the faithful lane's L1")
    ap.add_argument("--qemu-peer", action="store_true",
                    help="also run the guest under QEMU/KVM (virtio-blk, virtio-net on a TAP); "
                         "QEMU cannot run it on kvm_pvm: use it with --lane faithful or on real KVM")
    ap.add_argument("--qemu-boot-timeout", type=float, default=QEMU_BOOT_TIMEOUT,
                    help="seconds for the QEMU guest to reach its shell")
    ap.add_argument("--faithful-timeout", type=float, default=FAITHFUL_TIMEOUT)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from pyvmm.guests.debian import DebianError
    try:
        if args.lane == "faithful" and not args.inner:
            r = run_faithful(args)
        else:
            with_net = not args.no_net and net_available()
            if not args.no_net and not with_net:
                say("no iperf3 runs: they need root, /dev/net/tun and iproute2")
            r = run(args.size_mb, args.runtime, args.seq_iodepth, not args.no_disk, with_net,
                    args.ioengine, args.memory_mb, args.qemu_peer, args.qemu_boot_timeout,
                    args.rand_iodepth)
    except DebianError as e:
        print(f"tools: cannot fetch the benchmark tools: {e}", file=sys.stderr)
        return 1
    except ToolError as e:
        print(f"tools: {e}", file=sys.stderr)
        return 1
    if args.inner:
        print(JSON_TAG + json.dumps(r), flush=True)
    else:
        print(json.dumps(r) if args.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
