"""The rest of the x86-64 PV ABI (issue 10), each piece run by a test guest
that checks Xen's answers itself and ends with "TESTGUEST <name>: PASS".

A few behaviours kvm_pvm cannot give (README "Two test lanes") are printed
by the guest as "OBSERVE <name> ok|differs": on kvm_pvm the ones in
PVM_DIFFERS may differ, in the faithful lane the ones in FAITHFUL_DIFFERS
(what its TCG gets wrong), every other one must be "ok"."""
from __future__ import annotations

import re

import pytest

from pyvmm.guests.testguests import build_testguest
from pyvmm.vmm.quirks import on_kvm_pvm
from pyvmm.xen_abi import abi
from pyvmm.xen_abi.hypervisor.domain import Domain

pytestmark = pytest.mark.faithful

# what kvm_pvm does differently (README "Two test lanes")
PVM_DIFFERS = {
    "kernel_nm", "user_nm",        # CR0.TS does not stop x87/SSE at CPL3: no #NM
    # DR0-3/DR7 are not loaded for CPL3: no breakpoint fires (TF does)
    "instruction_breakpoint", "data_breakpoint", "data_breakpoint_guest_write",
    "gs_selector",                 # a %gs selector loaded at CPL0 reads back 0 at CPL3
    # KVM offers no FSGSBASE, and the guest runs under the host's CR4 (which has it)
    "fsgsbase_offered", "fsgsbase_ud",
}
# what the faithful lane's QEMU 7.2 TCG does differently (README "Two test lanes")
FAITHFUL_DIFFERS = {
    "noncanonical_gp",             # WRFSBASE/WRGSBASE load a non-canonical base instead of #GP
}


def run_pass(name: str, timeout: float = 120, nr_vcpus: int = 1):
    with Domain(str(build_testguest(name)), nr_vcpus=nr_vcpus, cmdline=f"nr_vcpus={nr_vcpus}") as dom:
        res = dom.run(timeout=timeout)
    lines = res.text.strip().splitlines()
    assert res.reason == abi.ShutdownReason.poweroff, (res.reason, res.crash_info, res.text)
    assert lines and lines[-1] == f"TESTGUEST {name}: PASS", res.text
    observed = dict(re.findall(r"^OBSERVE (\w+) (ok|differs)$", res.text, re.M))
    differs = {k for k, v in observed.items() if v != "ok"}
    allowed = PVM_DIFFERS if on_kvm_pvm() else FAITHFUL_DIFFERS
    assert differs <= allowed, (differs - allowed, res.text)
    return res, observed


def test_software_interrupts_and_exception_frames_from_both_modes():
    """`int $n` through the trap table's DPL (#GP((n<<3)|2) when refused),
    int3 / int $3 / int $4 whatever the DPL, Xen's int80 fast path, and the
    frames of #DB #BP #OF #GP #PF #NM #UD from guest kernel and user mode."""
    _, observed = run_pass("softint")
    assert {"kernel_nm", "user_nm"} <= set(observed)


def test_debug_registers_as_xen_checks_and_delivers_them():
    """set_debugreg / get_debugreg with Xen 4.17's error codes and reserved
    bits (DR4/5 aliases, CR4.DE, I/O breakpoints, the hypervisor's range),
    and breakpoints and single-step delivered as #DB with Xen's DR6; a
    breakpoint the hypervisor itself hits is not the guest's."""
    _, observed = run_pass("debugreg")
    assert {"instruction_breakpoint", "data_breakpoint", "data_breakpoint_guest_write"} <= set(observed)


def test_set_segment_base_as_xen_4_17():
    """FS / GS_USER / GS_KERNEL bases (non-canonical -EINVAL), `which` an
    unsigned int (others -EINVAL), and GS_USER_SEL: RPL 3, a null or
    faulting selector loads a null %gs with base 0 and returns 0."""
    _, observed = run_pass("segbase")
    assert "gs_selector" in observed


def test_fsgsbase_instructions_as_xen_4_17():
    """CR4.FSGSBASE is the guest's when its CPUID offers FSGSBASE (dropped
    otherwise); with it, rd/wr{fs,gs}base work on the live bases from both
    modes (user wrgsbase is the user GS base), a non-canonical base is
    #GP(0) at the instruction; without it, #UD."""
    _, observed = run_pass("fsgsbase")
    # the instructions work in both lanes (offered, or kvm_pvm's host CR4), so both run them
    assert {"fsgsbase_offered", "fsgsbase_ud", "noncanonical_gp"} <= set(observed)


def test_user_mode_port_io_through_iopl_3_or_the_io_bitmap():
    """From guest user mode (virtual ring 3): IOPL 3 allows every port, 1
    and 2 do not; below it the I/O bitmap decides, read through the
    kernel's page tables (port + size <= nr_ports, bits clear); a refused
    access is #GP(0) at it with a user frame, an allowed one reads all
    ones or is dropped."""
    run_pass("userio")


def test_long_hypercalls_are_preempted_and_resumed():
    """mmu_update and mmuext_op batches, a multicall, a multicall entry that
    is itself a long batch and a long trap table stop part-way, the guest
    takes a timer upcall in the middle, and each resumes from its
    continuation: all the work done once, the done counts adding up across
    the pieces, a failing request still ending its batch (preempt.c)."""
    run_pass("preempt")


def test_grant_table_ops_on_own_grants():
    """grant_table_op as Xen 4.17 answers a domain using its own grants
    (grants.c): host maps at a linear address and at a PTE's machine
    address (the shim's PTE, with its type reference), read-only and
    device maps, unmap by handle and unmap_and_replace, copy by gref and
    gmfn, swap, cache_flush, dump_table, v2 and back (status frames,
    sub_page, transitive), with Xen's error for every hostile input."""
    run_pass("grants")


def test_multicall_as_xen_4_17():
    """Every entry's result in its own slot, failures (nested multicall
    -EINVAL, unknown hypercall -ENOSYS, bad pointers) not stopping the
    list; a list outside the guest's half -EFAULT even when empty; an
    unreadable entry or unwritable result ends it with -EFAULT."""
    run_pass("multicall")


def test_vcpu_op_with_one_vcpu_as_xen_4_17():
    """Absent vCPU ids -ENOENT (an unsigned int), unknown sub-ops -ENOSYS,
    is_up, the runstate and the vcpu_time areas (-EFAULT outside the
    guest's half; filled at once), send_nmi with an argument and
    get_physid -EINVAL."""
    run_pass("vcpuop")


def test_virtual_nmis_as_xen_4_17():
    """VCPUOP_send_nmi (-EINVAL with an argument, -ENOENT for an absent
    vCPU) delivered to the NMI callback (callback_op, or trap_ctxt[2]) with
    Xen's bounce frame and events masked, at once to itself; held while
    the handler runs and delivered once at HYPERVISOR_iret; dropped with no
    callback; waking a vCPU blocked in SCHEDOP_block or poll; a flood of
    sends and a handler that never irets wedge nothing."""
    res, _ = run_pass("nmi", timeout=300, nr_vcpus=2)
    assert "nmi: vCPU 1 in SCHEDOP_poll" in res.text, res.text


def test_memory_op_answers_as_xen_4_17():
    """maximum_ram_page, current/maximum_reservation and maximum_gpfn for
    each kind of domid, start extents refused, maximum_gpfn from the
    guest's max_pfn, machine_memory_map -EPERM, memory_map,
    machphys_mfn_list, PoD targets -EINVAL for a PV guest."""
    run_pass("memop")


def test_fifo_event_channels_as_xen_4_17():
    """EVTCHNOP_init_control / expand_array / set_priority with Xen's
    answers, a 2-level pending port carried over, delivery through the
    queues from the shim (IPI, VIRQ_TIMER, unmask) and from Python
    (loopback interdomain), priorities ordering READY and the walk, one
    queue's LINK order, masked ports linked only by EVTCHNOP_unmask,
    SCHEDOP_poll on FIFO PENDING, close, a guest scribbling on its words
    and control block, and EVTCHNOP_reset back to 2-level (fifo.c)."""
    run_pass("fifo")
