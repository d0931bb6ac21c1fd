"""vmm/: KVM from Python, exercised with tiny flat guests (vmm/flat/*.S)."""
from __future__ import annotations

import ctypes
import os
import select
import threading
import time

import numpy as np
import pytest

from waiting import wait_for
from pyvmm.vmm import kvm as K
from pyvmm.vmm import x86
from pyvmm.vmm.flatvm import (
    FlatVm, KERNEL_CS, KERNEL_STACK_TOP, USER_CS, USER_STACK_TOP, assemble, cpl,
)
from pyvmm.vmm.kvm import ExitReason, Kvm, KvmError, KvmUnavailable
from pyvmm.vmm.memory import GuestMemory, GuestMemoryError
from pyvmm.vmm.quirks import PVM_HOST_USER_CS, detect_quirks

pytestmark = pytest.mark.faithful

PORT_OUT = 0x500
PORT_GP, PORT_INT, PORT_SYSCALL, PORT_UD = 0x501, 0x502, 0x503, 0x504
CPL3_PORTS = dict(PORT_GP=PORT_GP, PORT_INT=PORT_INT, PORT_SYSCALL=PORT_SYSCALL,
                  PORT_UD=PORT_UD)
PORT_EVT, PORT_DONE = 0x520, 0x521
PORT_READY, PORT_IRQ = 0x510, 0x511
TEST_VECTOR = 0x40
LAPIC_ID, LAPIC_VERSION, LAPIC_TPR = 0x20, 0x30, 0x80     # xAPIC register offsets
MSI_GSI = 24               # first GSI above the IOAPIC's pins
SPIN_COUNT_GPA = USER_STACK_TOP - 8      # where cpl3.S's user_spin keeps its count (r14)


@pytest.fixture(scope="module")
def kvm():
    try:
        k = Kvm()
    except KvmUnavailable as e:
        pytest.fail(str(e))
    yield k
    k.close()


def user_cs_as_read_by_guest() -> int:
    """What `mov %cs` at CPL3 yields (kvm_pvm leaks the host's selector)."""
    return PVM_HOST_USER_CS if detect_quirks().cpl3_cs_read_shows_host_selector else USER_CS


def cpl3_vm(kvm, user_entry, **kw):
    return FlatVm(kvm, assemble("cpl3.S", defines=dict(CPL3_PORTS, USER_ENTRY=user_entry)), **kw)


# ---------------------------------------------------------------- bindings


def test_ioctl_numbers_match_the_kernel_encoding():
    # Values from the kernel headers; each depends on a structure size.
    assert K.KVM_RUN == 0xAE80
    assert K.KVM_GET_REGS == 0x8090AE81          # 144-byte kvm_regs
    assert K.KVM_SET_SREGS == 0x4138AE84         # 312-byte kvm_sregs
    assert K.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert K.KVM_IOEVENTFD == 0x4040AE79
    assert K.KVM_IRQFD == 0x4020AE76
    assert K.KVM_SIGNAL_MSI == 0x4020AEA5
    assert K.KVM_GET_VCPU_EVENTS == 0x8040AE9F
    assert ctypes.sizeof(K.KvmRun) == 2352


def test_missing_device_is_one_clear_line(tmp_path):
    path = tmp_path / "no-such-kvm"
    with pytest.raises(KvmUnavailable) as ei:
        Kvm(str(path))
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg and "does not exist" in msg


def test_non_kvm_device_is_rejected():
    with pytest.raises(KvmUnavailable) as ei:
        Kvm("/dev/null")
    assert "not a KVM device" in str(ei.value)


def test_system_queries(kvm):
    assert kvm.api_version == K.KVM_API_VERSION
    assert kvm.vcpu_mmap_size >= ctypes.sizeof(K.KvmRun)
    assert kvm.check_extension(K.Cap.USER_MEMORY) > 0
    assert kvm.check_extension(K.Cap.IOEVENTFD) > 0
    cpuid = kvm.supported_cpuid()
    leaves = {e.function for e in cpuid}
    assert 0 in leaves and 0x80000001 in leaves
    ext = next(e for e in cpuid if e.function == 0x80000001)
    assert ext.edx & (1 << 29), "long mode must be offered"


def test_unknown_exit_reason_keeps_its_number():
    r = ExitReason(1234)
    assert int(r) == 1234 and "1234" in r.name


# ---------------------------------------------------------------- memory


def test_guest_memory_views_and_bounds():
    with GuestMemory(1 << 16, name="t") as m:
        m.write(0x100, b"hello")
        assert m.read(0x100, 5) == b"hello"
        m.write_u64(0x200, 0x1122334455667788)
        assert m.u64[0x200 // 8] == 0x1122334455667788
        assert m.buf[0x200] == 0x88
        assert bytes(m.view(0x100, 5)) == b"hello"
        m.u64[0x300 // 8] = 7            # the word view writes through
        assert m.read(0x300, 2) == b"\x07\x00"
        m.fill(0x400, 3, 0xAB)
        assert m.read(0x3ff, 5) == b"\x00\xab\xab\xab\x00"
        for off, n in ((m.size - 4, 8), (-1, 1), (m.size, 1), (0, m.size + 1)):
            with pytest.raises(GuestMemoryError):
                m.read(off, n)
        with pytest.raises(GuestMemoryError):
            m.write_u64(m.size - 4, 1)
        # the fd maps the same pages (what an out-of-process back-end sees)
        assert os.pread(m.fd, 5, 0x100) == b"hello"


def test_unaligned_slot_is_refused(kvm):
    with kvm.create_vm() as vm, GuestMemory(1 << 16) as m:
        with pytest.raises(ValueError):
            vm.add_memory(0x800, m)
        assert vm.add_memory(0, m) == 0
        with GuestMemory(1 << 16) as m2, GuestMemory(1 << 16) as m3:
            assert vm.add_memory(1 << 20, m2) == 1
            with pytest.raises(KvmError):           # overlapping slot
                vm.add_memory(0x8000, m3)


# ---------------------------------------------------------------- running guests


def test_cpl0_out_and_hlt(kvm):
    value = 0x1234ABCD
    b = assemble("out_cpl0.S", defines=dict(PORT=PORT_OUT, VALUE=value))
    with FlatVm(kvm, b) as f:
        ex = f.vcpu.run()
        assert ex.reason == ExitReason.IO
        assert (ex.port, ex.size, ex.count, ex.is_out) == (PORT_OUT, 4, 1, True)
        assert ex.value == value
        ex = f.vcpu.run()
        assert ex.reason == ExitReason.HLT
        r = f.vcpu.get_regs()
        assert r.rbx == 0x42 and r.rcx == KERNEL_CS
        assert r.rip == b.sym("after_hlt")            # hlt completed
        assert r.rsp == KERNEL_STACK_TOP
        s = f.vcpu.get_sregs()
        assert s.efer & x86.EFER_LMA and s.cs.l == 1 and s.cs.selector == KERNEL_CS


def test_cpl3_via_iretq_then_gp_to_cpl0_handler(kvm):
    with cpl3_vm(kvm, "user_hlt") as f:
        ex = f.vcpu.run()
        assert ex.reason == ExitReason.IO and ex.port == PORT_GP, ex
        r = f.vcpu.get_regs()
        assert r.r13 == user_cs_as_read_by_guest() and cpl(r.r13) == 3   # ran at CPL3
        assert r.r14 == 0x5EED
        assert r.r9 == f.sym("user_hlt_insn")            # #GP frame: faulting RIP
        assert r.r10 == USER_CS and r.r8 == 0            # frame CS, error code
        assert f.vcpu.get_sregs().cs.selector == KERNEL_CS   # handler at CPL0
        # the handler ran on the TSS rsp0 stack: frame (5 qwords + error code)
        assert r.rsp == KERNEL_STACK_TOP - 6 * 8


def test_mmio_write_and_read_exit(kvm):
    mmio_addr = 0x4000_0000                     # mapped by the page tables, no slot
    b = assemble("mmio.S", defines=dict(MMIO_ADDR=mmio_addr, VALUE=0xCAFEF00D,
                                        PORT_DONE=PORT_DONE))
    with FlatVm(kvm, b) as f:
        ex = f.vcpu.run()
        assert ex.reason == ExitReason.MMIO and ex.is_write
        assert (ex.phys_addr, ex.len, ex.value) == (mmio_addr, 4, 0xCAFEF00D)
        ex = f.vcpu.run()
        assert ex.reason == ExitReason.MMIO and not ex.is_write and ex.len == 4
        ex.set_value(0x600DD00D)                # answer the load
        ex = f.vcpu.run()
        assert ex.reason == ExitReason.IO and ex.port == PORT_DONE
        assert ex.value == 0x600DD00D


def test_run_loop_sees_every_exit(kvm):
    b = assemble("out_cpl0.S", defines=dict(PORT=PORT_OUT, VALUE=5))
    seen = []
    with FlatVm(kvm, b) as f:
        last = f.vcpu.run_loop(lambda ex: seen.append(ex.reason) or ex.reason != ExitReason.HLT)
    assert seen == [ExitReason.IO, ExitReason.HLT] and last.reason == ExitReason.HLT


# ---------------------------------------------------------------- eventfds / MSI


@pytest.fixture
def io_vm(kvm):
    """The io.S guest (writes 7, then 8, to PORT_EVT, then one to PORT_DONE)
    with a non-blocking eventfd that an ioeventfd signals for writes of 7."""
    b = assemble("io.S", defines=dict(PORT_EVT=PORT_EVT, PORT_DONE=PORT_DONE,
                                      VALUE1=7, VALUE2=8))
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        with FlatVm(kvm, b) as f:
            f.vm.ioeventfd(efd, PORT_EVT, length=4, datamatch=7)
            yield f, efd
    finally:
        os.close(efd)


def test_ioeventfd_datamatch_write_does_not_exit(io_vm):
    f, efd = io_vm
    ex = f.vcpu.run()
    # the matching write (7) was absorbed by the kernel; the other one exits
    assert ex.reason == ExitReason.IO and ex.port == PORT_EVT and ex.value == 8
    assert select.select([efd], [], [], 0)[0] == [efd]
    assert os.eventfd_read(efd) == 1
    ex = f.vcpu.run()
    assert ex.reason == ExitReason.IO and ex.port == PORT_DONE
    with pytest.raises(BlockingIOError):
        os.eventfd_read(efd)


def test_ioeventfd_deassign_restores_exits(io_vm):
    f, efd = io_vm
    f.vm.ioeventfd(efd, PORT_EVT, length=4, datamatch=7, deassign=True)
    ex = f.vcpu.run()
    assert ex.reason == ExitReason.IO and ex.port == PORT_EVT and ex.value == 7


def _irq_vm(kvm):
    b = assemble("irq.S", defines=dict(PORT_READY=PORT_READY, PORT_IRQ=PORT_IRQ,
                                       VECTOR=TEST_VECTOR))
    f = FlatVm(kvm, b, irqchip=True, gates={TEST_VECTOR: ("irq_handler", 0, 0)})
    ex = f.vcpu.run()
    assert ex.reason == ExitReason.IO and ex.port == PORT_READY, ex
    return f


def _expect_irq(f):
    ex = f.vcpu.run()
    assert ex.reason == ExitReason.IO and ex.port == PORT_IRQ, ex
    assert ex.value == TEST_VECTOR
    assert f.vcpu.get_regs().r13 == 1           # handler ran exactly once


def test_irqfd_routed_to_msi_interrupts_guest(kvm):
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with _irq_vm(kvm) as f:
            f.vm.set_gsi_routing({MSI_GSI: (x86.msi_address(0), TEST_VECTOR)})
            f.vm.irqfd(efd, MSI_GSI)
            os.eventfd_write(efd, 1)
            _expect_irq(f)
    finally:
        os.close(efd)


def test_signal_msi_interrupts_guest(kvm):
    with _irq_vm(kvm) as f:
        assert f.vm.signal_msi(x86.msi_address(0), TEST_VECTOR) > 0
        _expect_irq(f)


# ---------------------------------------------------------------- statistics


def test_vcpu_statistics_read_while_the_vcpu_is_in_kvm_run(kvm):
    """KVM_GET_STATS_FD waits for the vCPU's mutex, which KVM_RUN holds:
    the statistics fd is opened with the vCPU, so a benchmark can read it
    from another thread while the guest runs (bench/devices.py hung here)."""
    with cpl3_vm(kvm, "user_spin") as f:
        t = threading.Thread(target=f.vcpu.run)
        t.start()
        wait_for(lambda: f.mem.read_u64(SPIN_COUNT_GPA) > 1000, "the guest to spin at CPL3")
        box = {}
        reader = threading.Thread(target=lambda: box.setdefault("stats", f.vcpu.stats().read()))
        reader.start()
        reader.join(timeout=5)
        f.vcpu.kick()
        t.join(timeout=5)
        assert not reader.is_alive(), "reading the statistics waited for KVM_RUN"
        assert "exits" in box["stats"] and "insn_emulation" in box["stats"]


# ---------------------------------------------------------------- kick


def test_kick_interrupts_cpl3_spin_from_another_thread(kvm):
    with cpl3_vm(kvm, "user_spin") as f:
        result = {}

        def spins() -> int:
            return f.mem.read_u64(SPIN_COUNT_GPA)

        def vcpu_thread():
            result["exit"] = f.vcpu.run()
            result["t"] = time.monotonic()

        t = threading.Thread(target=vcpu_thread)
        t.start()
        wait_for(lambda: spins() > 1000, "the guest to spin at CPL3")
        t0 = time.monotonic()
        f.vcpu.kick()
        t.join(timeout=2)
        assert not t.is_alive(), "kick did not stop KVM_RUN"
        assert result["exit"].reason == ExitReason.INTR
        assert result["t"] - t0 < 0.5
        # it was really spinning at CPL3
        assert f.vcpu.get_sregs().cs.selector == USER_CS
        r = f.vcpu.get_regs()
        assert r.r13 == user_cs_as_read_by_guest() and r.r14 > 1000
        assert f.vcpu.kvm_run.immediate_exit == 0       # cleared for the next run
        # and it resumes where it was
        before = r.r14

        def kick_once_spinning_again():
            try:
                wait_for(lambda: spins() > before, "the guest to spin again")
            finally:
                f.vcpu.kick()           # never leave run() below waiting

        threading.Thread(target=kick_once_spinning_again).start()
        assert f.vcpu.run().reason == ExitReason.INTR
        assert f.vcpu.get_regs().r14 > before


def test_kick_before_run_returns_immediately(kvm):
    with cpl3_vm(kvm, "user_spin") as f:
        f.vcpu.kick()
        t0 = time.monotonic()
        assert f.vcpu.run().reason == ExitReason.INTR
        assert time.monotonic() - t0 < 0.5
        assert f.vcpu.get_regs().rip == f.sym("_start")   # no guest instruction ran


# ---------------------------------------------------------------- state accessors


def test_msr_cpuid_fpu_lapic_accessors(kvm):
    b = assemble("out_cpl0.S", defines=dict(PORT=PORT_OUT, VALUE=1))
    with FlatVm(kvm, b, irqchip=True) as f:
        v = f.vcpu
        v.set_msrs({x86.MSR_LSTAR: 0xFFFF_8000_0000_1000, x86.MSR_KERNEL_GS_BASE: 0x1234000})
        got = v.get_msrs([x86.MSR_LSTAR, x86.MSR_KERNEL_GS_BASE, x86.MSR_EFER])
        assert got[x86.MSR_LSTAR] == 0xFFFF_8000_0000_1000
        assert got[x86.MSR_KERNEL_GS_BASE] == 0x1234000
        assert got[x86.MSR_EFER] & x86.EFER_LMA
        assert any(e.function == 0x80000001 for e in v.get_cpuid())
        fpu = v.get_fpu()
        fpu.fcw = 0x37E                           # default 0x37f with invalid-op unmasked
        v.set_fpu(fpu)
        assert v.get_fpu().fcw == 0x37E
        # (kvm_pvm reports mxcsr 0 through KVM_GET_FPU and ignores it in
        # KVM_SET_FPU/KVM_SET_XSAVE, so mxcsr is not round-tripped here)
        assert len(bytes(v.get_xsave())) == ctypes.sizeof(K.KvmXsave)
        assert v.get_xcrs().nr_xcrs >= 1            # XCR0
        lapic = v.get_lapic()
        assert lapic.reg(LAPIC_ID) >> 24 == 0 and lapic.reg(LAPIC_VERSION) & 0xFF
        lapic.set_reg(LAPIC_TPR, 0x20)
        v.set_lapic(lapic)
        assert v.get_lapic().reg(LAPIC_TPR) == 0x20
        assert v.get_mp_state() == K.MpState.RUNNABLE
        ev = v.get_vcpu_events()
        v.set_vcpu_events(ev)
        # a rejected MSR write names the MSR
        with pytest.raises(KvmError) as ei:
            v.set_msrs({0xDEAD0000: 1})
        assert "0xdead0000" in str(ei.value)


# ---------------------------------------------------------------- x86 helpers


def test_descriptor_builders():
    # a flat 64-bit ring-0 code segment: the well-known 0x00af9b000000ffff
    assert x86.make_seg_descriptor(0, 0xFFFFF, x86.SEG_TYPE_CODE_XR_A, 0, long=True) \
        == 0x00AF9B000000FFFF
    assert x86.make_seg_descriptor(0, 0xFFFFF, x86.SEG_TYPE_DATA_RW_A, 3) == 0x00CFF3000000FFFF
    g = x86.make_gate(0xFFFF_8000_1234_5678, 0x08, 1, x86.SYS_TYPE_INT_GATE, 3)
    assert len(g) == x86.GATE_SIZE
    lo, hi = np.frombuffer(g, "<u8")
    assert int(lo) & 0xFFFF == 0x5678 and (int(lo) >> 48) == 0x1234 and int(hi) == 0xFFFF8000
    assert (int(lo) >> 16) & 0xFFFF == 0x08 and (int(lo) >> 32) & 7 == 1
    assert (int(lo) >> 45) & 3 == 3 and (int(lo) >> 47) & 1 == 1
    tss = x86.make_tss64(0x9000, [0xA000, 0xB000])
    assert len(tss) == x86.TSS64_SIZE
    assert int.from_bytes(tss[4:12], "little") == 0x9000
    assert int.from_bytes(tss[36:44], "little") == 0xA000           # IST1
    assert int.from_bytes(tss[102:104], "little") == x86.TSS64_SIZE   # no I/O bitmap
