"""`pyvmm create FILE [KEY=VALUE ...] [-c]`, as `xl create`: the guest an xl
config describes starts in the background (or with its console, -c);
every bad config is one line naming the key and the fix.  The config
syntax itself: test_xlcfg.py."""
from __future__ import annotations

import json
import os
import sys

import pytest

from pyvmm.errors import ExitStatus
from spawned import Spawned
from test_cli import assert_one_line_error, pyvmm


@pytest.fixture
def cfg_dir(tmp_path):
    from pyvmm.guests.testguests import build_testguest

    for img in ("a.img", "b.img"):
        with open(tmp_path / img, "wb") as f:
            f.truncate(8 << 20)
    ticker = build_testguest("ticker")
    (tmp_path / "t.cfg").write_text(
        'name = "cfg1"\n'
        f'kernel = "{ticker}"\n'
        "memory = 32\n"
        "disk = [ 'a.img,raw,xvda,rw',\n"
        "         'format=raw, vdev=xvdb, access=ro, target=b.img' ]\n"
        'uuid = "12345678-1234-1234-1234-123456789abc"\n'
        'on_reboot = "destroy"\n')
    env = {"PYVMM_RUNTIME_DIR": str(tmp_path / "run")}
    yield tmp_path, env
    pyvmm("destroy", "cfg1", env=env)


def _create(cfg_dir, *args):
    tmp, env = cfg_dir
    return pyvmm("create", *args, env=env, cwd=tmp)


@pytest.mark.faithful
def test_create_starts_the_configured_guest_in_the_background(cfg_dir):
    tmp, env = cfg_dir
    p = _create(cfg_dir, "t.cfg", "memory=48")
    assert p.returncode == 0 and "guest cfg1 started in the background" in p.stderr, p.stderr
    (info,) = json.loads(pyvmm("list", "-l", env=env).stdout)
    # the file's settings, the override applied after them, paths from the cwd as xl takes them
    assert info["memory_mib"] == 48 and info["name"] == "cfg1", info
    assert info["disks"] == [f"{tmp}/a.img", f"{tmp}/b.img,ro"], info
    assert info["config"] == f"{tmp}/t.cfg" and info["on_reboot"] == "exit", info
    assert info["uuid"] == "12345678-1234-1234-1234-123456789abc"
    vm = pyvmm("xenstore", "cfg1", "read", "vm", env=env)
    assert vm.stdout == "/vm/12345678-1234-1234-1234-123456789abc\n", vm.stderr
    again = _create(cfg_dir, "t.cfg")
    assert_one_line_error(again, ExitStatus.USAGE, "a guest named 'cfg1' is already running")


def test_create_c_attaches_the_console_and_the_escape_leaves_it_running(cfg_dir):
    tmp, env = cfg_dir
    con = Spawned([sys.executable, "-m", "pyvmm", "create", "-c", str(tmp / "t.cfg")],
                  env=dict(os.environ, **env), cwd=tmp)
    try:
        assert con.wait_for(lambda: b"tick 3 at" in con.out, 120), (bytes(con.out), con.stderr)
        con.send(b"\x1d")                                  # Ctrl-]
        assert con.proc.wait(30) == 0, con.stderr
        assert "left cfg1's console; it keeps running" in con.stderr, con.stderr
    finally:
        con.finish()
    (info,) = json.loads(pyvmm("list", "--json", env=env).stdout)
    assert info["name"] == "cfg1" and info["state"] == "running"


@pytest.mark.parametrize("line, fragments", [
    ('kernal = "x"', ["t.cfg:8", "'kernal'", "did you mean 'kernel'"]),
    ("disk = [ 'a.img,qcow2,xvda,rw' ]", ["t.cfg:8", "format qcow2 is not supported", "qemu-img convert"]),
    ("disk = [ 'a.img,raw' ]", ["t.cfg:8", "disk[0]"]),
    ('vif = [ "mac=01:00:00:00:00:01" ]', ["t.cfg:8", "vif[0]", "multicast"]),
    ('vif = [ "bridge=nobr-pyvmm" ]', ["bridge 'nobr-pyvmm' does not exist", "ip link add nobr-pyvmm"]),
    ("memory = 4", ["t.cfg:8", "memory = 4 (MiB) is too small", "set memory = 16 or more"]),
])
def test_bad_configs_are_one_line_naming_the_key(cfg_dir, line, fragments):
    tmp, env = cfg_dir
    with open(tmp / "t.cfg", "a") as f:
        f.write(line + "\n")
    assert_one_line_error(_create(cfg_dir, "t.cfg"), ExitStatus.USAGE, *fragments)
    assert pyvmm("list", "--names", env=env).stdout == ""


def test_config_errors_before_anything_starts(cfg_dir):
    tmp, env = cfg_dir
    text = (tmp / "t.cfg").read_text()
    (tmp / "nokernel.cfg").write_text("".join(l for l in text.splitlines(True) if not l.startswith("kernel")))
    assert_one_line_error(_create(cfg_dir, "nokernel.cfg"), ExitStatus.USAGE, "kernel")
    assert_one_line_error(_create(cfg_dir, "missing.cfg"), ExitStatus.USAGE, "'missing.cfg' does not exist")
    assert_one_line_error(_create(cfg_dir, "t.cfg", "memory"), ExitStatus.USAGE, "KEY=VALUE")


def test_memory_below_the_kernels_needs_names_the_config_key(cfg_dir):
    """A kernel bigger than the memory the config gives: the builder's
    error, from the background guest, with the key to change."""
    from kernels import make_linux_like

    tmp, env = cfg_dir
    big = tmp / "big.elf"
    big.write_bytes(make_linux_like(bss_size=40 << 20))
    assert_one_line_error(_create(cfg_dir, "t.cfg", f'kernel="{big}"', "memory=32"), ExitStatus.USAGE,
                          "give more with 'memory' in t.cfg")
