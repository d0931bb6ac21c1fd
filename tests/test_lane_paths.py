"""Start-up picks the path that fits the KVM underneath, and the guest's
syscalls really take it: on kvm_pvm the swapgs trampoline turns a CPL3
`syscall` into #GP (no SMEP, user-visible trampoline page, the M2P alias);
on a faithful KVM the `syscall` reaches the shim at CPL0 (SMEP on, no
#GP at all).  Runs in both lanes; each lane asserts its own behaviour."""
from __future__ import annotations

import pytest

from pyvmm.guests.testguests import build_testguest
from pyvmm.vmm import x86
from pyvmm.vmm.quirks import on_kvm_pvm
from pyvmm.xen_abi import abi
from pyvmm.xen_abi.shim import priv
from pyvmm.xen_abi.shim.layout import PERCPU
from pyvmm.xen_abi.memory import vmm_region as R
from pyvmm.xen_abi.hypervisor.domain import Domain

ON_KVM_PVM = on_kvm_pvm()
GP = f"trap {x86.VEC_GP}"


@pytest.fixture(scope="module")
def usermode_run():
    """The usermode guest makes hypercalls from kernel mode and syscalls
    from user mode, so both kinds of `syscall` are exercised."""
    with Domain(str(build_testguest("usermode"))) as dom:
        res = dom.run(timeout=120)
        sregs = dom.vcpu.get_sregs()
        counters = priv.read_counters(dom.region.mem, dom.region.vcpus[0].percpu_off)
        yield dom, res, sregs, counters


@pytest.mark.faithful
def test_quirk_detection_matches_the_lane(usermode_run):
    dom, res, sregs, _ = usermode_run
    assert res.reason == abi.ShutdownReason.poweroff, res.text
    assert dom.is_pvm is ON_KVM_PVM
    smep = bool(sregs.cr4 & x86.CR4_SMEP)
    if ON_KVM_PVM:
        assert not smep, "SMEP must be off while the trampoline page is user-accessible"
        assert dom.m2p_va == R.M2P_ALIAS_VA
    else:
        assert smep, "a faithful KVM keeps SMEP on"
        assert dom.m2p_va == R.M2P_VA == abi.MACH2PHYS_VIRT_START


@pytest.mark.faithful
def test_syscalls_take_the_lanes_path(usermode_run):
    dom, res, _, counters = usermode_run
    hypercalls = sum(n for name, n in counters.items() if name.startswith("hypercall "))
    assert hypercalls >= 3, counters
    # both lanes join entry.S shim_syscall, which counts them; none is a #GP
    assert counters.get("syscall entries", 0) >= hypercalls, counters
    assert GP not in counters, counters
    saved_rsp = PERCPU.read(dom.region.mem, dom.region.vcpus[0].percpu_off, "syscall_rsp")
    if ON_KVM_PVM:
        # every `syscall` faulted on the trampoline's first swapgs (#GP at
        # CPL3, taken as the syscall), so the rest of it never ran
        assert saved_rsp == 0
    else:
        # the CPU ran the trampoline at CPL0: it saved the guest rsp
        assert saved_rsp != 0


@pytest.mark.faithful
def test_a_test_hung_in_kvm_run_fails_alone(pytester, monkeypatch):
    """The suite's safety net (pytest-timeout, pyproject.toml): a test whose
    vCPU sits in KVM_RUN forever (a halted guest, nothing pending) fails
    with a Timeout and the thread stacks, and the next test still runs."""
    from pyvmm.cache import cache_root
    from pyvmm.guests.testguests import build_testguest
    from pyvmm.xen_abi.shim.build import build_shim

    # pytester gives the inner run a HOME of its own: point it at this
    # cache, with the shim and the guest built, so that the timeout hits
    # the halted vCPU and not a gcc run
    monkeypatch.setenv("PYVMM_CACHE", str(cache_root()))
    build_shim()
    build_testguest("idle")
    pytester.makepyfile(test_hang='''
        import pytest
        from pyvmm.guests.testguests import build_testguest
        from pyvmm.xen_abi.hypervisor.domain import Domain

        @pytest.mark.timeout(10)
        def test_hangs_in_kvm_run():
            with Domain(str(build_testguest("idle")), ram_size=32 << 20) as dom:
                dom.run(timeout=None)

        def test_after():
            pass
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=300)
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    assert "Timeout (>10.0s)" in out and "Stack of" in out, out[-3000:]
    assert "in run" in out, out[-3000:]          # it was waiting in the vCPU run, not elsewhere
