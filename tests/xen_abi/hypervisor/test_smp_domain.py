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
