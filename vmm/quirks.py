"""Known deviations of the host's KVM from a faithful x86 machine.

on_kvm_pvm() and detect_quirks() are cheap (one stat): the development
machines' /dev/kvm is kvm_pvm, a software hypervisor (see ARCHITECTURE.md).
The probe_* functions run a tiny guest to *observe* a behaviour; the tests
use them to keep the table below honest on each lane.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from . import x86
from .kvm import ExitReason, Kvm

PVM_MODULE_PATH = "/sys/module/kvm_pvm"

# Exit ports of vmm/flat/cpl3.S (anything above the legacy PIC/PIT range).
PORT_GP = 0x501
PORT_INT = 0x502
PORT_SYSCALL = 0x503
PORT_UD = 0x504
PROBE_PORTS = dict(PORT_GP=PORT_GP, PORT_INT=PORT_INT, PORT_SYSCALL=PORT_SYSCALL,
                   PORT_UD=PORT_UD)
PROBE_TIMEOUT_S = 5.0
# What `mov %cs` returns at CPL3 under kvm_pvm: the host kernel's __USER_CS.
PVM_HOST_USER_CS = 0x33
PROBE_MAX_EXITS = 16


@dataclass(frozen=True)
class HostQuirks:
    is_pvm: bool
    # `syscall` at CPL3 lands on LSTAR but stays at CPL3 (CS 0x33)
    syscall_from_cpl3_stays_cpl3: bool = False
    # `int $n` (n != 3) and `sysenter` at CPL3 never reach the IDT gate
    # (observed: #UD at the instruction; older notes: silently skipped)
    int_n_from_cpl3_dropped: bool = False
    # CPUID leaves 1 and 7 show host values whatever KVM_SET_CPUID2 says
    cpuid_leaves_1_7_host_only: bool = False
    # CPL0 code runs in KVM's instruction emulator (~1 us/instruction)
    cpl0_emulated: bool = False
    # instructions the CPL0 emulator cannot run (the VM stops)
    cpl0_unsupported: tuple[str, ...] = ()
    # RFLAGS.IOPL is forced to 0 at CPL3 (`out`, `cli` fault even with IOPL=3)
    iopl_forced_zero_at_cpl3: bool = False
    # KVM_SET_SREGS rejects CR4.PCIDE with EINVAL
    set_sregs_rejects_pcide: bool = False
    # wrfsbase/rdfsbase work with CR4.FSGSBASE clear (real hardware: #UD)
    fsgsbase_ignores_cr4: bool = False
    # `mov %cs, reg` at CPL3 reads the host's user selector (0x33), not the
    # guest's; exception frames still carry the guest's CS (measured)
    cpl3_cs_read_shows_host_selector: bool = False
    # guest code at CPL3 runs with the host's XCR0 (e.g. x87|SSE|AVX|AVX-512),
    # whatever CR4.OSXSAVE and KVM_SET_XCRS say for the vCPU (measured with
    # the xcr0 test guest): the PV CPUID must offer XSAVE for all of it
    xcr0_is_host_at_cpl3: bool = False
    notes: dict = field(default_factory=dict)


def on_kvm_pvm(pvm_module_path: str = PVM_MODULE_PATH) -> bool:
    """Is the host's KVM kvm_pvm? Its module is loaded."""
    return os.path.exists(pvm_module_path)


def detect_quirks(pvm_module_path: str = PVM_MODULE_PATH) -> HostQuirks:
    """Decide from the loaded modules; no guest is run."""
    if on_kvm_pvm(pvm_module_path):
        return HostQuirks(
            is_pvm=True,
            syscall_from_cpl3_stays_cpl3=True,
            int_n_from_cpl3_dropped=True,
            cpuid_leaves_1_7_host_only=True,
            cpl0_emulated=True,
            cpl0_unsupported=("lock cmpxchg16b", "rdtscp", "int n", "int3"),
            iopl_forced_zero_at_cpl3=True,
            set_sregs_rejects_pcide=True,
            fsgsbase_ignores_cr4=True,
            cpl3_cs_read_shows_host_selector=True,
            xcr0_is_host_at_cpl3=True,
        )
    return HostQuirks(is_pvm=False)


# --------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """What a probe guest did. outcome is a short keyword (see each probe)."""
    outcome: str
    exit: str                       # the last exit, for messages
    regs: dict = field(default_factory=dict)
    symbols: dict = field(default_factory=dict)

    def __str__(self):
        regs = ", ".join(f"{k}={v:#x}" for k, v in self.regs.items())
        return f"{self.outcome} ({self.exit}; {regs})"


def _run_cpl3_probe(kvm: Kvm, user_entry: str, msrs_from_syms=None):
    """Run vmm/flat/cpl3.S entering `user_entry`; returns (exit, regs, fv syms)."""
    from .flatvm import FlatVm, assemble     # local: only probes need gcc
    binary = assemble("cpl3.S", defines=dict(PROBE_PORTS, USER_ENTRY=user_entry))
    with FlatVm(kvm, binary) as fv:
        if msrs_from_syms:
            fv.vcpu.set_msrs({msr: fv.sym(s) for msr, s in msrs_from_syms.items()})
        # a probe guest must never hang the caller
        watchdog = threading.Timer(PROBE_TIMEOUT_S, fv.vcpu.kick)
        watchdog.start()
        try:
            for _ in range(PROBE_MAX_EXITS):
                ex = fv.vcpu.run()
                if ex.reason == ExitReason.IO and ex.port in PROBE_PORTS.values():
                    break
                if ex.reason != ExitReason.IO:
                    break
        finally:
            watchdog.cancel()
        r = fv.vcpu.get_regs()
        regs = {n: getattr(r, n) for n in ("rax", "rbx", "rcx", "r8", "r9", "r10", "r11", "r12", "rip")}
        return ex, regs, dict(binary.symbols)


def probe_syscall_behaviour(kvm: Kvm) -> ProbeResult:
    """Execute `syscall` at CPL3 with LSTAR pointing at `swapgs; ...`.

    outcome:
      "cpl0"              LSTAR reached at CPL0 (swapgs ran) — real hardware
      "stays_cpl3"        #GP at RIP == LSTAR from CPL3 — kvm_pvm
      "other"             anything else
    regs: rcx/r11 as seen after the syscall; cs (CS at LSTAR or in the #GP
    frame); rip_at_fault.
    """
    from .flatvm import cpl
    ex, r, syms = _run_cpl3_probe(kvm, "user_syscall",
                                  {x86.MSR_LSTAR: "lstar_entry"})
    out = dict(rcx=r["rcx"], r11=r["r11"], user_rflags=r["rbx"])
    outcome = "other"
    if ex.reason == ExitReason.IO and ex.port == PORT_SYSCALL:
        out["cs"] = r["rax"] & 0xFFFF
        outcome = "cpl0" if cpl(out["cs"]) == 0 else "other"
    elif ex.reason == ExitReason.IO and ex.port == PORT_GP:
        out.update(cs=r["r10"], rip_at_fault=r["r9"], error_code=r["r8"])
        if r["r9"] == syms["lstar_entry"] and cpl(r["r10"]) == 3:
            outcome = "stays_cpl3"
    return ProbeResult(outcome, repr(ex), out, syms)


def probe_int80_behaviour(kvm: Kvm) -> ProbeResult:
    """Execute `int $0x80` at CPL3 through a present DPL3 interrupt gate.

    outcome:
      "delivered"  the gate's handler ran with the frame RIP after the int
      "ud"         #UD with RIP at the int instruction (kvm_pvm, measured)
      "skipped"    no exception, execution went on at the next instruction
      "other"
    """
    ex, r, syms = _run_cpl3_probe(kvm, "user_int80")
    outcome = "other"
    out = dict(rip=r["r9"], cs=r["r10"])
    if ex.reason == ExitReason.IO:
        if ex.port == PORT_INT and r["r9"] == syms["after_int80"]:
            outcome = "delivered"
        elif ex.port == PORT_UD and r["r9"] == syms["user_int80"]:
            outcome = "ud"
        elif ex.port == PORT_GP and r["r9"] == syms["after_int80"]:
            # the `hlt` after the int faulted: the int itself did nothing
            outcome = "skipped"
    return ProbeResult(outcome, repr(ex), out, syms)
