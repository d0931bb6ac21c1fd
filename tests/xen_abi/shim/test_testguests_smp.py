"""SMP PV guests (issue 9): the smp test guest brings up its secondary vCPUs
as Linux does (VCPUOP_initialise + VCPUOP_up) and checks Xen 4.17's answers
itself: is_up, bad vCPU contexts, event channels and VIRQ_TIMER across
vCPUs, bind_vcpu, SCHEDOP_poll, TLB shootdowns (UVMF_MULTI/UVMF_ALL and
MMUEXT_*_MULTI/_ALL) and VCPUOP_down/up.  It prints one line per step
("smp: step N: ok") and "check failed: step N: ..." with the values for
each failure, then "TESTGUEST smp: PASS"."""
from __future__ import annotations

import re

import pytest

from pyvmm.guests.testguests import build_testguest
from pyvmm.xen_abi import abi
from pyvmm.xen_abi.hypervisor.domain import Domain

pytestmark = pytest.mark.faithful


def run_smp(nr_vcpus: int, timeout: float = 600, fifo: bool = False):
    with Domain(str(build_testguest("smp")), nr_vcpus=nr_vcpus,
                cmdline=f"nr_vcpus={nr_vcpus}" + (" fifo" if fifo else "")) as dom:
        res = dom.run(timeout=timeout)
    text = res.text
    failed = re.findall(r"^check failed: .*$", text, re.M)
    assert res.reason == abi.ShutdownReason.poweroff, (res.reason, res.crash_info, failed, text)
    lines = text.strip().splitlines()
    assert lines and lines[-1] == "TESTGUEST smp: PASS", "\n".join(failed) + "\n\n" + text
    steps = set(re.findall(r"^smp: step (\d): ok$", text, re.M))
    assert steps == {"1", "2", "3", "4", "5", "6", "7"}, text
    assert ("smp: FIFO event channels on" in text) == fifo, text
    return res


def test_smp_two_vcpus_as_xen_4_17():
    """vCPU 1 brought up with a read-only GDT frame; every step with one
    secondary vCPU (VCPUOP_initialise of vCPU 2 is -ENOENT; the bad
    contexts need a spare vCPU: the 4-vCPU run)."""
    run_smp(2)


def test_smp_four_vcpus_as_xen_4_17():
    """vCPU 3's refused contexts (non-canonical addresses, bad GDT/LDT/cr3,
    !VGCF_in_kernel without a user cr3) leave it uninitialised, and it comes
    up afterwards; the shootdowns reach three reading vCPUs."""
    run_smp(4)


def test_smp_fifo_event_channels_across_vcpus():
    """Steps 4 and 5 under the FIFO ABI (control blocks for both vCPUs):
    IPIs to a spinning and a blocked vCPU 1, its VIRQ_TIMER, a loopback
    port moved by bind_vcpu from vCPU 0's queue to vCPU 1's (its old
    queue forgets it as tail), SCHEDOP_poll of a masked pending port."""
    run_smp(2, fifo=True)


def test_page_type_race_two_vcpus(capsys):
    """Page-type races between vCPUs (issue 11): vCPU 1 pins and unpins a
    frame while vCPU 0 maps it writable and writes forged PTEs into it;
    never both at once, and vCPU 1's pin flushes the writable translation
    vCPU 0's TLB kept.  The guest counts each side's successes and
    refusals and insists on a few of each."""
    with Domain(str(build_testguest("pgrace")), nr_vcpus=2) as dom:
        res = dom.run(timeout=600)
    assert res.reason == abi.ShutdownReason.poweroff, (res.reason, res.crash_info, res.text)
    lines = res.text.strip().splitlines()
    assert lines and lines[-1] == "TESTGUEST pgrace: PASS", res.text
    counts = re.search(r"^pgrace: .*$", res.text, re.M)
    assert counts, res.text
    with capsys.disabled():
        print("\n  " + counts.group(0))


def test_vcpu_context_with_an_ldt():
    """VCPUOP_initialise takes the context's LDT (ldt_base, ldt_ents), as
    Xen's arch_set_info_guest does: the new vCPU loads an LDT selector at
    its first instruction; a context whose LDT page is not mapped is
    accepted (Xen maps LDT pages at first use) and that vCPU's load is
    #GP(selector); so is one whose LDT is that same valid page seen
    through the shim's 1:1 map of RAM in the hypervisor's half (hostile:
    never taken).  LAR's view of the descriptor is an OBSERVE line:
    kvm_pvm answers it from the host's tables."""
    from pyvmm.vmm.quirks import on_kvm_pvm
    from pyvmm.xen_abi.memory.vmm_region import DIRECTMAP_VA
    with Domain(str(build_testguest("vcpuldt")), nr_vcpus=4, cmdline=f"directmap={DIRECTMAP_VA}") as dom:
        res = dom.run(timeout=120)
    lines = res.text.strip().splitlines()
    assert res.reason == abi.ShutdownReason.poweroff, (res.reason, res.crash_info, res.text)
    assert lines and lines[-1] == "TESTGUEST vcpuldt: PASS", res.text
    observed = dict(re.findall(r"^OBSERVE (\w+) (ok|differs)$", res.text, re.M))
    assert "ldt_lar" in observed, res.text
    assert observed["ldt_lar"] == "ok" or on_kvm_pvm(), res.text
