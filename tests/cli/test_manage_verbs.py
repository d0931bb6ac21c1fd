"""xl's verbs on a running guest: pause/unpause (the vCPU and its clock
stop, nothing is lost), reboot (the request reaches xenstore), and the
host's view of the guest's xenstore (ls/read/write/rm/watch)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from pyvmm.errors import ExitStatus
from spawned import Spawned
from waiting import wait_for
from test_cli import assert_one_line_error, pyvmm

TICK = re.compile(rb"tick (\d+) at (\d+) ms\n")


def _ticks(log) -> list[tuple[int, int]]:
    return [(int(n), int(t)) for n, t in TICK.findall(log.read_bytes())]


def _cpu_s(pid: int) -> float:
    """utime + stime of every thread of pid, in seconds."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def ticker(tmp_path):
    """A detached `ticker` guest (prints its clock every 100 ms) named tk."""
    from pyvmm.guests.testguests import build_testguest

    env = {"PYVMM_RUNTIME_DIR": str(tmp_path / "run")}
    p = pyvmm("--xen-pv", str(build_testguest("ticker")), "--memory", "32M", "--name", "tk", "--detach",
              env=env)
    assert p.returncode == 0, p.stderr
    log = tmp_path / "run" / "tk.log"
    try:
        yield env, log
    finally:
        pyvmm("destroy", "tk", env=env)


def _info(env) -> dict:
    (info,) = json.loads(pyvmm("list", "--json", env=env).stdout)
    return info


@pytest.mark.faithful
def test_pause_stops_the_vcpu_and_its_clock_unpause_resumes(ticker):
    env, log = ticker
    wait_for(lambda: len(_ticks(log)) >= 5, lambda: f"5 ticks; log: {log.read_text()[-500:]}", 120)
    p = pyvmm("pause", "tk", env=env)
    assert p.returncode == 0 and "tk paused" in p.stderr, p.stderr
    info = _info(env)
    assert info["state"] == "paused", info
    before = _ticks(log)
    cpu0, t0 = _cpu_s(info["pid"]), time.monotonic()
    time.sleep(3)
    cpu, paused_for = _cpu_s(info["pid"]) - cpu0, time.monotonic() - t0
    assert _ticks(log) == before, "the guest ran while paused"
    # paused means no vCPU work and no polling thread (a tick a second of
    # slack for the control request that reads it)
    assert cpu < 0.05 * paused_for + 0.02, f"{cpu:.3f} s of CPU in {paused_for:.1f} s paused"
    p = pyvmm("unpause", "tk", env=env)
    assert p.returncode == 0 and "tk runs again" in p.stderr, p.stderr
    assert _info(env)["state"] == "running"
    wait_for(lambda: len(_ticks(log)) >= len(before) + 5, lambda: "ticks after unpause", 120)
    after = _ticks(log)
    (n0, t_last), (n1, t_next) = before[-1], after[len(before)]
    assert n1 == n0 + 1
    # the guest's clock stopped with it: the next tick is one tick later in
    # its time, not the 3 s the host waited
    assert 0 < t_next - t_last < 1000, (t_last, t_next)
    assert b"BACKWARDS" not in log.read_bytes()


def test_pause_twice_and_destroy_while_paused(ticker):
    env, log = ticker
    wait_for(lambda: len(_ticks(log)) >= 1, lambda: "a tick", 120)
    for _ in range(2):
        assert pyvmm("pause", "tk", env=env).returncode == 0
    assert pyvmm("unpause", "tk", env=env).returncode == 0
    assert pyvmm("unpause", "tk", env=env).returncode == 0       # not paused: nothing to do, as xl
    assert pyvmm("pause", "tk", env=env).returncode == 0
    d = pyvmm("destroy", "tk", env=env)
    assert d.returncode == 0 and "tk destroyed" in d.stderr, d.stderr


def test_reboot_verb_asks_through_xenstore(ticker):
    """`pyvmm reboot` is `xl reboot`: control/shutdown = reboot, for the
    guest's kernel to act on (the ticker guest does not watch it)."""
    env, _ = ticker
    r = pyvmm("reboot", "tk", env=env)
    assert r.returncode == 0 and "asked tk to reboot" in r.stderr, r.stderr
    assert pyvmm("xenstore", "tk", "read", "control/shutdown", env=env).stdout == "reboot\n"


def test_xenstore_verbs(ticker):
    env, _ = ticker
    ls = pyvmm("xenstore", "tk", "ls", env=env)
    assert ls.returncode == 0, ls.stderr
    lines = ls.stdout.splitlines()
    assert lines[:2] == ['local = ""', ' domain = ""'], lines[:5]
    assert '   name = "tk"' in lines, lines
    home = pyvmm("xenstore", "tk", "ls", "/local/domain/1/control", env=env)
    assert home.returncode == 0 and 'shutdown = ""' in home.stdout.splitlines(), home.stdout

    assert pyvmm("xenstore", "tk", "write", "data/greeting", 'say "hi"\n', env=env).returncode == 0
    # a value's bytes never reach the user's terminal raw
    assert pyvmm("xenstore", "tk", "read", "data/greeting", env=env).stdout == 'say \\"hi\\"\\n\n'
    assert pyvmm("xenstore", "tk", "read", "/local/domain/1/data/greeting", env=env).returncode == 0
    assert 'greeting = "say \\"hi\\"\\n"' in pyvmm("xenstore", "tk", "ls", "data", env=env).stdout

    watch = Spawned([sys.executable, "-m", "pyvmm", "xenstore", "tk", "watch", "data"], env=dict(os.environ, **env))
    try:
        assert watch.wait_for(lambda: b"/local/domain/1/data\n" in watch.out, 60), watch.stderr
        assert pyvmm("xenstore", "tk", "rm", "data/greeting", env=env).returncode == 0
        assert watch.wait_for(lambda: b"/local/domain/1/data/greeting\n" in watch.out, 60), \
            (bytes(watch.out), watch.stderr)
        # the watch ends, with a line, when the guest does
        assert pyvmm("destroy", "tk", env=env).returncode == 0
        assert watch.proc.wait(60) == 1
        assert "the guest ended" in watch.stderr, watch.stderr
    finally:
        watch.finish()

    missing = pyvmm("xenstore", "tk", "read", "data/greeting", env=env)
    assert_one_line_error(missing, ExitStatus.USAGE, "no guest named tk")


def test_xenstore_verb_errors(ticker):
    env, _ = ticker
    assert_one_line_error(pyvmm("xenstore", "tk", "read", "data/none", env=env), ExitStatus.USAGE,
                          "/local/domain/1/data/none", "no such node")
    assert_one_line_error(pyvmm("xenstore", "tk", "write", "data/x", env=env), ExitStatus.USAGE,
                          "only write takes a value")
    assert_one_line_error(pyvmm("xenstore", "tk", "read", env=env), ExitStatus.USAGE, "give a path")
    assert_one_line_error(pyvmm("xenstore", "tk", "ls", "bad//path", env=env), ExitStatus.USAGE,
                          "not a valid path")


def test_escape_value():
    from pyvmm.xenstore_access import escape_value

    assert escape_value(b"plain 1/2") == "plain 1/2"
    assert escape_value(b'\x1b[2J"\\\t\n\r\x00\xff') == '\\x1b[2J\\"\\\\\\t\\n\\r\\x00\\xff'


def _complete(script: str, words: list[str], env: dict) -> list[str]:
    """What bash's completion of `words` (the last one being completed) offers."""
    line = " ".join(f"'{w}'" for w in words)
    prog = (f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _pyvmm; '
            'printf "%s\\n" "${COMPREPLY[@]}"')
    p = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_bash_completion_offers_verbs_flags_and_running_guests(ticker, tmp_path):
    env, _ = ticker
    bin_dir = tmp_path / "bin"                   # `pyvmm` on PATH is this checkout's
    bin_dir.mkdir()
    (bin_dir / "pyvmm").write_text(f"#!/bin/sh\nexec {sys.executable} -m pyvmm \"$@\"\n")
    (bin_dir / "pyvmm").chmod(0o755)
    env = dict(os.environ, **env, PATH=f"{bin_dir}:{os.environ['PATH']}")
    script = pyvmm("completion", "bash", env=env).stdout
    assert _complete(script, ["pyvmm", "pa"], env) == ["pause"]
    assert _complete(script, ["pyvmm", "cr"], env) == ["create"]
    assert _complete(script, ["pyvmm", "create", "-"], env) == ["--escape", "--help", "--verbose"]
    assert _complete(script, ["pyvmm", "--me"], env) == ["--memory", "--memory-limit"]
    assert _complete(script, ["pyvmm", "pause", ""], env) == ["tk"]
    assert _complete(script, ["pyvmm", "xenstore", "t"], env) == ["tk"]
    assert sorted(_complete(script, ["pyvmm", "xenstore", "tk", "w"], env)) == ["watch", "write"]
    assert _complete(script, ["pyvmm", "shutdown", "--w"], env) == ["--wait"]
    assert pyvmm("list", "--names", env=env).stdout == "tk\n"


def test_mem_set_writes_the_balloon_target_and_list_reports_a_guest_that_ignores_it(ticker):
    """`pyvmm mem-set` is `xl mem-set`: memory/target in KiB; a target above
    the guest's maximum or below what a PV guest needs is refused with one
    line; the ticker guest has no balloon driver, so list shows it still
    holding its memory against the lower target (reported, not killed)."""
    env, _ = ticker
    p = pyvmm("mem-set", "tk", "20M", env=env)
    assert p.returncode == 0 and "asked tk to use 20 MiB" in p.stderr, p.stderr
    assert pyvmm("xenstore", "tk", "read", "memory/target", env=env).stdout == f"{20 << 10}\n"
    info = _info(env)
    assert (info["memory_target_mib"], info["memory_current_mib"]) == (20, 32), info
    row = pyvmm("list", env=env).stdout.splitlines()[1].split()
    assert row[2] == "32->20" and row[3] == "1" and row[4] == "running", row
    assert_one_line_error(pyvmm("mem-set", "tk", "64M", env=env), ExitStatus.USAGE,
                          "64 MiB is above the guest's maximum of 32 MiB")
    assert_one_line_error(pyvmm("mem-set", "tk", "8M", env=env), ExitStatus.USAGE, "below the 16 MiB")
    assert_one_line_error(pyvmm("mem-set", "tk", "lots", env=env), ExitStatus.USAGE, "cannot read memory size")


def test_top_prints_rates_per_guest(ticker):
    env, log = ticker
    p = pyvmm("top", "-d", "0.5", "-n", "2", env=env)
    assert p.returncode == 0, p.stderr
    tables = p.stdout.strip().split("\n\n")
    assert len(tables) == 2, p.stdout
    header, row = tables[1].splitlines()
    assert header.split()[:5] == ["NAME", "STATE", "CPU%", "MEM(MiB)", "HOST(MiB)"], header
    name, state, cpu, mem, host, *rates = row.split()
    assert (name, state, mem) == ("tk", "running", "32"), row
    assert 0 < float(cpu) < 100 and int(host) <= 32, row     # the ticker wakes 10 times a second
    assert rates == ["0.0"] * 4, row                          # no devices
    assert_one_line_error(pyvmm("top", "-d", "0", env=env), ExitStatus.USAGE, "more than 0 seconds")


def test_top_rates_from_counters():
    """rows(): each rate is the counter's change over the interval; a guest
    new since the first sample (or restarted: another pid) has none yet."""
    from pyvmm.top import rows

    def g(pid, cpu, dr, dw, rx, tx):
        return {"name": "a", "pid": pid, "state": "running", "cpu_s": cpu, "memory_current_mib": 64,
                "memory_host_mib": 40, "io": {"disk_read_bytes": dr, "disk_write_bytes": dw,
                                               "net_rx_bytes": rx, "net_tx_bytes": tx}}
    before = (10.0, {"a": g(1, 5.0, 0, 0, 0, 0)})
    after = (12.0, {"a": g(1, 5.5, 20e6, 4e6, 2e6, 1e6), "b": dict(g(2, 1.0, 0, 0, 0, 0), name="b")})
    (a, b) = rows(before, after)
    assert a == ("a", "running", "25.0", "64", "40", "10.0", "2.0", "1.0", "0.5")
    assert b[0] == "b" and b[2] == "-" and b[5:] == ("-",) * 4
    restarted = (12.0, {"a": g(7, 0.1, 0, 0, 0, 0)})
    assert rows(before, restarted)[0][2] == "-"
