"""The event, time and device-channel side of a Domain (xen_abi/hypervisor/domain.py):

* the vCPU LAPIC set up for the shim's timer, the pvclock snapshot written
  into vcpu_info.time (again whenever vcpu_info moves), the wallclock;
* kicks: a port raised from Python becomes an "event check" MSI to the
  target vCPU, so the shim re-checks events even while the guest spins at
  CPL3 or is halted in SCHEDOP_block;
* the store and console channels: pre-allocated guest ports bound to
  back-ends (XenstoreRingServer, ConsoleRingServer), grant entries 0/1,
  the xenstore tree of the domain;
* guest -> back-end EVTCHNOP_send without an exit: the shim writes the port
  number to EV_SEND_PORT where an ioeventfd per back-end port (datamatch)
  absorbs it; a thread waits on those eventfds and runs the back-end.

    ev = DomainEvents(domain)     # after the vCPU exists, before it runs
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time

from pyvmm.vmm import x86

from pyvmm.xen_abi import abi
from pyvmm.xen_abi.hypervisor import time as E
from pyvmm.xen_abi.abi import DOMID_SELF, Virq
from pyvmm.xen_abi.hypervisor.console_ring import ConsoleRingServer
from pyvmm.xen_abi.hypervisor.evtchn import BACKEND_DOMID
from pyvmm.xen_abi.hypervisor.hypercalls import XEN_VERSION
from pyvmm.xen_abi.shim.layout import EV_CHECK_VECTOR, EV_SEND_PORT, EVENTS
from pyvmm.xen_abi.xenstore.ring import XenstoreRingServer
from pyvmm.xen_abi.xenstore.store import XenstoreStore
from pyvmm.xen_abi.xenstore.toolstack import populate_domain

log = logging.getLogger(__name__)

__all__ = ["DomainEvents"]

CALIBRATION_S = 0.05     # TSC rate measurement when the TSC is not invariant


class DomainEvents:
    def __init__(self, dom, *, name: str = "domU", use_ioeventfd: bool = True):
        self.dom = dom
        self.lock = threading.Lock()          # console text
        self._in_exit = threading.local()
        self.tsc_deadline = E.want_tsc_deadline(dom.kvm)
        self.use_ioeventfd = use_ioeventfd
        self._efds: dict[int, int] = {}       # guest port -> eventfd
        self._efd_lock = threading.Lock()
        self.backend_lock = threading.RLock()   # one back-end notification at a time
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self.kicks = 0
        for v in dom.region.vcpus:
            self.tsc_deadline = E.setup_lapic(dom.vcpu, v.index, tsc_deadline=self.tsc_deadline)
        self._time_snapshot()
        self._channels(name)
        self._thread = threading.Thread(target=self._backend_loop, name="pyvmm-evtchn-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------
    # time
    # ------------------------------------------------------------------
    def _time_snapshot(self) -> None:
        """One pvclock snapshot: guest TSC (KVM_GET_MSRS IA32_TSC, bracketed
        by monotonic readings) is system time 0; Python's now_ns() uses the
        same origin."""
        d = self.dom
        khz = E.get_tsc_khz(d.vcpu)
        stable = E.tsc_is_stable()
        tsc, mid = self._read_tsc()
        if not stable:
            # no invariant TSC (e.g. the faithful lane's TCG): KVM's tsc_khz
            # can be far off; measure the rate against CLOCK_MONOTONIC, as
            # Xen calibrates against its platform timer
            time.sleep(CALIBRATION_S)
            tsc2, mid2 = self._read_tsc()
            measured = (tsc2 - tsc) * 1_000_000 // max(1, mid2 - mid)
            # nested KVM may not advance a never-run vCPU's TSC: keep KVM's
            # figure unless the measurement is plausible
            if khz // 2 < measured < khz * 2:
                khz = measured
        d._boot_ns = mid
        mul, shift = E.time_scale(khz * 1000)
        flags = abi.XEN_PVCLOCK_TSC_STABLE_BIT if stable else 0
        self.clock = E.PvClock(tsc, 0, mul, shift, flags, khz)
        E.write_wallclock(d.phys, d.shared_info_gpa, time.time_ns() - (time.monotonic_ns() - d._boot_ns))
        for v in d.region.vcpus:
            E.write_vcpu_time(d.phys, d.shared_info_gpa + v.index * abi.VCPU_INFO_SIZE, self.clock)
            E.write_events_block(d.region.mem, v.events_off, self.clock,
                                 xen_version=(XEN_VERSION[0] << 16) | XEN_VERSION[1],
                                 tsc_deadline=self.tsc_deadline, send_port=self.use_ioeventfd)

    def _read_tsc(self) -> tuple[int, int]:
        """Guest TSC and the monotonic time it was read at (bracketed)."""
        m0 = time.monotonic_ns()
        tsc = self.dom.vcpu.get_msrs([x86.MSR_TSC])[x86.MSR_TSC]
        m1 = time.monotonic_ns()
        return tsc, (m0 + m1) // 2

    def vcpu_info_moved(self, vcpu_id: int, gpa: int) -> None:
        E.write_vcpu_time(self.dom.phys, gpa, self.clock)

    # ------------------------------------------------------------------
    # kicks and the hypercall hook
    # ------------------------------------------------------------------
    def kick(self, vcpu_id: int) -> None:
        """Make vcpu_id re-check events: an MSI on the event-check vector.
        From the vCPU's own thread inside a shim exit nothing is needed:
        check_events runs before the shim returns to the guest."""
        if getattr(self._in_exit, "active", False):
            return
        if 0 <= vcpu_id < len(self.dom.region.vcpus):
            self.kicks += 1
            self.dom.vm.signal_msi(E.msi_address(vcpu_id), EV_CHECK_VECTOR)

    def enter_exit(self, active: bool) -> None:
        self._in_exit.active = active

    def after_hypercall(self, vcpu_id: int, nr: int) -> None:
        """Keep the shim's copy of the VIRQ_TIMER port current."""
        if nr != abi.Hypercall.event_channel_op:
            return
        d = self.dom
        for v in d.region.vcpus:
            port = d.evtchn.virq_to_port[v.index].get(int(Virq.TIMER), 0)
            EVENTS.write(d.region.mem, v.events_off, timer_port=port)

    def counters(self, vcpu_id: int = 0) -> dict[str, int]:
        return E.read_counters(self.dom.region.mem, self.dom.region.vcpus[vcpu_id].events_off)

    # ------------------------------------------------------------------
    # store and console
    # ------------------------------------------------------------------
    def _ring(self, pfn: int) -> memoryview:
        return self.dom.ram.view(pfn << abi.PAGE_SHIFT, abi.PAGE_SIZE)

    def _channels(self, name: str) -> None:
        d, lay, ev = self.dom, self.dom.layout, self.dom.evtchn
        ev.listeners.append(self._on_port_event)
        ports = {}
        for what, want in (("store", lay.store_evtchn), ("console", lay.console_evtchn)):
            p = ev.alloc_unbound(DOMID_SELF, BACKEND_DOMID)
            if p != want:
                raise RuntimeError(f"{what} event channel: got port {p}, start_info says {want}")
            ports[what] = p
        self.store = XenstoreStore()
        self.dom_path = populate_domain(
            self.store, d.domid, name, memory_kib=d.ram.size // 1024, vcpus=len(d.region.vcpus),
            console={"ring-ref": lay.console_pfn, "port": ports["console"]})
        self.store.write(f"{self.dom_path}/store/ring-ref", str(lay.xenstore_pfn))
        self.store.write(f"{self.dom_path}/store/port", str(ports["store"]))
        d.gnttab.seed_reserved(lay.console_pfn, lay.xenstore_pfn, BACKEND_DOMID)
        self.xenstore_server = None
        self.console_backend = None
        be_store = ev.backend_bind(ports["store"], lambda: self.xenstore_server.process())
        self.xenstore_server = XenstoreRingServer(self._ring(lay.xenstore_pfn), be_store.notify,
                                                  self.store, d.domid)
        be_cons = ev.backend_bind(ports["console"], lambda: self.console_backend.process())
        self.console_backend = ConsoleRingServer(self._ring(lay.console_pfn), be_cons.notify, d.console_write)

    def send_console_input(self, data: bytes) -> int:
        return self.console_backend.send_input(bytes(data))

    # ------------------------------------------------------------------
    # guest -> back-end sends through ioeventfds
    # ------------------------------------------------------------------
    def _on_port_event(self, event: str, guest_port: int, be) -> None:
        d = self.dom
        for v in d.region.vcpus:
            E.set_backend_port(d.region.mem, v.events_off, guest_port, event == "bind")
        if not self.use_ioeventfd:
            return
        with self._efd_lock:
            if event == "bind" and guest_port not in self._efds:
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                d.vm.ioeventfd(efd, EV_SEND_PORT, length=4, datamatch=guest_port, pio=True)
                self._efds[guest_port] = efd
            elif event == "close" and guest_port in self._efds:
                efd = self._efds.pop(guest_port)
                d.vm.ioeventfd(efd, EV_SEND_PORT, length=4, datamatch=guest_port, pio=True,
                               deassign=True)
                os.close(efd)
        os.write(self._wake_w, b"\0")     # re-read the eventfd set

    def _backend_loop(self) -> None:
        while not self._closed:
            with self._efd_lock:
                fds = {efd: port for port, efd in self._efds.items()}
            try:
                ready, _, _ = select.select([self._wake_r, *fds], [], [])
            except (OSError, ValueError):
                if self._closed:
                    return
                continue
            for fd in ready:
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                try:
                    os.eventfd_read(fd)
                except (BlockingIOError, OSError):
                    continue
                self.backend_send(fds[fd])

    def backend_send(self, port: int) -> None:
        """The guest sent on a back-end port (ioeventfd thread or exit)."""
        try:
            with self.backend_lock:
                self.dom.evtchn.send(port)
        except abi.HypercallError:
            pass                       # closed meanwhile
        except Exception:
            log.exception("back-end send on port %d failed", port)

    def handle_io(self, ex) -> bool:
        """An `out` to EV_SEND_PORT no ioeventfd matched: send from here."""
        if ex.port != EV_SEND_PORT or not ex.is_out:
            return False
        port = int.from_bytes(bytes(ex.data[:4]), "little")
        self.enter_exit(True)
        try:
            self.backend_send(port)
        finally:
            self.enter_exit(False)
        return True

    def quiesce(self) -> None:
        """Wait for an in-flight back-end notification, then drain the
        console ring once more (the guest may stop right after writing)."""
        with self.backend_lock:
            self.console_backend.process()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"\0")
        self._thread.join(timeout=2)
        with self._efd_lock:
            for efd in self._efds.values():
                os.close(efd)
            self._efds.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
