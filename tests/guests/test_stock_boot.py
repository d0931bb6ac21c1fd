"""Boot Debian's stock 6.1 cloud kernel (Xen PV, no hypercall page, LZ4
bzImage) with the default guest's busybox initramfs under pyvmm: the boot
milestones in order, then the shell on hvc0 (console ring input and
output, timers, poweroff), in-process and through the `pyvmm` command.

MILESTONES lists console lines of a healthy Xen PV boot in the order they
appear.  REQUIRED is how many of them this tree must reach; raise it as
the boot gets further, never lower it.  Each milestone must appear after
the previous one in the console output.

The boot is slow on kvm_pvm (every shim instruction is interpreted, a
hypercall costs ~0.2 ms) and slower still in the faithful lane, hence the
generous timeouts.  Run alone with:
    python -m pytest -q -s -m slow tests/guests/test_stock_boot.py
    python -m pytest -q -s --lane faithful tests/guests/test_stock_boot.py
"""
from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

import pytest

from spawned import Spawned
from waiting import wait_for
from pyvmm.xen_abi.hypervisor import trace

RAM_MB = 256

# (name, regex) in boot order
MILESTONES = [
    ("xen_start_kernel", r"Linux version 6\.1\.\S+"),
    ("xen detected", r"Hypervisor detected: Xen PV"),
    ("start_kernel", r"Kernel command line: .*earlyprintk=xen"),
    ("event channels", r"xen:events: Using FIFO-based ABI"),   # EVTCHNOP_init_control took
    ("hvc0", r"printk: console \[hvc0\] enabled"),
    ("xen clocksource", r"clocksource: xen: mask"),
    ("xen timer", r"installing Xen timer for CPU 0"),
    ("grant tables", r"xen:grant_table: Grant tables using version 1 layout"),
    ("balloon", r"xen:balloon: Initialising balloon driver"),
    ("init", r"Run /init as init process"),
    # the default guest's /init (guests/default.py BANNER)
    ("banner", r"pyvmm default guest ready: Linux 6\.1\."),
]
REQUIRED = 11    # all of them: the default guest reaches /init and its banner


def _milestones_in_order(text: str) -> list[str]:
    """Names of the milestones reached, each after the previous one."""
    reached, pos = [], 0
    for name, rx in MILESTONES:
        m = re.compile(rx, re.M).search(text, pos)
        if m is None:
            break
        reached.append(name)
        pos = m.end()
    return reached


def test_milestone_order_checker():
    """The checker itself: order matters and gaps stop the count."""
    ok = ("Linux version 6.1.0-x\nHypervisor detected: Xen PV\n"
          "Kernel command line: earlyprintk=xen console=hvc0\n")
    assert _milestones_in_order(ok) == ["xen_start_kernel", "xen detected", "start_kernel"]
    swapped = ("Hypervisor detected: Xen PV\nLinux version 6.1.0-x\n"
               "Kernel command line: earlyprintk=xen\n")
    assert _milestones_in_order(swapped) == ["xen_start_kernel"]
    assert _milestones_in_order("nothing") == []


def test_default_guest_without_apt_uses_the_cached_build(monkeypatch, tmp_path):
    """No package index (the faithful L1: no network, no apt lists): the
    newest default guest already built in the cache is used; with nothing
    built, the Debian error stands."""
    from pyvmm.guests import debian, default
    built = default.build_default_guest(progress=False)

    def no_apt(progress=True):
        raise debian.DebianError("apt-cache show linux-image-cloud-amd64 failed")
    monkeypatch.setattr(debian, "cloud_kernel", no_apt)
    g = default.build_default_guest(progress=False, cmdline="console=hvc0 x")
    assert (g.kernel, g.initrd, g.kernel_version) == (built.kernel, built.initrd, built.kernel_version)
    assert g.cmdline == "console=hvc0 x"
    monkeypatch.setattr(debian, "cache_root", lambda: tmp_path)
    with pytest.raises(debian.DebianError):
        default.build_default_guest(progress=False)


def test_symbolizer_on_a_small_map(tmp_path):
    m = tmp_path / "System.map"
    m.write_text("ffffffff81000000 T _stext\nffffffff81000100 T foo\nffffffff81000200 t bar\n"
                 "ffffffff81000300 T _etext\nffffffff82000000 D some_data\n")
    s = trace.Symbolizer.from_file(m)
    assert s(0xffffffff81000104) == "foo+0x4"
    assert s(0xffffffff81000200) == "bar"
    assert s(0xffffffff82000010) == "0xffffffff82000010"   # data, not text
    stub = tmp_path / "stub.map"
    stub.write_text("ffffffffffffffff B The real System.map is in the linux-image-x-dbg package\n")
    with pytest.raises(ValueError):
        trace.Symbolizer.from_file(stub)


# ---------------------------------------------------------------------------
# The default guest (cloud kernel + busybox initramfs) on its console
# ---------------------------------------------------------------------------
PROMPT = re.compile(rb"pyvmm:/# ")
# Measured to the first prompt: kvm_pvm ~40-60 s alone (x2-3 under load),
# the faithful lane ~10-15 s.  The limits are ~7x and ~40x those, and
# small enough that a hung boot fails with its console and pyvmm's state
# well inside the faithful lane's own budget (conftest).
PROMPT_TIMEOUT_PVM, PROMPT_TIMEOUT_FAITHFUL = 400.0, 600.0
COMMAND_TIMEOUT_PVM, COMMAND_TIMEOUT_FAITHFUL = 60.0, 120.0
# "  0:       6976  xen-percpu    -virq      timer0" (chip name, then the type)
TIMER_LINE = re.compile(rb"^\s*\d+:\s+(\d+)\s+xen-percpu\s*-virq\s+timer0\s*$", re.M)


def _timeouts() -> tuple[float, float]:
    from pyvmm.vmm.quirks import on_kvm_pvm
    if on_kvm_pvm():
        return PROMPT_TIMEOUT_PVM, COMMAND_TIMEOUT_PVM
    return PROMPT_TIMEOUT_FAITHFUL, COMMAND_TIMEOUT_FAITHFUL


class ConsoleSession:
    """Expect-style access to a console byte stream that grows in another
    thread: `read()` returns everything so far."""

    def __init__(self, read, send, alive=lambda: True):
        self._read, self._send, self._alive = read, send, alive
        self.pos = 0
        self.t0 = time.monotonic()
        self.seen: dict[bytes, float] = {}     # marker -> first time seen

    def expect(self, rx: re.Pattern, timeout: float, what: str) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            text = self._read()
            m = rx.search(text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > deadline or not self._alive():
                tail = text[-1500:].decode(errors="replace")
                raise AssertionError(f"{what}: no {rx.pattern!r} within {timeout:.0f} s "
                                     f"(guest alive: {self._alive()}); console tail:\n{tail}")
            self.note(b"Run /init as init process", text)
            time.sleep(0.1)

    def note(self, marker: bytes, text: bytes) -> None:
        if marker not in self.seen and marker in text:
            self.seen[marker] = time.monotonic() - self.t0

    def command(self, line: str, rx: re.Pattern, timeout: float) -> re.Match:
        """Type `line`, wait for rx in its output and then the next prompt."""
        self._send((line + "\n").encode())
        m = self.expect(rx, timeout, repr(line))
        self.expect(PROMPT, timeout, f"prompt after {line!r}")
        return m


def _shell_checks(con: ConsoleSession, command_timeout: float) -> dict:
    """The commands of the interactive tests; returns measured figures."""
    m = con.command("uname -r", re.compile(rb"^(6\.1\.0-\S+)\r?$", re.M), command_timeout)
    assert m.group(1).decode().endswith("-cloud-amd64"), m.group(1)
    first = int(con.command("cat /proc/interrupts", TIMER_LINE, command_timeout).group(1))
    t = time.monotonic()
    con.command("sleep 1; echo SLEPT", re.compile(rb"^SLEPT\r?$", re.M), command_timeout)
    slept = time.monotonic() - t
    assert slept >= 1.0, f"`sleep 1` returned after {slept:.2f} s"
    second = int(con.command("cat /proc/interrupts", TIMER_LINE, command_timeout).group(1))
    assert second > first, f"timer0 interrupts did not increase: {first} -> {second}"
    _pipeline_checks(con, command_timeout)
    return {"sleep_1_s": round(slept, 2), "timer0": (first, second)}


SEGFAULT = re.compile(rb"segfault at|Segmentation fault|general protection")

# An idle default guest at its prompt (issue 8): the kernel stops its tick
# and wakes only for its own timers.  Before the default command line's
# IDLE_CMDLINE it took ~10 timer interrupts a second (the clocksource
# watchdog and kcompactd every 0.5 s, PSI every 2 s, each wake-up costing
# two or three ticks); with it ~3 per ~4.3 s, the longest one-shot Linux's
# Xen clockevent programs (max_delta_ns 0xffffffff).  The limit sits
# between the two; the window is longer than 4.3 s several times over.
IDLE_SETTLE_S, IDLE_WINDOW_S, IDLE_MAX_INTERRUPTS_PER_S = 5.0, 15.0, 3.0


def _idle_check(dom) -> dict:
    """Count the shim entries of vCPU 0 while the shell waits for input:
    interrupts (the guest's timer, event channels) and blocks."""
    from pyvmm.xen_abi.shim import priv

    time.sleep(IDLE_SETTLE_S)
    percpu = dom.region.vcpus[0].percpu_off
    before, t = priv.read_counters(dom.region.mem, percpu), time.monotonic()
    time.sleep(IDLE_WINDOW_S)
    after, span = priv.read_counters(dom.region.mem, percpu), time.monotonic() - t
    rate = {k: round((after.get(k, 0) - before.get(k, 0)) / span, 2)
            for k in ("interrupts", "hypercall sched_op", "hypercall vcpu_op")}
    assert rate["interrupts"] <= IDLE_MAX_INTERRUPTS_PER_S, \
        f"an idle guest took {rate['interrupts']} interrupts/s (at most {IDLE_MAX_INTERRUPTS_PER_S}): {rate}"
    return rate


def _pipeline_checks(con: ConsoleSession, command_timeout: float) -> None:
    """Pipelines and a loop forking several processes: each side of a pipe
    is a fresh busybox (fork + exec of /proc/self/exe) starting up while
    the other runs, so register state must survive context switches (on
    kvm_pvm the FPU/AVX state once leaked between processes and `cat |
    grep` segfaulted in glibc's start-up)."""
    start = con.pos
    third = int(con.command("cat /proc/interrupts | grep timer0", TIMER_LINE,
                            command_timeout).group(1))
    assert third > 0
    n = int(con.command("ls / | wc -l", re.compile(rb"^\s*(\d+)\r?$", re.M), command_timeout).group(1))
    assert n >= 5, n          # bin dev etc proc sys ... of the initramfs
    con.command("echo pipe-a | cat | tr a-z A-Z", re.compile(rb"^PIPE-A\r?$", re.M), command_timeout)
    # several forks in a row, each pipeline's output in order
    con.command("for i in 1 2 3; do echo x$i | cat; done; echo LOOP-DONE",
                re.compile(rb"^x1\r?\nx2\r?\nx3\r?\nLOOP-DONE\r?$", re.M), command_timeout)
    con.command("for i in 1 2 3 4; do cat /proc/interrupts | grep -c timer0; done | tr -d '\\n'; echo",
                re.compile(rb"^1111\r?$", re.M), command_timeout)
    out = con._read()[start:con.pos]
    assert not SEGFAULT.search(out), out.decode(errors="replace")


DISK_SECTORS = 8192                    # 4 MiB
WRITE_AT, WRITE_BLOCKS = 128, 64       # in 4 KiB blocks: the guest writes 256 KiB at 512 KiB
HASH = re.compile(rb"^([0-9a-f]{32})  -\r?$", re.M)


def _disk_images(tmp_path: Path) -> tuple[Path, Path, bytes, bytes]:
    """A writable and a read-only image of random bytes."""
    import os
    rw, ro = tmp_path / "rw.img", tmp_path / "ro.img"
    rw_data, ro_data = os.urandom(DISK_SECTORS * 512), os.urandom(DISK_SECTORS * 512)
    rw.write_bytes(rw_data)
    ro.write_bytes(ro_data)
    return rw, ro, rw_data, ro_data


def _disk_checks(con: ConsoleSession, command_timeout: float, rw_data: bytes, ro_data: bytes) -> bytes:
    """xvda (rw) and xvdb (ro) through Linux's xen-blkfront: sizes, the
    whole of each disk read and hashed in the guest, a 256 KiB write
    flushed to the image.  Returns the guest's hash of what it wrote."""
    import hashlib
    size = re.compile(rb"^(\d+)\r?$", re.M)
    assert int(con.command("cat /sys/block/xvda/size", size, command_timeout).group(1)) == DISK_SECTORS
    assert int(con.command("cat /sys/block/xvdb/ro", size, command_timeout).group(1)) == 1
    for dev, data in (("xvda", rw_data), ("xvdb", ro_data)):
        got = con.command(f"md5sum < /dev/{dev}", HASH, command_timeout).group(1).decode()
        assert got == hashlib.md5(data).hexdigest(), f"{dev}: the guest read other bytes"
    con.command(f"dd if=/dev/urandom of=/tmp/w bs=4096 count={WRITE_BLOCKS} 2>/dev/null; "
                f"dd if=/tmp/w of=/dev/xvda bs=4096 seek={WRITE_AT} conv=notrunc,fsync 2>/dev/null "
                f"&& echo WRITE-OK", re.compile(rb"^WRITE-OK\r?$", re.M), command_timeout)
    wrote = con.command("md5sum < /tmp/w", HASH, command_timeout).group(1)
    # the guest's block layer gives an error for the read-only disk
    con.command("dd if=/tmp/w of=/dev/xvdb bs=4096 count=1 conv=fsync 2>/dev/null || echo RO-REFUSED",
                re.compile(rb"^RO-REFUSED\r?$", re.M), command_timeout)
    return wrote


def _check_images_after(rw: Path, ro: Path, rw_data: bytes, ro_data: bytes, wrote: bytes) -> None:
    import hashlib
    after = rw.read_bytes()
    lo, hi = WRITE_AT * 4096, (WRITE_AT + WRITE_BLOCKS) * 4096
    assert hashlib.md5(after[lo:hi]).hexdigest().encode() == wrote, "the write did not reach the image"
    assert after[:lo] == rw_data[:lo] and after[hi:] == rw_data[hi:], "bytes outside the write changed"
    assert ro.read_bytes() == ro_data, "the read-only image changed"


GUEST_IP, PEER_IP = "10.0.2.15", "10.0.2.1"
TFTP_CONTENT = b"pyvmm tftp payload\n"


def _net_checks(con: ConsoleSession, command_timeout: float, peer) -> None:
    """eth0 through Linux's xen-netfront to a Python peer on the link:
    ARP, ping (small, and large enough to span two transmit slots), and a
    TFTP read (UDP out with the checksum the back-end fills in, UDP back)."""
    con.command(f"ifconfig eth0 {GUEST_IP} netmask 255.255.255.0 up && echo UP",
                re.compile(rb"^UP\r?$", re.M), command_timeout)
    con.command(f"ping -c 3 -W 5 {PEER_IP}", re.compile(rb"3 packets transmitted, 3 packets received"),
                command_timeout)
    con.command(f"ping -c 2 -W 5 -s 1400 {PEER_IP}",
                re.compile(rb"2 packets transmitted, 2 packets received"), command_timeout)
    con.command(f"tftp -g -r hello -l /tmp/hello {PEER_IP} && cat /tmp/hello",
                re.compile(re.escape(TFTP_CONTENT.rstrip()) + rb"\r?$", re.M), command_timeout)
    assert peer.seen["arp"] >= 1 and peer.seen["icmp_echo"] == 5, peer.seen
    assert peer.seen["largest"] >= 1400 and peer.seen["bad_checksum"] == 0, peer.seen
    assert peer.tftp_requests == ["hello"], peer.tftp_requests


# The devices' end-to-end test runs in the host lane only for now: in the
# faithful lane it failed twice in eleven runs (once `md5sum < /dev/xvda`
# never returned, once a boot milestone was missing from the console), not
# yet diagnosed; the L1 itself has been seen to wedge in unrelated tests
# (guests/faithful.py DEFAULT_SMP), so these may not be pyvmm's.  There the
# back-ends are covered by tests/backends/test_blkback.py and test_netback.py,
# which do not depend on the lane.
@pytest.mark.slow
@pytest.mark.faithful
def test_default_guest_shell_on_console(tmp_path):
    """Boot the default guest, check the boot milestones in order, then use
    its busybox shell over the console ring: uname, sleep, the timer
    interrupt count, pipelines, how often the idle guest wakes, and
    `poweroff -f` ending the domain with poweroff."""
    _boot_in_process(tmp_path, with_devices=False)


@pytest.mark.slow
def test_default_guest_disks_and_network(tmp_path):
    """The same boot with two disks and a network interface: md5 of both
    whole disks in the guest, a 256 KiB write reaching the image, the
    read-only disk refusing writes, ping and TFTP over eth0 to a Python
    peer, then poweroff."""
    _boot_in_process(tmp_path, with_devices=True)


@pytest.mark.slow
def test_default_guest_two_vcpus_multi_queue_disk_and_network(tmp_path):
    """The devices' boot with two vCPUs: xen-blkfront and xen-netfront
    each negotiate two queues (multi-queue-max-queues is the guest's
    vCPUs): /sys/block/xvda/mq has two hardware queues and eth0 tx-0/tx-1;
    a direct read pinned to each CPU goes through that CPU's ring (the
    back-end's per-queue counters say so) and reads the image's bytes;
    the whole-disk hashes, the write, ping and TFTP pass as with one vCPU."""
    _boot_in_process(tmp_path, with_devices=True, vcpus=2)


def _multi_queue_checks(con: ConsoleSession, command_timeout: float, dom, rw_data: bytes) -> list:
    """Two queues on each device, each disk queue used: a direct read of
    xvda's first 512 KiB (untouched by the write) pinned to each CPU."""
    import hashlib
    con.command("nproc", re.compile(rb"^2\r?$", re.M), command_timeout)
    con.command("ls /sys/block/xvda/mq | tr '\\n' ' '; echo", re.compile(rb"^0 1 \r?$", re.M), command_timeout)
    con.command("ls /sys/class/net/eth0/queues | tr '\\n' ' '; echo",
                re.compile(rb"^rx-0 rx-1 tx-0 tx-1 \r?$", re.M), command_timeout)
    vbd = next(be for be in dom.backends if be.kind == "vbd")
    assert len(vbd.queues) == 2, vbd.describe()
    want = hashlib.md5(rw_data[:WRITE_AT * 4096]).hexdigest().encode()
    for cpu in (0, 1):
        before = vbd.queues[cpu].stats["read"]
        got = con.command(f"taskset {1 << cpu} dd if=/dev/xvda iflag=direct bs=64k count=8 2>/dev/null | md5sum",
                          HASH, command_timeout).group(1)
        assert got == want, f"CPU {cpu}: the guest read other bytes"
        assert vbd.queues[cpu].stats["read"] > before, \
            f"CPU {cpu}'s read did not use queue {cpu}: {[dict(q.stats) for q in vbd.queues]}"
    vif = next(be for be in dom.backends if be.kind == "vif")
    assert len(vif.queues) == 2, vif.describe()
    return [[dict(q.stats) for q in be.queues] for be in (vbd, vif)]


def _boot_in_process(tmp_path, with_devices: bool, vcpus: int = 1) -> None:
    import threading

    from netpeer import NetPeer
    from pyvmm.backends.blkback import BlockBackend, DiskImage
    from pyvmm.backends.netback import NetBackend, SocketLink
    from pyvmm.guests.debian import find_system_map
    from pyvmm.guests.default import BANNER, build_default_guest
    from pyvmm.xen_abi.abi import ShutdownReason
    from pyvmm.xen_abi.hypervisor.domain import Domain

    prompt_timeout, command_timeout = _timeouts()
    g = build_default_guest(progress=False)
    smap = find_system_map(version=g.kernel_version, fetch=False)
    sym = trace.Symbolizer.from_file(smap) if smap else None
    images, link, peer, wrote = [], None, None, None
    if with_devices:
        rw, ro, rw_data, ro_data = _disk_images(tmp_path)
        images = [DiskImage.open(str(rw)), DiskImage.open(str(ro), readonly=True)]
    t0 = time.monotonic()
    with Domain(str(g.kernel), ram_size=RAM_MB << 20, cmdline=g.cmdline + " loglevel=8",
                initrd=g.initrd.read_bytes(), nr_vcpus=vcpus) as dom:
        for index, image in enumerate(images):
            dom.attach(BlockBackend(dom, index, image))
        if with_devices:
            link, peer_sock = SocketLink.pair()
            dom.attach(NetBackend(dom, 0, link, "00:16:3e:00:00:01"))
            peer = NetPeer(peer_sock, ip=PEER_IP, tftp_files={"hello": TFTP_CONTENT})
        tr = trace.Tracer(dom, symbols=sym, last_n=40)
        out: dict = {}

        def runner():
            try:
                out["result"] = dom.run(timeout=prompt_timeout + 8 * command_timeout)
            except BaseException as e:      # reported by the main thread
                out["error"] = e

        th = threading.Thread(target=runner, name="vcpu0", daemon=True)
        th.start()
        con = ConsoleSession(lambda: dom.read_console()[0], dom.send_console_input, th.is_alive)
        con.t0 = t0
        figures = {}
        try:
            con.expect(re.compile(re.escape(BANNER.encode())), prompt_timeout, "banner")
            con.expect(PROMPT, command_timeout, "first prompt")
            if with_devices:
                wrote = _disk_checks(con, command_timeout, rw_data, ro_data)
                _net_checks(con, command_timeout, peer)
                if vcpus > 1:
                    figures["queue_counters"] = _multi_queue_checks(con, command_timeout, dom, rw_data)
            else:
                figures = _shell_checks(con, command_timeout)
                figures["idle_per_s"] = _idle_check(dom)
            dom.send_console_input(b"poweroff -f\n")
            th.join(command_timeout)
        except AssertionError as e:     # a command got no answer: where are the guest and devices?
            raise AssertionError(f"{e}\n{_stall_report(dom)}") from None
        finally:
            if th.is_alive():
                out["stall"] = _stall_report(dom)
                dom.stop()
                th.join(30)
            report = tr.report(out.get("result"))
        text = dom.console.decode(errors="replace")
        device_stats = [dict(be.stats) for be in dom.backends]
    if peer is not None:
        peer.close()
        link.close()
    for image in images:
        image.close()
    if with_devices:
        _check_images_after(rw, ro, rw_data, ro_data, wrote)
        print(f"device counters: {device_stats}")
    reached = _milestones_in_order(text)
    print(f"milestones reached: {reached}")
    print(f"init after {con.seen.get(b'Run /init as init process', float('nan')):.1f} s, "
          f"shell figures {figures}")
    print(report)
    need = [n for n, _ in MILESTONES[:REQUIRED]]
    assert reached[:REQUIRED] == need, \
        f"stopped after {reached[-1] if reached else 'nothing'}\n{report}\nconsole:\n{text[-20000:]}"
    assert "error" not in out, out.get("error")
    res = out["result"]
    assert res.reason == ShutdownReason.poweroff and not res.stopped, \
        (res.reason, res.crash_info, report, out.get("stall"))


def _stall_report(dom) -> str:
    """The guest's state and every host thread's stack, for a guest that did
    not end when it should have."""
    import sys
    import threading
    import traceback
    names = {t.ident: t.name for t in threading.enumerate()}
    stacks = [f"--- thread {names.get(ident, ident)} ---\n" + "".join(traceback.format_stack(frame))
              for ident, frame in sys._current_frames().items()]
    return trace.status_report(dom) + "\n" + "\n".join(stacks)


@contextlib.contextmanager
def _pyvmm_at_prompt(argv: list[str], prompt_timeout: float, env: dict | None = None):
    """(run, console): the `pyvmm` command `argv` with its console at the first
    prompt. A failed assertion in the block gets pyvmm's own account of why it
    stopped; pyvmm is gone (killed if need be) when the block ends."""
    from pyvmm.launch import STATUS_SIGNAL

    run = Spawned(argv, env=env)
    con = ConsoleSession(lambda: bytes(run.out), run.send, run.alive)
    try:
        con.expect(PROMPT, prompt_timeout, "first prompt")
        yield run, con
    except AssertionError as e:
        raise run.stalled(e, STATUS_SIGNAL) from None
    finally:
        run.finish()


@pytest.mark.slow
@pytest.mark.faithful
def test_cli_default_guest_shell_and_poweroff_exit_status(tmp_path):
    """`python -m pyvmm --default-guest` with stdin a pipe: the shell answers
    over hvc0, `poweroff -f` ends pyvmm with status 0, and pyvmm reported
    the init milestone on stderr."""
    import sys

    from pyvmm.errors import ExitStatus
    from pyvmm.guests.default import build_default_guest

    prompt_timeout, command_timeout = _timeouts()
    build_default_guest(progress=False)           # fetch/build outside the timed part
    with _pyvmm_at_prompt([sys.executable, "-m", "pyvmm", "--default-guest"],
                          prompt_timeout) as (run, con):
        m = con.command("uname -r", re.compile(rb"^(6\.1\.0-\S+)\r?$", re.M), command_timeout)
        assert m.group(1).endswith(b"-cloud-amd64")
        run.send(b"poweroff -f\n")
        rc = run.proc.wait(command_timeout)
    stderr = run.stderr
    print(stderr)
    assert rc == ExitStatus.POWEROFF == 0, (rc, stderr, bytes(run.out[-1500:]))
    assert re.search(r"pyvmm: init started after [\d.]+ s", stderr), stderr
    assert "guest powered off" in stderr, stderr


# One XS_WRITE of data/busy with a 2000-byte value, as busybox printf writes
# it to /dev/xen/xenbus: the xsd_sockmsg header (type 11, req_id 1, tx_id 0,
# len 10 + 2000 = 0x7da, little endian, in octal), the path, the value.
XENBUS_WRITE_2K = r"'\013\000\000\000\001\000\000\000\000\000\000\000\332\007\000\000data/busy\000%s'"
XENBUS_BUSY_WRITES = 3000


@pytest.mark.slow
def test_cli_default_guest_busy_xenbus_client(tmp_path):
    """Issue 11 item 7 with the stock kernel's own /dev/xen/xenbus: a shell
    loop keeps one descriptor open and writes thousands of 2 KB XS_WRITE
    requests, which Linux's xenbus pipelines into the ring as space allows;
    every one is answered OK on the same descriptor, pyvmm never breaks the
    ring and the guest's xenbus logs no error.  (On main it got ~400 replies:
    pyvmm published each ring index with a transient 0, Linux's
    check_indexes() saw a broken ring and zeroed its indices.)"""
    import sys

    from pyvmm.guests.default import build_default_guest

    prompt_timeout, command_timeout = _timeouts()
    build_default_guest(progress=False)
    with _pyvmm_at_prompt([sys.executable, "-m", "pyvmm", "--default-guest"],
                          prompt_timeout) as (run, con):
        con.command("ls /dev/xen/xenbus", re.compile(rb"^/dev/xen/xenbus\r?$", re.M), command_timeout)
        con.command("V=$(printf '%2000s' '' | tr ' ' v); echo LEN ${#V}",
                    re.compile(rb"^LEN 2000\r?$", re.M), command_timeout)
        con.command("exec 3<>/dev/xen/xenbus; echo OPEN", re.compile(rb"^OPEN\r?$", re.M), command_timeout)
        t = time.monotonic()
        m = con.command(f"i=0; while [ $i -lt {XENBUS_BUSY_WRITES} ] && printf {XENBUS_WRITE_2K} \"$V\" >&3;"
                        " do i=$((i+1)); done; echo WROTE $i",
                        re.compile(rb"^WROTE (\d+)\r?$", re.M), 10 * command_timeout)
        assert int(m.group(1)) == XENBUS_BUSY_WRITES, bytes(run.out[-2000:])
        # each reply: a 16-byte header (no 'K' in it) and "OK\0"
        m = con.command(f"head -c {19 * XENBUS_BUSY_WRITES} <&3 | tr -cd K | wc -c",
                        re.compile(rb"^\s*(\d+)\r?$", re.M), 5 * command_timeout)
        assert int(m.group(1)) == XENBUS_BUSY_WRITES, bytes(run.out[-2000:])
        print(f"{XENBUS_BUSY_WRITES} writes answered in {time.monotonic() - t:.1f} s")
        con.command("exec 3<&-; dmesg | grep -c 'while \\(reading\\|writing\\) message'",
                    re.compile(rb"^0\r?$", re.M), command_timeout)
        run.send(b"poweroff -f\n")
        rc = run.proc.wait(command_timeout)
    stderr = run.stderr
    assert "xenstore: ring of domain" not in stderr, stderr
    assert rc == 0, (rc, stderr)


# Each block the guest writes: its marker, then zeros to the end of the 4 KiB block.
ACKED_BLOCK = re.compile(rb"^ACKED (\d+)\r?$", re.M)
KILL_AFTER_ACKS = 6


@pytest.mark.slow
def test_sigkill_mid_write_loses_no_acknowledged_write(tmp_path):
    """Issue 7: a WRITE is acknowledged only once it reached the image.  The
    guest writes numbered 4 KiB blocks, each with `conv=fsync` (a WRITE and a
    FLUSH through blkfront), and prints ACKED n once dd returned, i.e. once
    blkback answered both; pyvmm is SIGKILLed while the next blocks are being
    written.  Every block the guest saw acknowledged is in the image, whole;
    every other block is untouched or whole (never torn or foreign)."""
    import os
    import signal
    import sys

    from pyvmm.guests.default import build_default_guest

    prompt_timeout, command_timeout = _timeouts()
    build_default_guest(progress=False)
    image = tmp_path / "disk.img"
    blocks = 256
    image.write_bytes(bytes(blocks * 4096))
    with _pyvmm_at_prompt([sys.executable, "-m", "pyvmm", "--default-guest", "--disk", str(image)],
                          prompt_timeout) as (run, con):
        run.send(f"i=0; while [ $i -lt {blocks} ]; do printf 'BLOCK%06d' $i | dd of=/dev/xvda bs=4096 "
                 f"seek=$i conv=notrunc,fsync 2>/dev/null && echo ACKED $i; i=$((i+1)); done\n".encode())
        ok = run.wait_for(lambda: len(ACKED_BLOCK.findall(bytes(run.out))) >= KILL_AFTER_ACKS,
                          KILL_AFTER_ACKS * command_timeout)
        assert ok, f"fewer than {KILL_AFTER_ACKS} writes acknowledged: {bytes(run.out[-1500:])!r}"
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(command_timeout)
        acked = sorted(int(n) for n in ACKED_BLOCK.findall(bytes(run.out)))
    assert run.proc.returncode == -signal.SIGKILL
    data = image.read_bytes()
    assert len(data) == blocks * 4096, "the image changed size"
    assert acked == list(range(len(acked))), acked
    for i in range(blocks):
        block = data[i * 4096:(i + 1) * 4096]
        whole = f"BLOCK{i:06d}".encode().ljust(4096, b"\0")
        if i in acked:
            assert block == whole, f"acknowledged block {i} is not in the image: {block[:32]!r}"
        else:
            assert block in (whole, bytes(4096)), f"unacknowledged block {i} is torn: {block[:32]!r}"
    print(f"{len(acked)} blocks acknowledged before SIGKILL, all in the image")


# ---------------------------------------------------------------------------
# The guest on a host TAP device, in a network namespace of its own
# ---------------------------------------------------------------------------
TAP_HOST_IP, TAP_GUEST_IP = "10.0.3.1", "10.0.3.15"


@pytest.fixture
def tap_namespace(tmp_path):
    """A network namespace with a persistent TAP device (10.0.3.1/24, up)
    and an HTTP server on it serving tmp_path.  Needs root, /dev/net/tun
    and iproute2 (`make setup` installs it)."""
    import os
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        pytest.skip("needs root, /dev/net/tun and iproute2 (ip) for a TAP device in a namespace")
    ns, tap = f"pyvmm-t{os.getpid()}", "pvtap0"

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    server = None
    try:
        ip("-n", ns, "tuntap", "add", "dev", tap, "mode", "tap")
        ip("-n", ns, "addr", "add", f"{TAP_HOST_IP}/24", "dev", tap)
        ip("-n", ns, "link", "set", tap, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "8000",
                                   "--bind", TAP_HOST_IP, "--directory", str(tmp_path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield ns, tap
    finally:
        if server is not None:
            server.kill()
            server.wait(30)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


@pytest.mark.slow
def test_cli_default_guest_on_a_tap_device(tmp_path, tap_namespace):
    """`pyvmm --default-guest --net tap=NAME --disk A --disk B,ro` inside a
    namespace: the guest pings the host end of the TAP, fetches a file over
    HTTP from it, and serves one the host fetches (TCP both ways through the
    real Linux stacks, blank checksums and 64 KiB GSO segments passed in
    vnet headers), md5 checked; then the disk checks through the CLI's --disk."""
    import hashlib
    import os
    import subprocess
    import sys

    ns, tap = tap_namespace
    blob = os.urandom(3_000_000)
    (tmp_path / "blob").write_bytes(blob)
    prompt_timeout, command_timeout = _timeouts()
    rw, ro, rw_data, ro_data = _disk_images(tmp_path)
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "pyvmm", "--default-guest",
            "--net", f"tap={tap},mac=00:16:3e:00:03:0f", "--disk", str(rw), "--disk", f"{ro},ro"]
    with _pyvmm_at_prompt(argv, prompt_timeout) as (run, con):
        con.command(f"ifconfig eth0 {TAP_GUEST_IP} netmask 255.255.255.0 up && echo UP",
                    re.compile(rb"^UP\r?$", re.M), command_timeout)
        con.command(f"ping -c 2 -W 5 {TAP_HOST_IP}", re.compile(rb"2 packets transmitted, 2 packets received"),
                    command_timeout)
        got = con.command(f"wget -q -O - http://{TAP_HOST_IP}:8000/blob | md5sum", HASH, command_timeout)
        assert got.group(1).decode() == hashlib.md5(blob).hexdigest(), "the guest received other bytes"
        # the other way: the guest's httpd, the host's wget
        sent = con.command("mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/up bs=64k count=48 2>/dev/null"
                           " && httpd -p 8080 -h /tmp/www && md5sum < /tmp/www/up", HASH, command_timeout)
        fetched = subprocess.run(["ip", "netns", "exec", ns, "wget", "-q", "-O", "-",
                                  f"http://{TAP_GUEST_IP}:8080/up"], capture_output=True, timeout=command_timeout)
        assert fetched.returncode == 0, fetched.stderr
        assert len(fetched.stdout) == 48 << 16, len(fetched.stdout)
        assert hashlib.md5(fetched.stdout).hexdigest() == sent.group(1).decode(), "the host received other bytes"
        con.command("killall httpd; echo KILLED", re.compile(rb"^KILLED\r?$", re.M), command_timeout)
        wrote = _disk_checks(con, command_timeout, rw_data, ro_data)
        run.send(b"poweroff -f\n")
        rc = run.proc.wait(command_timeout)
    stderr = run.stderr
    assert rc == 0, (rc, stderr)
    assert f"eth0={tap} (00:16:3e:00:03:0f)" in stderr, stderr
    assert f"xvda={rw}, xvdb={ro} (ro)" in stderr, stderr
    _check_images_after(rw, ro, rw_data, ro_data, wrote)


def _guest_info(pyvmm) -> dict:
    import json

    (info,) = json.loads(pyvmm("list", "--json", timeout=30).stdout)
    return info


def _detached_status(pyvmm, log) -> str:
    """A detached guest's status report (kill -USR2 writes it to its log)."""
    import os
    import signal

    try:
        info = _guest_info(pyvmm)
        before = log.read_text().count("pyvmm: status after")
        os.kill(info["pid"], signal.SIGUSR2)
        wait_for(lambda: log.read_text().count("pyvmm: status after") > before, "a status report", 30)
        text = log.read_text()
        return text[text.rindex("pyvmm: status after"):]
    except Exception as e:            # a diagnosis must not hide the failure it explains
        return f"(no status: {e!r})"


@pytest.mark.slow
def test_create_from_an_xl_config_two_disks_and_a_vif_on_a_bridge(tmp_path):
    """Issue 12's acceptance: `pyvmm create FILE -c` with an xl config
    (the default kernel, two disks in both spec syntaxes, a vif on a bridge
    in a network namespace the test makes): the guest sees both disks,
    pings the host's address on the bridge, and `pyvmm xenstore ... ls
    device` shows its frontends' nodes."""
    import os
    import shutil
    import subprocess
    import sys

    from pyvmm.guests.default import build_default_guest

    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        pytest.skip("needs root, /dev/net/tun and iproute2 (ip) for a bridge in a namespace")
    guest = build_default_guest(progress=False)
    prompt_timeout, command_timeout = _timeouts()
    rw, ro, rw_data, ro_data = _disk_images(tmp_path)
    cfg = tmp_path / "deb.cfg"
    cfg.write_text(f'name = "xl1"\nkernel = "{guest.kernel}"\nramdisk = "{guest.initrd}"\n'
                   f'cmdline = "{guest.cmdline}"\nmemory = 256\n'
                   f"disk = [ '{rw},raw,xvda,rw', 'vdev=xvdb, access=ro, target={ro}' ]\n"
                   'vif = [ "mac=00:16:3e:00:04:0f, bridge=pvbr0" ]\n')
    env = dict(os.environ, PYVMM_RUNTIME_DIR=str(tmp_path / "run"))
    ns = f"pyvmm-x{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["link", "add", "pvbr0", "type", "bridge"], ["addr", "add", "10.0.4.1/24", "dev", "pvbr0"],
                    ["link", "set", "pvbr0", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "pyvmm", "create", str(cfg), "-c"]
        with _pyvmm_at_prompt(argv, prompt_timeout, env=env) as (run, con):
            con.command("ifconfig eth0 10.0.4.15 netmask 255.255.255.0 up && echo UP",
                        re.compile(rb"^UP\r?$", re.M), command_timeout)
            con.command("ping -c 2 -W 5 10.0.4.1", re.compile(rb"2 packets transmitted, 2 packets received"),
                        command_timeout)
            ls = subprocess.run([sys.executable, "-m", "pyvmm", "xenstore", "xl1", "ls", "device"],
                                capture_output=True, text=True, env=env, timeout=60)
            assert ls.returncode == 0, ls.stderr
            nodes = [line.strip() for line in ls.stdout.splitlines()]
            for node in ('vbd = ""', '51712 = ""', '51728 = ""', 'vif = ""', '0 = ""', 'mac = "00:16:3e:00:04:0f"'):
                assert node in nodes, (node, ls.stdout)
            wrote = _disk_checks(con, command_timeout, rw_data, ro_data)
            # /init gave insmod the command line's module option (1 MiB requests)
            con.command("cat /sys/module/xen_blkfront/parameters/max_indirect_segments",
                        re.compile(rb"^256\r?$", re.M), command_timeout)
            run.send(b"poweroff -f\n")
            rc = run.proc.wait(command_timeout)
        assert rc == 0, (rc, run.stderr)
        _check_images_after(rw, ro, rw_data, ro_data, wrote)
        log = (tmp_path / "run" / "xl1.log").read_text()
        assert re.search(r"eth0=vif\d+\.0 \(00:16:3e:00:04:0f\)", log), log[-2000:]   # the TAP pyvmm made
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


@pytest.mark.slow
@pytest.mark.faithful
def test_detached_default_guest_console_and_xenstore_shutdown(tmp_path):
    """xl's workflow: `pyvmm --default-guest --detach`, `pyvmm console`
    (the shell answers through the control socket), then `pyvmm shutdown
    --wait`: the guest's kernel sees control/shutdown in xenstore, runs
    /sbin/poweroff, /init powers off and pyvmm goes away."""
    import os
    import subprocess
    import sys

    from pyvmm.guests.default import build_default_guest

    prompt_timeout, command_timeout = _timeouts()
    build_default_guest(progress=False)
    env = dict(os.environ, PYVMM_RUNTIME_DIR=str(tmp_path / "run"))

    def pyvmm(*args, timeout=prompt_timeout):
        return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True,
                              env=env, timeout=timeout, stdin=subprocess.DEVNULL)

    p = pyvmm("--default-guest", "--name", "deb1", "--detach")
    assert p.returncode == 0, p.stderr
    con = None
    try:
        con = Spawned([sys.executable, "-m", "pyvmm", "console", "deb1"], env=env)
        buf = con.out
        session = ConsoleSession(lambda: bytes(buf), con.send, con.alive)
        session.expect(PROMPT, prompt_timeout, "first prompt (through pyvmm console)")
        try:
            m = session.command("uname -r", re.compile(rb"^(6\.1\.0-\S+)\r?$", re.M), command_timeout)
        except AssertionError as e:
            # seen once in the faithful lane: the typed line never echoed;
            # the guest's own state report tells where the input stopped
            raise AssertionError(f"{e}\n--- guest status ---\n{_detached_status(pyvmm, tmp_path / 'run' / 'deb1.log')}"
                                 f"\n--- console client stderr ---\n{con.stderr}") from None
        assert m.group(1).endswith(b"-cloud-amd64")
        listing = pyvmm("list", timeout=30)
        assert "deb1" in listing.stdout and " 256 " in listing.stdout, listing.stdout
        # the balloon (xl mem-set): the kernel's driver gives 64 MiB back, in
        # steps of a few MiB (slow where ring 0 is interpreted or emulated)
        assert pyvmm("mem-set", "deb1", "192M", timeout=30).returncode == 0
        wait_for(lambda: _guest_info(pyvmm)["memory_current_mib"] == 192,
                 lambda: f"the guest ballooned down to 192 MiB: {_guest_info(pyvmm)}", 3 * command_timeout)
        total = session.command("grep MemTotal /proc/meminfo", re.compile(rb"^MemTotal:\s+(\d+) kB", re.M),
                                command_timeout)
        assert int(total.group(1)) < 192 << 10, total.group(0)
        s = pyvmm("shutdown", "deb1", "--wait", str(int(command_timeout)), timeout=command_timeout + 30)
        assert s.returncode == 0, (s.stderr, bytes(buf[-2000:]))
        assert "deb1 is off" in s.stderr
        wait_for(lambda: b"pyvmm-init: powering off" in buf,
                 lambda: f"pyvmm-init's poweroff line; console tail {bytes(buf[-2000:])!r}")
        con.proc.stdin.close()
        assert con.proc.wait(30) == 0
        log = (tmp_path / "run" / "deb1.log").read_text()
        assert "guest powered off" in log, log[-2000:]
    finally:
        if con is not None:
            con.finish()
        pyvmm("destroy", "deb1", timeout=60)


# ---------------------------------------------------------------------------
# SMP (issue 9): the stock kernel on several vCPUs
# ---------------------------------------------------------------------------
CPUS_ONLINE = re.compile(rb"^([0-9,-]+)\r?$", re.M)


def _cpus_online(con: ConsoleSession, command_timeout: float) -> bytes:
    return con.command("cat /sys/devices/system/cpu/online", CPUS_ONLINE, command_timeout).group(1)


def _cpus_possible(con: ConsoleSession, command_timeout: float) -> bytes:
    """The guest's possible CPUs: the domain's maximum, whether the kernel
    found them by VCPUOP_is_up alone or with the builder's nr_cpus= hint."""
    return con.command("cat /sys/devices/system/cpu/possible", CPUS_ONLINE, command_timeout).group(1)


@pytest.mark.slow
@pytest.mark.faithful
def test_default_guest_four_vcpus(tmp_path):
    """`pyvmm --default-guest --vcpus 4`: the stock kernel brings up all
    four (nproc agrees), each vCPU takes its own timer events, and short
    processes pinned to each one in turn run and exit."""
    import os
    import sys

    from pyvmm.guests.default import build_default_guest

    prompt_timeout, command_timeout = _timeouts()
    build_default_guest(progress=False)
    env = dict(os.environ, PYVMM_RUNTIME_DIR=str(tmp_path / "run"))
    argv = [sys.executable, "-m", "pyvmm", "--default-guest", "--vcpus", "4", "--name", "smp4"]
    with _pyvmm_at_prompt(argv, prompt_timeout, env=env) as (run, con):
        con.command("nproc", re.compile(rb"^4\r?$", re.M), command_timeout)
        assert _cpus_online(con, command_timeout) == b"0-3"
        assert _cpus_possible(con, command_timeout) == b"0-3"
        con.command("n=0; for c in 0 1 2 3; do taskset -c $c true && n=$((n+1)); done; echo PINNED $n",
                    re.compile(rb"^PINNED 4\r?$", re.M), command_timeout)
        for cpu in range(4):
            m = con.command(f"grep -E 'timer{cpu}$' /proc/interrupts",
                            re.compile(rb"^\s*\d+:((?:\s+\d+){4})\s+xen-percpu\s*-virq\s+timer%d\s*$" % cpu, re.M),
                            command_timeout)
            assert int(m.group(1).split()[cpu]) > 0, m.group(0)
        run.send(b"poweroff -f\n")
        rc = run.proc.wait(command_timeout)
    assert rc == 0, (rc, run.stderr)


@pytest.mark.slow
@pytest.mark.faithful
def test_default_guest_smp_ipis_shootdowns_and_cpu_hotplug(tmp_path):
    """`pyvmm --default-guest --vcpus 2,max=3`: the stock kernel brings up
    two vCPUs (VCPUOP_initialise/up), each takes its own timer and IPIs;
    hundreds of short processes spread over both (fork/exit: IPIs and TLB
    shootdowns) finish; a CPU goes offline and online again from inside
    the guest (VCPUOP_down on itself, VCPUOP_up), and through `pyvmm
    vcpu-set` (xenstore cpu/N/availability, as xl vcpu-set)."""
    import os
    import subprocess
    import sys

    from pyvmm.guests.default import build_default_guest

    prompt_timeout, command_timeout = _timeouts()
    build_default_guest(progress=False)
    env = dict(os.environ, PYVMM_RUNTIME_DIR=str(tmp_path / "run"))

    def pyvmm(*args):
        p = subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True,
                           env=env, timeout=60)
        assert p.returncode == 0, p.stderr
        return p

    argv = [sys.executable, "-m", "pyvmm", "--default-guest", "--vcpus", "2,max=3", "--name", "smp1"]
    with _pyvmm_at_prompt(argv, prompt_timeout, env=env) as (run, con):
        con.command("nproc", re.compile(rb"^2\r?$", re.M), command_timeout)
        assert _cpus_online(con, command_timeout) == b"0-1"
        assert _cpus_possible(con, command_timeout) == b"0-2"     # room for vcpu-set 3
        # CPU 1's own timer events and IPIs arrived
        m = con.command("grep -E 'timer1|resched1|callfunc' /proc/interrupts",
                        re.compile(rb"^\s*\d+:\s+\d+\s+(\d+)\s+xen-percpu\s*-virq\s+timer1\s*$", re.M),
                        command_timeout)
        assert int(m.group(1)) > 0, m.group(0)
        # many short processes over both CPUs: fork, exec, exit (IPIs, TLB shootdowns,
        # page tables validated and released); ~70 s alone on kvm_pvm with counted
        # page types (63 s before), and a host loaded by other work triples it
        con.command("i=0; while [ $i -lt 300 ]; do (echo $i > /dev/null) & i=$((i+1)); done; wait; echo FORKED",
                    re.compile(rb"^FORKED\r?$", re.M), command_timeout * 5)
        # offline and online from inside the guest
        con.command("echo 0 > /sys/devices/system/cpu/cpu1/online; echo OFF", re.compile(rb"^OFF\r?$", re.M),
                    command_timeout)
        assert _cpus_online(con, command_timeout) == b"0"
        con.command("echo 1 > /sys/devices/system/cpu/cpu1/online; echo ON", re.compile(rb"^ON\r?$", re.M),
                    command_timeout)
        assert _cpus_online(con, command_timeout) == b"0-1"
        # xl vcpu-set: the third vCPU becomes present; the guest onlines it
        # (as a udev rule would under Xen), then vcpu-set 1 takes two away
        pyvmm("vcpu-set", "smp1", "3")
        con.command("for t in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/devices/system/cpu/cpu2/online ] && break; "
                    "sleep 1; done; echo 1 > /sys/devices/system/cpu/cpu2/online; echo ON2",
                    re.compile(rb"^ON2\r?$", re.M), command_timeout)
        assert _cpus_online(con, command_timeout) == b"0-2"
        info = json.loads(pyvmm("list", "--json").stdout)
        assert [g["vcpus_online"] for g in info if g["name"] == "smp1"] == [[0, 1, 2]], info
        pyvmm("vcpu-set", "smp1", "1")
        con.command("for t in 1 2 3 4 5 6 7 8 9 10; do [ \"$(cat /sys/devices/system/cpu/online)\" = 0 ] && break; "
                    "sleep 1; done; echo WAITED", re.compile(rb"^WAITED\r?$", re.M), command_timeout)
        assert _cpus_online(con, command_timeout) == b"0"
        bad = subprocess.run([sys.executable, "-m", "pyvmm", "vcpu-set", "smp1", "4"], capture_output=True,
                             text=True, env=env, timeout=60)
        assert bad.returncode != 0 and "1 to 3" in bad.stderr, bad.stderr
        run.send(b"poweroff -f\n")
        rc = run.proc.wait(command_timeout)
    assert rc == 0, (rc, run.stderr)


def _generic_kernel() -> Path:
    """Debian's generic kernel (the faithful lane boots it as its L1, so it is
    in the shared cache even where apt cannot reach the network)."""
    from pyvmm.guests import debian
    try:
        return Path(debian.generic_kernel(progress=False).vmlinuz)
    except debian.DebianError:
        found = sorted(p for p in (debian.cache_root() / "debian").glob("linux-image-*-amd64/boot/vmlinuz-*")
                       if "cloud" not in p.name)
        assert found, "Debian's generic kernel is neither fetchable nor in the cache"
        return found[-1]


@pytest.mark.slow
@pytest.mark.faithful
def test_generic_kernel_smp_nmi_backtraces():
    """All-CPU backtraces (`echo l > /proc/sysrq-trigger`, what RCU stall
    and soft-lockup reports do too) from CPU 0, twice: CPU 1's comes by a
    virtual NMI (VCPUOP_send_nmi, the NMI callback), the second only if the
    first one's HYPERVISOR_iret unmasked NMIs; no "Sending nmi to CPU1
    failed", no WARN() splat, no unknown NMI.  Debian's generic kernel, with the
    default guest's initramfs: the cloud kernel never sends these NMIs,
    under Xen neither -- built without MPPARSE, with ACPI off in a domU it
    drops the APIC feature and with it Xen's PV APIC driver, whose IPI
    callbacks are what issue VCPUOP_send_nmi ("APIC: switched to apic
    NOOP")."""
    import threading

    from pyvmm.guests.default import build_default_guest
    from pyvmm.xen_abi.hypervisor.domain import Domain

    prompt_timeout, command_timeout = _timeouts()
    g = build_default_guest(progress=False)
    with Domain(str(_generic_kernel()), ram_size=RAM_MB << 20, cmdline=g.cmdline,
                initrd=g.initrd.read_bytes(), nr_vcpus=2) as dom:
        out: dict = {}

        def runner():
            try:
                out["result"] = dom.run(timeout=prompt_timeout + 4 * command_timeout)
            except BaseException as e:      # reported by the main thread
                out["error"] = e

        th = threading.Thread(target=runner, name="vcpu0", daemon=True)
        th.start()
        con = ConsoleSession(lambda: dom.read_console()[0], dom.send_console_input, th.is_alive)
        try:
            con.expect(PROMPT, prompt_timeout, "first prompt")
            bt = "dmesg | grep -c 'NMI backtrace for cpu 1'"
            bad = "dmesg | grep -c -e 'Sending nmi' -e 'WARNING: CPU' -e 'Uhhuh' -e 'Dazed'"
            m = con.command("taskset -c 0 sh -c 'echo l > /proc/sysrq-trigger; echo l > /proc/sysrq-trigger'; "
                            f"for t in 1 2 3 4 5; do [ $({bt}) -ge 2 ] && break; sleep 1; done; "
                            f"echo NMIBT=$({bt}) BAD=$({bad})",
                            re.compile(rb"^NMIBT=(\d+) BAD=(\d+)\r?$", re.M), command_timeout)
            nmis = trace.shim_counters(dom, 1).get("trap 2", 0)
            dom.send_console_input(b"poweroff -f\n")
            th.join(command_timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{_stall_report(dom)}") from None
        finally:
            if th.is_alive():
                dom.stop()
                th.join(30)
    assert m.group(1) == b"2" and m.group(2) == b"0", m.group(0)
    assert nmis == 2, f"CPU 1 took {nmis} virtual NMIs"
    assert "error" not in out, out.get("error")
