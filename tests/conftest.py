"""Test lanes.

``pytest`` (``--lane host``, the default) runs the suite on this machine's
KVM.  When that KVM is ``kvm_pvm`` (``pyvmm.vmm.quirks.on_kvm_pvm()``), tests
marked ``faithful_only`` are skipped and ``pvm_only`` ones run; elsewhere
(real KVM, or inside the faithful L1) the reverse.

``pytest --lane faithful`` on the host collects as usual, keeps the tests
marked ``faithful`` or ``faithful_only`` plus any named explicitly as
``file::test``, and runs them with pytest *inside* the faithful L1 (KVM
inside QEMU/TCG, see ``pyvmm.guests.faithful``).  The host session prints
the inner output and exits with the inner exit status; a lane that cannot
boot fails with one line saying why.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from pyvmm.vmm.quirks import on_kvm_pvm

LANES = ("host", "faithful")
#: Set to run the tests marked heavy, as --heavy does (the faithful lane's L1 inherits it).
HEAVY_ENV = "PYVMM_HEAVY"
#: Upper bound of one inner run (boot included), unless --faithful-timeout.
DEFAULT_FAITHFUL_TIMEOUT = 2400.0

_RC_KEY = pytest.StashKey[int]()
_NOTE_KEY = pytest.StashKey[str]()
_COUNTS_KEY = pytest.StashKey[dict]()
#: Outcome words of pytest's closing line ("3 passed, 1 skipped in 4.2s").
_OUTCOME = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b")
_CLOSING = re.compile(r"^\W*(\d+ \w+.*|no tests ran) in [\d.]+s")


def inside_faithful_l1() -> bool:
    """True in the L1 that the faithful lane boots (its /init sets the variable)."""
    from pyvmm.guests.faithful import LANE_ENV, LANE_NAME

    return os.environ.get(LANE_ENV) == LANE_NAME and not on_kvm_pvm()


pytest_plugins = ["pytester"]


def pytest_configure(config):
    # guests the tests start get control sockets of their own, apart from
    # any the user runs meanwhile (pyvmm/control.py)
    if "PYVMM_RUNTIME_DIR" not in os.environ:
        import tempfile
        os.environ["PYVMM_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="pyvmm-test-run-")


def pytest_addoption(parser):
    group = parser.getgroup("pyvmm lanes")
    group.addoption("--lane", choices=LANES, default="host",
                    help="host: this machine's KVM (default); faithful: re-run the tests "
                         "marked faithful/faithful_only (and any named explicitly) inside "
                         "KVM-in-QEMU/TCG")
    group.addoption("--heavy", action="store_true", default=False,
                    help="also run the tests marked heavy (minutes each: full benchmark "
                         "runs; also with $PYVMM_HEAVY=1), which the default suite skips")
    group.addoption("--faithful-timeout", type=float, default=DEFAULT_FAITHFUL_TIMEOUT,
                    help="seconds for the whole faithful-lane run, boot included")
    group.addoption("--faithful-smp", type=int, default=None, metavar="N",
                    help="vCPUs of the faithful lane's L1 (default $PYVMM_FAITHFUL_SMP, else "
                         "pyvmm.guests.faithful.DEFAULT_SMP)")


def _delegating(config) -> bool:
    """On the host with --lane faithful: the tests run in the L1, not here."""
    return config.getoption("lane") == "faithful" and not inside_faithful_l1()


def _lane_here() -> str:
    if inside_faithful_l1():
        return "faithful lane"
    return "host lane (kvm_pvm)" if on_kvm_pvm() else "host lane"


def _explicit_ids(config) -> list[str]:
    """Positional arguments naming a test (``path::name``), as node ids."""
    out = []
    for arg in config.args:
        path, sep, rest = str(arg).partition("::")
        if not sep:
            continue
        full = (Path(config.invocation_params.dir) / path).resolve()
        try:
            rel = full.relative_to(config.rootpath).as_posix()
        except ValueError:
            continue
        out.append(f"{rel}::{rest}")
    return out


def _named(nodeid: str, explicit: list[str]) -> bool:
    return any(nodeid == e or nodeid.startswith((e + "::", e + "["))
               for e in explicit)


def pytest_collection_modifyitems(config, items):
    if _delegating(config):
        explicit = _explicit_ids(config)
        keep, drop = [], []
        for item in items:
            wanted = (item.get_closest_marker("faithful") is not None
                      or item.get_closest_marker("faithful_only") is not None
                      or _named(item.nodeid, explicit))
            (keep if wanted else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep
        return
    pvm = on_kvm_pvm()
    lane = _lane_here()
    heavy = config.getoption("heavy") or os.environ.get(HEAVY_ENV, "") not in ("", "0")
    for item in items:
        if not heavy and item.get_closest_marker("heavy"):
            item.add_marker(pytest.mark.skip(
                reason=f"heavy (minutes): run with --heavy or {HEAVY_ENV}=1"))
        if pvm and item.get_closest_marker("faithful_only"):
            item.add_marker(pytest.mark.skip(
                reason=f"needs real-KVM behaviour; skipped on the {lane}: "
                       "run with --lane faithful"))
        if not pvm and item.get_closest_marker("pvm_only"):
            item.add_marker(pytest.mark.skip(
                reason=f"exercises a kvm_pvm workaround; no kvm_pvm in the {lane}"))


def _inner_argv(session) -> list[str]:
    config = session.config
    opt = config.option
    argv = [sys.executable, "-m", "pytest", "--lane", "faithful", "-p", "no:cacheprovider",
            "--rootdir", str(config.rootpath)]
    verbose = getattr(opt, "verbose", 0)
    if verbose > 0:
        argv.append("-" + "v" * verbose)
    elif verbose < 0:
        argv.append("-" + "q" * -verbose)
    if getattr(opt, "maxfail", 0):
        argv.append(f"--maxfail={opt.maxfail}")
    if getattr(opt, "capture", None) == "no":
        argv.append("-s")
    if getattr(opt, "tbstyle", "auto") != "auto":
        argv.append(f"--tb={opt.tbstyle}")
    if getattr(opt, "reportchars", None):
        argv.append(f"-r{opt.reportchars}")
    if getattr(opt, "timeout", None) is not None:       # pytest-timeout's --timeout
        argv.append(f"--timeout={opt.timeout}")
    argv += [item.nodeid for item in session.items]
    return argv


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    config = session.config
    if not _delegating(config) or config.option.collectonly:
        return None
    if session.testsfailed and not config.option.continue_on_collection_errors:
        return None     # collection errors: let pytest report them as usual
    from pyvmm.guests import faithful

    if not session.items:
        config.stash[_RC_KEY] = int(pytest.ExitCode.NO_TESTS_COLLECTED)
        config.stash[_NOTE_KEY] = ("no test selected for the faithful lane (mark it faithful "
                                   "or faithful_only, or name it as file::test); L1 not booted")
        return True
    capman = config.pluginmanager.getplugin("capturemanager")

    def show(stream: str, chunk: bytes) -> None:
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.buffer.write(chunk)
        out.flush()

    with capman.global_and_fixture_disabled():
        sys.stdout.write("\n")
        try:
            # PYVMM_* settings (cache path, test knobs) follow the tests in.
            env = {k: v for k, v in os.environ.items()
                   if k.startswith("PYVMM_") and k != faithful.LANE_ENV}
            # the pyvmm cache (Debian packages, built guests) follows them too:
            # the L1 has no network and no apt lists
            from pyvmm.cache import cache_root
            cache = cache_root()
            cache.mkdir(parents=True, exist_ok=True)
            if any("test_stock_boot" in item.nodeid for item in session.items):
                # fetch and build the default guest here, where apt works
                from pyvmm.guests.default import build_default_guest
                build_default_guest(progress=True)
            result = faithful.run_in_faithful_lane(
                _inner_argv(session), cwd=config.rootpath, env=env,
                timeout=config.getoption("faithful_timeout"), on_output=show,
                smp=config.getoption("faithful_smp"), shares=[(cache, False)])
        except faithful.FaithfulLaneError as exc:
            if getattr(config.option, "verbose", 0) > 0 and exc.console_tail:
                print(exc.console_tail, file=sys.stderr)    # context, with -v
            print(str(exc), file=sys.stderr, flush=True)
            config.stash[_RC_KEY] = int(pytest.ExitCode.INTERNAL_ERROR)
            config.stash[_NOTE_KEY] = str(exc) + (" (the output above shows how far the tests got)"
                                                  if exc.command_started else " (no test ran)")
            return True
    config.stash[_RC_KEY] = result.returncode
    config.stash[_NOTE_KEY] = (f"faithful lane: inner pytest exit status {result.returncode} "
                               f"(L1 up in {result.boot_time:.1f} s, wall {result.wall_time:.1f} s)")
    config.stash[_COUNTS_KEY] = _closing_counts(result.stdout)
    return True


def _closing_counts(stdout: str) -> dict[str, int]:
    """Outcome counts from the inner pytest's closing line."""
    for line in reversed(stdout.splitlines()):
        if _CLOSING.match(line):
            return {word: int(n) for n, word in _OUTCOME.findall(line)}
    return {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    rc = config.stash.get(_RC_KEY, None)
    if rc is None:
        return
    # Exit with the inner pytest's status (5 "no tests" stays 5).
    session.exitstatus = rc
    # Make the host's closing line tell what ran in the L1 ("3 passed
    # (faithful), 6 deselected"): counted-only entries under keys of their own.
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for word, n in config.stash.get(_COUNTS_KEY, {}).items():
            outcomes = [_InnerOutcome(word) for _ in range(n)]
            # _add_stats also refreshes the reporter's list of outcome kinds.
            add = getattr(reporter, "_add_stats", None)
            if add is not None:
                add(f"{word} (faithful)", outcomes)
            else:
                reporter.stats.setdefault(f"{word} (faithful)", []).extend(outcomes)


class _InnerOutcome:
    """Stands for one test outcome reported by the inner pytest: counted in
    the closing line, carries nothing else (other plugins may look at it)."""

    count_towards_summary = True
    when = "call"
    nodeid = "(faithful lane)"

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rc = config.stash.get(_RC_KEY, None)
    if rc is not None:
        terminalreporter.write_line(config.stash[_NOTE_KEY], red=rc != 0, green=rc == 0,
                                    bold=True)
