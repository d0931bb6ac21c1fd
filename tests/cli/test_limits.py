"""Per-guest limits (pyvmm/limits.py): a cgroup of the guest's own with
xl's cpu_weight and cap and a host memory limit, on whichever hierarchy
(v2, else v1) offers each controller; removed when the guest ends; every
limit the host cannot apply is one line at start-up."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pyvmm.errors import ExitStatus, UserError
from pyvmm.limits import GuestCgroup, Limits, hierarchies
from test_cli import assert_one_line_error, pyvmm

V1_MOUNTS = """\
32 31 0:29 / /CG/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /CG/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /CG/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_OWN = "4:memory:/jobs/j1\n1:cpu:/\n0::/\n"


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_hierarchies_of_a_hybrid_host(tmp_path):
    """v1 cpu and memory, an empty v2 (this project's machine): each
    controller from v1, under the cgroup pyvmm itself is in."""
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    found = hierarchies(V1_MOUNTS.replace("/CG", str(tmp_path)), V1_OWN)
    assert {c: (h.version, h.path) for c, h in found.items()} == {
        "cpu": (1, tmp_path / "cpu"), "memory": (1, tmp_path / "memory" / "jobs" / "j1")}


def test_v2_settings_and_its_busy_parent(tmp_path, monkeypatch):
    """A v2-only host: cpu.weight / cpu.max / memory.max in a child of
    pyvmm's cgroup, controllers handed down through subtree_control; when
    the kernel refuses that (pyvmm's cgroup holds processes) one line says
    what to do.  (A fake cgroupfs: this machine's v2 has no cpu/memory.)"""
    root = tmp_path / "cg"
    own = root / "user" / "me"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    mounts = f"41 31 0:38 / {root} rw,relatime - cgroup2 cgroup2 rw\n"
    group = GuestCgroup.create("web", Limits(cpu_weight=512, cpu_cap=150, memory_max=300 << 20), pid=4242,
                               mountinfo=mounts, own="0::/user/me\n")
    d = own / "pyvmm-web-4242"
    assert (own / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert {f: (d / f).read_text() for f in ("cpu.weight", "cpu.max", "memory.max", "cgroup.procs")} == {
        "cpu.weight": "200", "cpu.max": "150000 100000", "memory.max": str(300 << 20), "cgroup.procs": "4242"}
    assert group.dirs == [d]

    # the same with a parent the kernel will not hand controllers down from
    busy = root / "busy"
    busy.mkdir()
    (busy / "cgroup.controllers").write_text("cpu memory\n")
    import errno
    import pyvmm.limits as L

    real = L._write

    def ebusy(path, value):          # what the kernel answers for a parent with processes
        if path.name == "cgroup.subtree_control":
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        real(path, value)
    monkeypatch.setattr(L, "_write", ebusy)
    with pytest.raises(UserError, match="holds processes.*systemd-run --scope"):
        GuestCgroup.create("web", Limits(cpu_cap=50), pid=1, mountinfo=mounts, own="0::/busy\n")


def test_no_controller_is_one_line():
    with pytest.raises(UserError, match="no memory cgroup controller"):
        GuestCgroup.create("web", Limits(memory_max=1 << 30), mountinfo="", own="0::/\n")
    assert GuestCgroup.create("web", Limits(), mountinfo="", own="0::/\n") is None   # nothing asked


def test_limits_the_host_could_never_apply():
    for limits, fragment in ((Limits(cpu_weight=0), "cpu weight 0"), (Limits(cpu_weight=70000), "1 to 65535"),
                             (Limits(cpu_cap=-1), "cpu cap -1%"),
                             (Limits(memory_max=64 << 20), "need at least")):
        with pytest.raises(UserError, match=fragment):
            limits.check(32 << 20)


@pytest.mark.skipif(os.geteuid() != 0, reason="making cgroups needs root")
def test_cap_and_weight_in_a_real_cgroup(tmp_path):
    """The spinner guest burns its vCPU; capped at 20% of a CPU it gets
    about that (cgroup cpu controller on the vCPU thread), list -l shows
    the settings, and the cgroup goes when the guest does."""
    from pyvmm.guests.testguests import build_testguest

    found = hierarchies(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())
    if "cpu" not in found:
        pytest.skip("this host offers no cpu cgroup controller")
    env = {"PYVMM_RUNTIME_DIR": str(tmp_path / "run")}
    p = pyvmm("--xen-pv", str(build_testguest("spinner")), "--memory", "32M", "--name", "cap1", "--detach",
              "--cpu-cap", "20", "--cpu-weight", "512", "--memory-limit", "128M", env=env)
    assert p.returncode == 0, p.stderr
    try:
        (info,) = json.loads(pyvmm("list", "-l", env=env).stdout)
        assert info["limits"] == {"cpu_weight": 512, "cpu_cap": 20, "memory_limit_mib": 128}, info
        files = {Path(f).name: v for f, v in info["cgroup"].items()}
        assert files["cpu.cfs_quota_us" if "cpu.cfs_quota_us" in files else "cpu.max"] in ("20000", "20000 100000")
        cg_dirs = {Path(f).parent for f in info["cgroup"]}
        for d in cg_dirs:
            assert str(info["pid"]) in (d / "cgroup.procs").read_text().split()
        time.sleep(1)
        cpu0, t0 = _cpu_s(info["pid"]), time.monotonic()
        time.sleep(4)
        share = (_cpu_s(info["pid"]) - cpu0) / (time.monotonic() - t0)
        assert 0.05 < share < 0.3, f"capped at 20%, the spinner got {share:.0%} of a CPU"
    finally:
        pyvmm("destroy", "cap1", env=env)
    for d in cg_dirs:
        assert not d.exists(), f"{d} left behind"


def test_limit_errors_through_the_cli(tmp_path):
    from pyvmm.guests.testguests import build_testguest

    k = str(build_testguest("hello"))
    assert_one_line_error(pyvmm("--xen-pv", k, "--memory", "64M", "--memory-limit", "80M"), ExitStatus.USAGE,
                          "memory limit 80 MiB", "at least 112 MiB")
    assert_one_line_error(pyvmm("--xen-pv", k, "--cpu-cap", "1000"), ExitStatus.USAGE, "cpu cap 1000%")


def test_rate_limits_reach_the_back_ends(tmp_path):
    """--disk ...,rate=,iops= and --net ...,rate= end up on the running
    guest's back-ends (its status report names them)."""
    import signal

    from pyvmm.guests.testguests import build_testguest
    from waiting import wait_for

    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    env = {"PYVMM_RUNTIME_DIR": str(tmp_path / "run")}
    p = pyvmm("--xen-pv", str(build_testguest("ticker")), "--memory", "32M", "--name", "rl1", "--detach",
              "--disk", f"{img},rate=1M,iops=10", env=env)
    assert p.returncode == 0, p.stderr
    log = tmp_path / "run" / "rl1.log"
    try:
        (info,) = json.loads(pyvmm("list", "--json", env=env).stdout)
        os.kill(info["pid"], signal.SIGUSR2)
        wait_for(lambda: "requests limited to" in log.read_text(), lambda: log.read_text()[-1500:], 30)
        assert "requests limited to 1.04858 MB/s and 10 ops/s" in log.read_text()
    finally:
        pyvmm("destroy", "rl1", env=env)
