"""Smoke test of bench/fuzz.py (no figure asserted): a short run of one
surface with each engine prints its line of figures and its JSON, and a
replayed input runs alone."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from repo import REPO

BENCH = REPO / "bench" / "fuzz.py"


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("engine", ["hypothesis", "atheris"])
def test_short_run_reports(tmp_path, engine):
    if engine == "atheris":
        pytest.importorskip("atheris", reason="the long runs' engine: pip install -e .[fuzz]")
    out = tmp_path / "fuzz.json"
    r = _run("--surface", "console", "--inputs", "300", "--engine", engine, "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "console: 300 inputs in" in r.stdout and "0 distinct findings" in r.stdout
    figures = json.loads(out.read_text())["console"]
    assert figures["inputs"] == 300 and figures["findings"] == {}


def test_replay_one_input():
    r = _run("--surface", "hypercalls", "--replay", "00" * 64)
    assert r.returncode == 0 and "no finding" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("surface", ["shim-mmu", "shim-hc"])
def test_guest_surface_counts_ops(tmp_path, surface):
    """shim-mmu, shim-hc: an input is a whole test-guest run; the ops inside are counted."""
    out = tmp_path / "fuzz.json"
    r = _run("--surface", surface, "--inputs", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{surface}: 1 inputs in" in r.stdout and " ops/s, " in r.stdout, r.stdout
    figures = json.loads(out.read_text())[surface]
    assert figures["inputs"] == 1 and figures["ops"] >= 500, figures
