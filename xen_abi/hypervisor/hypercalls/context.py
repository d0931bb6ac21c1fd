"""What every Python hypercall handler shares: the caller's HypercallContext,
the per-vCPU state, the domain interface (PvDomainBase), DomainShutdown and
the small helpers for errors and domain ids."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from pyvmm.xen_abi.abi import (
    HYPERVISOR_VIRT_END,
    DOMID_SELF,
    E820_RAM,
    MACH2PHYS_VIRT_START,
    PAGE_SHIFT,
    PAGE_SIZE,
    RUNSTATE_offline,
    XEN_DOMAIN_HANDLE_LEN,
    HypercallError,
    ShutdownReason,
    XenErrno,
)

log = logging.getLogger(__name__)

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1


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
    """Per-vCPU PV state the Python handlers keep (the shim keeps its own
    per-vCPU state: callbacks, timers, IOPL)."""
    vcpu_id: int
    online: bool = False
    initialised: bool = False
    vcpu_info_gpa: Optional[int] = None
    vcpu_info_registered: bool = False
    runstate_va: int = 0
    runstate_state: int = RUNSTATE_offline
    runstate_entry_ns: int = 0
    runstate_time: list = field(default_factory=lambda: [0, 0, 0, 0])
    time_area_va: int = 0       # VCPUOP_register_vcpu_time_memory_area
    time_area_frames: tuple = ()   # ... its RAM frames, held writable (vcpu_op.py)
    pending: Optional[tuple] = None  # (nr, args, handler) waiting on the shim (dispatch.resume)


class PvDomainBase:
    """Everything the Python hypercall handlers use from a domain, in one place.

    Attributes: domid, handle, nr_vcpus, phys (PhysicalMemory), evtchn
    (EventChannels), gnttab (GrantTable), page_types (PageTypes: what
    pyvmm writes in guest RAM it holds writable), e820 [(addr, size, type)],
    shared_info_gpa; derived from the e820: nr_pages, max_pages, max_ram_mfn.
    m2p_va: where XENMEM_machphys_mapping says the M2P is (Xen's address
    unless the domain moves it).
    Hooks, with defaults the VMM may override: console_write, now_ns,
    yield_vcpu, vcpu_info_moved, vcpu_initialise, vcpu_up, vcpu_down.
    """

    m2p_va = MACH2PHYS_VIRT_START

    def __init__(self, *, phys, nr_vcpus: int, e820, shared_info_gpa: int, evtchn, gnttab,
                 page_types, domid: int = 1, handle: bytes = bytes(XEN_DOMAIN_HANDLE_LEN)):
        self.phys = phys
        self.page_types = page_types
        self.nr_vcpus = nr_vcpus
        self.e820 = [tuple(e) for e in e820]
        self.shared_info_gpa = shared_info_gpa
        self.evtchn = evtchn
        self.gnttab = gnttab
        # the FIFO ABI's pages: guest RAM, held writable while registered
        evtchn.take_frame = self._take_event_frame
        evtchn.drop_frame = self._drop_event_frame
        self.domid = domid
        self.handle = handle
        self._boot_ns = time.monotonic_ns()
        self._ram = [(a >> PAGE_SHIFT, (a + s) >> PAGE_SHIFT) for a, s, t in self.e820 if t == E820_RAM]
        self._built_pages = sum(hi - lo for lo, hi in self._ram)
        self.reservation = None     # reservation.py, where the domain has a balloon
        self.max_ram_mfn = max((hi for lo, hi in self._ram), default=1) - 1

    # ---- facts ----
    @property
    def nr_pages(self) -> int:
        """Frames the domain holds now (its current reservation)."""
        return self.reservation.nr_pages if self.reservation is not None else self._built_pages

    @property
    def max_pages(self) -> int:
        return self.reservation.max_pages if self.reservation is not None else self._built_pages

    def _take_event_frame(self, mfn: int) -> bool:
        if not self.is_ram_frame(mfn):
            return False
        return self.page_types is None or self.page_types.take_writable(mfn)

    def _drop_event_frame(self, mfn: int) -> None:
        if self.page_types is not None:
            self.page_types.release_writable(mfn, "FIFO event channels")

    def is_ram_frame(self, mfn: int) -> bool:
        return any(lo <= mfn < hi for lo, hi in self._ram) and \
            self.phys.contains(mfn << PAGE_SHIFT, PAGE_SIZE)

    def now_ns(self) -> int:
        """Guest system time (ns): the runstate clock."""
        return time.monotonic_ns() - self._boot_ns

    # ---- hooks ----
    def console_write(self, data: bytes) -> None:
        """CONSOLEIO_write: the guest's early console text."""
        log.info("guest console: %r", data)

    def yield_vcpu(self, vcpu_id: int) -> None:
        """SCHEDOP_poll found nothing pending: give the host CPU away."""
        time.sleep(0)

    def vcpu_info_moved(self, vcpu_id: int, gpa: int) -> None:
        """VCPUOP_register_vcpu_info moved vcpu_id's vcpu_info to gpa."""

    def vcpu_time_area_moved(self, vcpu_id: int, pieces) -> None:
        """VCPUOP_register_vcpu_time_memory_area: from now on the guest's
        copy of vcpu_id's time record is at pieces [(gpa, length)] (empty:
        none), to be rewritten wherever vcpu_info's is."""

    def runstate_times(self, st: "PvVcpuState") -> tuple[int, list[int]]:
        """(state_entry_time, time[running, runnable, blocked, offline]) of
        a vCPU now; by default from the switches vcpu_op.py records (no
        steal or blocked time)."""
        time = list(st.runstate_time)
        now = self.now_ns()
        time[st.runstate_state] += max(0, now - st.runstate_entry_ns)
        return now, time

    def runstate_area_moved(self, vcpu_id: int, va: int) -> None:
        """VCPUOP_register_runstate_memory_area: the area is at va now."""

    def vm_assist_changed(self, value: int) -> None:
        """vm_assist: the enabled assists are `value` (a bit per type)."""

    def vcpu_initialise(self, vcpu_id: int, ctx) -> None:
        """Load a VcpuGuestContext into a secondary vCPU (SMP: the VMM's job)."""

    def vcpu_up(self, vcpu_id: int) -> None:
        pass

    def vcpu_down(self, vcpu_id: int) -> None:
        pass


class ShimRequest(NamedTuple):
    """What a handler written as a generator yields: the shim is to do
    `op` (a MailboxOp) with `args` and the handler resumes with the
    shim's answer (dispatch.py; domain.py carries it through the mailbox)."""
    op: int
    args: tuple


def fail(errno: XenErrno, why: str = ""):
    raise HypercallError(errno, why)


def addr_ok(va: int) -> bool:
    """Xen's __addr_ok (guest_handle_okay for a 64-bit PV guest): a guest
    address starts in the lower half or above the hypervisor's range."""
    return va < (1 << 47) or va >= HYPERVISOR_VIRT_END


def is_self(domain, domid: int) -> bool:
    return domid in (DOMID_SELF, domain.domid)


def other_domain_errno(domid: int) -> XenErrno:
    """Xen's answer for a domain other than the caller: exists -> EPERM."""
    return XenErrno.EPERM if domid == 0 else XenErrno.ESRCH
