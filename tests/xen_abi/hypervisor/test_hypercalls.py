"""Every Python-side hypercall through HypercallDispatcher on a fake domain whose
arguments live in guest memory behind real page tables, including hostile input.
(What the shim finishes itself is tested by the test guests: tests/xen_abi/shim/test_testguests*.py.)"""
from __future__ import annotations

import logging

import pytest

from pvfake import (KBASE, RAM_SIZE, SCRATCH, SHARED_INFO_GPA, FakeDomain, GNTTAB_GPA,
                    GNTTAB_MAX_FRAMES)
from pyvmm.xen_abi.abi import (
    DOMID_SELF,
    E820_RAM,
    GNTST_bad_domain,
    GNTST_bad_virt_addr,
    GNTST_general_error,
    GNTST_okay,
    HYPERVISOR_VIRT_START,
    MACH2PHYS_VIRT_END,
    MACH2PHYS_VIRT_START,
    PAGE_SIZE,
    PV_FEATURES_SUBMAP0,
    RUNSTATE_running,
    VCPU_INFO_PENDING_SEL,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_MASK,
    VCPU_INFO_UPCALL_PENDING,
    VGCF_IN_KERNEL,
    ConsoleIoCmd,
    E820Entry,
    EvtchnAllocUnbound,
    EvtchnBindInterdomain,
    EvtchnBindIpi,
    EvtchnBindVirq,
    EvtchnOp,
    EvtchnStatus,
    EvtchnStatusArg,
    GnttabGetVersion,
    GnttabOp,
    GnttabQuerySize,
    GnttabSetupTable,
    Hypercall,
    MemoryOp,
    PhysdevOp,
    SchedOp,
    SchedPoll,
    ShutdownReason,
    VcpuGuestContext,
    VcpuOp,
    VcpuRegisterVcpuInfo,
    VcpuRunstateInfo,
    VcpuSetPeriodicTimer,
    Virq,
    VmAssistType,
    XenErrno,
    XenFeat,
    XenMachphysMapping,
    XenMemoryMap,
    XenVer,
)
from pyvmm.xen_abi.hypervisor.hypercalls.console_io import CONSOLE_IO_MAX
from pyvmm.xen_abi.hypervisor.hypercalls.context import DomainShutdown, HypercallContext
from pyvmm.xen_abi.hypervisor.hypercalls.table import python_handlers
from pyvmm.xen_abi.memory.page_types import PGT_L1, PGT_TYPE_SHIFT, PGT_WRITABLE

E = XenErrno
WRITABLE_ONCE = PGT_WRITABLE << PGT_TYPE_SHIFT | 1
L1_TABLE = PGT_L1 << PGT_TYPE_SHIFT | 1
UNMAPPED = 0x0000_1234_5678_0000  # a canonical VA with nothing mapped
ARG = SCRATCH  # argument structure
BUF = SCRATCH + 0x1000  # a second buffer
FAR = SCRATCH + 0x3000


@pytest.fixture
def dom():
    d = FakeDomain(nr_vcpus=2)
    yield d
    d.close()


def put(d, struct, va, value):
    d.ctx().vm.write_struct(struct, va, value)


def get(d, struct, va):
    return d.ctx().vm.read_struct(struct, va)


# ---------------------------------------------------------------- generic

def test_unknown_and_unsupported_hypercalls(dom, caplog):
    caplog.set_level(logging.INFO, logger="pyvmm.xen_abi.hypervisor.hypercalls.dispatch")
    for nr in (Hypercall.mmu_update, Hypercall.xenpmu_op, Hypercall.hvm_op, 11, 47, 1000):
        assert dom.call(nr, 1, 2, 3) == -E.ENOSYS
    assert "hvm_op" in caplog.text and "#1000" in caplog.text
    caplog.clear()
    assert dom.call(Hypercall.hvm_op) == -E.ENOSYS
    assert "hvm_op" not in caplog.text, "each unsupported call is logged once"


def test_user_mode_callers_are_refused(dom):
    ctx = HypercallContext(0, dom.ctx().vm, dom.phys, in_kernel_mode=False)
    assert dom.dispatcher.dispatch(ctx, Hypercall.console_io, (0, 1, SCRATCH)) == -E.EPERM


def test_vmm_bug_is_contained(dom, monkeypatch):
    def boom(*a):
        raise RuntimeError("bug")
    monkeypatch.setattr(dom, "console_write", boom)
    dom.ctx().vm.write(BUF, b"x")
    assert dom.call(Hypercall.console_io, ConsoleIoCmd.write, 1, BUF) == -E.EINVAL


# ---------------------------------------------------------------- xen_version

def test_xen_version(dom):
    vm = dom.ctx().vm
    assert dom.call(Hypercall.xen_version, XenVer.extraversion, BUF) == 0
    assert vm.read(BUF, 16) == b".0-pyvmm".ljust(16, b"\0")
    assert dom.call(Hypercall.xen_version, XenVer.capabilities, BUF) == 0
    assert vm.read(BUF, 16) == b"xen-3.0-x86_64\0\0"
    assert dom.call(Hypercall.xen_version, XenVer.platform_parameters, BUF) == 0
    assert vm.read_u64(BUF) == HYPERVISOR_VIRT_START
    assert dom.call(Hypercall.xen_version, XenVer.pagesize, 0) == PAGE_SIZE
    assert dom.call(Hypercall.xen_version, XenVer.guest_handle, BUF) == 0
    assert vm.read(BUF, 16) == bytes(range(16))
    assert dom.call(Hypercall.xen_version, XenVer.compile_info, BUF) == 0
    assert vm.read(BUF, 6) == b"python"
    assert dom.call(Hypercall.xen_version, XenVer.changeset, BUF) == 0
    assert dom.call(Hypercall.xen_version, XenVer.commandline, BUF) == -E.EPERM
    assert dom.call(Hypercall.xen_version, 99, BUF) == -E.ENOSYS
    for cmd in (XenVer.extraversion, XenVer.capabilities, XenVer.get_features):
        assert dom.call(Hypercall.xen_version, cmd, UNMAPPED) == -E.EFAULT
        assert dom.call(Hypercall.xen_version, cmd, HYPERVISOR_VIRT_START) == -E.EFAULT


def test_get_features(dom):
    vm = dom.ctx().vm
    vm.write_u32(BUF, 0)
    vm.write_u32(BUF + 4, 0xDEAD)
    assert dom.call(Hypercall.xen_version, XenVer.get_features, BUF) == 0
    submap = vm.read_u32(BUF + 4)
    assert submap == PV_FEATURES_SUBMAP0
    assert submap >> XenFeat.mmu_pt_update_preserve_ad & 1 and submap >> XenFeat.gnttab_map_avail_bits & 1
    assert not submap >> XenFeat.auto_translated_physmap & 1
    dom.call(Hypercall.vm_assist, 0, VmAssistType.PAE_EXTENDED_CR3)
    dom.call(Hypercall.xen_version, XenVer.get_features, BUF)
    assert vm.read_u32(BUF + 4) >> XenFeat.pae_pgdir_above_4gb & 1
    vm.write_u32(BUF, 1)
    assert dom.call(Hypercall.xen_version, XenVer.get_features, BUF) == -E.EINVAL


# ---------------------------------------------------------------- memory_op

def test_memory_map(dom):
    vm = dom.ctx().vm
    put(dom, XenMemoryMap, ARG, {"nr_entries": 128, "buffer": BUF})
    assert dom.call(Hypercall.memory_op, MemoryOp.memory_map, ARG) == 0
    assert get(dom, XenMemoryMap, ARG).nr_entries == 1
    e = vm.read_struct(E820Entry, BUF)
    assert (e.addr, e.size, e.type) == (0, RAM_SIZE, E820_RAM)
    # a zero-sized buffer gets zero entries, like Xen's min()
    vm.write(BUF, bytes(20))
    put(dom, XenMemoryMap, ARG, {"nr_entries": 0, "buffer": BUF})
    assert dom.call(Hypercall.memory_op, MemoryOp.memory_map, ARG) == 0
    assert get(dom, XenMemoryMap, ARG).nr_entries == 0 and vm.read(BUF, 20) == bytes(20)
    put(dom, XenMemoryMap, ARG, {"nr_entries": 4, "buffer": UNMAPPED})
    assert dom.call(Hypercall.memory_op, MemoryOp.memory_map, ARG) == -E.EFAULT
    assert dom.call(Hypercall.memory_op, MemoryOp.memory_map, UNMAPPED) == -E.EFAULT


def test_machphys_and_reservations(dom):
    vm = dom.ctx().vm
    assert dom.call(Hypercall.memory_op, MemoryOp.machphys_mapping, ARG) == 0
    m = get(dom, XenMachphysMapping, ARG)
    assert (m.v_start, m.v_end) == (MACH2PHYS_VIRT_START, MACH2PHYS_VIRT_END)
    assert m.max_mfn == RAM_SIZE // PAGE_SIZE - 1
    assert dom.call(Hypercall.memory_op, MemoryOp.maximum_ram_page, 0) == RAM_SIZE // PAGE_SIZE
    vm.write(BUF, DOMID_SELF.to_bytes(2, "little"))
    assert dom.call(Hypercall.memory_op, MemoryOp.current_reservation, BUF) == RAM_SIZE // PAGE_SIZE
    assert dom.call(Hypercall.memory_op, MemoryOp.maximum_reservation, BUF) == RAM_SIZE // PAGE_SIZE
    vm.write(BUF, (0).to_bytes(2, "little"))
    assert dom.call(Hypercall.memory_op, MemoryOp.current_reservation, BUF) == -E.EPERM
    vm.write(BUF, (42).to_bytes(2, "little"))
    assert dom.call(Hypercall.memory_op, MemoryOp.maximum_reservation, BUF) == -E.ESRCH
    assert dom.call(Hypercall.memory_op, MemoryOp.add_to_physmap, ARG) == -E.EACCES
    for op in (MemoryOp.increase_reservation, MemoryOp.decrease_reservation,
               MemoryOp.populate_physmap, MemoryOp.exchange):
        assert dom.call(Hypercall.memory_op, op, ARG) == -E.ENOSYS


# ---------------------------------------------------------------- vcpu_op

def test_vcpu_is_up_and_nonexistent(dom):
    assert dom.call(Hypercall.vcpu_op, VcpuOp.is_up, 0, 0) == 1
    assert dom.call(Hypercall.vcpu_op, VcpuOp.is_up, 1, 0) == 0
    for v in (2, 4095, (1 << 32) - 1):
        assert dom.call(Hypercall.vcpu_op, VcpuOp.is_up, v, 0) == -E.ENOENT
    put(dom, VcpuSetPeriodicTimer, ARG, {"period_ns": 999_999})
    assert dom.call(Hypercall.vcpu_op, VcpuOp.set_periodic_timer, 0, ARG) == -E.EINVAL
    put(dom, VcpuSetPeriodicTimer, ARG, {"period_ns": 10_000_000})
    assert dom.call(Hypercall.vcpu_op, VcpuOp.set_periodic_timer, 0, ARG) == -E.ENOSYS, \
        "no periodic timer: the shim has the singleshot one"
    assert dom.call(Hypercall.vcpu_op, VcpuOp.get_physid, 0, ARG) == -E.EINVAL, "dom0 only"
    assert dom.call(Hypercall.vcpu_op, VcpuOp.send_nmi, 0, ARG) == -E.ENOSYS, \
        "send_nmi is the shim's (shim.c send_nmi); Python never sees it"


def test_runstate_area(dom):
    vm = dom.ctx().vm
    vm.write_u64(ARG, BUF)
    assert dom.call(Hypercall.vcpu_op, VcpuOp.register_runstate_memory_area, 0, ARG) == 0
    assert dom.dispatcher.vcpus[0].runstate_va == BUF
    assert get(dom, VcpuRunstateInfo, BUF).state == RUNSTATE_running
    assert dom.call(Hypercall.vcpu_op, VcpuOp.get_runstate_info, 0, FAR) == 0
    got, area = get(dom, VcpuRunstateInfo, FAR), get(dom, VcpuRunstateInfo, BUF)
    # Xen's vcpu_runstate_get adds the time in the current state up to now
    assert (got.state, got.state_entry_time) == (area.state, area.state_entry_time)
    assert got.time[RUNSTATE_running] >= area.time[RUNSTATE_running]
    assert list(got.time)[1:] == list(area.time)[1:]
    # an unmapped area is accepted (Xen checks lazily) and simply not written
    vm.write_u64(ARG, UNMAPPED)
    assert dom.call(Hypercall.vcpu_op, VcpuOp.register_runstate_memory_area, 0, ARG) == 0
    vm.write_u64(ARG, 0x0000_8000_0000_0000)  # non-canonical
    assert dom.call(Hypercall.vcpu_op, VcpuOp.register_runstate_memory_area, 0, ARG) == -E.EFAULT
    assert dom.call(Hypercall.vcpu_op, VcpuOp.register_runstate_memory_area, 0, UNMAPPED) == -E.EFAULT


def test_register_vcpu_info(dom):
    phys = dom.phys
    old = SHARED_INFO_GPA
    phys.write_u8(old + VCPU_INFO_UPCALL_MASK, 1)
    phys.write_u64(old + 32 + 8, 0x1234)  # something in the time area to see it copied
    mfn, off = 0x700, 0x40
    new = mfn * PAGE_SIZE + off
    put(dom, VcpuRegisterVcpuInfo, ARG, {"mfn": mfn, "offset": off, "rsvd": 0})
    assert dom.call(Hypercall.vcpu_op, VcpuOp.register_vcpu_info, 0, ARG) == 0
    assert phys.read_u64(new + 32 + 8) == 0x1234, "old contents copied"
    assert phys.read_u8(new + VCPU_INFO_UPCALL_MASK) == 1
    assert phys.read_u64(new + VCPU_INFO_PENDING_SEL) == (1 << 64) - 1
    assert phys.read_u8(new + VCPU_INFO_UPCALL_PENDING) == 1
    assert dom.moved == [(0, new)]
    assert dom.evtchn.vcpu_info_gpa(0) == new
    # event delivery now targets the new place
    phys.write_u64(new + VCPU_INFO_PENDING_SEL, 0)
    phys.write_u8(new + VCPU_INFO_UPCALL_PENDING, 0)
    p = dom.evtchn.bind_ipi(0)
    assert dom.evtchn.set_pending(p) == 0
    assert phys.read_u64(new + VCPU_INFO_PENDING_SEL) == 1 << (p // 64)
    assert phys.read_u64(old + VCPU_INFO_PENDING_SEL) == 0
    # second registration
    assert dom.call(Hypercall.vcpu_op, VcpuOp.register_vcpu_info, 0, ARG) == -E.EBUSY
    # pyvmm and the shim write the page from now on: held writable, once
    assert dom.page_types.word(mfn) == WRITABLE_ONCE


def test_register_vcpu_info_onto_a_page_table(dom):
    """Xen's map_vcpu_info: get_page_type(PGT_writable_page) fails, -EINVAL."""
    mfn = 0x700
    dom.types.set(mfn, L1_TABLE)
    dom.ram.write(mfn * PAGE_SIZE, bytes(PAGE_SIZE))
    put(dom, VcpuRegisterVcpuInfo, ARG, {"mfn": mfn, "offset": 0, "rsvd": 0})
    assert dom.call(Hypercall.vcpu_op, VcpuOp.register_vcpu_info, 0, ARG) == -E.EINVAL
    assert dom.page_types.word(mfn) == L1_TABLE
    assert dom.ram.read(mfn * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE), "nothing written"
    assert dom.moved == [] and not dom.dispatcher.vcpus[0].vcpu_info_registered


@pytest.mark.parametrize("mfn,off", [(0x700, PAGE_SIZE - VCPU_INFO_SIZE + 8), (0x700, 4),
                                     (RAM_SIZE // PAGE_SIZE, 0), (GNTTAB_GPA >> 12, 0),
                                     ((1 << 64) - 1, 0)])
def test_register_vcpu_info_rejects(dom, mfn, off):
    put(dom, VcpuRegisterVcpuInfo, ARG, {"mfn": mfn, "offset": off, "rsvd": 0})
    assert dom.call(Hypercall.vcpu_op, VcpuOp.register_vcpu_info, 1, ARG) == -E.EINVAL
    assert dom.moved == [] and not dom.dispatcher.vcpus[1].vcpu_info_registered


def test_time_area_frames_are_held_writable_while_registered(dom):
    """pyvmm writes the time area at the frames its address mapped to when it
    was registered: they stay writable until the area moves."""
    first, second = SCRATCH + 0x2000 - 16, SCRATCH + 0x5000   # the first spans two frames
    pt = dom.page_types

    def frames_of(va):      # the fake kernel maps KBASE + x at x
        return {(va - KBASE) >> 12, (va + 31 - KBASE) >> 12}

    def register(va):
        dom.ctx().vm.write_u64(ARG, va)
        return dom.call(Hypercall.vcpu_op, VcpuOp.register_vcpu_time_memory_area, 0, ARG)

    assert register(first) == 0
    assert len(frames_of(first)) == 2
    assert all(pt.word(f) == WRITABLE_ONCE for f in frames_of(first))
    assert register(second) == 0
    assert not any(pt.in_use(f) for f in frames_of(first))
    assert all(pt.word(f) == WRITABLE_ONCE for f in frames_of(second))
    assert register(0) == 0
    assert not any(pt.in_use(f) for f in frames_of(second))
    # an area on a page table: kept by nobody, as a write Xen cannot do
    (frame,) = frames_of(second)
    dom.types.set(frame, L1_TABLE)
    assert register(second) == 0
    assert pt.word(frame) == L1_TABLE and dom.dispatcher.vcpus[0].time_area_frames == ()


def _guest_context(**over):
    c = {"fpu_ctxt": bytes(512), "flags": VGCF_IN_KERNEL,
         "user_regs": {k: 0 for k in ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9",
                                      "r8", "rax", "rcx", "rdx", "rsi", "rdi", "error_code",
                                      "entry_vector", "rip", "cs", "saved_upcall_mask", "rflags",
                                      "rsp", "ss", "es", "ds", "fs", "gs")},
         "trap_ctxt": [{"vector": 0, "flags": 0, "cs": 0, "address": 0}] * 256,
         "ldt_base": 0, "ldt_ents": 0, "gdt_frames": [0x10] + [0] * 15, "gdt_ents": 16,
         "kernel_ss": 0xE02B, "kernel_sp": KBASE + 0x8000, "ctrlreg": [0, 0, 0, 0x100000, 0, 0, 0, 0],
         "debugreg": [0] * 8, "event_callback_eip": KBASE + 0x100, "failsafe_callback_eip": KBASE + 0x200,
         "syscall_callback_eip": KBASE + 0x300, "vm_assist": 0, "fs_base": 0, "gs_base_kernel": 0,
         "gs_base_user": 0}
    c["user_regs"]["rip"] = KBASE + 0x1000
    for k, v in over.items():
        if k == "rip":
            c["user_regs"]["rip"] = v
        else:
            c[k] = v
    return c


def test_vcpu_initialise_and_up_down(dom):
    assert dom.call(Hypercall.vcpu_op, VcpuOp.up, 1, 0) == -E.EINVAL  # not initialised yet
    put(dom, VcpuGuestContext, ARG, _guest_context())
    assert dom.call(Hypercall.vcpu_op, VcpuOp.initialise, 1, ARG) == 0
    assert dom.initialised[1].user_regs.rip == KBASE + 0x1000
    assert dom.call(Hypercall.vcpu_op, VcpuOp.initialise, 1, ARG) == -E.EEXIST
    assert dom.call(Hypercall.vcpu_op, VcpuOp.initialise, 0, ARG) == -E.EEXIST
    assert dom.call(Hypercall.vcpu_op, VcpuOp.up, 1, 0) == 0
    assert dom.ups == [1] and dom.call(Hypercall.vcpu_op, VcpuOp.is_up, 1, 0) == 1
    assert dom.call(Hypercall.vcpu_op, VcpuOp.down, 1, 0) == 0
    assert dom.downs == [1] and dom.call(Hypercall.vcpu_op, VcpuOp.is_up, 1, 0) == 0


@pytest.mark.parametrize("over", [{"rip": 0x0000_8000_0000_0000}, {"gdt_ents": 8000},
                                  {"flags": 0},        # user mode without a user L4 (ctrlreg[1])
                                  {"trap_ctxt": [{"vector": 14, "flags": 0, "cs": 0,
                                                  "address": 0x0000_8000_0000_0000}] * 256},
                                  {"ctrlreg": [0, 0, 0, RAM_SIZE + 0x1000, 0, 0, 0, 0]},
                                  {"ldt_ents": 5, "ldt_base": KBASE + 3},
                                  {"gdt_frames": [RAM_SIZE] + [0] * 15}])
def test_vcpu_initialise_rejects(dom, over):
    put(dom, VcpuGuestContext, ARG, _guest_context(**over))
    assert dom.call(Hypercall.vcpu_op, VcpuOp.initialise, 1, ARG) == -E.EINVAL
    assert dom.initialised == {}
    assert dom.call(Hypercall.vcpu_op, VcpuOp.initialise, 1, UNMAPPED) == -E.EFAULT


# ---------------------------------------------------------------- sched_op

def test_sched_poll(dom):
    vm = dom.ctx().vm
    p = dom.evtchn.bind_ipi(0)
    vm.write(BUF, p.to_bytes(4, "little"))
    put(dom, SchedPoll, ARG, {"ports": BUF, "nr_ports": 1, "timeout": 0})
    assert dom.call(Hypercall.sched_op, SchedOp.poll, ARG) == 0 and dom.yields == 1
    dom.evtchn.set_pending(p)
    assert dom.call(Hypercall.sched_op, SchedOp.poll, ARG) == 0 and dom.yields == 1, "pending: no wait"
    put(dom, SchedPoll, ARG, {"ports": BUF, "nr_ports": 1 << 31, "timeout": 0})
    assert dom.call(Hypercall.sched_op, SchedOp.poll, ARG) == -E.EINVAL
    put(dom, SchedPoll, ARG, {"ports": UNMAPPED, "nr_ports": 2, "timeout": 0})
    assert dom.call(Hypercall.sched_op, SchedOp.poll, ARG) == -E.EFAULT
    vm.write(BUF, (70000).to_bytes(4, "little"))
    put(dom, SchedPoll, ARG, {"ports": BUF, "nr_ports": 1, "timeout": 0})
    assert dom.call(Hypercall.sched_op, SchedOp.poll, ARG) == -E.EINVAL
    assert dom.call(Hypercall.sched_op, SchedOp.watchdog, ARG) == -E.ENOSYS


def test_shutdown(dom):
    vm = dom.ctx().vm
    vm.write_u32(ARG, ShutdownReason.reboot)
    with pytest.raises(DomainShutdown) as e:
        dom.call(Hypercall.sched_op, SchedOp.shutdown, ARG)
    assert e.value.reason == ShutdownReason.reboot
    assert dom.call(Hypercall.sched_op, SchedOp.shutdown, UNMAPPED) == -E.EFAULT
    vm.write_u32(ARG, 99)
    with pytest.raises(DomainShutdown) as e:
        dom.call(Hypercall.sched_op, SchedOp.shutdown, ARG)
    assert e.value.reason == ShutdownReason.crash
    # remote_shutdown: self only
    vm.write(ARG, (0).to_bytes(2, "little") + bytes(2) + (0).to_bytes(4, "little"))
    assert dom.call(Hypercall.sched_op, SchedOp.remote_shutdown, ARG) == -E.EPERM
    vm.write(ARG, DOMID_SELF.to_bytes(2, "little") + bytes(2) + (0).to_bytes(4, "little"))
    with pytest.raises(DomainShutdown) as e:
        dom.call(Hypercall.sched_op, SchedOp.remote_shutdown, ARG)
    assert e.value.reason == ShutdownReason.poweroff
    # a preset shutdown_code wins, as in Xen
    vm.write_u32(ARG, ShutdownReason.crash)
    assert dom.call(Hypercall.sched_op, SchedOp.shutdown_code, ARG) == 0
    vm.write_u32(ARG, ShutdownReason.poweroff)
    with pytest.raises(DomainShutdown) as e:
        dom.call(Hypercall.sched_op, SchedOp.shutdown, ARG)
    assert e.value.reason == ShutdownReason.crash


# ---------------------------------------------------------------- console_io

def test_console_io(dom):
    vm = dom.ctx().vm
    vm.write(BUF + PAGE_SIZE - 3, b"hello, world")  # crosses a page
    assert dom.call(Hypercall.console_io, ConsoleIoCmd.write, 12, BUF + PAGE_SIZE - 3) == 0
    assert bytes(dom.console) == b"hello, world"
    assert dom.call(Hypercall.console_io, ConsoleIoCmd.write, 0, UNMAPPED) == 0
    assert dom.call(Hypercall.console_io, ConsoleIoCmd.write, 8, UNMAPPED) == -E.EFAULT
    assert dom.call(Hypercall.console_io, ConsoleIoCmd.write, CONSOLE_IO_MAX + 1, BUF) == -E.EINVAL
    assert dom.call(Hypercall.console_io, ConsoleIoCmd.write, (1 << 32) - 1, BUF) == -E.EINVAL
    assert dom.call(Hypercall.console_io, ConsoleIoCmd.read, 16, BUF) == 0
    assert dom.call(Hypercall.console_io, 7, 16, BUF) == -E.ENOSYS
    assert bytes(dom.console) == b"hello, world"


# ---------------------------------------------------------------- event_channel_op

def test_evtchn_ops_through_guest_memory(dom):
    ev = dom.evtchn
    put(dom, EvtchnBindVirq, ARG, {"virq": Virq.TIMER, "vcpu": 1, "port": 0})
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.bind_virq, ARG) == 0
    tport = get(dom, EvtchnBindVirq, ARG).port
    assert tport > 0 and ev.ports[tport].vcpu == 1
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.bind_virq, ARG) == -E.EEXIST
    put(dom, EvtchnAllocUnbound, ARG, {"dom": DOMID_SELF, "remote_dom": 0, "port": 0})
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.alloc_unbound, ARG) == 0
    uport = get(dom, EvtchnAllocUnbound, ARG).port
    notes = []
    ev.backend_bind(uport, lambda: notes.append(uport))
    dom.ctx().vm.write_u32(ARG, uport)
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.send, ARG) == 0
    assert notes == [uport]
    put(dom, EvtchnStatusArg, ARG, {"dom": DOMID_SELF, "port": uport, "status": 0, "vcpu": 0, "u": bytes(8)})
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.status, ARG) == 0
    s = get(dom, EvtchnStatusArg, ARG)
    assert s.status == EvtchnStatus.interdomain and s.u[:2] == b"\0\0"
    put(dom, EvtchnStatusArg, ARG, {"dom": DOMID_SELF, "port": tport, "status": 0, "vcpu": 0, "u": bytes(8)})
    dom.call(Hypercall.event_channel_op, EvtchnOp.status, ARG)
    s = get(dom, EvtchnStatusArg, ARG)
    assert (s.status, s.vcpu, s.u[:4]) == (EvtchnStatus.virq, 1, bytes(4))
    be = ev.backend_alloc_unbound(lambda: None)
    put(dom, EvtchnBindInterdomain, ARG, {"remote_dom": 0, "remote_port": be.port, "local_port": 0})
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.bind_interdomain, ARG) == 0
    assert get(dom, EvtchnBindInterdomain, ARG).local_port == be.guest_port
    put(dom, EvtchnBindIpi, ARG, {"vcpu": 0, "port": 0})
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.bind_ipi, ARG) == 0
    ipi = get(dom, EvtchnBindIpi, ARG).port
    dom.ctx().vm.write(ARG, ipi.to_bytes(4, "little") + (1).to_bytes(4, "little"))
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.bind_vcpu, ARG) == -E.EINVAL  # IPIs stay
    dom.ctx().vm.write_u32(ARG, ipi)
    ev.mask(ipi)
    ev.set_pending(ipi)
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.unmask, ARG) == 0
    assert not ev.is_masked(ipi)
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.close, ARG) == 0
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.close, ARG) == -E.EINVAL
    # the FIFO ABI's ops before init_control (test_evtchn_fifo.py for the rest)
    dom.ctx().vm.write(ARG, (1).to_bytes(4, "little") + (3).to_bytes(4, "little"))
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.set_priority, ARG) == -E.ENOSYS
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.expand_array, ARG) == -E.EOPNOTSUPP
    dom.ctx().vm.write(ARG, DOMID_SELF.to_bytes(2, "little"))
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.reset, ARG) == 0
    assert all(p.state == EvtchnStatus.closed for p in ev.ports)


def test_evtchn_hostile_input(dom):
    vm = dom.ctx().vm
    for port in (4096, 1 << 31, (1 << 32) - 1):
        vm.write_u32(ARG, port)
        for op in (EvtchnOp.send, EvtchnOp.close, EvtchnOp.unmask):
            assert dom.call(Hypercall.event_channel_op, op, ARG) == -E.EINVAL
    for op in EvtchnOp:
        if op in (EvtchnOp.init_control, EvtchnOp.expand_array, EvtchnOp.set_priority, EvtchnOp.bind_pirq):
            continue
        assert dom.call(Hypercall.event_channel_op, op, UNMAPPED) == -E.EFAULT, op
    put(dom, EvtchnBindVirq, ARG, {"virq": 1 << 31, "vcpu": 0, "port": 0})
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.bind_virq, ARG) == -E.EINVAL
    put(dom, EvtchnBindVirq, ARG, {"virq": Virq.TIMER, "vcpu": 1 << 31, "port": 0})
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.bind_virq, ARG) == -E.ENOENT
    put(dom, EvtchnAllocUnbound, ARG, {"dom": 300, "remote_dom": 0, "port": 0})
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.alloc_unbound, ARG) == -E.ESRCH
    # the result cannot be written back (read-only page): the new port is released again
    ro = 0x0000_5000_0000_0000
    dom.pt.map(ro, 0x90_0000, PAGE_SIZE, rw=False)
    dom.phys.write(0x90_0000, EvtchnBindIpi.build({"vcpu": 0, "port": 0}))
    assert dom.call(Hypercall.event_channel_op, EvtchnOp.bind_ipi, ro) == -E.EFAULT
    assert all(p.state == EvtchnStatus.closed for p in dom.evtchn.ports)


# ---------------------------------------------------------------- grant_table_op

def test_grant_setup_query_version(dom):
    vm = dom.ctx().vm
    put(dom, GnttabQuerySize, ARG, {"dom": DOMID_SELF, "nr_frames": 0, "max_nr_frames": 0, "status": 5})
    assert dom.call(Hypercall.grant_table_op, GnttabOp.query_size, ARG, 1) == 0
    q = get(dom, GnttabQuerySize, ARG)
    assert (q.nr_frames, q.max_nr_frames, q.status) == (1, GNTTAB_MAX_FRAMES, GNTST_okay)
    put(dom, GnttabSetupTable, ARG, {"dom": DOMID_SELF, "nr_frames": 3, "status": 9, "frame_list": BUF})
    assert dom.call(Hypercall.grant_table_op, GnttabOp.setup_table, ARG, 1) == 0
    assert get(dom, GnttabSetupTable, ARG).status == GNTST_okay
    base = GNTTAB_GPA >> 12
    assert [vm.read_u64(BUF + 8 * i) for i in range(3)] == [base, base + 1, base + 2]
    put(dom, GnttabSetupTable, ARG, {"dom": DOMID_SELF, "nr_frames": GNTTAB_MAX_FRAMES + 1,
                                     "status": 0, "frame_list": BUF})
    assert dom.call(Hypercall.grant_table_op, GnttabOp.setup_table, ARG, 1) == 0
    assert get(dom, GnttabSetupTable, ARG).status == GNTST_general_error
    put(dom, GnttabSetupTable, ARG, {"dom": DOMID_SELF, "nr_frames": 2, "status": 0, "frame_list": UNMAPPED})
    assert dom.call(Hypercall.grant_table_op, GnttabOp.setup_table, ARG, 1) == 0
    assert get(dom, GnttabSetupTable, ARG).status == GNTST_bad_virt_addr
    put(dom, GnttabSetupTable, ARG, {"dom": 77, "nr_frames": 1, "status": 0, "frame_list": BUF})
    dom.call(Hypercall.grant_table_op, GnttabOp.setup_table, ARG, 1)
    assert get(dom, GnttabSetupTable, ARG).status == GNTST_bad_domain
    assert dom.call(Hypercall.grant_table_op, GnttabOp.setup_table, UNMAPPED, 1) == -E.EFAULT
    for count in (0, 2, 1 << 31, (1 << 32) - 1):
        assert dom.call(Hypercall.grant_table_op, GnttabOp.setup_table, ARG, count) == -E.EINVAL
    vm.write_u32(ARG, 2)
    assert dom.call(Hypercall.grant_table_op, GnttabOp.set_version, ARG, 1) == 0
    assert vm.read_u32(ARG) == 2
    put(dom, GnttabGetVersion, ARG, {"dom": DOMID_SELF, "version": 0})
    assert dom.call(Hypercall.grant_table_op, GnttabOp.get_version, ARG, 1) == 0
    assert get(dom, GnttabGetVersion, ARG).version == 2
    vm.write_u32(ARG, 7)
    assert dom.call(Hypercall.grant_table_op, GnttabOp.set_version, ARG, 1) == -E.EINVAL
    assert vm.read_u32(ARG) == 2, "the current version is written back"
    vm.write_u32(ARG, 1)
    assert dom.call(Hypercall.grant_table_op, GnttabOp.set_version, ARG, 1) == 0
    put(dom, GnttabGetVersion, ARG, {"dom": DOMID_SELF, "version": 0})
    assert dom.call(Hypercall.grant_table_op, GnttabOp.get_version, ARG, 1) == 0
    assert get(dom, GnttabGetVersion, ARG).version == 1
    assert dom.call(Hypercall.grant_table_op, GnttabOp.transfer, ARG, 1) == -E.ENOSYS


# ---------------------------------------------------------------- physdev, vm_assist

def test_physdev(dom):
    vm = dom.ctx().vm
    vm.write_u32(ARG, 1)
    assert dom.call(Hypercall.physdev_op, PhysdevOp.set_iopl, ARG) == 0
    vm.write_u32(ARG, 4)
    assert dom.call(Hypercall.physdev_op, PhysdevOp.set_iopl, ARG) == -E.EINVAL
    assert dom.call(Hypercall.physdev_op, PhysdevOp.set_iopl, UNMAPPED) == -E.EFAULT
    assert dom.call(Hypercall.physdev_op, PhysdevOp.pirq_eoi_gmfn_v2, ARG) == -E.ENOSYS
    assert dom.call(Hypercall.physdev_op, PhysdevOp.map_pirq, ARG) == -E.ENOSYS


def test_vm_assist(dom):
    d = dom.dispatcher
    for kind in (VmAssistType.WRITABLE_PAGETABLES, VmAssistType.FOUR_GB_SEGMENTS,
                 VmAssistType.PAE_EXTENDED_CR3, VmAssistType.RUNSTATE_UPDATE_FLAG):
        assert dom.call(Hypercall.vm_assist, 0, kind) == 0
        assert d.vm_assist >> kind & 1
    assert dom.call(Hypercall.vm_assist, 1, VmAssistType.FOUR_GB_SEGMENTS) == 0
    assert not d.vm_assist >> VmAssistType.FOUR_GB_SEGMENTS & 1
    for kind in (VmAssistType.M2P_STRICT, 63, 64, (1 << 32) - 1):
        assert dom.call(Hypercall.vm_assist, 0, kind) == -E.EINVAL
    assert dom.call(Hypercall.vm_assist, 2, VmAssistType.WRITABLE_PAGETABLES) == -E.ENOSYS


def test_random_garbage_never_escapes(dom, caplog):
    """Fuzz: random numbers and pointers into mapped/unmapped/hypervisor memory
    for every handled hypercall return an int; only DomainShutdown may raise."""
    import random
    rnd = random.Random(1234)
    vm = dom.ctx().vm
    vm.write(SCRATCH, bytes(rnd.getrandbits(8) for _ in range(0x4000)))
    ptrs = [SCRATCH, SCRATCH + 0xFF8, UNMAPPED, HYPERVISOR_VIRT_START, 0, (1 << 64) - 8,
            0x0000_8000_0000_0000]
    nrs = sorted(python_handlers())
    for i in range(3000):
        nr = rnd.choice(nrs)
        args = [rnd.choice([rnd.randrange(16), rnd.getrandbits(64), rnd.choice(ptrs)]) for _ in range(5)]
        if i % 3 == 0:  # keep the random scratch contents random
            vm.write(SCRATCH + rnd.randrange(0x3000), rnd.getrandbits(64).to_bytes(8, "little"))
        try:
            rc = dom.call(nr, *args)
        except DomainShutdown:
            continue
        assert isinstance(rc, int)
    bugs = [r for r in caplog.records if "inside the VMM" in r.getMessage()]
    assert not bugs, bugs[0].exc_text if bugs else ""

