"""Port I/O and same-privilege iretq from a PV guest kernel (test guest
`privio`): Xen's answers (all-ones reads, dropped writes, #GP without the
virtual IOPL, iretq honouring its frame), through the shim's #GP fast path
in entry.S as well as priv.c, on both lanes."""
from __future__ import annotations

import re

import pytest

from pyvmm.guests.testguests import build_testguest
from pyvmm.xen_abi import abi
from pyvmm.xen_abi.shim import priv
from pyvmm.xen_abi.hypervisor.domain import Domain

pytestmark = pytest.mark.faithful


def test_port_io_and_iretq_answers_and_fast_path(capsys):
    with Domain(str(build_testguest("privio"))) as dom:
        res = dom.run(timeout=120)
        state = priv.read_state(dom.region.mem, dom.region.vcpus[0].percpu_off)
        khz = dom.vcpu.get_tsc_khz()
    lines = res.text.strip().splitlines()
    assert res.reason == abi.ShutdownReason.poweroff, (res.reason, res.crash_info, res.text)
    assert lines and lines[-1] == "TESTGUEST privio: PASS", res.text
    # the byte forms with IOPL granted went through entry.S's fast path:
    # `inb dx` at IOPL 3, 2, 1, then inb imm, inb dx, outb imm, outb dx,
    # then the 2000 timed `inb $0x42` (word/dword forms, the IOPL-0 #GPs
    # and the I/O bitmap's ports are priv.c's)
    assert state["fast_io"] == 3 + 4 + 2000, state
    # the four plain cli/sti with the IOPL granted; the prefixed ones and
    # those after set_iopl(0) are priv.c's (the same no-op)
    assert state["fast_cli"] == 4, state
    assert state["emulated"] >= 200, state          # the timed inw loop: C path
    m = dict((k, int(v)) for k, v in re.findall(r"(\w+)_cycles=(\d+)", res.text))
    assert set(m) == {"fast_inb", "iretq_self", "c_path_inw"}
    with capsys.disabled():
        print("\n  port I/O (us/op): " + ", ".join(f"{k} {v / (khz / 1000):.1f}" for k, v in m.items())
              + f"; fast iretq emulations: {state['fast_iret']}")



def test_pit_channel_2_counts_like_xens():
    """PIT channel 2 and port 0x61 (test guest `pit`): a count that runs
    down with the guest's clock, latch, gate, OUT2, and quick_pit_calibrate's
    MSB loop ending after a few reads instead of 50,000 (on kvm_pvm each
    read is a shim entry; the 100k-read spin cost seconds of every boot)."""
    with Domain(str(build_testguest("pit"))) as dom:
        res = dom.run(timeout=120)
        state = priv.read_state(dom.region.mem, dom.region.vcpus[0].percpu_off)
    lines = res.text.strip().splitlines()
    assert res.reason == abi.ShutdownReason.poweroff, (res.reason, res.crash_info, res.text)
    assert lines and lines[-1] == "TESTGUEST pit: PASS", res.text
    reads = int(re.search(r"calibration_reads=(\d+)", res.text).group(1))
    assert reads < 1000, res.text
    # only the three all-ones checks (ports 0x40, 0x60, 0x40; each check
    # reads its port twice) took the fast path: the PIT's ports take priv.c
    assert state["fast_io"] == 6, state

def test_xsave_xcr0_reaches_the_cpu():
    """The emulated `xsetbv` really sets XCR0 (through the VMM: KVM_SET_XCRS),
    so XSAVE/XRSTOR of a Linux-style signal frame (header forced to x87|SSE)
    works at CPL3.  Where the PV CPUID hides XSAVE the guest says so and
    only checks nothing breaks (kvm_pvm offers it: see test_xcr0_...)."""
    from pyvmm.vmm import hostcpu
    from pyvmm.vmm.quirks import detect_quirks, on_kvm_pvm
    with Domain(str(build_testguest("xsave"))) as dom:
        res = dom.run(timeout=60)
        state = priv.read_state(dom.region.mem, dom.region.vcpus[0].percpu_off)
        xcr0 = dom.vcpu.get_xcrs().xcrs[0].value
    lines = res.text.strip().splitlines()
    assert res.reason == abi.ShutdownReason.poweroff, (res.reason, res.crash_info, res.text)
    assert lines and lines[-1] == "TESTGUEST xsave: PASS", res.text
    if "XSAVE absent" in res.text:
        assert not on_kvm_pvm(), "kvm_pvm's PV CPUID must offer XSAVE (host XCR0 in force)"
        return
    m = re.search(r"xcr0 (0x[0-9a-f]+) xgetbv (0x[0-9a-f]+)", res.text)
    assert m and int(m.group(1), 16) == state["xcr0"] == xcr0, (res.text, state, xcr0)
    # what guest code sees: the XCR0 set, or on kvm_pvm the host's (README "Two test lanes")
    in_force = hostcpu.xgetbv(0) if detect_quirks().xcr0_is_host_at_cpl3 else xcr0
    assert int(m.group(2), 16) == in_force, (res.text, hex(in_force))


def test_xcr0_in_force_is_what_the_guest_kernel_saves():
    """The XCR0 guest code runs with covers only state the PV kernel
    context-switches (its PV CPUID's XSAVE components, or x87|SSE without
    XSAVE).  Otherwise user space (glibc picks routines from the native
    CPUID and xgetbv) uses registers no context switch preserves and their
    contents leak between processes: the stock guest's `cat | grep`
    crashed that way on kvm_pvm, whose guests run with the host's XCR0.
    Off kvm_pvm the value is Xen's x87|SSE until the guest's xsetbv."""
    from pyvmm.vmm import hostcpu
    from pyvmm.vmm.quirks import detect_quirks
    from pyvmm.xen_abi.hypervisor.domain import XSTATE_FP_SSE
    XSTATE_AMX = 3 << 17       # XTILECFG, XTILEDATA
    with Domain(str(build_testguest("xcr0"))) as dom:
        res = dom.run(timeout=60)
    lines = res.text.strip().splitlines()
    assert res.reason == abi.ShutdownReason.poweroff, (res.reason, res.crash_info, res.text)
    assert lines and lines[-1] == "TESTGUEST xcr0: PASS", res.text
    m = re.search(r"xcr0 (0x[0-9a-f]+) kernel-saved (0x[0-9a-f]+)", res.text)
    assert m, res.text
    xcr0, saved = int(m.group(1), 16), int(m.group(2), 16)
    if detect_quirks().xcr0_is_host_at_cpl3:
        assert xcr0 == hostcpu.xgetbv(0), (hex(xcr0), res.text)
        # the PV CPUID offers the host's XCR0, but for AMX: KVM withholds the
        # tile components from guests (they need XFD, which PV lacks) and the
        # host fences tile data with XFD for pyvmm's threads (THREAT_MODEL.md)
        assert saved == xcr0 & ~XSTATE_AMX, (hex(xcr0), hex(saved))
    else:
        assert xcr0 == XSTATE_FP_SSE, res.text
        assert xcr0 & ~saved == 0, (hex(xcr0), hex(saved))
