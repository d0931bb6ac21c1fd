"""The command line: every user mistake is one clear line and exit status 2
(5 for a host without usable KVM); nothing is started."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from pyvmm.cli import parse_size, parse_vcpus
from pyvmm.errors import ExitStatus, UserError
from kernels import bzimage_of, make_linux_like


def pyvmm(*args, env=None, timeout=120, cwd=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, stdin=subprocess.DEVNULL, cwd=cwd)


def assert_one_line_error(proc, status, *fragments):
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pyvmm: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in proc.stderr


def test_missing_kernel(tmp_path):
    p = pyvmm("--xen-pv", str(tmp_path / "nope"))
    assert_one_line_error(p, ExitStatus.USAGE, "does not exist")


def test_directory_as_kernel(tmp_path):
    p = pyvmm("--xen-pv", str(tmp_path))
    assert_one_line_error(p, ExitStatus.USAGE, "is a directory")


def test_not_a_kernel(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello, I am not a kernel\n" * 100)
    p = pyvmm("--xen-pv", str(f))
    assert_one_line_error(p, ExitStatus.USAGE, str(f))


def test_elf_without_xen_notes():
    p = pyvmm("--xen-pv", "/bin/true")
    assert_one_line_error(p, ExitStatus.USAGE, "Xen")


def test_truncated_bzimage(tmp_path):
    image = bzimage_of(make_linux_like(), "gzip")
    f = tmp_path / "vmlinuz"
    f.write_bytes(image[: len(image) // 2])
    p = pyvmm("--xen-pv", str(f))
    assert_one_line_error(p, ExitStatus.USAGE, "truncated")


def test_missing_initrd(tmp_path):
    from pyvmm.guests.testguests import build_testguest

    p = pyvmm("--xen-pv", str(build_testguest("hello")), "--initrd", str(tmp_path / "initrd.img"))
    assert_one_line_error(p, ExitStatus.USAGE, "initrd", "does not exist")


@pytest.mark.parametrize("size", ["1M", "lots", "0"])
def test_bad_memory_sizes(size):
    from pyvmm.guests.testguests import build_testguest

    p = pyvmm("--xen-pv", str(build_testguest("hello")), "--memory", size)
    assert_one_line_error(p, ExitStatus.USAGE, "memory")


def test_memory_too_small_for_the_image(tmp_path):
    """A kernel whose image needs more than the RAM given is refused by the
    builder with one line (the synthetic kernel spans about 58 MiB)."""
    f = tmp_path / "big.elf"
    f.write_bytes(make_linux_like(bss_size=40 << 20))
    p = pyvmm("--xen-pv", str(f), "--memory", "32M")
    assert_one_line_error(p, ExitStatus.USAGE, "memory")


def test_kvm_device_missing():
    from pyvmm.guests.testguests import build_testguest

    p = pyvmm("--xen-pv", str(build_testguest("hello")), env={"PYVMM_KVM_DEVICE": "/nonexistent/kvm"})
    assert p.returncode == ExitStatus.HOST_ERROR, p.stderr
    errors = [l for l in p.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and "/nonexistent/kvm" in errors[0], p.stderr


def test_no_gcc_and_no_prebuilt_shim(tmp_path):
    """A checkout on a host without gcc: one line saying what to install."""
    from pyvmm.guests.testguests import build_testguest

    (tmp_path / "bin").mkdir()
    p = pyvmm("--xen-pv", str(build_testguest("hello")),
              env={"PATH": str(tmp_path / "bin"), "PYVMM_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(p, ExitStatus.HOST_ERROR, "building shim needs 'gcc' on PATH",
                          "apt-get install gcc", "from a wheel")


def test_bad_name():
    from pyvmm.guests.testguests import build_testguest

    p = pyvmm("--xen-pv", str(build_testguest("hello")), "--name", "no spaces/please")
    assert_one_line_error(p, ExitStatus.USAGE, "--name")


def test_disk_errors(tmp_path):
    from pyvmm.backends.blkback import DiskImage
    from pyvmm.guests.testguests import build_testguest

    k = str(build_testguest("hello"))
    p = pyvmm("--xen-pv", k, "--disk", str(tmp_path / "none.img"))
    assert_one_line_error(p, ExitStatus.USAGE, "no such file", "truncate -s")
    assert_one_line_error(pyvmm("--xen-pv", k, "--disk", str(tmp_path)), ExitStatus.USAGE, "directory")
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    assert_one_line_error(pyvmm("--xen-pv", k, "--disk", f"{img},rx"), ExitStatus.USAGE, "',ro'")
    assert_one_line_error(pyvmm("--xen-pv", k, "--disk", f"{img},rate=0"), ExitStatus.USAGE,
                          "rate=0 is not a positive size per second")
    assert_one_line_error(pyvmm("--xen-pv", k, "--disk", f"{img},ro,iops=many"), ExitStatus.USAGE,
                          "iops=many is not a positive number")
    assert_one_line_error(pyvmm("--xen-pv", k, "--net", "tap=pv0,rate=fast"), ExitStatus.USAGE,
                          "rate=fast")
    held = DiskImage.open(str(img))          # another guest has it
    try:
        assert_one_line_error(pyvmm("--xen-pv", k, "--disk", str(img)), ExitStatus.USAGE,
                              "in use by another guest")
    finally:
        held.close()


def test_net_errors():
    from pyvmm.guests.testguests import build_testguest

    k = str(build_testguest("hello"))
    assert_one_line_error(pyvmm("--xen-pv", k, "--net", "brige=br0"), ExitStatus.USAGE, "tap=NAME",
                          "bridge=BRIDGE")
    assert_one_line_error(pyvmm("--xen-pv", k, "--net", "bridge=nobr-pyvmm"), ExitStatus.USAGE,
                          "bridge 'nobr-pyvmm' does not exist", "ip link add nobr-pyvmm type bridge")
    assert_one_line_error(pyvmm("--xen-pv", k, "--net", "mac=00:16:3e:00:00:01"), ExitStatus.USAGE,
                          "name the host TAP device or a bridge")
    assert_one_line_error(pyvmm("--xen-pv", k, "--net", "tap=a,tap=b"), ExitStatus.USAGE, "tap=NAME")
    assert_one_line_error(pyvmm("--xen-pv", k, "--net", "tap=" + "t" * 20), ExitStatus.USAGE,
                          "bad interface name")
    assert_one_line_error(pyvmm("--xen-pv", k, "--net", "tap=pv0,mac=01:00:00:00:00:01"), ExitStatus.USAGE,
                          "multicast")


def test_parse_vcpus():
    assert parse_vcpus("2") == (2, 2)
    assert parse_vcpus(" 2 , max = 4") == (2, 4)
    for bad, why in (("0", "1 to 8"), ("9", "1 to 8"), ("2,max=9", "1 to 8"), ("4,max=2", "give max=4"),
                     ("two", "give a number"), ("2,min=1", "give a number")):
        with pytest.raises(UserError, match=why):
            parse_vcpus(bad)


def test_bad_vcpus_is_one_line(tmp_path):
    p = pyvmm("--xen-pv", str(tmp_path / "k"), "--vcpus", "9")
    assert_one_line_error(p, ExitStatus.USAGE, "--vcpus '9'", "1 to 8")


def test_parse_size():
    assert parse_size("256M") == 256 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("512") == 512 << 20
    assert parse_size("65536K") == 64 << 20
    with pytest.raises(UserError):
        parse_size("12X")


def test_hello_guest_powers_off_with_status_0():
    """End to end through the CLI: the test guest prints on the console and
    powers off; pyvmm exits 0 and reports progress on stderr."""
    from pyvmm.guests.testguests import build_testguest

    p = pyvmm("--xen-pv", str(build_testguest("hello")), "--memory", "32M")
    assert p.returncode == ExitStatus.POWEROFF, (p.stdout, p.stderr)
    assert "TESTGUEST hello: PASS" in p.stdout
    assert "pyvmm: booting" in p.stderr
    assert "powered off" in p.stderr
    assert "Traceback" not in p.stderr, p.stderr


def test_crashing_guest_exits_1_with_last_lines():
    from pyvmm.guests.testguests import build_testguest

    p = pyvmm("--xen-pv", str(build_testguest("nohandler")), "--memory", "32M")
    assert p.returncode == ExitStatus.CRASH, (p.stdout, p.stderr)
    assert "crash" in p.stderr


def test_reboot_exits_3_with_on_reboot_exit():
    from pyvmm.guests.testguests import build_testguest

    p = pyvmm("--xen-pv", str(build_testguest("reboot")), "--memory", "32M", "--on-reboot", "exit")
    assert p.returncode == ExitStatus.REBOOT, (p.stdout, p.stderr)
    assert "asking for a reboot" in p.stdout
    assert "rebooted" in p.stderr


def test_reboot_rebuilds_the_guest():
    """Default --on-reboot=restart: the domain is built and booted again."""
    import time

    from pyvmm.guests.testguests import build_testguest

    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "--xen-pv", str(build_testguest("reboot")),
                             "--memory", "32M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 60
        err = ""
        while "boot #3" not in err and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            err += line
    finally:
        proc.terminate()
        out, rest = proc.communicate(timeout=30)
    assert "boot #3" in err, err + rest
    assert out.count("asking for a reboot") >= 2, out


def test_escape_key_leaves_and_restores_the_terminal():
    """On a terminal: raw mode while attached, Ctrl-] leaves (status 4, guest
    destroyed), and the terminal's settings are back as they were."""
    import pty
    import select
    import termios
    import time

    from pyvmm.guests.testguests import build_testguest

    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "--xen-pv", str(build_testguest("idle")),
                             "--memory", "32M"], stdin=slave, stdout=slave, stderr=slave)
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"waiting forever" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
        assert b"waiting forever" in seen, seen
        raw = termios.tcgetattr(slave)
        assert not raw[3] & termios.ICANON and not raw[3] & termios.ECHO, "stdin not in raw mode"
        os.write(master, b"\x1d")
        assert proc.wait(timeout=30) == ExitStatus.DETACHED
        assert termios.tcgetattr(slave) == before
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        os.close(slave)


@pytest.mark.faithful
def test_status_signal_reports_a_halted_guest_and_leaves_it_running():
    """`kill -USR2` on pyvmm prints the guest's state on stderr even while
    the vCPU sits halted inside KVM_RUN (the idle guest blocks forever with
    nothing pending); the guest keeps running afterwards."""
    from spawned import Spawned
    from waiting import wait_for
    from pyvmm.guests.testguests import build_testguest
    from pyvmm.launch import STATUS_SIGNAL

    run = Spawned([sys.executable, "-m", "pyvmm", "--xen-pv", str(build_testguest("idle")), "--memory", "32M"])
    try:
        assert run.wait_for(lambda: b"waiting forever" in run.out, 120), (bytes(run.out), run.stderr)
        report = ""

        def halted_report() -> bool:
            # the shim counts SCHEDOP_block on entry, and the idle guest never
            # leaves it: a report that counts one was taken with the vCPU halted
            nonlocal report
            report = run.ask_status(STATUS_SIGNAL, timeout=60)
            return "hypercall sched_op=" in report or not run.alive()

        wait_for(halted_report, "a status report of the halted guest", 120)
        assert "pyvmm: status after" in report and "vcpu_info:" in report, run.stderr
        assert re.search(r"shim events: .*hypercall sched_op=\d+", report), run.stderr
        assert re.search(r"RIP e033:0x[0-9a-f]{16}", report), run.stderr
        assert re.search(r"console ring: in prod=0x0 cons=0x0 \(0 more waiting\), out prod=", report), \
            run.stderr
        # the handler is pyvmm's only while the guest runs (SIGUSR2 kills by
        # default): a second report means the first one left the guest running
        assert "vcpu_info:" in run.ask_status(STATUS_SIGNAL, timeout=60), \
            ("the status request ended the guest", run.stderr)
        assert run.alive(), ("the status request ended the guest", run.stderr)
    finally:
        run.finish()


def _manage_env(tmp_path) -> dict:
    return {"PYVMM_RUNTIME_DIR": str(tmp_path / "run")}


@pytest.mark.faithful
def test_detach_list_console_destroy(tmp_path):
    """--detach returns once the guest runs; list shows it; a second guest
    of that name is refused; console replays its output; destroy ends it;
    a socket left by a dead pyvmm is cleaned up, not reported."""
    import socket

    from spawned import Spawned
    from pyvmm.guests.testguests import build_testguest

    env = _manage_env(tmp_path)
    idle = str(build_testguest("idle"))
    p = pyvmm("--xen-pv", idle, "--memory", "32M", "--name", "bg1", "--detach", env=env)
    assert p.returncode == 0, p.stderr
    assert "started in the background" in p.stderr and "pyvmm console bg1" in p.stderr
    try:
        again = pyvmm("--xen-pv", idle, "--memory", "32M", "--name", "bg1", "--detach", env=env)
        assert_one_line_error(again, ExitStatus.USAGE, "already running", "bg1")
        # a stale socket (its pyvmm died) next to the live guest
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(tmp_path / "run" / "ghost.sock"))
        stale.close()
        listing = pyvmm("list", env=env)
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        assert lines[0].split()[:3] == ["NAME", "PID", "MEM(MiB)"]
        assert len(lines) == 2 and lines[1].split()[0] == "bg1" and lines[1].split()[2] == "32", lines
        as_json = pyvmm("list", "--json", env=env)
        assert as_json.returncode == 0, as_json.stderr
        (info,) = json.loads(as_json.stdout)
        assert info["name"] == "bg1" and info["memory_mib"] == 32 and info["pid"] == int(lines[1].split()[1])
        assert not (tmp_path / "run" / "ghost.sock").exists()
        # console: the guest's earlier output, then stays attached until the guest ends
        con = Spawned([sys.executable, "-m", "pyvmm", "console", "bg1"], env=dict(os.environ, **env))
        try:
            assert con.wait_for(lambda: b"idle guest: waiting forever" in con.out, 60), \
                (bytes(con.out), con.stderr)
            listing = pyvmm("list", env=env)
            assert listing.stdout.splitlines()[1].split()[6] == "1", listing.stdout    # CONSOLES
            assert con.alive(), con.stderr
            d = pyvmm("destroy", "bg1", env=env)
            assert d.returncode == 0 and "bg1 destroyed" in d.stderr, d.stderr
            con.proc.wait(timeout=30)
        finally:
            con.finish()
        assert "console closed (the guest ended)" in con.stderr, con.stderr
        assert pyvmm("list", env=env).stdout.splitlines()[1:] == []
        assert "guest destroyed (pyvmm destroy)" in (tmp_path / "run" / "bg1.log").read_text()
    finally:
        pyvmm("destroy", "bg1", env=env)


def test_manage_errors(tmp_path):
    from pyvmm.guests.testguests import build_testguest

    env = _manage_env(tmp_path)
    for cmd in (["destroy", "nope"], ["shutdown", "nope"], ["console", "nope"], ["reboot", "nope"],
                ["pause", "nope"], ["unpause", "nope"], ["xenstore", "nope", "ls"]):
        assert_one_line_error(pyvmm(*cmd, env=env), ExitStatus.USAGE, "no guest named nope")
    assert pyvmm("list", env=env).stdout.strip().split()[0] == "NAME"
    deep = tmp_path / ("d" * 100)
    p = pyvmm("--xen-pv", str(build_testguest("hello")), "--memory", "32M",
              env={"PYVMM_RUNTIME_DIR": str(deep)})
    assert_one_line_error(p, ExitStatus.USAGE, "longer than 107 bytes", "PYVMM_RUNTIME_DIR")


def test_no_kernel_image_is_held_while_the_guest_runs(monkeypatch, capsys):
    """The CLI loads the kernel to check it, the first boot takes it, and
    nothing holds the loaded image (tens of MiB for a distribution kernel)
    while the guest runs; a reboot reads the file again
    (test_reboot_rebuilds_the_guest)."""
    import gc

    from pyvmm import cli
    from pyvmm.guests.testguests import build_testguest
    from pyvmm.xen_abi.boot.loader import KernelImage
    from pyvmm.xen_abi.hypervisor.domain import Domain

    images_alive = []
    real_run = Domain.run

    def run(self, *args, **kwargs):
        gc.collect()
        images_alive.append(sum(isinstance(o, KernelImage) for o in gc.get_objects()))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Domain, "run", run)
    rc = cli.main(["--xen-pv", str(build_testguest("hello")), "--memory", "32M", "--name", "no-image-kept"])
    assert rc == ExitStatus.POWEROFF, capsys.readouterr()
    assert images_alive == [0]


def test_net_on_a_bridge_gets_a_tap_port_that_is_up():
    """--net bridge=BR: a TAP (vif<pid>.<index>, or the one named) becomes
    an up port of the bridge, as xl's vif-bridge script makes it; it goes
    away with pyvmm.  Run in a network namespace of its own."""
    import shutil

    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        pytest.skip("needs root, /dev/net/tun and iproute2 (ip) for a bridge in a namespace")
    ns = f"pyvmm-br{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["link", "add", "br7", "type", "bridge"], ["link", "set", "br7", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        probe = ("import os, subprocess; from pyvmm.cli import _net_specs, _open_nets\n"
                 "nets = _open_nets(_net_specs(['bridge=br7', 'bridge=br7,tap=named0']), 'g')\n"
                 "print(os.getpid(), [l.name for l, _ in nets])\n"
                 "print(subprocess.run(['ip', '-o', 'link', 'show', 'master', 'br7', 'up'],"
                 " capture_output=True, text=True).stdout)\n")
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        pid = p.stdout.split()[0]
        assert f"['vif{pid}.0', 'named0']" in p.stdout, p.stdout
        assert f"vif{pid}.0:" in p.stdout and "named0:" in p.stdout, p.stdout
        left = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout
        assert "named0" not in left and f"vif{pid}" not in left, left
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
