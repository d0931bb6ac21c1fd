"""Device throughput: the default guest's disk and network through pyvmm's
back-ends, next to the host doing the same transfer itself.

    python bench/devices.py [--size-mb 64] [--no-net] [--no-disk] [--json] [--profile]
                            [--vcpus N] [--max-queues M]

Boots the default guest (in process, Domain API) with one disk, a raw image
of --size-mb random bytes in a temporary directory, and, when this runs as
root with /dev/net/tun and iproute2, one network interface on a TAP device
in a network namespace of its own where a Python HTTP server serves a file
of the same size.  In the guest's shell, timed by busybox `time` (10 ms
resolution, so sizes that take seconds):

    disk read     dd if=/dev/xvda of=/dev/null bs=1M
    disk re-read  the same, after `echo 3 > /proc/sys/vm/drop_caches`: the
                  guest's RAM for its page cache touched before
    disk write    dd if=/dev/zero of=/dev/xvda bs=1M count=N conv=fsync
    net receive   wget -O /dev/null http://<host end of the TAP>/blob
    net transmit  the other way: the guest's busybox httpd serves a copy of the
                  disk from its RAM (/tmp/www/blob), the host wgets it from the
                  namespace (timed on the host; httpd sends with sendfile, so
                  the guest's kernel, not a 1 KiB-buffer tool, sets the pace)

With --vcpus N (N > 1) the guest has N vCPUs, so its xen-blkfront and
xen-netfront negotiate up to N queues (--max-queues caps what the back-ends
offer: --max-queues 1 is the single-queue comparison), and two more disk
rows read the disk with O_DIRECT (no guest page cache): one reader, and N
readers at once, each pinned to its own vCPU (so on its own queue) and
reading its share:

    direct, 1 reader     dd if=/dev/xvda of=/dev/null bs=1M iflag=direct
    direct, N readers    taskset <cpu> dd ... count=size/N skip=k*size/N iflag=direct &  (x N); wait

Baselines, run side by side on the host: the same dd commands on the image
file (page cache warm, as the guest's read is), and wget of the same URL
from inside the namespace (loopback, through the same Python server; the
baseline of both network rows).
Figures, not pass/fail; the ratio guest/host is what carries over from a
kvm_pvm machine to real hardware.  With --profile, each transfer's shim
entries are also sampled (bench/entry_sampler.py) and printed by kind, guest
code site and caller, with what the back-end's worker spent per request.  Progress on stderr, the table (or
--json) on stdout.
"""
from __future__ import annotations

import argparse
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

PROMPT = re.compile(rb"pyvmm:/# ")
REAL = re.compile(rb"real\s+(\d+)m\s*([\d.]+)s")
GUEST_IP, HOST_IP, PORT, GUEST_PORT = "10.0.3.15", "10.0.3.1", 8000, 8080
BOOT_TIMEOUT, COMMAND_TIMEOUT = 900.0, 900.0


def say(msg: str) -> None:
    print(f"devices: {msg}", file=sys.stderr, flush=True)


class Console:
    def __init__(self, dom):
        self.dom, self.pos = dom, 0

    def expect(self, rx: re.Pattern, timeout: float, what: str) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            text = self.dom.read_console()[0]
            m = rx.search(text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: nothing after {timeout:.0f} s; console tail:\n"
                                   + text[-1500:].decode(errors="replace"))
            time.sleep(0.05)

    def run(self, line: str, rx: re.Pattern = None) -> re.Match | None:
        self.dom.send_console_input((line + "\n").encode())
        m = self.expect(rx, COMMAND_TIMEOUT, repr(line)) if rx is not None else None
        self.expect(PROMPT, COMMAND_TIMEOUT, f"prompt after {line!r}")
        return m

    def timed(self, command: str) -> float:
        """Seconds the guest's `time` applet reports for command."""
        m = self.run(f"time sh -c '{command}'", REAL)
        return int(m.group(1)) * 60 + float(m.group(2))


def start_guest(dom) -> tuple[threading.Thread, Console]:
    """Run *dom* on a thread of its own; return it and a Console at the first prompt."""
    th = threading.Thread(target=lambda: dom.run(timeout=None), daemon=True)
    th.start()
    con = Console(dom)
    con.expect(PROMPT, BOOT_TIMEOUT, "first prompt")
    return th, con


def stop_guest(dom, th: threading.Thread) -> None:
    """Power the guest off from its shell (stop it if that does not end it)."""
    dom.send_console_input(b"poweroff -f\n")
    th.join(120)
    if th.is_alive():
        dom.stop()
        th.join(30)


def host_time(argv: list[str]) -> float:
    t = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


class Namespace:
    """A network namespace with a TAP device and, given a directory, an HTTP
    server on its host end (bench/tools.py starts its own server instead)."""

    def __init__(self, directory: Path | None = None):
        self.name, self.tap = f"pyvmm-b{os.getpid()}", "pvbench0"
        self._ip("netns", "add", self.name)
        self.server = None
        try:
            self._ip("-n", self.name, "tuntap", "add", "dev", self.tap, "mode", "tap")
            self._ip("-n", self.name, "addr", "add", f"{HOST_IP}/24", "dev", self.tap)
            self._ip("-n", self.name, "link", "set", self.tap, "up")
            self._ip("-n", self.name, "link", "set", "lo", "up")
            if directory is not None:
                self.server = subprocess.Popen(
                    self.argv([sys.executable, "-m", "http.server", str(PORT),
                               "--bind", HOST_IP, "--directory", str(directory)]),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except BaseException:
            self.close()
            raise

    def argv(self, argv: list[str]) -> list[str]:
        """*argv* run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    @staticmethod
    def _ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def open_tap(self):
        """The TAP device, opened from a thread that has entered the namespace."""
        from pyvmm.backends.netback import TapDevice
        import ctypes
        out = {}

        def inside():
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:        # CLONE_NEWNET, this thread only
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            out["tap"] = TapDevice(self.tap)

        t = threading.Thread(target=inside)
        t.start()
        t.join()
        return out["tap"]

    def close(self):
        if self.server is not None:
            self.server.kill()
            self.server.wait(30)
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)


def net_available() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun") and shutil.which("ip") is not None


#: The vCPU's KVM statistics that say why it left the guest (KVM_GET_STATS_FD).
KVM_EXIT_KINDS = ("halt_exits", "io_exits", "mmio_exits", "irq_exits", "irq_window_exits",
                  "request_irq_exits", "signal_exits", "pf_taken", "hypercalls")


class CostMeter:
    """What one transfer cost the guest's vCPU: CPL0 instructions the KVM
    interpreted (kvm_pvm's insn_emulation; 0 on a KVM that interprets
    nothing), KVM exits, exits to Python, shim entries by kind, and the
    back-ends' request counters."""

    def __init__(self, dom):
        from pyvmm.xen_abi.hypervisor import trace
        self.dom, self.trace, self.stats = dom, trace, dom.vcpu.stats()

    def snapshot(self) -> dict:
        s = self.stats.read()
        snap = {"cpl0_insns": s.get("insn_emulation", 0), "kvm_exits": s.get("exits", 0),
                "python_exits": sum(self.dom.exit_counts.values())}
        snap.update({f"kvm {k}": s[k] for k in KVM_EXIT_KINDS if k in s})
        snap.update({f"shim {k}": v for k, v in self.trace.shim_counters(self.dom).items()})
        for i, be in enumerate(self.dom.backends):
            snap.update({f"{type(be).__name__}[{i}] {k}": v for k, v in be.stats.items()})
        return snap

    @staticmethod
    def delta(before: dict, after: dict) -> dict:
        return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def run(size_mb: int, with_net: bool, extra_cmdline: str = "", with_disk: bool = True,
        profile: bool = False, vcpus: int = 1, max_queues: int | None = None) -> dict:
    from pyvmm.backends.blkback import BlockBackend, DiskImage
    from pyvmm.backends.netback import NetBackend
    from pyvmm.guests.default import build_default_guest
    from pyvmm.xen_abi.hypervisor.domain import Domain

    g = build_default_guest(progress=True)
    work = Path(tempfile.mkdtemp(prefix="pyvmm-bench-"))
    results: dict = {"size_mb": size_mb, "vcpus": vcpus, "max_queues": max_queues}
    ns = None
    try:
        img = work / "disk.img"
        blob = work / "blob"
        say(f"writing a {size_mb} MiB image")
        data = os.urandom(size_mb << 20)
        img.write_bytes(data)
        blob.write_bytes(data)
        (work / "empty").write_bytes(b"")
        del data
        image = DiskImage.open(str(img))
        tap = None
        if with_net:
            ns = Namespace(work)
            tap = ns.open_tap()
        with Domain(str(g.kernel), ram_size=256 << 20, cmdline=" ".join(filter(None, (g.cmdline, extra_cmdline))),
                    initrd=g.initrd.read_bytes(), nr_vcpus=vcpus) as dom:
            dom.attach(BlockBackend(dom, 0, image, max_queues=max_queues))
            if tap is not None:
                dom.attach(NetBackend(dom, 0, tap, "00:16:3e:00:0b:01", max_queues=max_queues))
            say("booting the default guest")
            th, con = start_guest(dom)
            meter = CostMeter(dom)
            costs = results["costs"] = {}
            sampler = None
            if profile:
                from entry_sampler import EntrySampler, kernel_symbols
                sampler = EntrySampler(dom, kernel_symbols(g.kernel.name, say))
                sampler.label = None
                sampler.start()

            def timed(key: str, command: str) -> None:
                say(key.replace("_", " "))
                before = meter.snapshot()
                if sampler:
                    sampler.label = key
                results[f"{key}_guest_s"] = con.timed(command)
                if sampler:
                    sampler.label = None
                costs[key] = meter.delta(before, meter.snapshot())

            # each command also run for 0 bytes: its fixed cost (processes
            # started, a flush), taken off to give the steady state per MiB
            if with_disk:
                timed("disk_read_0", "dd if=/dev/xvda of=/dev/null bs=1M count=0 2>/dev/null")
                timed("disk_read", "dd if=/dev/xvda of=/dev/null bs=1M 2>/dev/null")
                # again once the guest dropped its page cache: the same I/O into
                # guest RAM it has touched before (the first read's page cache
                # pages were the guest's first touch of them, a host page fault each)
                con.run("sync; echo 3 > /proc/sys/vm/drop_caches")
                timed("disk_reread", "dd if=/dev/xvda of=/dev/null bs=1M 2>/dev/null")
                costs["disk_reread_0"] = costs["disk_read_0"]
                results["disk_reread_0_guest_s"] = results["disk_read_0_guest_s"]
                if vcpus > 1:
                    share = size_mb // vcpus
                    timed("disk_read_direct", "dd if=/dev/xvda of=/dev/null bs=1M iflag=direct 2>/dev/null")
                    timed("disk_read_parallel", " ".join(
                        f"taskset {1 << c} dd if=/dev/xvda of=/dev/null bs=1M count={share} skip={c * share} "
                        f"iflag=direct 2>/dev/null &" for c in range(vcpus)) + " wait")
                    results["queues"] = [len(be.queues) for be in dom.backends]
                timed("disk_write_0", "dd if=/dev/zero of=/dev/xvda bs=1M count=0 conv=fsync 2>/dev/null")
                timed("disk_write", f"dd if=/dev/zero of=/dev/xvda bs=1M count={size_mb} conv=fsync 2>/dev/null")
            if tap is not None:
                con.run(f"ifconfig eth0 {GUEST_IP} netmask 255.255.255.0 up")
                con.run(f"ping -c 1 -W 10 {HOST_IP} >/dev/null")
                timed("net_rx_0", f"wget -q -O /dev/null http://{HOST_IP}:{PORT}/empty")
                timed("net_rx", f"wget -q -O /dev/null http://{HOST_IP}:{PORT}/blob")
                con.run(f"mkdir -p /tmp/www && dd if=/dev/xvda of=/tmp/www/blob bs=1M 2>/dev/null && "
                        f"httpd -p {GUEST_PORT} -h /tmp/www")
                say("net tx")
                before = meter.snapshot()
                if sampler:
                    sampler.label = "net_tx"
                results["net_tx_guest_s"] = host_time(ns.argv(["wget", "-q", "-O",
                                                       "/dev/null", f"http://{GUEST_IP}:{GUEST_PORT}/blob"]))
                if sampler:
                    sampler.label = None
                costs["net_tx"] = meter.delta(before, meter.snapshot())
                con.run("killall httpd; rm -r /tmp/www")
            if sampler:
                sampler.stop()
                results["profile"] = {key: sampler.table(key) for key in costs}
            stop_guest(dom, th)
            results["device_counters"] = [dict(be.stats) for be in dom.backends]
        image.close()
        if tap is not None:
            tap.close()
        say("host baselines")
        if with_disk:
            results["disk_read_host_s"] = host_time(["dd", f"if={img}", "of=/dev/null", "bs=1M"])
            results["disk_reread_host_s"] = results["disk_read_host_s"]    # the host's page cache is warm for both
            if vcpus > 1:                # the same bytes read: the same baseline
                results["disk_read_direct_host_s"] = results["disk_read_parallel_host_s"] = \
                    results["disk_read_host_s"]
            results["disk_write_host_s"] = host_time(["dd", "if=/dev/zero", f"of={img}", "bs=1M",
                                                      f"count={size_mb}", "conv=fsync,notrunc"])
        if ns is not None:
            results["net_rx_host_s"] = host_time(ns.argv(["wget", "-q", "-O", "/dev/null",
                                                          f"http://{HOST_IP}:{PORT}/blob"]))
            results["net_tx_host_s"] = results["net_rx_host_s"]     # the same loopback transfer
    finally:
        if ns is not None:
            ns.close()
        shutil.rmtree(work, ignore_errors=True)
    return results


ROWS = (("disk read", "disk_read"), ("disk re-read", "disk_reread"), ("disk read, direct", "disk_read_direct"),
        ("  ... N readers", "disk_read_parallel"), ("disk write (fsync)", "disk_write"),
        ("net receive (HTTP)", "net_rx"), ("net transmit (HTTP)", "net_tx"))


def shim_entries(c: dict) -> dict:
    """A cost delta's shim entries by kind (traps, interrupts, syscall-instruction entries)."""
    return {k[5:]: v for k, v in c.items() if k.startswith("shim ") and
            (k.startswith("shim trap") or k in ("shim interrupts", "shim syscall entries"))}


def _backend_counter(c: dict, key: str, name: str) -> int:
    be = "NetBackend[" if key.startswith("net") else "BlockBackend["
    return sum(v for k, v in c.items() if k.startswith(be) and k.endswith("] " + name))


def table(r: dict) -> str:
    mb = r["size_mb"]
    costs = r.get("costs", {})
    out = []
    if r.get("vcpus", 1) > 1:
        out.append(f"{r['vcpus']} vCPUs, queues per device {r.get('queues')} "
                   f"(back-ends offered {r.get('max_queues') or 'one per vCPU'})")
    out.append(f"{'transfer of %d MiB' % mb:<22} {'guest MB/s':>11} {'host MB/s':>10} {'guest/host':>11}")
    for label, key in ROWS:
        g, h = r.get(f"{key}_guest_s"), r.get(f"{key}_host_s")
        if g is None or h is None:
            continue
        gm, hm = mb / max(g, 0.01), mb / max(h, 0.001)
        out.append(f"{label:<22} {gm:>11.1f} {hm:>10.1f} {gm / hm:>11.3f}")
    measured = [(label, key, costs[key]) for label, key in ROWS if costs.get(key)]
    if not measured:
        return "\n".join(out)
    out += ["", f"{'per MiB moved':<22} {'CPL0 insns':>11} {'KVM exits':>10} {'to Python':>10} "
            f"{'shim entries':>13}  top shim entries per MiB"]
    for label, key, c in measured:
        entries = shim_entries(c)
        hcalls = {k[15:]: v for k, v in c.items() if k.startswith("shim hypercall ")}
        top = sorted({**entries, **hcalls}.items(), key=lambda kv: -kv[1])[:6]
        out.append(f"{label:<22} {c.get('cpl0_insns', 0) / mb:>11.0f} {c.get('kvm_exits', 0) / mb:>10.0f} "
                   f"{c.get('python_exits', 0) / mb:>10.1f} {sum(entries.values()) / mb:>13.0f}  "
                   + ", ".join(f"{k} {v / mb:.0f}" for k, v in top))
    out += ["", f"{'steady state, per MiB':<22} {'guest MB/s':>11} {'CPL0 insns':>11} "
            f"{'shim entries':>13}   (less the same command moving 0 bytes)"]
    for label, key, c in measured:
        c0, t, t0 = costs.get(f"{key}_0"), r.get(f"{key}_guest_s"), r.get(f"{key}_0_guest_s")
        if c0 is None or t is None or t0 is None:
            continue
        out.append(f"{label:<22} {mb / max(t - t0, 0.01):>11.1f} "
                   f"{(c.get('cpl0_insns', 0) - c0.get('cpl0_insns', 0)) / mb:>11.0f} "
                   f"{(sum(shim_entries(c).values()) - sum(shim_entries(c0).values())) / mb:>13.0f}")
    out += ["", f"{'KVM exits, per MiB':<22} by reason (the vCPU's KVM statistics)"]
    for label, key, c in measured:
        kinds = sorted(((k[4:], v) for k, v in c.items() if k.startswith("kvm ") and v), key=lambda kv: -kv[1])
        out.append(f"{label:<22} " + ", ".join(f"{k} {v / mb:.0f}" for k, v in kinds))
    out += ["", f"{'back-end, per MiB':<22} {'requests':>11} {'wake-ups':>10} {'wall ms':>10} {'CPU ms':>10}"]
    for label, key, c in measured:
        requests = sum(_backend_counter(c, key, n) for n in ("read", "write", "flush", "tx_packets", "rx_packets"))
        out.append(f"{label:<22} {requests / mb:>11.1f} {_backend_counter(c, key, 'worker_runs') / mb:>10.1f} "
                   f"{_backend_counter(c, key, 'worker_wall_us') / mb / 1000:>10.2f} "
                   f"{_backend_counter(c, key, 'worker_cpu_us') / mb / 1000:>10.2f}")
    for key, text in r.get("profile", {}).items():
        if not key.endswith("_0"):
            out += ["", f"{key}: sampled shim entries (shares of entries, not of time)", text]
    # the network rows: packets through netif's rings (GSO: one per up to 64 KiB)
    net = [(label, c) for label, key, c in measured if key.startswith("net_")]
    if net:
        out += ["", f"{'netif packets per MiB':<22} {'guest->host':>11} {'host->guest':>11} "
                f"{'GSO tx':>7} {'GSO rx':>7}"]
        for label, c in net:
            def per(stat):
                return sum(v for k, v in c.items() if k.startswith("NetBackend") and k.endswith(f" {stat}")) / mb
            out.append(f"{label:<22} {per('tx_packets'):>11.1f} {per('rx_packets'):>11.1f} "
                       f"{per('tx_gso_packets'):>7.1f} {per('rx_gso_packets'):>7.1f}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--no-net", action="store_true", help="skip the network transfers")
    ap.add_argument("--no-disk", action="store_true", help="skip the disk transfers")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="also sample each transfer's shim entries by kind, code site and caller")
    ap.add_argument("--extra-cmdline", default="", metavar="STR",
                    help="appended to the guest's command line (e.g. a module parameter to compare)")
    ap.add_argument("--vcpus", type=int, default=1, metavar="N",
                    help="the guest's vCPUs (its devices use up to N queues); N > 1 adds the direct-read rows")
    ap.add_argument("--max-queues", type=int, default=None, metavar="M",
                    help="what the back-ends offer as multi-queue-max-queues (default: one per vCPU)")
    args = ap.parse_args()
    with_net = not args.no_net and net_available()
    if not args.no_net and not with_net:
        say("no network transfer: it needs root, /dev/net/tun and iproute2")
    r = run(args.size_mb, with_net, args.extra_cmdline, with_disk=not args.no_disk, profile=args.profile,
            vcpus=args.vcpus, max_queues=args.max_queues)
    print(json.dumps(r) if args.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
