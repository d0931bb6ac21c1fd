"""SMP in the Domain (issue 9): the run state a hostile guest can put its
vCPUs in.  Bring-up, IPIs, shootdowns and hotplug of the stock kernel are
in tests/guests/test_stock_boot.py; the ABI's answers in the smp test
guest (tests/xen_abi/shim/test_testguests_smp.py)."""
from __future__ import annotations

import resource
import threading
import time

import pytest

from pyvmm.guests.testguests import build_testguest
from pyvmm.xen_abi import abi
from pyvmm.xen_abi.hypervisor.domain import Domain, DomainTimeout

pytestmark = pytest.mark.faithful


def test_a_guest_that_takes_all_its_vcpus_down_still_times_out_using_no_cpu():
    """VCPUOP_down of the last vCPU up: nothing of the guest runs; run()
    still ends at its timeout, and the wait costs no CPU."""
    with Domain(str(build_testguest("downself"))) as dom:
        t0 = time.monotonic()
        with pytest.raises(DomainTimeout, match="no vCPU up: True"):
            dom.run(timeout=8)
        took = time.monotonic() - t0
        assert dom.online_vcpus() == []
        assert "taking vCPU 0 down" in dom.console.decode()
        assert "FAILURE" not in dom.console.decode()
    assert took < 8 + 5, took


def test_a_guest_with_no_vcpu_up_is_stopped_at_once():
    with Domain(str(build_testguest("downself"))) as dom:
        before = resource.getrusage(resource.RUSAGE_SELF)
        threading.Timer(3, dom.stop).start()
        res = dom.run(timeout=60)
        after = resource.getrusage(resource.RUSAGE_SELF)
    assert res.stopped and res.reason == abi.ShutdownReason.poweroff
    assert res.elapsed < 10, res.elapsed
    # parked, not spinning: well under a second of CPU in the ~3 s it waited
    used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert used < 1.5, used


def test_nr_vcpus_out_of_range_is_refused():
    for bad in (0, 9):
        with pytest.raises(ValueError, match="nr_vcpus must be 1..8"):
            Domain(str(build_testguest("hello")), nr_vcpus=bad)
    with pytest.raises(ValueError, match="vcpus_online must be 1..2"):
        Domain(str(build_testguest("hello")), nr_vcpus=2, vcpus_online=3)


def test_a_failing_vcpu_thread_ends_the_domain_and_every_other_thread():
    """An exception on a secondary vCPU's thread (here its first KVM_RUN)
    reaches run() on vCPU 0's thread; the other vCPU threads end too."""
    with Domain(str(build_testguest("smp")), nr_vcpus=4, cmdline="nr_vcpus=4") as dom:
        def boom():
            raise RuntimeError("vCPU 1 broke")
        dom.vcpus[1].run = boom
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="vCPU 1 broke"):
            dom.run(timeout=120)
        assert time.monotonic() - t0 < 60
        assert not any(t.is_alive() for t in dom._threads), dom._threads


def _thread_cpu_s(tid: int) -> float:
    import os
    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_blocked_vcpu_costs_no_host_cpu_while_another_runs():
    """vCPU 1 blocks in SCHEDOP_block with nothing that could wake it while
    vCPU 0 spins: vCPU 1's thread sleeps (KVM's halt, nothing polls), so it
    uses next to no host CPU.  Polling would show as most of a core."""
    with Domain(str(build_testguest("blockone")), nr_vcpus=2, cmdline="spin_s=6") as dom:
        box: dict = {}
        th = threading.Thread(target=lambda: box.setdefault("r", dom.run(timeout=300)), daemon=True)
        th.start()
        deadline = time.monotonic() + 120
        while "vCPU 1 blocked" not in dom.console.decode(errors="replace") or 1 not in dom.vcpu_tids:
            assert time.monotonic() < deadline and th.is_alive(), dom.console.decode(errors="replace")
            time.sleep(0.05)
        tid, spinner = dom.vcpu_tids[1], dom.vcpu_tids[0]
        c0, s0, t0 = _thread_cpu_s(tid), _thread_cpu_s(spinner), time.monotonic()
        time.sleep(2)
        c1, s1, t1 = _thread_cpu_s(tid), _thread_cpu_s(spinner), time.monotonic()
        still_spinning = "blockone: done" not in dom.console.decode(errors="replace")
        th.join(300)
    res = box["r"]
    assert res.reason == abi.ShutdownReason.poweroff, (res.reason, res.text)
    assert res.text.strip().splitlines()[-1] == "TESTGUEST blockone: PASS", res.text
    assert still_spinning, "vCPU 0 stopped spinning before the window ended: raise spin_s"
    share, spun = (c1 - c0) / (t1 - t0), (s1 - s0) / (t1 - t0)
    # the measure sees a busy thread (vCPU 0's, unless the host starved it)
    assert spun > 0.3, f"the spinning vCPU's thread used only {spun:.1%} of a core"
    assert share < 0.05, f"the blocked vCPU's thread used {share:.1%} of a core"
