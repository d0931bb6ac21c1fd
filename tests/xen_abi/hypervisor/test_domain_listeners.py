"""Domain listeners (xen_abi/hypervisor/listeners.py): what observers of a
domain see, and that an observer that fails does not hurt the guest."""
from __future__ import annotations

import logging

import pytest

from pyvmm.guests.testguests import build_testguest
from pyvmm.xen_abi import abi
from pyvmm.xen_abi.hypervisor import trace
from pyvmm.xen_abi.hypervisor.domain import Domain
from pyvmm.xen_abi.hypervisor.hypercalls.context import DomainShutdown
from pyvmm.xen_abi.hypervisor.listeners import Listeners

GUEST = "traps"          # a few hundred slow hypercalls (xen_version), console output, poweroff


def assert_pass(name, res):
    lines = res.text.strip().splitlines()
    assert res.reason == abi.ShutdownReason.poweroff, (res.reason, res.crash_info, res.text)
    assert lines and lines[-1] == f"TESTGUEST {name}: PASS", res.text


def hypercall_exits(exit_counts) -> int:
    """Exits the domain counted as slow hypercalls ("xen_version", "sched_op:shutdown", ...)."""
    return sum(n for key, n in exit_counts.items() if key.split(":")[0] in abi.Hypercall.__members__)


def test_listeners_run_in_order_and_a_failing_one_is_logged(caplog):
    seen = []
    hooks = Listeners("test")
    hooks.add(lambda x: seen.append(("first", x)))
    hooks.add(lambda x: 1 / 0)
    hooks.add(lambda x: seen.append(("last", x)))
    with caplog.at_level(logging.ERROR, logger="pyvmm.xen_abi.hypervisor.listeners"):
        hooks(7)
    assert seen == [("first", 7), ("last", 7)]
    assert "test listener" in caplog.text and "ZeroDivisionError" in caplog.text


def test_listeners_see_every_exit_hypercall_and_console_byte():
    with Domain(str(build_testguest(GUEST))) as dom:
        exits, calls, console = [], [], []
        dom.on_vcpu_exit.add(exits.append)
        dom.on_hypercall.add(calls.append)
        dom.on_console_output.add(console.append)
        res = dom.run(timeout=20)
    assert_pass(GUEST, res)
    assert len(exits) == sum(res.exit_counts.values())
    assert len(calls) == hypercall_exits(res.exit_counts) >= 200
    assert b"".join(console) == res.console
    versions = [c for c in calls if c.nr == abi.Hypercall.xen_version]
    assert versions and all(c.error is None and c.result is not None and c.rip for c in versions)
    last = calls[-1]
    assert (last.nr, last.args[0]) == (abi.Hypercall.sched_op, abi.SchedOp.shutdown)
    assert isinstance(last.error, DomainShutdown) and last.result is None


@pytest.mark.parametrize("hook", ["on_vcpu_exit", "on_hypercall", "on_console_output"])
def test_a_raising_listener_does_not_kill_the_guest(hook, caplog):
    def broken(*_):
        raise RuntimeError("listener bug")

    with Domain(str(build_testguest("hello"))) as dom:
        getattr(dom, hook).add(broken)
        with caplog.at_level(logging.ERROR, logger="pyvmm.xen_abi.hypervisor.listeners"):
            res = dom.run(timeout=8)
    assert_pass("hello", res)
    assert "listener bug" in caplog.text


def test_tracer_listens_without_replacing_the_domains_methods():
    with Domain(str(build_testguest(GUEST))) as dom:
        run, dispatch = dom.vcpu.run, dom.dispatcher.dispatch
        tracer = trace.Tracer(dom, last_n=8)
        assert (dom.vcpu.run, dom.dispatcher.dispatch) == (run, dispatch)
        res = dom.run(timeout=20)
    assert_pass(GUEST, res)
    assert sum(tracer.hcall_counts.values()) == hypercall_exits(res.exit_counts)
    assert sum(tracer.exit_counts.values()) == sum(res.exit_counts.values())
    last = tracer.events[-1].text
    assert last.startswith("sched_op(") and "DomainShutdown" in last, last
