"""The Python slow path of the Xen PV hypercall ABI.

The shim (in the guest) does the hot hypercalls itself and exits to Python
for the rest; the VMM then calls

    HypercallDispatcher(domain).dispatch(ctx, nr, args) -> value for guest rax

with a HypercallContext for the calling vCPU. Every pointer argument is a
guest-virtual address read and written through ctx.vm (GuestVirtualMemory),
every count and index is bounded, and any failure caused by guest input
becomes a negative Xen errno. The only exception that leaves dispatch() is
DomainShutdown (SCHEDOP_shutdown and friends).

What the dispatcher needs from the domain is spelled out by PvDomainBase,
which also gives working defaults (the domain object may subclass it or
duck-type the same names).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from construct import ConstructError

from pyvmm.xen_abi import abi
from pyvmm.xen_abi.abi import (
    CALLBACKF_MASK_EVENTS,
    MEMOP_CMD_MASK,
    XEN_CAPABILITIES_INFO_LEN,
    XEN_CHANGESET_INFO_LEN,
    XEN_DOMAIN_HANDLE_LEN,
    XEN_EXTRAVERSION_LEN,
    XEN_RUNSTATE_UPDATE,
    XENFEAT_NR_SUBMAPS,
    XENMEM_maximum_gpfn,
    XenCompileInfo,
    CALLBACKOP_REGISTER,
    CALLBACKOP_UNREGISTER,
    DOMID_SELF,
    E820_RAM,
    GNTST_bad_domain,
    GNTST_bad_virt_addr,
    GNTST_okay,
    GNTST_permission_denied,
    HYPERVISOR_VIRT_START,
    MACH2PHYS_VIRT_END,
    MACH2PHYS_VIRT_START,
    PAGE_SHIFT,
    PAGE_SIZE,
    PV_FEATURES_SUBMAP0,
    RUNSTATE_blocked,
    RUNSTATE_offline,
    RUNSTATE_running,
    VCPU_INFO_PENDING_SEL,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_MASK,
    VCPU_INFO_UPCALL_PENDING,
    VCPU_SSHOTTMR_FUTURE,
    VMASST_CMD_DISABLE,
    VMASST_CMD_ENABLE,
    XEN_LEGACY_MAX_VCPUS,
    CallbackRegister,
    CallbackType,
    CallbackUnregister,
    ConsoleIoCmd,
    E820Entry,
    EvtchnAllocUnbound,
    EvtchnBindInterdomain,
    EvtchnBindIpi,
    EvtchnBindVcpu,
    EvtchnBindVirq,
    EvtchnOp,
    EvtchnStatus,
    EvtchnStatusArg,
    GnttabGetVersion,
    GnttabOp,
    GnttabQuerySize,
    GnttabSetupTable,
    GnttabSetVersion,
    Hypercall,
    HypercallError,
    MemoryOp,
    PhysdevOp,
    PhysdevSetIopl,
    SchedOp,
    SchedPoll,
    SchedRemoteShutdown,
    SchedShutdown,
    ShutdownReason,
    VcpuGuestContext,
    VcpuOp,
    VcpuRegisterRunstateMemoryArea,
    VcpuRegisterVcpuInfo,
    VcpuRunstateInfo,
    VcpuSetPeriodicTimer,
    VcpuSetSingleshotTimer,
    Virq,
    VmAssistType,
    XenAddToPhysmap,
    XenErrno,
    XenFeat,
    XenFeatureInfo,
    XenMachphysMapping,
    XenMemoryMap,
    XenPlatformParameters,
    XenVer,
)
from pyvmm.xen_abi.hypervisor.grant_table import GrantError
from pyvmm.xen_abi.memory.guest_va import GuestPageFault, is_canonical
from pyvmm.xen_abi.memory.physmem import GuestPhysicalFault

__all__ = ["HypercallDispatcher", "HypercallContext", "DomainShutdown", "PvDomainBase",
           "PvVcpuState", "OneShotTimers", "XEN_VERSION", "XEN_EXTRAVERSION",
           "XEN_CAPABILITIES", "CONSOLE_IO_MAX"]

log = logging.getLogger(__name__)

XEN_VERSION = (4, 17)
XEN_EXTRAVERSION = ".0-pyvmm"
XEN_CAPABILITIES = "xen-3.0-x86_64"
XEN_CHANGESET = "pyvmm"
XEN_COMPILER = "python"
CONSOLE_IO_MAX = 64 * 1024  # longest CONSOLEIO_write accepted in one call
SCHED_POLL_MAX_PORTS = 128  # Xen refuses longer poll lists
MAX_GDT_ENTRIES = abi.FIRST_RESERVED_GDT_ENTRY
MAX_LDT_ENTRIES = 8192
# set_timer_op "Linux workaround" (Xen, QEMU): absurd deadlines become now + 100 ms.
TIMER_SLOP_LIMIT_SHIFT = 50
TIMER_WORKAROUND_NS = 100_000_000
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
# Virtual-machine assists a 64-bit PV guest may switch (and the shim honours).
VM_ASSIST_VALID = frozenset({VmAssistType.FOUR_GB_SEGMENTS, VmAssistType.WRITABLE_PAGETABLES,
                             VmAssistType.PAE_EXTENDED_CR3, VmAssistType.RUNSTATE_UPDATE_FLAG})
PER_VCPU_CALLBACKS = frozenset({CallbackType.EVENT, CallbackType.FAILSAFE, CallbackType.SYSCALL,
                                CallbackType.SYSCALL32, CallbackType.SYSENTER, CallbackType.NMI})


class DomainShutdown(Exception):
    """The guest asked to shut down (SCHEDOP_shutdown / remote_shutdown on self)."""

    def __init__(self, reason, code: Optional[int] = None):
        try:
            reason = ShutdownReason(reason)
        except ValueError:
            reason = ShutdownReason.crash  # an unknown reason is treated as a crash
        super().__init__(f"domain shutdown: {reason.name}")
        self.reason = reason
        self.code = reason if code is None else code


@dataclass
class HypercallContext:
    vcpu_id: int
    vm: object  # GuestVirtualMemory for the caller's current CR3
    phys: object  # PhysicalMemory
    in_kernel_mode: bool = True


@dataclass
class PvVcpuState:
    """Per-vCPU PV state the hypercalls set and the shim/domain read."""
    vcpu_id: int
    online: bool = False
    initialised: bool = False
    vcpu_info_gpa: Optional[int] = None
    vcpu_info_registered: bool = False
    runstate_va: int = 0
    runstate_state: int = RUNSTATE_offline
    runstate_entry_ns: int = 0
    runstate_time: list = field(default_factory=lambda: [0, 0, 0, 0])
    # CallbackType -> (address, flags); flags bit 0 = CALLBACKF_mask_events
    callbacks: dict = field(default_factory=dict)
    iopl: int = 0
    singleshot_deadline: Optional[int] = None
    periodic_ns: int = 0
    guest_context: object = None  # the parsed VcpuGuestContext of VCPUOP_initialise


class OneShotTimers:
    """Default VCPUOP_set_singleshot_timer back-end: a host timer per vCPU that
    raises the vCPU's VIRQ_TIMER at the deadline (the shim may take this over)."""

    def __init__(self, evtchn, now_ns):
        self.evtchn = evtchn
        self.now_ns = now_ns
        self._timers: dict[int, threading.Timer] = {}
        self._lock = threading.Lock()

    def set_oneshot(self, vcpu: int, abs_ns: int) -> None:
        delay = max(0, abs_ns - self.now_ns()) / 1e9
        t = threading.Timer(delay, self._fire, args=(vcpu,))
        t.daemon = True
        with self._lock:
            old = self._timers.pop(vcpu, None)
            self._timers[vcpu] = t
        if old is not None:
            old.cancel()
        t.start()

    def _fire(self, vcpu: int) -> None:
        with self._lock:
            if self._timers.get(vcpu) is threading.current_thread():
                del self._timers[vcpu]
        self.evtchn.raise_virq(Virq.TIMER, vcpu)

    def cancel_oneshot(self, vcpu: int) -> None:
        with self._lock:
            t = self._timers.pop(vcpu, None)
        if t is not None:
            t.cancel()

    def close(self) -> None:
        with self._lock:
            timers, self._timers = list(self._timers.values()), {}
        for t in timers:
            t.cancel()


class PvDomainBase:
    """What HypercallDispatcher uses from a domain, with working defaults.

    Required attributes: domid, nr_vcpus, phys (PhysicalMemory), evtchn
    (EventChannels), gnttab (GrantTable), e820 [(addr, size, type)],
    shared_info_gpa, timers (set_oneshot(vcpu, abs_ns) / cancel_oneshot(vcpu)).
    Hooks the VMM overrides: console_write, block, yield_vcpu, kick,
    vcpu_info_moved, callbacks_changed, vcpu_initialise, vcpu_up, vcpu_down, now_ns.
    """

    def __init__(self, *, phys, nr_vcpus: int, e820, shared_info_gpa: int, evtchn, gnttab,
                 domid: int = 1, timers=None, handle: bytes = bytes(XEN_DOMAIN_HANDLE_LEN)):
        self.phys = phys
        self.nr_vcpus = nr_vcpus
        self.e820 = [tuple(e) for e in e820]
        self.shared_info_gpa = shared_info_gpa
        self.evtchn = evtchn
        self.gnttab = gnttab
        self.domid = domid
        self.handle = handle
        self._boot_ns = time.monotonic_ns()
        self.timers = timers if timers is not None else OneShotTimers(evtchn, self.now_ns)
        self._ram = [(a >> PAGE_SHIFT, (a + s) >> PAGE_SHIFT) for a, s, t in self.e820 if t == E820_RAM]
        self.nr_pages = sum(hi - lo for lo, hi in self._ram)
        self.max_pages = self.nr_pages
        self.max_ram_mfn = max((hi for lo, hi in self._ram), default=1) - 1
        self._wake = threading.Condition()
        self._kicked = [False] * nr_vcpus
        self.block_timeout = 0.05  # block() re-checks at least this often (seconds)

    # ---- facts ----
    def is_ram_frame(self, mfn: int) -> bool:
        return any(lo <= mfn < hi for lo, hi in self._ram) and \
            self.phys.contains(mfn << PAGE_SHIFT, PAGE_SIZE)

    def now_ns(self) -> int:
        """Guest system time (ns), the base of timer deadlines."""
        return time.monotonic_ns() - self._boot_ns

    # ---- hooks ----
    def console_write(self, data: bytes) -> None:
        log.info("guest console: %r", data)

    def kick(self, vcpu_id: int) -> None:
        with self._wake:
            if 0 <= vcpu_id < self.nr_vcpus:
                self._kicked[vcpu_id] = True
            self._wake.notify_all()

    def block(self, vcpu_id: int) -> None:
        """Return once vcpu_id has an upcall pending or was kicked."""
        with self._wake:
            while not self._kicked[vcpu_id] and not self.evtchn.vcpu_upcall_pending(vcpu_id):
                self._wake.wait(self.block_timeout)
            self._kicked[vcpu_id] = False

    def yield_vcpu(self, vcpu_id: int) -> None:
        time.sleep(0)

    def vcpu_info_moved(self, vcpu_id: int, gpa: int) -> None:
        pass

    def callbacks_changed(self, vcpu_id: int, state: PvVcpuState) -> None:
        pass

    def vcpu_initialise(self, vcpu_id: int, ctx) -> None:
        """Load a VcpuGuestContext into a secondary vCPU (SMP: the VMM's job)."""

    def vcpu_up(self, vcpu_id: int) -> None:
        pass

    def vcpu_down(self, vcpu_id: int) -> None:
        pass


def _fail(errno: XenErrno, why: str = ""):
    raise HypercallError(errno, why)


def _cstr(s: str, n: int) -> bytes:
    """NUL-padded, always NUL-terminated char[n]."""
    b = s.encode()[: n - 1]
    return b + bytes(n - len(b))


class HypercallDispatcher:
    def __init__(self, domain):
        self.domain = domain
        self.vcpus = [PvVcpuState(v) for v in range(domain.nr_vcpus)]
        for v, st in enumerate(self.vcpus):
            st.vcpu_info_gpa = (domain.shared_info_gpa + v * VCPU_INFO_SIZE
                                if v < XEN_LEGACY_MAX_VCPUS else None)
        self.vcpus[0].online = self.vcpus[0].initialised = True
        self.vcpus[0].runstate_state = RUNSTATE_running
        self.vm_assist = 0  # bitmask of VmAssistType
        self.shutdown_code: Optional[int] = None
        self.grant_version = 1
        self._logged: set = set()
        self._lock = threading.Lock()
        self._handlers = {
            Hypercall.xen_version: self._xen_version,
            Hypercall.memory_op: self._memory_op,
            Hypercall.vcpu_op: self._vcpu_op,
            Hypercall.sched_op: self._sched_op,
            Hypercall.console_io: self._console_io,
            Hypercall.event_channel_op: self._event_channel_op,
            Hypercall.grant_table_op: self._grant_table_op,
            Hypercall.physdev_op: self._physdev_op,
            Hypercall.callback_op: self._callback_op,
            Hypercall.vm_assist: self._vm_assist,
            Hypercall.set_timer_op: self._set_timer_op,
        }

    # ------------------------------------------------------------------
    def dispatch(self, ctx: HypercallContext, nr: int, args=()) -> int:
        """Run hypercall nr; the value for the guest's rax (negative = -errno)."""
        a = tuple(int(x) & U64 for x in args[:6]) + (0,) * (6 - min(len(args), 6))
        if nr == Hypercall.xen_version and a[0] == XenVer.version:
            return (XEN_VERSION[0] << 16) | XEN_VERSION[1]  # the "check events" call: keep it cheap
        handler = self._handlers.get(nr)
        if handler is None:
            return self._unsupported(nr, None)
        if not ctx.in_kernel_mode:
            return -XenErrno.EPERM  # hypercalls are for the guest kernel only
        try:
            return int(handler(ctx, *a))
        except DomainShutdown:
            raise
        except HypercallError as e:
            return -e.errno
        except (GuestPageFault, GuestPhysicalFault, ConstructError) as e:
            log.debug("hypercall %d: guest fault: %s", nr, e)
            return -XenErrno.EFAULT
        except Exception:  # a VMM bug: report it, keep the guest (and host) alive
            log.exception("hypercall %d%r failed inside the VMM", nr, a)
            return -XenErrno.EINVAL

    def _unsupported(self, nr: int, sub) -> int:
        key = (nr, sub)
        if key not in self._logged:
            self._logged.add(key)
            try:
                name = Hypercall(nr).name
            except ValueError:
                name = f"#{nr}"
            # Normal for a stock kernel (FIFO events, PMU, ...): info, not warning.
            log.info("unsupported hypercall %s%s -> -ENOSYS", name,
                        "" if sub is None else f" sub-op {sub}")
        return -XenErrno.ENOSYS

    def _vcpu_state(self, vcpu_id: int) -> PvVcpuState:
        if not 0 <= vcpu_id < len(self.vcpus):
            _fail(XenErrno.ENOENT, f"no vCPU {vcpu_id}")
        return self.vcpus[vcpu_id]

    def _is_self(self, domid: int) -> bool:
        return domid in (DOMID_SELF, self.domain.domid)

    def _other_domain_errno(self, domid: int) -> XenErrno:
        """Xen's answer for a domain other than the caller: exists -> EPERM."""
        return XenErrno.EPERM if domid == 0 else XenErrno.ESRCH

    # ------------------------------------------------------------------
    # xen_version
    # ------------------------------------------------------------------
    def _xen_version(self, ctx, cmd, arg, *_):
        cmd &= U32
        vm = ctx.vm
        if cmd == XenVer.extraversion:
            vm.write(arg, _cstr(XEN_EXTRAVERSION, XEN_EXTRAVERSION_LEN))
        elif cmd == XenVer.compile_info:
            vm.write_struct(XenCompileInfo, arg, {"compiler": XEN_COMPILER, "compile_by": "pyvmm",
                                                  "compile_domain": "localdomain",
                                                  "compile_date": "unknown"})
        elif cmd == XenVer.capabilities:
            vm.write(arg, _cstr(XEN_CAPABILITIES, XEN_CAPABILITIES_INFO_LEN))
        elif cmd == XenVer.changeset:
            vm.write(arg, _cstr(XEN_CHANGESET, XEN_CHANGESET_INFO_LEN))
        elif cmd == XenVer.platform_parameters:
            vm.write_struct(XenPlatformParameters, arg, {"virt_start": HYPERVISOR_VIRT_START})
        elif cmd == XenVer.get_features:
            fi = vm.read_struct(XenFeatureInfo, arg)
            if fi.submap_idx >= XENFEAT_NR_SUBMAPS:
                _fail(XenErrno.EINVAL, "unknown feature submap")  # as Xen
            submap = PV_FEATURES_SUBMAP0
            if self.vm_assist >> VmAssistType.PAE_EXTENDED_CR3 & 1:
                submap |= 1 << XenFeat.pae_pgdir_above_4gb
            vm.write_struct(XenFeatureInfo, arg, {"submap_idx": fi.submap_idx, "submap": submap})
        elif cmd == XenVer.pagesize:
            return PAGE_SIZE
        elif cmd == XenVer.guest_handle:
            vm.write(arg, bytes(self.domain.handle)[:XEN_DOMAIN_HANDLE_LEN].ljust(XEN_DOMAIN_HANDLE_LEN, b"\0"))
        elif cmd in (XenVer.commandline, XenVer.build_id):
            return -XenErrno.EPERM  # privileged in Xen (XSM) for a domU
        else:
            return self._unsupported(Hypercall.xen_version, cmd)
        return 0

    # ------------------------------------------------------------------
    # memory_op
    # ------------------------------------------------------------------
    def _read_domid(self, ctx, arg) -> int:
        domid = int.from_bytes(ctx.vm.read(arg, 2), "little")
        if not self._is_self(domid):
            _fail(self._other_domain_errno(domid), f"domain {domid}")
        return domid

    def _memory_op(self, ctx, cmd, arg, *_):
        op = cmd & MEMOP_CMD_MASK
        d = self.domain
        if op == MemoryOp.memory_map:
            m = ctx.vm.read_struct(XenMemoryMap, arg)
            if not d.e820:
                return -XenErrno.ENOSYS  # what Xen says when no map was set
            n = min(m.nr_entries, len(d.e820))
            buf = b"".join(E820Entry.build({"addr": a, "size": s, "type": t}) for a, s, t in d.e820[:n])
            ctx.vm.write(m.buffer, buf)
            ctx.vm.write_struct(XenMemoryMap, arg, {"nr_entries": n, "buffer": m.buffer})
            return 0
        if op == MemoryOp.machphys_mapping:
            # Xen reports max_mfn = MACH2PHYS_NR_ENTRIES - 1 for a domU; here the M2P
            # only covers guest RAM (identity), so report its real size: Linux then
            # treats higher frames (shared_info, grant frames) as identity without
            # touching unmapped M2P entries.
            v_start = getattr(d, "m2p_va", MACH2PHYS_VIRT_START)   # Domain may move it
            ctx.vm.write_struct(XenMachphysMapping, arg, {
                "v_start": v_start, "v_end": v_start + (MACH2PHYS_VIRT_END - MACH2PHYS_VIRT_START),
                "max_mfn": getattr(d, "m2p_max_mfn", d.max_ram_mfn)})
            return 0
        if op == MemoryOp.maximum_ram_page:
            return d.max_ram_mfn + 1
        if op == MemoryOp.current_reservation:
            self._read_domid(ctx, arg)
            return d.nr_pages
        if op == MemoryOp.maximum_reservation:
            self._read_domid(ctx, arg)
            return d.max_pages
        if op == XENMEM_maximum_gpfn:
            self._read_domid(ctx, arg)
            return d.max_ram_mfn
        if op == MemoryOp.add_to_physmap:
            ctx.vm.read_struct(XenAddToPhysmap, arg)
            return -XenErrno.EACCES  # only translated (HVM/PVH) guests may use it
        if op == MemoryOp.machine_memory_map:
            return -XenErrno.EPERM  # dom0 only
        return self._unsupported(Hypercall.memory_op, op)

    # ------------------------------------------------------------------
    # vcpu_op
    # ------------------------------------------------------------------
    def _runstate_switch(self, ctx, st: PvVcpuState, new_state: int) -> None:
        now = self.domain.now_ns()
        old = st.runstate_state
        if 0 <= old < 4:
            st.runstate_time[old] += max(0, now - st.runstate_entry_ns)
        st.runstate_state, st.runstate_entry_ns = new_state, now
        if ctx is not None and ctx.vcpu_id == st.vcpu_id:
            self._write_runstate(ctx, st)

    def _runstate_value(self, st: PvVcpuState, entry_flag: int = 0) -> dict:
        return {"state": st.runstate_state, "state_entry_time": st.runstate_entry_ns | entry_flag,
                "time": list(st.runstate_time)}

    def _write_runstate(self, ctx, st: PvVcpuState) -> None:
        """Best effort, like Xen: a bad area is silently not updated."""
        if not st.runstate_va:
            return
        try:
            if self.vm_assist >> VmAssistType.RUNSTATE_UPDATE_FLAG & 1:
                ctx.vm.write_struct(VcpuRunstateInfo, st.runstate_va,
                                    self._runstate_value(st, XEN_RUNSTATE_UPDATE))
            ctx.vm.write_struct(VcpuRunstateInfo, st.runstate_va, self._runstate_value(st))
        except GuestPageFault:
            pass

    def _vcpu_op(self, ctx, cmd, vcpuid, arg, *_):
        cmd &= U32
        vcpuid &= U32
        d = self.domain
        st = self._vcpu_state(vcpuid)  # -ENOENT for vCPUs that do not exist
        current = vcpuid == ctx.vcpu_id
        if cmd == VcpuOp.is_up:
            return 1 if st.online else 0
        if cmd == VcpuOp.register_runstate_memory_area:
            area = ctx.vm.read_struct(VcpuRegisterRunstateMemoryArea, arg)
            if area.addr and not is_canonical(area.addr):
                _fail(XenErrno.EFAULT, "runstate area address")
            st.runstate_va = area.addr
            if current:
                self._write_runstate(ctx, st)
            return 0
        if cmd == VcpuOp.get_runstate_info:
            ctx.vm.write_struct(VcpuRunstateInfo, arg, self._runstate_value(st))
            return 0
        if cmd == VcpuOp.register_vcpu_info:
            return self._register_vcpu_info(ctx, st, arg, current)
        if cmd == VcpuOp.stop_periodic_timer:
            st.periodic_ns = 0
            stop = getattr(d.timers, "stop_periodic", None)
            if stop is not None:
                stop(vcpuid)
            return 0
        if cmd == VcpuOp.set_periodic_timer:
            p = ctx.vm.read_struct(VcpuSetPeriodicTimer, arg)
            if p.period_ns < 1_000_000:
                _fail(XenErrno.EINVAL, "period below 1 ms")
            setp = getattr(d.timers, "set_periodic", None)
            if setp is None:
                return self._unsupported(Hypercall.vcpu_op, cmd)
            st.periodic_ns = p.period_ns
            setp(vcpuid, p.period_ns)
            return 0
        if cmd == VcpuOp.set_singleshot_timer:
            if not current:
                _fail(XenErrno.EINVAL, "singleshot timer of another vCPU")
            t = ctx.vm.read_struct(VcpuSetSingleshotTimer, arg)
            if t.flags & VCPU_SSHOTTMR_FUTURE and t.timeout_abs_ns < d.now_ns():
                return -XenErrno.ETIME
            st.singleshot_deadline = t.timeout_abs_ns
            d.timers.set_oneshot(vcpuid, t.timeout_abs_ns)
            return 0
        if cmd == VcpuOp.stop_singleshot_timer:
            if not current:
                _fail(XenErrno.EINVAL, "singleshot timer of another vCPU")
            st.singleshot_deadline = None
            d.timers.cancel_oneshot(vcpuid)
            return 0
        if cmd == VcpuOp.initialise:
            return self._vcpu_initialise(ctx, st, arg)
        if cmd == VcpuOp.up:
            if not st.initialised:
                _fail(XenErrno.EINVAL, "vCPU not initialised")
            if not st.online:
                st.online = True
                self._runstate_switch(None, st, RUNSTATE_running)
                d.vcpu_up(vcpuid)
            return 0
        if cmd == VcpuOp.down:
            if st.online:
                st.online = False
                self._runstate_switch(ctx if current else None, st, RUNSTATE_offline)
                d.vcpu_down(vcpuid)
            return 0
        return self._unsupported(Hypercall.vcpu_op, cmd)  # send_nmi, get_physid, time area

    def _register_vcpu_info(self, ctx, st: PvVcpuState, arg, current: bool) -> int:
        d = self.domain
        info = ctx.vm.read_struct(VcpuRegisterVcpuInfo, arg)
        if info.offset > PAGE_SIZE - VCPU_INFO_SIZE or info.offset % 8:
            _fail(XenErrno.EINVAL, f"vcpu_info offset {info.offset:#x}")
        if not d.is_ram_frame(info.mfn):
            _fail(XenErrno.EINVAL, f"vcpu_info frame {info.mfn:#x} is not guest RAM")
        if not current and st.online:
            _fail(XenErrno.EINVAL, "vcpu_info of another running vCPU")  # as Xen
        new = (info.mfn << PAGE_SHIFT) + info.offset
        with self._lock:
            if st.vcpu_info_registered:
                _fail(XenErrno.EBUSY, "vcpu_info already registered")
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

    def _vcpu_initialise(self, ctx, st: PvVcpuState, arg) -> int:
        if st.initialised:
            return -XenErrno.EEXIST
        c = ctx.vm.read_struct(VcpuGuestContext, arg)
        for name, va in (("rip", c.user_regs.rip), ("kernel_sp", c.kernel_sp),
                         ("event_callback", c.event_callback_eip),
                         ("failsafe_callback", c.failsafe_callback_eip),
                         ("syscall_callback", c.syscall_callback_eip),
                         ("ldt_base", c.ldt_base), ("fs_base", c.fs_base),
                         ("gs_base_kernel", c.gs_base_kernel), ("gs_base_user", c.gs_base_user)):
            if not is_canonical(va):
                _fail(XenErrno.EINVAL, f"non-canonical {name}")
        if c.gdt_ents > MAX_GDT_ENTRIES:
            _fail(XenErrno.EINVAL, "too many GDT entries")
        if c.ldt_ents > MAX_LDT_ENTRIES or (c.ldt_ents and c.ldt_base % PAGE_SIZE):
            _fail(XenErrno.EINVAL, "bad LDT")
        nr_gdt_frames = (c.gdt_ents + PAGE_SIZE // 8 - 1) // (PAGE_SIZE // 8)
        for f in c.gdt_frames[:nr_gdt_frames]:
            if not self.domain.is_ram_frame(f):
                _fail(XenErrno.EINVAL, f"GDT frame {f:#x}")
        cr3_mfn = c.ctrlreg[3] >> PAGE_SHIFT  # 64-bit PV: ctrlreg[3] holds a plain address
        if not self.domain.is_ram_frame(cr3_mfn):
            _fail(XenErrno.EINVAL, f"CR3 frame {cr3_mfn:#x}")
        self.domain.vcpu_initialise(st.vcpu_id, c)  # may raise HypercallError
        st.guest_context = c
        st.initialised = True
        st.callbacks[CallbackType.EVENT] = (c.event_callback_eip, 0)
        st.callbacks[CallbackType.FAILSAFE] = (
            c.failsafe_callback_eip,
            CALLBACKF_MASK_EVENTS if c.flags & abi.VGCF_FAILSAFE_DISABLES_EVENTS else 0)
        st.callbacks[CallbackType.SYSCALL] = (
            c.syscall_callback_eip,
            CALLBACKF_MASK_EVENTS if c.flags & abi.VGCF_SYSCALL_DISABLES_EVENTS else 0)
        self.domain.callbacks_changed(st.vcpu_id, st)
        return 0

    # ------------------------------------------------------------------
    # sched_op
    # ------------------------------------------------------------------
    def _sched_op(self, ctx, cmd, arg, *_):
        cmd &= U32
        d = self.domain
        if cmd == SchedOp.yield_:
            d.yield_vcpu(ctx.vcpu_id)
            return 0
        if cmd == SchedOp.block:
            st = self._vcpu_state(ctx.vcpu_id)
            if st.vcpu_info_gpa is not None:  # blocking re-enables event delivery (Xen)
                d.phys.write_u8(st.vcpu_info_gpa + VCPU_INFO_UPCALL_MASK, 0)
            self._runstate_switch(ctx, st, RUNSTATE_blocked)
            try:
                d.block(ctx.vcpu_id)
            finally:
                self._runstate_switch(ctx, st, RUNSTATE_running)
            return 0
        if cmd == SchedOp.shutdown:
            s = ctx.vm.read_struct(SchedShutdown, arg)
            log.info("guest vCPU %d: SCHEDOP_shutdown reason %d", ctx.vcpu_id, s.reason)
            raise self._shutdown(s.reason)
        if cmd == SchedOp.shutdown_code:
            self.shutdown_code = ctx.vm.read_struct(SchedShutdown, arg).reason
            return 0
        if cmd == SchedOp.poll:
            p = ctx.vm.read_struct(SchedPoll, arg)
            if p.nr_ports > SCHED_POLL_MAX_PORTS:
                _fail(XenErrno.EINVAL, "too many poll ports")
            ports = ctx.vm.read(p.ports, 4 * p.nr_ports)
            for i in range(p.nr_ports):
                port = int.from_bytes(ports[4 * i:4 * i + 4], "little")
                if port >= d.evtchn.nr_ports:
                    _fail(XenErrno.EINVAL, f"poll port {port}")
                if d.evtchn.is_pending(port):
                    return 0
            d.yield_vcpu(ctx.vcpu_id)  # spurious wake-ups are allowed
            return 0
        if cmd == SchedOp.remote_shutdown:
            r = ctx.vm.read_struct(SchedRemoteShutdown, arg)
            if not self._is_self(r.domain_id):
                _fail(self._other_domain_errno(r.domain_id), f"domain {r.domain_id}")
            raise self._shutdown(r.reason)
        return self._unsupported(Hypercall.sched_op, cmd)

    def _shutdown(self, reason: int) -> DomainShutdown:
        # As Xen's domain_shutdown(): a code preset with SCHEDOP_shutdown_code wins.
        code = reason if self.shutdown_code is None else self.shutdown_code
        return DomainShutdown(code)

    def _set_timer_op(self, ctx, timeout, *_):
        d = self.domain
        st = self._vcpu_state(ctx.vcpu_id)
        if timeout == 0:
            st.singleshot_deadline = None
            d.timers.cancel_oneshot(ctx.vcpu_id)
            return 0
        now = d.now_ns()
        signed = timeout - (1 << 64) if timeout >> 63 else timeout
        if signed < 0 or (signed - now) >> TIMER_SLOP_LIMIT_SHIFT:
            signed = now + TIMER_WORKAROUND_NS  # Xen's workaround for Linux's bogus deadlines
        st.singleshot_deadline = signed
        d.timers.set_oneshot(ctx.vcpu_id, signed)
        return 0

    # ------------------------------------------------------------------
    # console_io
    # ------------------------------------------------------------------
    def _console_io(self, ctx, cmd, count, buffer, *_):
        cmd &= U32
        count &= U32
        if cmd == ConsoleIoCmd.write:
            if count > CONSOLE_IO_MAX:
                _fail(XenErrno.EINVAL, f"console write of {count} bytes")
            if count:
                self.domain.console_write(ctx.vm.read(buffer, count))
            return 0
        if cmd == ConsoleIoCmd.read:
            return 0  # no input through this path
        return self._unsupported(Hypercall.console_io, cmd)

    # ------------------------------------------------------------------
    # event_channel_op
    # ------------------------------------------------------------------
    def _event_channel_op(self, ctx, cmd, arg, *_):
        cmd &= U32
        ev = self.domain.evtchn
        vm = ctx.vm
        if cmd == EvtchnOp.send:
            ev.send(vm.read_u32(arg))  # evtchn_send: one u32 (EvtchnPort)
            return 0
        if cmd == EvtchnOp.unmask:
            ev.unmask(vm.read_u32(arg))  # evtchn_unmask: one u32 (EvtchnPort)
            return 0
        if cmd == EvtchnOp.alloc_unbound:
            a = vm.read_struct(EvtchnAllocUnbound, arg)
            port = ev.alloc_unbound(a.dom, a.remote_dom)
            return self._write_back(vm, EvtchnAllocUnbound, arg, dict(a, port=port), ev, port)
        if cmd == EvtchnOp.bind_interdomain:
            a = vm.read_struct(EvtchnBindInterdomain, arg)
            port = ev.bind_interdomain(a.remote_dom, a.remote_port)
            return self._write_back(vm, EvtchnBindInterdomain, arg, dict(a, local_port=port), ev, port)
        if cmd == EvtchnOp.bind_virq:
            a = vm.read_struct(EvtchnBindVirq, arg)
            port = ev.bind_virq(a.virq, a.vcpu)
            return self._write_back(vm, EvtchnBindVirq, arg, dict(a, port=port), ev, port)
        if cmd == EvtchnOp.bind_ipi:
            a = vm.read_struct(EvtchnBindIpi, arg)
            port = ev.bind_ipi(a.vcpu)
            return self._write_back(vm, EvtchnBindIpi, arg, dict(a, port=port), ev, port)
        if cmd == EvtchnOp.close:
            ev.close(vm.read_u32(arg))  # evtchn_close: one u32 (EvtchnPort)
            return 0
        if cmd == EvtchnOp.bind_vcpu:
            a = vm.read_struct(EvtchnBindVcpu, arg)
            ev.bind_vcpu(a.port, a.vcpu)
            return 0
        if cmd == EvtchnOp.status:
            a = vm.read_struct(EvtchnStatusArg, arg)
            s = ev.status(a.dom, a.port)
            if s["status"] == EvtchnStatus.interdomain:
                u = s["dom"].to_bytes(2, "little") + bytes(2) + s["port"].to_bytes(4, "little")
            elif s["status"] == EvtchnStatus.unbound:
                u = s["dom"].to_bytes(2, "little") + bytes(6)
            elif s["status"] == EvtchnStatus.virq:
                u = s["virq"].to_bytes(4, "little") + bytes(4)
            else:
                u = bytes(8)
            vm.write_struct(EvtchnStatusArg, arg, dict(a, status=int(s["status"]), vcpu=s["vcpu"], u=u))
            return 0
        if cmd == EvtchnOp.reset:
            dom = int.from_bytes(vm.read(arg, 2), "little")
            ev.reset(dom)
            return 0
        # init_control / expand_array / set_priority (FIFO ABI): -ENOSYS keeps Linux on 2-level.
        return self._unsupported(Hypercall.event_channel_op, cmd)

    @staticmethod
    def _write_back(vm, struct, arg, value, ev, port) -> int:
        """Copy the result out; if the guest buffer vanished, undo the binding (as Xen)."""
        try:
            vm.write_struct(struct, arg, value)
        except GuestPageFault:
            try:
                ev.close(port)
            except HypercallError:
                pass
            raise
        return 0

    # ------------------------------------------------------------------
    # grant_table_op
    # ------------------------------------------------------------------
    def _grant_table_op(self, ctx, cmd, uop, count, *_):
        cmd &= U32
        count &= U32
        gt = self.domain.gnttab
        vm = ctx.vm
        if count >> 31:
            _fail(XenErrno.EINVAL, "negative count")
        single = {GnttabOp.setup_table, GnttabOp.query_size, GnttabOp.set_version,
                  GnttabOp.get_version}
        if cmd in single and count != 1:
            _fail(XenErrno.EINVAL, "this grant op takes exactly one argument")
        if cmd == GnttabOp.setup_table:
            op = vm.read_struct(GnttabSetupTable, uop)
            status = GNTST_okay
            if not self._is_self(op.dom):
                status = GNTST_permission_denied if op.dom == 0 else GNTST_bad_domain
            else:
                try:
                    frames = gt.setup_table(op.nr_frames)
                except GrantError as e:
                    status = e.status
                else:
                    try:
                        vm.write(op.frame_list, b"".join(f.to_bytes(8, "little") for f in frames))
                    except GuestPageFault:
                        status = GNTST_bad_virt_addr
            vm.write_struct(GnttabSetupTable, uop, dict(op, status=status))
            return 0
        if cmd == GnttabOp.query_size:
            op = vm.read_struct(GnttabQuerySize, uop)
            if self._is_self(op.dom):
                nr, mx = gt.query_size()
                out = dict(op, nr_frames=nr, max_nr_frames=mx, status=GNTST_okay)
            else:
                out = dict(op, status=GNTST_permission_denied if op.dom == 0 else GNTST_bad_domain)
            vm.write_struct(GnttabQuerySize, uop, out)
            return 0
        if cmd == GnttabOp.set_version:
            op = vm.read_struct(GnttabSetVersion, uop)
            if op.version == 1:
                rc = 0
            elif op.version == 2:
                rc = -XenErrno.EOPNOTSUPP  # v2 not offered (and CPUID keeps Linux from asking)
            else:
                rc = -XenErrno.EINVAL
            vm.write_struct(GnttabSetVersion, uop, {"version": self.grant_version})
            return rc
        if cmd == GnttabOp.get_version:
            op = vm.read_struct(GnttabGetVersion, uop)
            if not self._is_self(op.dom):
                _fail(self._other_domain_errno(op.dom), f"domain {op.dom}")
            vm.write_struct(GnttabGetVersion, uop, dict(op, version=self.grant_version))
            return 0
        # map/unmap/copy/transfer from the guest: there is no other domain to grant to it.
        return self._unsupported(Hypercall.grant_table_op, cmd)

    # ------------------------------------------------------------------
    # physdev_op, callback_op, vm_assist
    # ------------------------------------------------------------------
    def _physdev_op(self, ctx, cmd, arg, *_):
        cmd &= U32
        if cmd == PhysdevOp.set_iopl:
            p = ctx.vm.read_struct(PhysdevSetIopl, arg)
            if p.iopl > 3:
                _fail(XenErrno.EINVAL, "iopl > 3")
            self._vcpu_state(ctx.vcpu_id).iopl = p.iopl
            return 0
        return self._unsupported(Hypercall.physdev_op, cmd)

    def _callback_op(self, ctx, cmd, arg, *_):
        cmd &= U32
        st = self._vcpu_state(ctx.vcpu_id)
        if cmd == CALLBACKOP_REGISTER:
            r = ctx.vm.read_struct(CallbackRegister, arg)
            if not is_canonical(r.address):
                _fail(XenErrno.EINVAL, "non-canonical callback address")
            try:
                kind = CallbackType(r.type)
            except ValueError:
                _fail(XenErrno.EINVAL, f"callback type {r.type}")
            flags = r.flags & CALLBACKF_MASK_EVENTS if kind in (
                CallbackType.FAILSAFE, CallbackType.SYSCALL, CallbackType.SYSCALL32,
                CallbackType.SYSENTER) else 0
            st.callbacks[kind] = (r.address, flags)
            self.domain.callbacks_changed(st.vcpu_id, st)
            return 0
        if cmd == CALLBACKOP_UNREGISTER:
            r = ctx.vm.read_struct(CallbackUnregister, arg)
            if r.type == CallbackType.NMI:
                st.callbacks.pop(CallbackType.NMI, None)
                self.domain.callbacks_changed(st.vcpu_id, st)
                return 0
            # Xen refuses to unregister the others; unknown types are invalid.
            _fail(XenErrno.EINVAL, f"cannot unregister callback type {r.type}")
        return self._unsupported(Hypercall.callback_op, cmd)

    def _vm_assist(self, ctx, cmd, kind, *_):
        cmd &= U32
        kind &= U32
        if cmd not in (VMASST_CMD_ENABLE, VMASST_CMD_DISABLE):
            return -XenErrno.ENOSYS
        if kind not in VM_ASSIST_VALID:
            return -XenErrno.EINVAL
        with self._lock:
            if cmd == VMASST_CMD_ENABLE:
                self.vm_assist |= 1 << kind
            else:
                self.vm_assist &= ~(1 << kind)
        return 0
