"""2-level event channels: the port table and the pending/mask bitmaps.

Python owns the port table (what each port is bound to). The bitmaps live in
the guest's shared_info page and the per-vCPU vcpu_info, which the guest
updates concurrently with LOCK-prefixed bit operations, so every update made
here is a real atomic on the shared mapping (PhysicalMemory.atomic_*).

Port numbers are the guest's. The VMM's back-ends play domain 0: an
interdomain channel connects a guest port to a BackendPort, whose callback
runs when the guest does EVTCHNOP_send, and whose notify() raises the guest
port. Everything guest-controlled (port numbers, vCPU ids, VIRQ numbers)
is range-checked and fails with HypercallError (a Xen errno).
"""
from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from pyvmm.xen_abi.abi import (
    DOMID_SELF,
    EVTCHN_2L_NR_CHANNELS,
    EVTCHN_FIFO_EVENT_WORDS_PER_PAGE,
    EVTCHN_FIFO_LINKED,
    EVTCHN_FIFO_MASKED,
    EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES,
    EVTCHN_FIFO_PENDING,
    EVTCHN_FIFO_PRIORITY_DEFAULT,
    EVTCHN_FIFO_PRIORITY_MIN,
    PAGE_SHIFT,
    PAGE_SIZE,
    NR_VIRQS,
    SHARED_INFO_EVTCHN_MASK,
    SHARED_INFO_EVTCHN_PENDING,
    VCPU_INFO_PENDING_SEL,
    VCPU_INFO_SIZE,
    VCPU_INFO_UPCALL_PENDING,
    XEN_LEGACY_MAX_VCPUS,
    EvtchnStatus,
    HypercallError,
    Virq,
    XenErrno,
    EvtchnFifoControlBlock,
)

__all__ = ["EventChannels", "BackendPort", "Port", "BACKEND_DOMID", "PER_VCPU_VIRQS", "FifoShim"]

log = logging.getLogger(__name__)

BACKEND_DOMID = 0  # the VMM's back-ends act as domain 0
BITS_PER_WORD = 64
NR_WORDS = EVTCHN_2L_NR_CHANNELS // BITS_PER_WORD
# VIRQs bound per vCPU; all others are global and bindable on vCPU 0 only (Xen virq_is_global).
PER_VCPU_VIRQS = frozenset({Virq.TIMER, Virq.DEBUG, Virq.XENOPROF, Virq.XENPMU})


@dataclass
class Port:
    state: EvtchnStatus = EvtchnStatus.closed
    vcpu: int = 0  # notify vCPU
    virq: int = -1
    remote_dom: int = 0  # unbound: who may bind; interdomain: the other end's domain
    remote_port: int = 0  # interdomain: the other end's port number
    backend: Optional["BackendPort"] = None


class FifoShim:
    """Where the FIFO ABI's queues are linked: the shim (notify.ShimFifo).
    This base does nothing, for an EventChannels without a shim (tests
    record what would have been asked)."""

    def enable(self, on: bool) -> None: ...
    def set_array_page(self, index: int, gpa: int, nr_words: int) -> None: ...
    def set_control_block(self, vcpu: int, gpa: Optional[int]) -> None: ...
    def set_priority(self, port: int, priority: int) -> None: ...
    def queue(self, vcpu: int, port: int) -> None:
        """Ask vcpu's shim to link port (it is PENDING, was neither MASKED
        nor LINKED); the caller kicks vcpu."""


class BackendPort:
    """The VMM (domain 0) end of an interdomain channel."""

    def __init__(self, evtchn: "EventChannels", port: int, on_notify: Callable[[], None],
                 on_close: Optional[Callable[[], None]] = None):
        self.evtchn = evtchn
        self.port = port  # domain-0-side number, as EVTCHNOP_status reports it
        self.on_notify = on_notify
        self.on_close = on_close
        self.guest_port: Optional[int] = None  # set once connected

    @property
    def connected(self) -> bool:
        return self.guest_port is not None

    def notify(self) -> Optional[int]:
        """Raise the guest end; returns the vCPU that was kicked, if any."""
        gp = self.guest_port
        if gp is None:
            return None
        return self.evtchn.raise_port(gp)

    def close(self) -> None:
        self.evtchn.backend_close(self)

    def __repr__(self):
        return f"BackendPort(dom0 port {self.port} <-> guest port {self.guest_port})"


def _err(errno: XenErrno, why: str) -> HypercallError:
    return HypercallError(errno, why)


class EventChannels:
    """The 2-level port table of one guest domain.

    phys: PhysicalMemory covering shared_info and RAM (for relocated vcpu_info).
    shared_info_gpa: guest-physical address of the shared_info frame.
    vcpu_info_gpa: optional callable vcpu -> GPA of that vCPU's live vcpu_info
        (or None if it has none); by default the table kept here, which starts
        at the legacy shared_info slots and follows set_vcpu_info_gpa().
    kick: called with a vCPU index when an event needs that vCPU's attention.
    """

    def __init__(self, phys, shared_info_gpa: int, nr_vcpus: int, *, domid: int = 1,
                 vcpu_info_gpa: Optional[Callable[[int], Optional[int]]] = None,
                 kick: Optional[Callable[[int], None]] = None,
                 nr_ports: int = EVTCHN_2L_NR_CHANNELS):
        if not 0 < nr_ports <= EVTCHN_2L_NR_CHANNELS:
            raise ValueError("nr_ports out of range for the 2-level ABI")
        self.phys = phys
        self.shared_info_gpa = shared_info_gpa
        self.nr_vcpus = nr_vcpus
        self.domid = domid
        self.nr_ports = nr_ports
        self.kick = kick
        self._vcpu_info = [shared_info_gpa + v * VCPU_INFO_SIZE if v < XEN_LEGACY_MAX_VCPUS else None
                           for v in range(nr_vcpus)]
        self.vcpu_info_gpa = vcpu_info_gpa or self._vcpu_info_default
        self.ports = [Port() for _ in range(nr_ports)]
        self.virq_to_port = [dict() for _ in range(nr_vcpus)]
        self.backend_ports: dict[int, BackendPort] = {}
        self._backend_numbers = itertools.count(1)
        self.lock = threading.RLock()
        # routing(port, vcpu, is_ipi) after a port is bound, moved or closed:
        # lets the shim send IPIs and unmask without Python (notify.py)
        self.routing: Optional[Callable[[int, int, bool], None]] = None
        # listener(event, guest_port, backend_port) for event in {"bind", "close"}:
        # lets the domain wire ioeventfds for guest->back-end sends.
        self.listeners: list[Callable[[str, int, BackendPort], None]] = []
        # FIFO ABI (EVTCHNOP_init_control): off until the guest asks.
        # take_frame(mfn) -> bool: the frame is the guest's RAM and now held
        # writable (Xen's get_page_type(PGT_writable_page)); drop_frame(mfn)
        # gives it back.  The domain sets both; without them nothing maps.
        self.fifo = False
        self.fifo_shim = FifoShim()
        self.take_frame: Optional[Callable[[int], bool]] = None
        self.drop_frame: Optional[Callable[[int], None]] = None
        self._fifo_array: list[int] = []                 # event array frames, in order
        self._fifo_cb: dict[int, int] = {}               # vCPU -> control block GPA
        self._fifo_pending: set[int] = set()             # raised before their page came (Xen's evtchn->pending)
        self._fifo_prio = [EVTCHN_FIFO_PRIORITY_DEFAULT] * nr_ports

    # ------------------------------------------------------------------
    # vcpu_info location
    # ------------------------------------------------------------------
    def _vcpu_info_default(self, vcpu: int) -> Optional[int]:
        return self._vcpu_info[vcpu] if 0 <= vcpu < self.nr_vcpus else None

    def set_vcpu_info_gpa(self, vcpu: int, gpa: int) -> None:
        self._vcpu_info[vcpu] = gpa

    # ------------------------------------------------------------------
    # bitmap primitives (atomic on the shared page)
    # ------------------------------------------------------------------
    def _word_gpa(self, base: int, port: int) -> int:
        return self.shared_info_gpa + base + (port // BITS_PER_WORD) * 8

    def is_pending(self, port: int) -> bool:
        self._check_port(port)
        if self.fifo:
            return bool(self._fifo_word(port) >> EVTCHN_FIFO_PENDING & 1)
        word = self.phys.atomic_load_u64(self._word_gpa(SHARED_INFO_EVTCHN_PENDING, port))
        return bool(word >> (port % BITS_PER_WORD) & 1)

    def is_masked(self, port: int) -> bool:
        self._check_port(port)
        if self.fifo:   # no event word yet: masked, as Xen's evtchn_fifo_is_masked
            gpa = self._fifo_word_gpa(port)
            return gpa is None or bool(self._fifo_word(port) >> EVTCHN_FIFO_MASKED & 1)
        word = self.phys.atomic_load_u64(self._word_gpa(SHARED_INFO_EVTCHN_MASK, port))
        return bool(word >> (port % BITS_PER_WORD) & 1)

    def clear_pending(self, port: int) -> None:
        self._check_port(port)
        if self.fifo:   # Xen's evtchn_fifo_clear_pending: the guest unlinks it
            with self.lock:
                self._fifo_pending.discard(port)
                self._fifo_and(port, ~(1 << EVTCHN_FIFO_PENDING))
            return
        self.phys.atomic_and_u64(self._word_gpa(SHARED_INFO_EVTCHN_PENDING, port),
                                 ~(1 << (port % BITS_PER_WORD)))

    def mask(self, port: int) -> None:
        self._check_port(port)
        if self.fifo:
            with self.lock:
                self._fifo_or(port, 1 << EVTCHN_FIFO_MASKED)
            return
        self.phys.atomic_or_u64(self._word_gpa(SHARED_INFO_EVTCHN_MASK, port),
                                1 << (port % BITS_PER_WORD))

    def _mark_vcpu(self, vcpu: int, word: int) -> Optional[int]:
        """Set the selector bit and upcall_pending; the vCPU to kick or None."""
        vi = self.vcpu_info_gpa(vcpu)
        if vi is None:
            return None
        old = self.phys.atomic_or_u64(vi + VCPU_INFO_PENDING_SEL, 1 << word)
        if old >> word & 1:
            return None
        if self.phys.atomic_or_u8(vi + VCPU_INFO_UPCALL_PENDING, 1) & 1:
            return None
        return vcpu

    def set_pending(self, port: int) -> Optional[int]:
        """Xen's 2-level raise; returns the vCPU that needs a kick, or None.

        pending bit (already set: done) -> mask bit (set: done) -> the notify
        vCPU's pending_sel bit (already set: done) -> upcall_pending (already
        set: done) -> kick.
        """
        return self._set_pending(port)[0]

    def _set_pending(self, port: int) -> tuple[Optional[int], Optional[int]]:
        """set_pending(), and the port's vCPU if the port became pending
        while masked: a vCPU in SCHEDOP_poll waits for masked ports too."""
        self._check_port(port)
        if self.fifo:
            return self._fifo_set_pending(port)
        word, bit = divmod(port, BITS_PER_WORD)
        old = self.phys.atomic_or_u64(self.shared_info_gpa + SHARED_INFO_EVTCHN_PENDING + word * 8,
                                      1 << bit)
        if old >> bit & 1:
            return None, None
        if self.phys.atomic_load_u64(self.shared_info_gpa + SHARED_INFO_EVTCHN_MASK + word * 8) >> bit & 1:
            return None, self.ports[port].vcpu
        return self._mark_vcpu(self.ports[port].vcpu, word), None

    def raise_port(self, port: int) -> Optional[int]:
        """set_pending() plus the kick callback; returns the kicked vCPU.
        A port that is masked still wakes its vCPU out of SCHEDOP_poll
        (Xen's evtchn_port_set_pending wakes pollers whatever the mask)."""
        v, poller = self._set_pending(port)
        if self.kick is not None:
            if v is not None:
                self.kick(v)
            elif poller is not None:
                self.kick(poller)
        return v

    def raise_virq(self, virq: int, vcpu: int = 0) -> Optional[int]:
        """Raise whatever port the guest bound to (virq, vcpu); no-op if unbound."""
        if not 0 <= vcpu < self.nr_vcpus:
            return None
        port = self.virq_to_port[vcpu].get(int(virq))
        if port is None:
            return None
        return self.raise_port(port)

    def vcpu_upcall_pending(self, vcpu: int) -> bool:
        vi = self.vcpu_info_gpa(vcpu)
        return vi is not None and bool(self.phys.read_u8(vi + VCPU_INFO_UPCALL_PENDING))

    # ------------------------------------------------------------------
    # checks
    # ------------------------------------------------------------------
    def _check_port(self, port: int) -> None:
        if not isinstance(port, int) or not 0 <= port < self.nr_ports:
            raise _err(XenErrno.EINVAL, f"port {port} out of range")

    def _check_vcpu(self, vcpu: int) -> None:
        if not 0 <= vcpu < self.nr_vcpus:
            raise _err(XenErrno.ENOENT, f"no vCPU {vcpu}")

    def _self_dom(self, dom: int) -> bool:
        return dom in (DOMID_SELF, self.domid)

    def _resolve_dom(self, dom: int) -> int:
        """Map DOMID_SELF; -ESRCH for domains that do not exist here."""
        if dom == DOMID_SELF:
            return self.domid
        if dom in (self.domid, BACKEND_DOMID):
            return dom
        raise _err(XenErrno.ESRCH, f"no domain {dom}")

    def _alloc_port(self) -> int:
        # Port 0 is reserved (Xen's ECS_RESERVED): never handed out.
        for p in range(1, self.nr_ports):
            if self.ports[p].state == EvtchnStatus.closed and not self._fifo_busy(p):
                self._fifo_init_port(p)
                return p
        raise _err(XenErrno.ENOSPC, "out of event channel ports")

    # ------------------------------------------------------------------
    # guest operations (EVTCHNOP_*); each raises HypercallError on bad input
    # ------------------------------------------------------------------
    def alloc_unbound(self, dom: int = DOMID_SELF, remote_dom: int = BACKEND_DOMID) -> int:
        if not self._self_dom(dom):
            self._resolve_dom(dom)  # -ESRCH if it does not exist at all
            raise _err(XenErrno.EPERM, "alloc_unbound for another domain")
        remote = self._resolve_dom(remote_dom)
        with self.lock:
            p = self._alloc_port()
            self.ports[p] = Port(EvtchnStatus.unbound, vcpu=0, remote_dom=remote)
            self._routed(p)
            return p

    def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        remote = self._resolve_dom(remote_dom)
        with self.lock:
            if remote == BACKEND_DOMID:
                be = self.backend_ports.get(remote_port)
                if be is None or be.guest_port is not None:
                    raise _err(XenErrno.EINVAL, f"domain 0 port {remote_port} is not unbound")
                p = self._alloc_port()
                self.ports[p] = Port(EvtchnStatus.interdomain, vcpu=0, remote_dom=BACKEND_DOMID,
                                     remote_port=remote_port, backend=be)
                self._routed(p)
                be.guest_port = p
                self._announce("bind", p, be)
            else:  # loopback inside this domain
                if not isinstance(remote_port, int) or not 0 <= remote_port < self.nr_ports:
                    raise _err(XenErrno.EINVAL, f"port {remote_port} out of range")
                rp = self.ports[remote_port]
                if rp.state != EvtchnStatus.unbound or rp.remote_dom != self.domid:
                    raise _err(XenErrno.EINVAL, f"port {remote_port} is not unbound for us")
                p = self._alloc_port()
                self.ports[p] = Port(EvtchnStatus.interdomain, vcpu=0, remote_dom=self.domid,
                                     remote_port=remote_port)
                self._routed(p)
                rp.state = EvtchnStatus.interdomain
                rp.remote_port = p
        # Like Xen: notifications sent to the unbound end may have been lost,
        # so always raise the new local port once.
        self.raise_port(p)
        return p

    def bind_virq(self, virq: int, vcpu: int) -> int:
        if not 0 <= virq < NR_VIRQS:
            raise _err(XenErrno.EINVAL, f"VIRQ {virq} out of range")
        if virq not in PER_VCPU_VIRQS and vcpu != 0:
            raise _err(XenErrno.EINVAL, f"global VIRQ {virq} must be bound on vCPU 0")
        self._check_vcpu(vcpu)
        with self.lock:
            if virq in self.virq_to_port[vcpu]:
                raise _err(XenErrno.EEXIST, f"VIRQ {virq} already bound on vCPU {vcpu}")
            p = self._alloc_port()
            self.ports[p] = Port(EvtchnStatus.virq, vcpu=vcpu, virq=virq)
            self._routed(p)
            self.virq_to_port[vcpu][virq] = p
            return p

    def bind_ipi(self, vcpu: int) -> int:
        self._check_vcpu(vcpu)
        with self.lock:
            p = self._alloc_port()
            self.ports[p] = Port(EvtchnStatus.ipi, vcpu=vcpu)
            self._routed(p)
            return p

    def send(self, port: int) -> None:
        self._check_port(port)
        with self.lock:
            pt = self.ports[port]
            state = pt.state
            backend = pt.backend
            target = pt.remote_port
        if state == EvtchnStatus.interdomain:
            if backend is not None:
                try:
                    backend.on_notify()
                except Exception:  # a back-end bug must not become a guest-visible error
                    log.exception("back-end notify for guest port %d failed", port)
            else:
                self.raise_port(target)
        elif state == EvtchnStatus.ipi:
            self.raise_port(port)
        elif state == EvtchnStatus.unbound:
            pass  # Xen silently drops sends on unbound ports
        else:
            raise _err(XenErrno.EINVAL, f"send on port {port} in state {state.name}")

    def close(self, port: int) -> None:
        self._check_port(port)
        with self.lock:
            pt = self.ports[port]
            if port == 0 or pt.state == EvtchnStatus.closed:
                raise _err(XenErrno.EINVAL, f"port {port} is not bound")
            be = None
            if pt.state == EvtchnStatus.virq:
                self.virq_to_port[pt.vcpu].pop(pt.virq, None)
            elif pt.state == EvtchnStatus.interdomain:
                if pt.backend is not None:
                    be = pt.backend
                    be.guest_port = None
                else:  # the loopback peer goes back to unbound, as in Xen
                    peer = self.ports[pt.remote_port]
                    if peer.state == EvtchnStatus.interdomain and peer.remote_port == port:
                        peer.state = EvtchnStatus.unbound
                        peer.remote_dom = self.domid
                        peer.remote_port = 0
            self.ports[port] = Port()
            self._routed(port)
            # Clear a stale pending bit so a re-bound port starts clean (Xen does too).
            self.clear_pending(port)
        if be is not None:
            self.backend_ports.pop(be.port, None)
            self._announce("close", port, be)
            if be.on_close is not None:
                try:
                    be.on_close()
                except Exception:
                    log.exception("back-end close for guest port %d failed", port)

    def status(self, dom: int, port: int) -> dict:
        if not self._self_dom(dom):
            self._resolve_dom(dom)
            raise _err(XenErrno.EPERM, "status of another domain's port")
        self._check_port(port)
        with self.lock:
            pt = self.ports[port]
            out = {"status": pt.state, "vcpu": pt.vcpu, "dom": 0, "port": 0, "virq": 0}
            if pt.state == EvtchnStatus.unbound:
                out["dom"] = pt.remote_dom
            elif pt.state == EvtchnStatus.interdomain:
                out["dom"] = pt.remote_dom
                out["port"] = pt.remote_port
            elif pt.state == EvtchnStatus.virq:
                out["virq"] = pt.virq
            return out

    def unmask(self, port: int) -> Optional[int]:
        """Clear the mask bit; re-raise if pending (Xen evtchn_2l_unmask,
        evtchn_fifo_unmask)."""
        self._check_port(port)
        if self.fifo:
            with self.lock:
                if self._fifo_word_gpa(port) is None:
                    return None
                self._fifo_and(port, ~(1 << EVTCHN_FIFO_MASKED))
                if not self._fifo_word(port) >> EVTCHN_FIFO_PENDING & 1:
                    return None
                v, _ = self._fifo_set_pending_locked(port)
            if v is not None and self.kick is not None:
                self.kick(v)
            return v
        word, bit = divmod(port, BITS_PER_WORD)
        old = self.phys.atomic_and_u64(self.shared_info_gpa + SHARED_INFO_EVTCHN_MASK + word * 8,
                                       ~(1 << bit))
        if not old >> bit & 1:
            return None
        if not self.phys.atomic_load_u64(
                self.shared_info_gpa + SHARED_INFO_EVTCHN_PENDING + word * 8) >> bit & 1:
            return None
        v = self._mark_vcpu(self.ports[port].vcpu, word)
        if v is not None and self.kick is not None:
            self.kick(v)
        return v

    def bind_vcpu(self, port: int, vcpu: int) -> None:
        self._check_vcpu(vcpu)
        self._check_port(port)
        with self.lock:
            pt = self.ports[port]
            if pt.state == EvtchnStatus.virq:
                if pt.virq in PER_VCPU_VIRQS:
                    raise _err(XenErrno.EINVAL, "per-vCPU VIRQ ports cannot move")
            elif pt.state not in (EvtchnStatus.unbound, EvtchnStatus.interdomain, EvtchnStatus.pirq):
                raise _err(XenErrno.EINVAL, f"port {port} in state {pt.state.name} cannot move")
            pt.vcpu = vcpu
            self._routed(port)

    def reset(self, dom: int = DOMID_SELF) -> None:
        if not self._self_dom(dom):
            self._resolve_dom(dom)
            raise _err(XenErrno.EPERM, "reset of another domain")
        for p in range(1, self.nr_ports):
            if self.ports[p].state != EvtchnStatus.closed:
                self.close(p)
        with self.lock:
            if self.fifo:   # Xen's evtchn_reset: back to the 2-level ABI
                self._fifo_teardown()

    def _routed(self, p: int) -> None:
        if self.routing is not None:
            pt = self.ports[p]
            self.routing(p, pt.vcpu, pt.state == EvtchnStatus.ipi)

    # ------------------------------------------------------------------
    # FIFO ABI (Xen's event_fifo.c)
    #
    # Locking model.  Python never writes a queue: it has no tail.  Any
    # raiser (a back-end thread here, or another vCPU's shim) sets PENDING
    # in the port's event word with one locked OR, and if the word was
    # neither MASKED nor LINKED, marks the port in the notify vCPU's
    # "to link" bitmap in shim memory (locked ORs) and kicks that vCPU.
    # That vCPU's shim links every marked port on its way back to the
    # guest (events.c fifo_drain), holding the domain's link lock, which
    # guards all the queue tails and each port's last queue (a port moved
    # to another vCPU or priority must invalidate its old queue's tail).
    # The guest may write the event words and control block at any time:
    # the shim never follows LINK, writes only head[] and READY, and
    # bounds its cmpxchg retries as Xen does (BUSY held forever costs five
    # tries, then the link is forced).  Event array pages and control
    # blocks are guest RAM frames held writable (take_frame) until reset
    # or the domain's end, so they can neither be ballooned out nor
    # become page tables.
    # ------------------------------------------------------------------
    def _fifo_word_gpa(self, port: int) -> Optional[int]:
        page, index = divmod(port, EVTCHN_FIFO_EVENT_WORDS_PER_PAGE)
        if page >= len(self._fifo_array):
            return None
        return (self._fifo_array[page] << PAGE_SHIFT) + 4 * index

    def _fifo_word(self, port: int) -> int:
        gpa = self._fifo_word_gpa(port)
        if gpa is None:
            return 0
        return self.phys.atomic_load_u64(gpa & ~7) >> (gpa & 4) * 8 & 0xFFFFFFFF

    def _fifo_or(self, port: int, bits: int) -> int:
        """Locked OR into the port's event word (the aligned u64 holding
        it); its old value (0 when the page is not there)."""
        gpa = self._fifo_word_gpa(port)
        if gpa is None:
            return 0
        shift = (gpa & 4) * 8
        return self.phys.atomic_or_u64(gpa & ~7, bits << shift) >> shift & 0xFFFFFFFF

    def _fifo_and(self, port: int, bits: int) -> int:
        gpa = self._fifo_word_gpa(port)
        if gpa is None:
            return 0
        shift = (gpa & 4) * 8
        keep = ((bits & 0xFFFFFFFF) << shift) | (0xFFFFFFFF << (32 - shift))
        return self.phys.atomic_and_u64(gpa & ~7, keep & 0xFFFFFFFFFFFFFFFF) >> shift & 0xFFFFFFFF

    def _fifo_busy(self, port: int) -> bool:
        """Xen's evtchn_is_busy: a port still LINKED is not handed out again."""
        return self.fifo and bool(self._fifo_word(port) >> EVTCHN_FIFO_LINKED & 1)

    def _fifo_init_port(self, port: int) -> None:
        """A port being bound starts at the default priority (evtchn_fifo_init)."""
        if self._fifo_prio[port] != EVTCHN_FIFO_PRIORITY_DEFAULT:
            self._fifo_prio[port] = EVTCHN_FIFO_PRIORITY_DEFAULT
            self.fifo_shim.set_priority(port, EVTCHN_FIFO_PRIORITY_DEFAULT)

    def _fifo_set_pending(self, port: int) -> tuple[Optional[int], Optional[int]]:
        """Xen's evtchn_fifo_set_pending, the raiser's half: (vCPU to kick
        because its shim has a port to link, poller vCPU to wake).  Under
        the table's lock: reset gives the frames back under it."""
        with self.lock:
            return self._fifo_set_pending_locked(port)

    def _fifo_set_pending_locked(self, port: int) -> tuple[Optional[int], Optional[int]]:
        v = self.ports[port].vcpu
        if self._fifo_word_gpa(port) is None:   # its page is not there yet
            self._fifo_pending.add(port)
            return None, None
        if v not in self._fifo_cb:               # Xen drops it (no control block)
            return None, None
        old = self._fifo_or(port, 1 << EVTCHN_FIFO_PENDING)
        if old & (1 << EVTCHN_FIFO_MASKED | 1 << EVTCHN_FIFO_LINKED):
            newly = not old >> EVTCHN_FIFO_PENDING & 1
            return None, (v if newly and old >> EVTCHN_FIFO_MASKED & 1 else None)
        self.fifo_shim.queue(v, port)
        return v, None

    def init_control(self, vcpu: int, control_gfn: int, offset: int) -> None:
        """EVTCHNOP_init_control (Xen's evtchn_fifo_init_control)."""
        if not 0 <= vcpu < self.nr_vcpus:
            raise _err(XenErrno.ENOENT, f"no vCPU {vcpu}")
        if offset > PAGE_SIZE - EvtchnFifoControlBlock.sizeof() or offset % 8:
            raise _err(XenErrno.EINVAL, f"control block offset {offset:#x}")
        with self.lock:
            if vcpu in self._fifo_cb:
                raise _err(XenErrno.EINVAL, f"vCPU {vcpu} already has a control block")
            if self.take_frame is None or not self.take_frame(control_gfn):
                raise _err(XenErrno.EINVAL, f"control block frame {control_gfn:#x}")
            gpa = (control_gfn << PAGE_SHIFT) + offset
            self._fifo_cb[vcpu] = gpa
            self.fifo_shim.set_control_block(vcpu, gpa)
            if not self.fifo:
                self._fifo_setup_ports()

    def _fifo_setup_ports(self) -> None:
        """The switch (Xen's setup_ports): every port keeps its 2-level
        pending state, raised once its event word exists; all at the
        default priority."""
        for p in range(1, self.nr_ports):
            self._fifo_prio[p] = EVTCHN_FIFO_PRIORITY_DEFAULT
            self.fifo_shim.set_priority(p, EVTCHN_FIFO_PRIORITY_DEFAULT)
            if self.ports[p].state != EvtchnStatus.closed:
                word, bit = divmod(p, BITS_PER_WORD)
                if self.phys.atomic_load_u64(self._word_gpa(SHARED_INFO_EVTCHN_PENDING, p)) >> bit & 1:
                    self._fifo_pending.add(p)
        self.fifo = True
        self.fifo_shim.enable(True)

    def expand_array(self, array_gfn: int) -> None:
        """EVTCHNOP_expand_array (Xen's add_page_to_event_array)."""
        with self.lock:
            if not self.fifo:
                raise _err(XenErrno.EOPNOTSUPP, "expand_array before init_control")
            if len(self._fifo_array) >= EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES:
                raise _err(XenErrno.ENOSPC, "event array full")
            if self.take_frame is None or not self.take_frame(array_gfn):
                raise _err(XenErrno.EINVAL, f"event array frame {array_gfn:#x}")
            index = len(self._fifo_array)
            self._fifo_array.append(array_gfn)
            first = index * EVTCHN_FIFO_EVENT_WORDS_PER_PAGE
            nr_words = min(first + EVTCHN_FIFO_EVENT_WORDS_PER_PAGE, self.nr_ports)
            if first < self.nr_ports:
                self.fifo_shim.set_array_page(index, array_gfn << PAGE_SHIFT, nr_words)
            again = sorted(p for p in self._fifo_pending if first <= p < nr_words)
            self._fifo_pending.difference_update(again)
        for p in again:    # pending while their page was missing
            if self.ports[p].state != EvtchnStatus.closed:
                self.raise_port(p)

    def set_priority(self, port: int, priority: int) -> None:
        """EVTCHNOP_set_priority: for the port's next link."""
        self._check_port(port)
        with self.lock:
            if not self.fifo:
                raise _err(XenErrno.ENOSYS, "set_priority under the 2-level ABI")
            if not 0 <= priority <= EVTCHN_FIFO_PRIORITY_MIN:
                raise _err(XenErrno.EINVAL, f"priority {priority}")
            self._fifo_prio[port] = priority
            self.fifo_shim.set_priority(port, priority)

    def priority(self, port: int) -> int:
        self._check_port(port)
        return self._fifo_prio[port]

    def _fifo_teardown(self) -> None:
        """Back to 2-level, the table's lock held: once the shim state is
        down (under the shim's link lock) nothing writes the frames."""
        self.fifo = False
        self.fifo_shim.enable(False)
        frames = [gpa >> PAGE_SHIFT for gpa in self._fifo_cb.values()] + self._fifo_array
        self._fifo_cb.clear()
        self._fifo_array = []
        self._fifo_pending.clear()
        if self.drop_frame is not None:
            for mfn in frames:
                self.drop_frame(mfn)

    # ------------------------------------------------------------------
    # back-end (domain 0) side
    # ------------------------------------------------------------------
    def _announce(self, event: str, guest_port: int, be: BackendPort) -> None:
        for fn in list(self.listeners):
            try:
                fn(event, guest_port, be)
            except Exception:
                log.exception("event channel listener failed on %s of port %d", event, guest_port)

    def backend_bind(self, guest_port: int, on_notify: Callable[[], None],
                     on_close: Optional[Callable[[], None]] = None) -> BackendPort:
        """Domain 0 binds to a guest port the guest left unbound for it
        (xenstored/xenconsoled/blkback doing bind_interdomain to the
        frontend's alloc_unbound port). Raises HypercallError if that port
        is not unbound for domain 0."""
        self._check_port(guest_port)
        with self.lock:
            pt = self.ports[guest_port]
            if pt.state != EvtchnStatus.unbound or pt.remote_dom != BACKEND_DOMID:
                raise _err(XenErrno.EINVAL, f"guest port {guest_port} is not unbound for domain 0")
            be = BackendPort(self, next(self._backend_numbers), on_notify, on_close)
            be.guest_port = guest_port
            self.backend_ports[be.port] = be
            pt.state = EvtchnStatus.interdomain
            pt.remote_port = be.port
            pt.backend = be
        self._announce("bind", guest_port, be)
        return be

    def backend_alloc_unbound(self, on_notify: Callable[[], None],
                              on_close: Optional[Callable[[], None]] = None) -> BackendPort:
        """Domain 0 offers a port that the guest binds with
        EVTCHNOP_bind_interdomain(remote_dom=0, remote_port=be.port)."""
        with self.lock:
            be = BackendPort(self, next(self._backend_numbers), on_notify, on_close)
            self.backend_ports[be.port] = be
            return be

    def backend_close(self, be: BackendPort) -> None:
        """Domain 0 closes its end: the guest end goes back to unbound (remote 0)."""
        with self.lock:
            gp = be.guest_port
            self.backend_ports.pop(be.port, None)
            be.guest_port = None
            if gp is not None:
                pt = self.ports[gp]
                if pt.backend is be:
                    pt.state = EvtchnStatus.unbound
                    pt.remote_dom = BACKEND_DOMID
                    pt.remote_port = 0
                    pt.backend = None
        if gp is not None:
            self._announce("close", gp, be)

    def backend_for(self, guest_port: int) -> Optional[BackendPort]:
        if not isinstance(guest_port, int) or not 0 <= guest_port < self.nr_ports:
            return None
        return self.ports[guest_port].backend
