"""vcpu_op, the sub-ops the shim passes on: is_up, the runstate area,
register_vcpu_info, set_periodic_timer, initialise/up/down, the vcpu_time
area, and what Xen 4.17's arch_do_vcpu_op answers a PV domU for
get_physid (-EINVAL: dom0's pinned vCPUs only).  The shim answers -ENOENT
for vCPUs that do not exist (shim.c hypercall), the caller's own
singleshot timer and stop_periodic_timer (events.c), and send_nmi (shim.c
send_nmi: the virtual NMI is the shim's alone)."""
from __future__ import annotations

from pyvmm.xen_abi import abi
from pyvmm.xen_abi.abi import (
    PAGE_SHIFT,
    PAGE_SIZE,
    RUNSTATE_offline,
    RUNSTATE_running,
    VCPU_INFO_PENDING_SEL,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_MASK,
    VCPU_INFO_UPCALL_PENDING,
    XEN_RUNSTATE_UPDATE,
    Hypercall,
    VcpuGuestContext,
    VcpuOp,
    VcpuRegisterRunstateMemoryArea,
    VcpuRegisterVcpuInfo,
    VcpuRunstateInfo,
    VcpuSetPeriodicTimer,
    VmAssistType,
    XenErrno,
)
from pyvmm.xen_abi.hypervisor.hypercalls.context import U32, U64, PvVcpuState, addr_ok, fail
from pyvmm.xen_abi.memory.guest_va import GuestPageFault, is_canonical
from pyvmm.xen_abi.memory.page_types import NotWritable, type_name

MAX_GDT_ENTRIES = abi.FIRST_RESERVED_GDT_ENTRY
MAX_LDT_ENTRIES = 8192
VCPU_TIME_INFO_SIZE = abi.VcpuTimeInfo.sizeof()


def vcpu_op(dispatcher, ctx, cmd, vcpuid, arg, *_):
    cmd &= U32
    vcpuid &= U32
    d = dispatcher.domain
    st = dispatcher.vcpu_state(vcpuid)  # -ENOENT for vCPUs that do not exist
    current = vcpuid == ctx.vcpu_id
    if cmd == VcpuOp.is_up:
        return 1 if st.online else 0
    if cmd == VcpuOp.register_runstate_memory_area:
        area = ctx.vm.read_struct(VcpuRegisterRunstateMemoryArea, arg)
        if not addr_ok(area.addr):   # Xen's guest_handle_okay
            fail(XenErrno.EFAULT, "runstate area address")
        st.runstate_va = area.addr
        d.runstate_area_moved(st.vcpu_id, area.addr)
        if current:
            _write_runstate(dispatcher, ctx, st)
        return 0
    if cmd == VcpuOp.get_runstate_info:
        # Xen's vcpu_runstate_get: the current state's time includes now
        ctx.vm.write_struct(VcpuRunstateInfo, arg, _runstate_value(d, st))
        return 0
    if cmd == VcpuOp.register_vcpu_info:
        return _register_vcpu_info(dispatcher, ctx, st, arg, current)
    if cmd == VcpuOp.set_periodic_timer:
        p = ctx.vm.read_struct(VcpuSetPeriodicTimer, arg)
        if p.period_ns < 1_000_000:
            fail(XenErrno.EINVAL, "period below 1 ms")
        return dispatcher.unsupported(Hypercall.vcpu_op, cmd)  # the shim has the singleshot timer only
    if cmd in (VcpuOp.set_singleshot_timer, VcpuOp.stop_singleshot_timer):
        return -XenErrno.EINVAL   # Xen: v != current (the shim answers the caller's own)
    if cmd == VcpuOp.initialise:
        return _vcpu_initialise(dispatcher, ctx, st, arg)
    if cmd == VcpuOp.up:
        if not st.initialised:
            fail(XenErrno.EINVAL, "vCPU not initialised")
        if not st.online:
            st.online = True
            _runstate_switch(dispatcher, None, st, RUNSTATE_running)
            d.vcpu_up(vcpuid)
        return 0
    if cmd == VcpuOp.down:
        if st.online:
            st.online = False
            _runstate_switch(dispatcher, ctx if current else None, st, RUNSTATE_offline)
            d.vcpu_down(vcpuid)
        return 0
    if cmd == VcpuOp.register_vcpu_time_memory_area:
        return _register_time_area(dispatcher, ctx, st, arg)
    if cmd == VcpuOp.get_physid:
        return -XenErrno.EINVAL      # is_hwdom_pinned_vcpu(): never for a domU
    return dispatcher.unsupported(Hypercall.vcpu_op, cmd)


def _register_time_area(dispatcher, ctx, st: PvVcpuState, arg) -> int:
    """Xen's arch_do_vcpu_op: the guest handle (8 bytes) must be readable
    and start in the guest's half (-EFAULT); 0 stops the updates.  Then
    force_update_vcpu_system_time: a copy of vcpu_info's time record, best
    effort, and again wherever vcpu_info's is rewritten.  The area is kept
    as the guest-physical pieces its address maps to now, and their frames
    held writable while it is (Xen writes through the address each time;
    pyvmm, writing the frames later, must keep them from becoming page
    tables meanwhile)."""
    va = ctx.vm.read_u64(arg)
    if not addr_ok(va):
        fail(XenErrno.EFAULT, f"time area at {va:#x}")
    st.time_area_va = va
    d = dispatcher.domain
    pieces, held = [], ()
    if va:
        try:
            off = 0
            while off < VCPU_TIME_INFO_SIZE:
                n = min(VCPU_TIME_INFO_SIZE - off, PAGE_SIZE - ((va + off) & (PAGE_SIZE - 1)))
                pieces.append((ctx.vm.translate(va + off, write=True), n))
                off += n
            held = d.page_types.take_all_writable(gpa >> PAGE_SHIFT for gpa, _ in pieces)
        except (GuestPageFault, NotWritable):
            pieces = []      # Xen's copy fails silently; so do later updates
    for mfn in st.time_area_frames:
        d.page_types.release_writable(mfn, f"vCPU {st.vcpu_id}'s time area moved")
    st.time_area_frames = held
    d.vcpu_time_area_moved(st.vcpu_id, pieces)     # the clock writes it now and later
    return 0


def _runstate_switch(dispatcher, ctx, st: PvVcpuState, new_state: int) -> None:
    now = dispatcher.domain.now_ns()
    old = st.runstate_state
    if 0 <= old < 4:
        st.runstate_time[old] += max(0, now - st.runstate_entry_ns)
    st.runstate_state, st.runstate_entry_ns = new_state, now
    if ctx is not None and ctx.vcpu_id == st.vcpu_id:
        _write_runstate(dispatcher, ctx, st)


def _runstate_value(d, st: PvVcpuState, entry_flag: int = 0) -> dict:
    entry, times = d.runstate_times(st)
    return {"state": st.runstate_state, "state_entry_time": entry | entry_flag, "time": times}


def _write_runstate(dispatcher, ctx, st: PvVcpuState) -> None:
    """Best effort, like Xen: a bad area is silently not updated."""
    if not st.runstate_va:
        return
    try:
        d = dispatcher.domain
        value = _runstate_value(d, st)
        if dispatcher.vm_assist >> VmAssistType.RUNSTATE_UPDATE_FLAG & 1:
            ctx.vm.write_struct(VcpuRunstateInfo, st.runstate_va,
                                dict(value, state_entry_time=value["state_entry_time"] | XEN_RUNSTATE_UPDATE))
        ctx.vm.write_struct(VcpuRunstateInfo, st.runstate_va, value)
    except GuestPageFault:
        pass


def _register_vcpu_info(dispatcher, ctx, st: PvVcpuState, arg, current: bool) -> int:
    d = dispatcher.domain
    info = ctx.vm.read_struct(VcpuRegisterVcpuInfo, arg)
    if info.offset > PAGE_SIZE - VCPU_INFO_SIZE or info.offset % 8:
        fail(XenErrno.EINVAL, f"vcpu_info offset {info.offset:#x}")
    if not d.is_ram_frame(info.mfn):
        fail(XenErrno.EINVAL, f"vcpu_info frame {info.mfn:#x} is not guest RAM")
    if not current and st.online:
        fail(XenErrno.EINVAL, "vcpu_info of another running vCPU")  # as Xen
    new = (info.mfn << PAGE_SHIFT) + info.offset
    with dispatcher.lock:
        if st.vcpu_info_registered:
            fail(XenErrno.EBUSY, "vcpu_info already registered")
        # Xen's map_vcpu_info: a writable type reference for as long as the
        # vCPU uses the page -- here the domain's life (no vCPU reset; a
        # reboot builds a new domain); pyvmm and the shim write it
        if not d.page_types.take_writable(info.mfn):
            fail(XenErrno.EINVAL, f"vcpu_info frame {info.mfn:#x} cannot be written "
                                  f"({type_name(d.page_types.word(info.mfn))})")
        old = st.vcpu_info_gpa
        if old is not None:
            contents = d.phys.read(old, VCPU_INFO_SIZE)
        else:  # no legacy slot: start masked, like Xen's dummy vcpu_info
            contents = bytearray(VCPU_INFO_SIZE)
            contents[VCPU_INFO_UPCALL_MASK] = 1
        d.phys.write(new, contents)
        st.vcpu_info_gpa = new
        st.vcpu_info_registered = True
        d.evtchn.set_vcpu_info_gpa(st.vcpu_id, new)
        # Mark everything pending so that nothing raised meanwhile is lost (Xen does this).
        d.phys.atomic_or_u64(new + VCPU_INFO_PENDING_SEL, U64)
        d.phys.atomic_or_u8(new + VCPU_INFO_UPCALL_PENDING, 1)
    d.vcpu_info_moved(st.vcpu_id, new)
    return 0


def _vcpu_initialise(dispatcher, ctx, st: PvVcpuState, arg) -> int:
    c = ctx.vm.read_struct(VcpuGuestContext, arg)
    if st.initialised:
        return -XenErrno.EEXIST
    for i, t in enumerate(c.trap_ctxt):
        if not is_canonical(t.address):
            fail(XenErrno.EINVAL, f"non-canonical trap {i}")
    if not c.flags & abi.VGCF_IN_KERNEL and not c.ctrlreg[1]:
        fail(XenErrno.EINVAL, "user mode without a user L4")
    for name, va in (("rip", c.user_regs.rip), ("rsp", c.user_regs.rsp), ("kernel_sp", c.kernel_sp),
                     ("event_callback", c.event_callback_eip),
                     ("failsafe_callback", c.failsafe_callback_eip),
                     ("syscall_callback", c.syscall_callback_eip),
                     ("ldt_base", c.ldt_base), ("fs_base", c.fs_base),
                     ("gs_base_kernel", c.gs_base_kernel), ("gs_base_user", c.gs_base_user)):
        if not is_canonical(va):
            fail(XenErrno.EINVAL, f"non-canonical {name}")
    if c.gdt_ents > MAX_GDT_ENTRIES:
        fail(XenErrno.EINVAL, "too many GDT entries")
    if c.ldt_ents > MAX_LDT_ENTRIES or (c.ldt_ents and c.ldt_base % PAGE_SIZE):
        fail(XenErrno.EINVAL, "bad LDT")
    domain = dispatcher.domain
    nr_gdt_frames = (c.gdt_ents + PAGE_SIZE // 8 - 1) // (PAGE_SIZE // 8)
    for f in c.gdt_frames[:nr_gdt_frames]:
        if not domain.is_ram_frame(f):
            fail(XenErrno.EINVAL, f"GDT frame {f:#x}")
    cr3_mfn = c.ctrlreg[3] >> PAGE_SHIFT  # 64-bit PV: ctrlreg[3] holds a plain address
    if not domain.is_ram_frame(cr3_mfn):
        fail(XenErrno.EINVAL, f"CR3 frame {cr3_mfn:#x}")
    domain.vcpu_initialise(st.vcpu_id, c)  # registers and callbacks: the VMM's; may raise HypercallError
    st.initialised = True
    return 0
