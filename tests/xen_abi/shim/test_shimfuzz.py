"""The shim's non-MMU hypercalls and privileged-instruction emulation
under generated sequences (issue 11): the shimfuzz test guest, judged by
tests/shimfuzz.py (PASS and poweroff; no ShimPanic, hang, crash or logged
traceback).

The CI slice: a few fixed seeds, a few hundred ops each.  Long runs:
bench/fuzz.py --surface shim-hc.  A failing seed is minimised with
    python3 tests/shimfuzz.py --seed S --ops N --minimise
"""
from __future__ import annotations

import pytest

from shimfuzz import run_seed
from pyvmm.xen_abi import abi
from pyvmm.xen_abi.hypervisor.hypercalls import dispatch

SEEDS = (1, 2, 3, 4)
OPS = 400


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_slice(seed):
    r = run_seed(seed, OPS, timeout=60)
    assert r.ok, r.summary()
    assert r.ops_run == OPS, r.summary()
    # the sequence reached the shim's paths, not only its refusals
    for kind in ("set_trap_table", "callback_op", "set_segment_base", "set_debugreg", "update_descriptor",
                 "set_gdt", "vcpu_op", "sched_op", "multicall"):
        assert r.stats[kind][0] > 0, (kind, r.stats)
    assert r.stats["priv_insn"][1] > 0 and r.traps.get(13, 0) > 0, (r.stats, r.traps)


def test_oracle_sees_a_traceback(monkeypatch):
    """An exception inside a Python handler is answered -EINVAL and the
    guest goes on; the oracle still fails the run on the logged traceback."""
    handlers = dispatch.python_handlers

    def boom(*_):
        raise RuntimeError("planted")

    monkeypatch.setattr(dispatch, "python_handlers", lambda: {**handlers(), abi.Hypercall.xen_version: boom})
    r = run_seed(1, 200, timeout=60)
    assert r.tail.rstrip().endswith("TESTGUEST shimfuzz: PASS"), r.summary()
    assert not r.ok and r.finding().startswith("pyvmm traceback"), r.summary()
