"""The faithful lane's runner (pyvmm.guests.faithful) and its pytest plumbing.

Tests marked ``slow`` boot the L1 (QEMU/TCG, ~10 s each); the first one may
also install QEMU and fetch Debian's generic kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.guests import faithful
from pyvmm.guests.faithful import FaithfulLaneError, run_in_faithful_lane
from pyvmm.vmm.quirks import PVM_MODULE_PATH, on_kvm_pvm

from repo import REPO, TESTS

CONFTEST = TESTS / "conftest.py"
THIS_FILE = str(Path(__file__).resolve().relative_to(REPO))
ON_PVM = on_kvm_pvm()
INSIDE_L1 = os.environ.get(faithful.LANE_ENV) == faithful.LANE_NAME and not ON_PVM
#: Set by test_pytest_lane_propagates_failure to make the probe below fail.
FORCE_FAIL = "PYVMM_SELFTEST_FORCE_FAIL"


def _quiet(_line: str) -> None:
    pass


# --- no boot ---------------------------------------------------------------------

def test_bogus_qemu_path_fails_with_one_line(tmp_path):
    bogus = tmp_path / "no-such-qemu"
    with pytest.raises(FaithfulLaneError) as info:
        run_in_faithful_lane(["true"], qemu=bogus, progress=_quiet)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("faithful lane: QEMU missing")
    assert str(bogus) in msg


def test_cli_reports_lane_failure_with_its_own_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pyvmm.guests.faithful", "--qemu", str(tmp_path / "nope"),
         "--", "true"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == faithful.LANE_FAILURE_EXIT
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("faithful lane: QEMU missing")
    assert proc.stdout == ""


@pytest.mark.skipif(INSIDE_L1, reason="delegates to the L1: runs on the host only")
def test_pytest_lane_boot_failure_fails_the_session():
    env = dict(os.environ, **{faithful.QEMU_ENV: "/nonexistent/qemu"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--lane", "faithful", "-p", "no:cacheprovider",
         THIS_FILE, "-q"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == pytest.ExitCode.INTERNAL_ERROR, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "faithful lane: QEMU missing: /nonexistent/qemu is not an executable file"
    assert "passed" not in proc.stdout


def test_no_disk_space_fails_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    monkeypatch.setattr(faithful, "MIN_FREE_BYTES", 1 << 62)
    monkeypatch.setattr(faithful, "find_qemu", lambda *a: Path("/bin/true"))
    with pytest.raises(FaithfulLaneError) as info:
        run_in_faithful_lane(["true"], progress=_quiet)
    assert str(info.value).startswith("faithful lane: no disk space: ")
    assert str(tmp_path) in str(info.value)


def test_download_failure_fails_with_one_line(monkeypatch, tmp_path):
    from pyvmm.guests import debian

    def offline(progress=True):
        raise debian.DebianError("apt-get download linux-image-6.1.0-99-amd64 failed:\n"
                                 "Temporary failure resolving 'deb.debian.org'")
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    monkeypatch.setattr(debian, "generic_kernel", offline)
    monkeypatch.setattr(faithful, "find_qemu", lambda *a: Path("/bin/true"))
    with pytest.raises(FaithfulLaneError) as info:
        run_in_faithful_lane(["true"], progress=_quiet)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("faithful lane: download of the L1 kernel/busybox impossible: ")
    assert "Temporary failure resolving" in msg


def test_run_script_quotes_argv_env_and_cwd(tmp_path):
    odd = ["printf", "%s|", "a b", "it's", "$HOME", "*"]
    faithful._write_run_files(tmp_path, odd, Path("/work dir"), {"X": "1 2", "Y": "'q'"},
                              [(Path("/usr"), True), (Path("/work dir"), False)])
    run = (tmp_path / "run.sh").read_text()
    # busybox sh in the L1 runs it; any POSIX sh must give the same argv.
    out = subprocess.run(["sh", "-c", run.replace("cd '/work dir'", "cd /")],
                         capture_output=True, text=True)
    assert out.stdout == "a b|it's|$HOME|*|"
    env = subprocess.run(["sh", "-c", run.replace("cd '/work dir'", "cd /")
                          .replace("exec printf", "exec env #")],
                         capture_output=True, text=True).stdout.splitlines()
    assert "X=1 2" in env and "Y='q'" in env
    mounts = (tmp_path / "mounts.sh").read_text()
    assert "share0 /usr" in mounts and ",ro " in mounts.splitlines()[1]
    assert "share1 '/work dir'" in mounts and ",ro" not in mounts.splitlines()[3]


def test_shares_cover_python_and_repo():
    shares = faithful.default_shares(REPO)
    paths = {p: ro for p, ro in shares}
    assert paths[Path("/usr")] is True
    assert paths[REPO] is False
    from pyvmm.cache import cache_root
    assert paths[cache_root()] is False         # guests built on the host, used offline in the L1
    exe = Path(sys.executable).resolve()
    assert any(exe.is_relative_to(p) for p in paths), "the interpreter must be visible in the L1"


def test_vcpu_count_from_the_environment_and_its_tcg_threading(monkeypatch):
    image = faithful.L1Image(Path("/vmlinuz"), Path("/initrd"), "x")

    def qemu_args(smp):
        cmd = faithful.qemu_command(Path("/qemu"), image, Path("/w"), Path("/c"), [], smp=smp)
        return cmd[cmd.index("-smp") + 1], cmd[cmd.index("-accel") + 1]

    monkeypatch.delenv(faithful.SMP_ENV, raising=False)
    monkeypatch.delenv(faithful.TCG_THREAD_ENV, raising=False)
    assert faithful.default_smp() == faithful.DEFAULT_SMP
    # the benchmarks' L1 (pyvmm beside a QEMU peer) has one vCPU unless told
    assert faithful.default_smp(faithful.PEER_SMP) == faithful.PEER_SMP == 1
    monkeypatch.setenv(faithful.SMP_ENV, "2")
    assert faithful.default_smp() == 2
    assert faithful.default_smp(faithful.PEER_SMP) == 2
    assert qemu_args(1) == ("1", "tcg,thread=multi")
    assert qemu_args(2) == ("2", f"tcg,thread={faithful.TCG_THREAD_SMP}")
    monkeypatch.setenv(faithful.TCG_THREAD_ENV, "multi")
    assert qemu_args(2) == ("2", "tcg,thread=multi")
    for bad in ("0", "two"):
        monkeypatch.setenv(faithful.SMP_ENV, bad)
        with pytest.raises(FaithfulLaneError, match=faithful.SMP_ENV):
            faithful.default_smp()
    monkeypatch.setenv(faithful.TCG_THREAD_ENV, "many")
    with pytest.raises(FaithfulLaneError, match=faithful.TCG_THREAD_ENV):
        faithful.tcg_thread(2)


def test_l1_kernel_parameters_from_the_environment(monkeypatch):
    image = faithful.L1Image(Path("/vmlinuz"), Path("/initrd"), "x")

    def append():
        cmd = faithful.qemu_command(Path("/qemu"), image, Path("/w"), Path("/c"), [])
        return cmd[cmd.index("-append") + 1]
    monkeypatch.delenv(faithful.CMDLINE_ENV, raising=False)
    assert append() == faithful.KERNEL_CMDLINE
    monkeypatch.setenv(faithful.CMDLINE_ENV, " idle=poll ")
    assert append() == faithful.KERNEL_CMDLINE + " idle=poll"


def test_init_failure_lines_name_the_module():
    line = faithful._describe_init_failure(
        "insmod kvm_amd: insmod: can't insert '/modules/kvm_amd.ko': Operation not supported")
    assert line.startswith("kvm_amd failed to load in the L1 (Operation not supported")
    assert faithful._describe_init_failure("/dev/kvm absent") == "L1 /init: /dev/kvm absent"


@pytest.mark.skipif(INSIDE_L1, reason="checks host-lane skip rules")
def test_lane_markers_on_this_host(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n faithful_only: x\n pvm_only: x\n faithful: x\n")
    (tmp_path / "test_m.py").write_text(
        "import pytest\n"
        "@pytest.mark.faithful_only\ndef test_real(): pass\n"
        "@pytest.mark.pvm_only\ndef test_quirk(): pass\n"
        "def test_plain(): pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
                           "-v", "test_m.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, out
    assert "test_plain PASSED" in out
    if ON_PVM:
        assert "test_quirk PASSED" in out and "test_real SKIPPED" in out
        assert "needs real-KVM behaviour; skipped on the host lane (kvm_pvm): " \
               "run with --lane faithful" in out
    else:
        assert "test_real PASSED" in out and "test_quirk SKIPPED" in out
        assert "exercises a kvm_pvm workaround; no kvm_pvm in the host lane" in out


@pytest.mark.skipif(INSIDE_L1, reason="checks host-lane skip rules")
def test_heavy_tests_skipped_unless_asked_for(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n heavy: x\n")
    (tmp_path / "test_h.py").write_text(
        "import pytest\n@pytest.mark.heavy\ndef test_big(): pass\ndef test_small(): pass\n")
    env = {k: v for k, v in os.environ.items() if k != "PYVMM_HEAVY"}
    for extra, heavy_env, ran in (([], None, False), (["--heavy"], None, True), ([], "1", True),
                                  ([], "0", False)):
        run_env = dict(env, **({"PYVMM_HEAVY": heavy_env} if heavy_env is not None else {}))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-v",
                               *extra, "test_h.py"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env=run_env)
        assert proc.returncode == 0, proc.stdout
        assert "test_small PASSED" in proc.stdout
        assert ("test_big PASSED" if ran else "test_big SKIPPED") in proc.stdout, (extra, heavy_env)
        if not ran:
            assert "heavy (minutes): run with --heavy or PYVMM_HEAVY=1" in proc.stdout


def test_explicit_ids_match_nodeids_and_params():
    ids = ["tests/test_x.py::test_a", "tests/test_x.py::TestC"]
    assert faithful_conftest()._named("tests/test_x.py::test_a", ids)
    assert faithful_conftest()._named("tests/test_x.py::test_a[1-2]", ids)
    assert faithful_conftest()._named("tests/test_x.py::TestC::test_m", ids)
    assert not faithful_conftest()._named("tests/test_x.py::test_ab", ids)


def faithful_conftest():
    import importlib.util
    spec = importlib.util.spec_from_file_location("_lane_conftest", CONFTEST)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- the probe the faithful lane itself runs -------------------------------------

@pytest.mark.faithful
def test_lane_probe():
    """Runs in both lanes; in the L1 it checks the L1 is what it claims."""
    assert not os.environ.get(FORCE_FAIL), "forced failure (exit-status propagation test)"
    if INSIDE_L1:
        assert Path("/dev/kvm").exists()
        assert not on_kvm_pvm()
        assert Path("/sys/module/kvm_amd").exists()


# --- booting the L1 ----------------------------------------------------------------

@pytest.mark.parametrize("cmd, rc", [(["true"], 0), (["false"], 1)])
@pytest.mark.slow
@pytest.mark.skipif(INSIDE_L1, reason="boots an L1: runs on the host only")
def test_exit_status_comes_back(cmd, rc):
    result = run_in_faithful_lane(cmd, timeout=600, progress=_quiet)
    assert result.returncode == rc
    assert 0 < result.boot_time < result.wall_time


@pytest.mark.slow
@pytest.mark.skipif(INSIDE_L1, reason="boots an L1: runs on the host only")
def test_python_sees_a_real_kvm_inside(tmp_path):
    code = ("import os, sys; print(os.path.exists('/dev/kvm'), "
            f"os.path.exists({PVM_MODULE_PATH!r}), os.getcwd(), os.environ['MARKER']); "
            "open('made-inside', 'w').write('x'); sys.stderr.write('err-line\\n')")
    chunks = []
    work = REPO / ".pytest-faithful-tmp"   # inside the repo share (read-write)
    work.mkdir(exist_ok=True)
    try:
        result = run_in_faithful_lane(
            ["python3", "-c", code], cwd=work, env={"MARKER": "m 1"}, timeout=600,
            progress=_quiet, on_output=lambda s, c: chunks.append((s, c)))
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["True", "False", str(work), "m", "1"]
        assert result.stderr == "err-line\n"
        assert b"".join(c for s, c in chunks if s == "stdout").decode() == result.stdout
        assert (work / "made-inside").read_text() == "x"
    finally:
        for p in work.glob("*"):
            p.unlink()
        work.rmdir()


@pytest.mark.slow
@pytest.mark.skipif(INSIDE_L1, reason="boots an L1: runs on the host only")
def test_unbootable_kernel_fails_with_one_line(tmp_path):
    bogus = tmp_path / "vmlinuz"
    bogus.write_bytes(os.urandom(8192))
    with pytest.raises(FaithfulLaneError) as info:
        run_in_faithful_lane(["true"], kernel=bogus, boot_timeout=120, timeout=180,
                             progress=_quiet)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("faithful lane: ")
    assert "before the L1 came up" in msg or "did not reach /init" in msg


@pytest.mark.slow
@pytest.mark.skipif(INSIDE_L1, reason="boots an L1: runs on the host only")
def test_kvm_amd_failure_fails_with_one_line():
    with pytest.raises(FaithfulLaneError) as info:
        run_in_faithful_lane(["true"], cpu="qemu64,-svm", timeout=300, progress=_quiet)
    assert str(info.value).startswith("faithful lane: kvm_amd failed to load in the L1")


def _pytest_in_lane(extra_env=None):
    env = dict(os.environ, **(extra_env or {}))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--lane", "faithful", "-p", "no:cacheprovider",
         THIS_FILE, "-q"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(INSIDE_L1, reason="boots an L1: runs on the host only")
def test_pytest_lane_runs_marked_tests_inside():
    proc = _pytest_in_lane()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed" in proc.stdout          # only test_lane_probe is marked faithful
    assert "faithful lane: L1 up in" in proc.stderr
    assert "faithful lane: inner pytest exit status 0" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(INSIDE_L1, reason="boots an L1: runs on the host only")
def test_pytest_lane_propagates_failure():
    proc = _pytest_in_lane({FORCE_FAIL: "1"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "forced failure" in proc.stdout
