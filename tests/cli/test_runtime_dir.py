"""The runtime directory (control sockets, detached logs) against another
local user: a directory they made or can write to, or a link they left
where pyvmm writes, is refused with one line and nothing is written
through it."""
from __future__ import annotations

import os
import socket
import stat

import pytest

from pyvmm import control
from pyvmm.errors import ExitStatus
from test_cli import assert_one_line_error, pyvmm

NOBODY_UID = 65534


def _hello() -> str:
    from pyvmm.guests.testguests import build_testguest
    return str(build_testguest("hello"))


def _detach(run_dir, name="g"):
    return pyvmm("--xen-pv", _hello(), "--memory", "32M", "--name", name, "--detach",
                 env={"PYVMM_RUNTIME_DIR": str(run_dir)})


def test_a_missing_runtime_dir_is_made_private(tmp_path, monkeypatch):
    run_dir = tmp_path / "a" / "run"
    monkeypatch.setenv("PYVMM_RUNTIME_DIR", str(run_dir))
    assert control.runtime_dir() == run_dir
    st = run_dir.lstat()
    assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_another_users_runtime_dir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, NOBODY_UID, NOBODY_UID)
    for p in (pyvmm("list", env={"PYVMM_RUNTIME_DIR": str(run_dir)}), _detach(run_dir)):
        assert_one_line_error(p, ExitStatus.USAGE, str(run_dir), "belongs to another user", "PYVMM_RUNTIME_DIR")
    assert list(run_dir.iterdir()) == []


def test_a_runtime_dir_others_can_write_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    assert_one_line_error(_detach(run_dir), ExitStatus.USAGE, "open to other users", "mode 0777",
                          f"chmod 700 {run_dir}")
    assert list(run_dir.iterdir()) == []


def test_a_linked_runtime_dir_is_refused(tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(real)
    monkeypatch.setenv("PYVMM_RUNTIME_DIR", str(tmp_path / "run"))
    with pytest.raises(control.ControlError, match="is a symbolic link"):
        control.runtime_dir()


def test_a_link_in_place_of_the_log_is_refused_and_its_target_untouched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_bytes(b"someone else's file\n")
    (run_dir / "g.log").symlink_to(target)
    p = _detach(run_dir)
    assert_one_line_error(p, ExitStatus.USAGE, f"{run_dir / 'g.log'} is a symbolic link", "remove it")
    assert target.read_bytes() == b"someone else's file\n"
    assert sorted(x.name for x in run_dir.iterdir()) == ["g.log"]      # no guest was started


def test_a_link_in_place_of_the_socket_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    elsewhere = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    elsewhere.bind(str(tmp_path / "elsewhere.sock"))
    elsewhere.listen(1)
    try:
        (run_dir / "g.sock").symlink_to(tmp_path / "elsewhere.sock")
        env = {"PYVMM_RUNTIME_DIR": str(run_dir)}
        assert_one_line_error(pyvmm("console", "g", env=env), ExitStatus.USAGE,
                              "g.sock is not a socket but a symbolic link", "remove it")
        assert pyvmm("list", env=env).stdout.splitlines()[1:] == []
        p = pyvmm("--xen-pv", _hello(), "--memory", "32M", "--name", "g", env=env)
        assert_one_line_error(p, ExitStatus.USAGE, "g.sock is not a socket but a symbolic link")
        assert (run_dir / "g.sock").is_symlink()
    finally:
        elsewhere.close()
