"""Event notifications between Python and a running Domain
(xen_abi/hypervisor/domain.py), both ways:

* kicks: a port raised from Python becomes an "event check" MSI to the
  target vCPU, so the shim re-checks events even while the guest spins at
  CPL3 or is halted in SCHEDOP_block;
* guest -> back-end EVTCHNOP_send without an exit: the shim writes the port
  number to EV_SEND_PORT, where an ioeventfd per back-end port (datamatch)
  absorbs it; a thread waits on those eventfds and runs the back-end, one
  notification at a time (backend_lock).

    notifier = EventNotifier(vm, region, evtchn)   # before any back-end port is bound
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time

from pyvmm.xen_abi import abi
from pyvmm.xen_abi.hypervisor import time as E
from pyvmm.xen_abi.memory import vmm_region as R
from pyvmm.xen_abi.hypervisor.evtchn import FifoShim
from pyvmm.xen_abi.shim.layout import (
    EV_CHECK_VECTOR,
    EV_SEND_PORT,
    EVENTS,
    FIFO,
    FIFO_ARRAY_PAGES,
    FIFO_PORTS,
    PORT_MAP_IPI,
    PORT_MAP_VCPU,
)

log = logging.getLogger(__name__)

__all__ = ["EventNotifier", "ShimFifo"]


class ShimFifo(FifoShim):
    """The FIFO ABI's state the shim links with (layout.FIFO and the
    events blocks' fifo_* fields); the locking model is evtchn.py's."""

    def __init__(self, region, phys):
        self.region, self.phys, self.mem = region, phys, region.mem

    def _va(self, gpa: int) -> int:
        return R.DIRECTMAP_VA + gpa     # event pages are guest RAM (take_frame)

    def enable(self, on: bool) -> None:
        if on:
            FIFO.write(self.mem, R.FIFO_OFF, on=1)
            return
        # back to 2-level (EVTCHNOP_reset): forget every page and queue,
        # holding the shim's link lock, so that once it is released no
        # shim writes the frames the caller then gives back
        lock = self.region.gpa + R.FIFO_OFF + FIFO.offset("lock")
        while self.phys.atomic_xchg_u64(lock, 1):
            time.sleep(0)
        try:
            FIFO.write(self.mem, R.FIFO_OFF, on=0, nr_words=0)
            for i in range(FIFO_ARRAY_PAGES):
                self.mem.write_u64(R.FIFO_OFF + FIFO.offset("array", i), 0)
            self.mem.write(R.FIFO_OFF + FIFO.offset("lastq"), bytes(FIFO_PORTS))
            for v in self.region.vcpus:
                base = v.events_off
                EVENTS.write(self.mem, base, fifo_cb=0)
                self.mem.write(base + EVENTS.offset("fifo_link_sum"),
                               bytes(8 + 8 * EVENTS.fields["fifo_link"].count))
                self.mem.write(base + EVENTS.offset("fifo_tail"), bytes(4 * EVENTS.fields["fifo_tail"].count))
        finally:
            self.phys.atomic_xchg_u64(lock, 0)

    def set_array_page(self, index: int, gpa: int, nr_words: int) -> None:
        if index < FIFO_ARRAY_PAGES:
            self.mem.write_u64(R.FIFO_OFF + FIFO.offset("array", index), self._va(gpa))
            FIFO.write(self.mem, R.FIFO_OFF, nr_words=min(nr_words, FIFO_PORTS))

    def set_control_block(self, vcpu: int, gpa) -> None:
        if 0 <= vcpu < len(self.region.vcpus):
            EVENTS.write(self.mem, self.region.vcpus[vcpu].events_off,
                         fifo_cb=0 if gpa is None else self._va(gpa))

    def set_priority(self, port: int, priority: int) -> None:
        if 0 <= port < FIFO_PORTS:
            self.mem.write(R.FIFO_OFF + FIFO.offset("prio", port), bytes([priority]))

    def queue(self, vcpu: int, port: int) -> None:
        if not (0 <= vcpu < len(self.region.vcpus) and 0 <= port < FIFO_PORTS):
            return
        ev = self.region.gpa + self.region.vcpus[vcpu].events_off
        word, bit = divmod(port, 64)
        self.phys.atomic_or_u64(ev + EVENTS.offset("fifo_link", word), 1 << bit)
        self.phys.atomic_or_u64(ev + EVENTS.offset("fifo_link_sum"), 1 << word)


class EventNotifier:
    def __init__(self, vm, region, evtchn):
        self.vm = vm
        self.region = region
        self.evtchn = evtchn
        self._in_exit = threading.local()
        self._efds: dict[int, int] = {}       # guest port -> eventfd
        self._efd_lock = threading.Lock()
        self.backend_lock = threading.RLock()   # one back-end notification at a time
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        evtchn.listeners.append(self._on_port_event)
        evtchn.routing = self._on_port_routing
        self._thread = threading.Thread(target=self._backend_loop, name="pyvmm-evtchn-io", daemon=True)
        self._thread.start()

    # ---- Python -> guest ----
    def kick(self, vcpu_id: int) -> None:
        """Make vcpu_id re-check events: an MSI on the event-check vector.
        From the vCPU's own thread inside a shim exit nothing is needed:
        check_events runs before the shim returns to the guest."""
        if getattr(self._in_exit, "vcpu", None) == vcpu_id:
            return
        if 0 <= vcpu_id < len(self.region.vcpus):
            self.vm.signal_msi(E.msi_address(vcpu_id), EV_CHECK_VECTOR)

    def enter_exit(self, vcpu_id: int | None) -> None:
        """The calling thread is vCPU vcpu_id's, inside a shim exit (None:
        it left it)."""
        self._in_exit.vcpu = vcpu_id

    def _on_port_routing(self, port: int, vcpu: int, is_ipi: bool) -> None:
        if 0 <= port < abi.EVTCHN_2L_NR_CHANNELS:
            byte = (vcpu & PORT_MAP_VCPU) | (PORT_MAP_IPI if is_ipi else 0)
            self.region.mem.write(R.PORT_MAP_OFF + port, bytes([byte]))

    # ---- guest -> back-end ----
    def _on_port_event(self, event: str, guest_port: int, be) -> None:
        for v in self.region.vcpus:
            E.set_backend_port(self.region.mem, v.events_off, guest_port, event == "bind")
        with self._efd_lock:
            if event == "bind" and guest_port not in self._efds:
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self.vm.ioeventfd(efd, EV_SEND_PORT, length=4, datamatch=guest_port, pio=True)
                self._efds[guest_port] = efd
            elif event == "close" and guest_port in self._efds:
                efd = self._efds.pop(guest_port)
                self.vm.ioeventfd(efd, EV_SEND_PORT, length=4, datamatch=guest_port, pio=True,
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
                self.evtchn.send(port)
        except abi.HypercallError:
            pass                       # closed meanwhile
        except Exception:
            log.exception("back-end send on port %d failed", port)

    def handle_io(self, ex, vcpu_id: int = 0) -> bool:
        """An `out` to EV_SEND_PORT no ioeventfd matched: send from here."""
        if ex.port != EV_SEND_PORT or not ex.is_out:
            return False
        port = int.from_bytes(bytes(ex.data[:4]), "little")
        self.enter_exit(vcpu_id)
        try:
            self.backend_send(port)
        finally:
            self.enter_exit(None)
        return True

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
