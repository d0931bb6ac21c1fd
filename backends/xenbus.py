"""The back-end half of a Xen split driver, run inside pyvmm (as domain 0).

A back-end is a subclass of `XenbusBackend` that says what it advertises
and what to do with a connected ring; this module does the rest the way
Linux's xenbus back-end core does:

* the device's xenstore directories (frontend under the guest's
  ``device/<kind>/<id>``, backend under ``/local/domain/0/backend/...``),
  created before the guest boots so its xenbus finds the device;
* the XenbusState handshake: InitWait with the features written, then on
  the frontend's Initialised/Connected ``connect()`` (map rings, bind the
  event channel) and Connected; Closing/Closed tear down and a frontend
  that starts again (module reload, kexec) finds the back-end in InitWait;
* one worker thread per device, woken by the frontend's event channel and
  by state changes, so a slow disk never holds up the console or xenstore;
* multi-queue devices (``multi-queue-max-queues``): a frontend that asks
  for N > 1 queues gets N `QueueWorker` threads, each woken by its own
  queue's event channel and serving only its own queue's rings (see
  "Locking" below); a device with one queue keeps the single worker;
* a guest that breaks the protocol (a wild grant, a ring index out of
  range, a missing key) loses that device, with the reason in the
  backend's ``error`` node and the log; pyvmm and other devices go on.

A new back-end implements `connect`, `process` and `disconnect` (and
usually `features`); see backends/blkback.py.

Locking.  The device's worker thread runs the handshake (`connect`,
`disconnect`) and, with one queue, `process`; nothing else touches the
rings, so they need no lock.  With N queues each `QueueWorker` owns its
queue (`BackendQueue`: rings, port, counters) and nothing else: no two
threads ever touch one ring, and a queue's counters are written by its
worker only (`stats` sums them when read).  What the queues share is
either read-only while connected (the disk image's fd, the link, feature
flags) or locked where it lives (grant table, event channels, a rate
limiter).  Teardown runs on the device's worker (or in `close` after it
stopped): it stops and joins every queue worker before `disconnect`
unmaps anything, so no queue is served from a ring being unmapped.  A
queue worker that meets a protocol error does not tear down itself: it
reports to the device's worker (`_queue_failed`) and stops; the device's
worker ends the whole device, as for a single queue.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import threading
import time
from dataclasses import dataclass

from pyvmm.xen_abi.abi import SRING_REQ_EVENT, SRING_REQ_PROD, SRING_RSP_EVENT, SRING_RSP_PROD
from pyvmm.xen_abi.abi import SRING_HEADER_SIZE, HypercallError, XenbusState, ring_entries
from pyvmm.xen_abi.hypervisor.evtchn import BACKEND_DOMID, BackendPort
from pyvmm.xen_abi.hypervisor.grant_table import GrantError, GrantMapping
from pyvmm.xen_abi.memory.physmem import SEQ_CST, atomics
from pyvmm.xen_abi.memory.shared_page import u32_fields
from pyvmm.xen_abi.xenstore.store import XenstoreError
from pyvmm.xen_abi.xenstore.toolstack import add_device

log = logging.getLogger(__name__)

__all__ = ["XenbusBackend", "BackRing", "ProtocolError", "BackendHost", "BackendQueue", "QueueWorker",
           "read_num_queues", "queue_dir", "check_distinct", "default_max_queues", "MAX_QUEUES"]

_MASK32 = 0xFFFFFFFF


class ProtocolError(Exception):
    """The frontend broke the protocol; the device is shut down with this message."""


@dataclass
class BackendHost:
    """What a back-end needs of the domain it serves (a Domain has all of these)."""
    domid: int
    store: object       # XenstoreStore
    evtchn: object      # EventChannels
    gnttab: object      # GrantTable


class BackRing:
    """The back-end's side of one shared ring page (io/ring.h BACK_RING).

    Requests are copied out of the page before they are looked at (the
    guest may rewrite them at any time); the producer index is checked so
    that a frontend claiming more requests than the ring holds is caught
    instead of being served stale slots."""

    def __init__(self, page: memoryview, entry_size: int, request_type, response_type):
        self.page = page
        # host address of the page, for the fenced index stores below
        self._anchor = ctypes.c_char.from_buffer(page)
        self._base = ctypes.addressof(self._anchor)
        # read whole, never torn, while the frontend moves them (shared_page.py)
        self._indices = u32_fields(memoryview(page).cast("B"), 0, SRING_HEADER_SIZE)
        self.entry_size = entry_size
        self.size = ring_entries(len(page), entry_size)
        self.request_type, self.response_type = request_type, response_type
        self.req_cons = 0
        self.rsp_prod_pvt = 0

    def _get(self, off: int) -> int:
        return self._indices[off >> 2]

    def _set_fenced(self, off: int, value: int) -> None:
        """Store an index with a full barrier (xchg), so that the load of
        the other side's event index that follows cannot be done before the
        store is visible: the xen_mb() of RING_PUSH_RESPONSES_AND_CHECK_NOTIFY
        and RING_FINAL_CHECK_FOR_REQUESTS.  x86 may otherwise move a load
        ahead of an earlier store, and the guest (which orders its side)
        would sleep on a response we decided not to tell it about."""
        atomics.exchange_4(self._base + off, value & _MASK32, SEQ_CST)

    def _slot(self, index: int) -> int:
        return SRING_HEADER_SIZE + (index % self.size) * self.entry_size

    def unconsumed(self) -> int:
        """Requests produced and not yet consumed (RING_HAS_UNCONSUMED_REQUESTS)."""
        n = (self._get(SRING_REQ_PROD) - self.req_cons) & _MASK32
        # at most a ring's worth may be outstanding: requests + unanswered ones
        if n > self.size - ((self.req_cons - self.rsp_prod_pvt) & _MASK32):
            raise ProtocolError(f"ring overflow: req_prod {self._get(SRING_REQ_PROD)}, "
                                f"req_cons {self.req_cons}, rsp_prod {self.rsp_prod_pvt}, "
                                f"{self.size} slots")
        return n

    def take_request(self):
        """Copy of the next request; advances req_cons."""
        req = self.request_type.from_buffer_copy(self.page, self._slot(self.req_cons))
        self.req_cons = (self.req_cons + 1) & _MASK32
        return req

    def put_response(self, rsp) -> None:
        off = self._slot(self.rsp_prod_pvt)
        self.page[off:off + self.entry_size] = bytes(self.entry_size)
        self.page[off:off + len(bytes(rsp))] = bytes(rsp)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & _MASK32

    def push_responses(self) -> bool:
        """Publish the responses written so far; True if the frontend asked
        to be notified (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY)."""
        old = self._get(SRING_RSP_PROD)
        new = self.rsp_prod_pvt
        self._set_fenced(SRING_RSP_PROD, new)
        event = self._get(SRING_RSP_EVENT)
        return ((new - event) & _MASK32) < ((new - old) & _MASK32)

    def state(self) -> str:
        """The indices, for a human looking at a stalled device."""
        return (f"req_prod {self._get(SRING_REQ_PROD)} req_event {self._get(SRING_REQ_EVENT)} "
                f"req_cons {self.req_cons} | rsp_prod {self._get(SRING_RSP_PROD)} "
                f"rsp_event {self._get(SRING_RSP_EVENT)} rsp_prod_pvt {self.rsp_prod_pvt}")

    def final_check(self) -> bool:
        """Ask for a notification on the next request, then look once more
        (RING_FINAL_CHECK_FOR_REQUESTS): True if requests arrived meanwhile."""
        if self.unconsumed():
            return True
        self._set_fenced(SRING_REQ_EVENT, self.req_cons + 1)
        return self.unconsumed() > 0


class BackendQueue:
    """One queue of a connected device: its event channel (`port`), its
    counters (`stats`, written only by the thread that serves the queue) and
    its `worker` when the device has several queues.  Subclasses add the
    rings and whatever else is per queue."""

    def __init__(self, index: int):
        self.index = index
        self.port: BackendPort | None = None
        self.worker: QueueWorker | None = None
        self.stats: collections.Counter = collections.Counter()

    def notify(self) -> None:
        """Tell the frontend, on this queue's port, that responses are ready."""
        if self.port is not None:
            self.port.notify()


#: The most queues a device offers (multi-queue-max-queues), whatever the
#: vCPUs: Linux's blkfront uses at most 4 by default, and each queue here
#: is a Python thread: past the host's few cores more only contend for the GIL.
MAX_QUEUES = 4


def default_max_queues(host) -> int:
    """One queue per vCPU the guest may have (Xen's backends offer one per
    host CPU; the guest uses at most one per vCPU), at most MAX_QUEUES."""
    n = getattr(host, "nr_vcpus", None) or getattr(getattr(host, "evtchn", None), "nr_vcpus", 1)
    return max(1, min(MAX_QUEUES, int(n or 1)))


def check_distinct(columns: dict[str, list[int]]) -> None:
    """No ring page or event channel named twice: `columns` maps a kind of
    key ("ring-ref", "event-channel") to its value for each queue (a vif's
    two rings per queue both in "ring-ref")."""
    for name, values in columns.items():
        seen: dict[int, int] = {}
        for i, v in enumerate(values):
            if v in seen:
                raise ProtocolError(f"{name} {v} named twice (entries {seen[v]} and {i})")
            seen[v] = i


def read_num_queues(read, max_queues: int) -> int:
    """The frontend's multi-queue-num-queues (1 when absent), as Linux's
    blkback and netback read it; 0, above `max_queues` or not a number is
    the frontend's error.  (Linux reads it with %u and a default: a value
    that does not parse counts as absent there, and a multi-queue frontend
    that wrote one then fails on the top-level keys it did not write; pyvmm
    says what was wrong at once.)"""
    try:
        text = read("multi-queue-num-queues")
    except ProtocolError:
        return 1
    try:
        n = int(text.strip(), 10)
    except ValueError:
        raise ProtocolError(f"multi-queue-num-queues {text[:32]!r} is not a number") from None
    if not 1 <= n <= max_queues:
        raise ProtocolError(f"guest requested {n} queues, the valid range is 1 - {max_queues}")
    return n


def queue_dir(index: int, num_queues: int) -> str:
    """Where a queue's keys are in the frontend's directory: the top level
    with one queue, ``queue-N/`` with several (blkfront's
    write_per_ring_nodes, netfront's write_queue_xenstore_keys)."""
    return "" if num_queues == 1 else f"queue-{index}/"


class QueueWorker:
    """The thread serving one queue of a multi-queue device: woken by that
    queue's event channel (`kick`) or its own retry timer, it runs
    `serve()` and nothing else.  Created before the queue's port is bound
    (a send before `start` is remembered), stopped and joined by the
    device's teardown."""

    def __init__(self, backend: "XenbusBackend", index: int, serve, stats):
        self.backend, self.index, self.serve, self.stats = backend, index, serve, stats
        self._cond = threading.Condition()
        self._kicked = False
        self._stopping = False
        self._retry: threading.Timer | None = None
        self.thread = threading.Thread(target=self._run, name=f"pyvmm-{backend.name}-q{index}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def kick(self) -> None:
        with self._cond:
            self._kicked = True
            self._cond.notify()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def retry_later(self, seconds: float) -> None:
        with self._cond:
            if self._stopping or (self._retry is not None and self._retry.is_alive()):
                return
            self._retry = threading.Timer(seconds, self.kick)
            self._retry.daemon = True
            self._retry.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
            if self._retry is not None:
                self._retry.cancel()
        if self.thread.ident is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)
            if self.thread.is_alive():
                log.warning("%s queue %d: worker still busy after 10 s", self.backend.name, self.index)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._kicked or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
                self._kicked = False
            try:
                self.backend._timed(self.serve, self.stats)
            except (ProtocolError, GrantError) as e:
                self.backend._queue_failed(f"queue {self.index}: {e}")
                return
            except Exception as e:          # a back-end bug: lose the device, not pyvmm
                log.exception("%s queue %d: back-end failed", self.backend.name, self.index)
                self.backend._queue_failed(f"internal error: {e}")
                return


class XenbusBackend:
    """Base class of an in-process back-end for one device of one guest.

    Subclasses set `kind` (the xenstore device class: "vbd", "vif", ...)
    and implement:

    * `features()`: backend keys written before InitWait (what the frontend
      may use);
    * `connect(read)`: the frontend is ready; `read(key)` gives its keys.
      Map the rings, bind the event channel with `bind_event_channel`,
      return keys to write before Connected;
    * `process()`: the frontend notified us (worker thread); serve the ring;
    * `disconnect()`: undo `connect` (also on errors and at close).

    A multi-queue back-end keeps its queues in `queues` (BackendQueue
    subclasses); with several, `connect` gives each a `QueueWorker` with
    `new_queue_worker` and binds each queue's port to it, and the workers
    start once connect returns.  `stats` is the sum of the device's own
    counters (`_device_stats`), every queue's, and those of queues gone
    with earlier connections.
    """

    kind = "device"

    def __init__(self, host, devid: int, *, frontend: dict | None = None, name: str | None = None):
        self.host = host
        self.domid = host.domid
        self.store = host.store
        self.devid = devid
        self.name = name or f"{self.kind}-{devid}"
        self.connected = False
        self.failed: str | None = None
        self._port: BackendPort | None = None       # the first (with one queue: the) port
        self._ports: list[BackendPort] = []
        self._maps: list[GrantMapping] = []
        self.queues: list[BackendQueue] = []
        self._queue_workers: list[QueueWorker] = []
        self._queue_failure: str | None = None
        if not hasattr(self, "_device_stats"):
            self._device_stats = collections.Counter()
        self._retired_stats = collections.Counter()
        self._cond = threading.Condition()
        self._kicked = False
        self._state_seen = False
        self._closing = False
        self._retry: threading.Timer | None = None
        self.fe_path, self.be_path = add_device(
            self.store, self.domid, self.kind, devid, frontend or {}, {})
        self._write_backend(self.features())
        self._set_state(XenbusState.InitWait)
        self._token = self.store.watch(f"{self.fe_path}/state", self._on_frontend_state)
        self._thread = threading.Thread(target=self._worker, name=f"pyvmm-{self.name}", daemon=True)
        self._thread.start()

    # ---- what subclasses provide ----
    def features(self) -> dict:
        return {}

    def connect(self, read) -> dict:
        raise NotImplementedError

    def process(self) -> None:
        raise NotImplementedError

    def disconnect(self) -> None:
        pass

    def rings(self) -> dict:
        """name -> BackRing of the connected rings (for status reports)."""
        return {}

    def describe(self) -> str:
        """One line on the device's state: xenbus states, the event
        channel's pending/mask bits, each ring's indices, counters."""
        parts = [f"{self.name}: backend {self.backend_state().name} frontend {self.frontend_state().name}"]
        if self.failed:
            parts.append(f"failed: {self.failed}")
        for port in list(self._ports):
            if port.guest_port is not None:
                ev = self.host.evtchn
                gp = port.guest_port
                parts.append(f"port {gp} pending {int(ev.is_pending(gp))} masked {int(ev.is_masked(gp))}")
        for name, ring in self.rings().items():
            parts.append(f"{name} ring: {ring.state()}")
        stats = self.stats
        if stats:
            parts.append(", ".join(f"{k}={v}" for k, v in dict(stats).items()))
        if len(self.queues) > 1:
            parts.append(f"{len(self.queues)} queues")
        for what, limiter in getattr(self, "limiters", {}).items():
            parts.append(f"{what} limited to {limiter.describe()}")
        with self._cond:
            parts.append(f"worker kicked {int(self._kicked)} state_seen {int(self._state_seen)}")
        return "; ".join(parts)

    # ---- helpers for subclasses ----
    def map_grant(self, ref: int, readonly: bool = False) -> memoryview:
        """Map a page the frontend granted us; unmapped at disconnect."""
        m = self.host.gnttab.map(ref, BACKEND_DOMID, readonly=readonly)
        self._maps.append(m)
        return m.view

    @property
    def stats(self) -> collections.Counter:
        """The device's counters: its own, every queue's (each written by
        one thread only), and those of earlier connections' queues."""
        total = collections.Counter(self._device_stats)
        total.update(self._retired_stats)
        for q in list(self.queues):
            total.update(q.stats)
        return total

    def bind_event_channel(self, guest_port: int, on_notify=None) -> BackendPort:
        """Bind to the frontend's unbound port; its sends wake the worker
        (or call `on_notify`: a queue worker's kick).  A port already bound,
        e.g. named for two queues, is the frontend's error, as in Xen,
        where the second EVTCHNOP_bind_interdomain fails."""
        try:
            port = self.host.evtchn.backend_bind(guest_port, on_notify or self.kick)
        except HypercallError as e:         # the port the frontend named is not one
            raise ProtocolError(f"event channel {guest_port}: {e}") from None
        self._ports.append(port)
        if self._port is None:
            self._port = port
        return port

    def new_queue_worker(self, queue: BackendQueue, serve) -> QueueWorker:
        """A worker for one queue of several (called from `connect`): it
        runs `serve()` when the queue's port fires; started when connect
        returns, stopped at teardown."""
        w = QueueWorker(self, queue.index, serve, queue.stats)
        queue.worker = w
        self._queue_workers.append(w)
        return w

    def bind_queue(self, queue: BackendQueue, guest_port: int, serve, several: bool) -> None:
        """Bind `queue`'s event channel (called from `connect`): with several
        queues it wakes the queue's own worker, which runs `serve()`; with
        one, the device's worker (which runs `process`)."""
        if several:
            queue.port = self.bind_event_channel(guest_port, self.new_queue_worker(queue, serve).kick)
        else:
            queue.port = self.bind_event_channel(guest_port)

    def notify_frontend(self) -> None:
        if self._port is not None:
            self._port.notify()

    def _queue_failed(self, why: str) -> None:
        """A queue worker met a protocol error (its thread): the device's
        worker ends the device."""
        with self._cond:
            if self._queue_failure is None:
                self._queue_failure = why
            self._cond.notify()

    def retry_queue_later(self, queue: BackendQueue, seconds: float) -> None:
        """`retry_later` for one queue: its own worker's timer with several."""
        if queue.worker is not None:
            queue.worker.retry_later(seconds)
        else:
            self.retry_later(seconds)

    def kick(self) -> None:
        """The frontend sent on our channel (any thread): run process() soon."""
        with self._cond:
            self._kicked = True
            self._cond.notify()

    def retry_later(self, seconds: float) -> None:
        """Run process() again in `seconds` (a rate limit holds a queue
        back); one timer at a time, gone with the device."""
        with self._cond:
            if self._closing or (self._retry is not None and self._retry.is_alive()):
                return
            self._retry = threading.Timer(seconds, self.kick)
            self._retry.daemon = True
            self._retry.start()

    # ---- xenstore ----
    def _write_backend(self, values: dict) -> None:
        with self.store.transaction() as t:
            for k, v in values.items():
                self.store.write(f"{self.be_path}/{k}", str(v), t)

    def _set_state(self, state: XenbusState) -> None:
        self.store.write(f"{self.be_path}/state", str(int(state)))

    def frontend_state(self) -> XenbusState:
        try:
            return XenbusState(int(self.store.read_str(f"{self.fe_path}/state", "0")))
        except (ValueError, XenstoreError):
            return XenbusState.Unknown

    def backend_state(self) -> XenbusState:
        return XenbusState(int(self.store.read_str(f"{self.be_path}/state", "0")))

    def _read_frontend(self, key: str) -> str:
        try:
            return self.store.read(f"{self.fe_path}/{key}").decode(errors="replace")
        except XenstoreError:
            raise ProtocolError(f"frontend key {key!r} missing") from None

    def _on_frontend_state(self, path: str, token: str) -> None:
        # runs in whichever thread wrote the key (often the xenstore ring's):
        # only wake the worker
        with self._cond:
            self._state_seen = True
            self._cond.notify()

    # ---- the worker ----
    def _worker(self) -> None:
        while True:
            with self._cond:
                while not (self._kicked or self._state_seen or self._closing
                           or self._queue_failure is not None):
                    self._cond.wait()
                if self._closing:
                    return
                state_changed, self._state_seen = self._state_seen, False
                kicked, self._kicked = self._kicked, False
                queue_failure, self._queue_failure = self._queue_failure, None
            try:
                if queue_failure is not None and self.connected:
                    self._fail(queue_failure)
                if state_changed:
                    self._frontend_changed()
                if kicked and self.connected:
                    self._timed_process()
            except (ProtocolError, GrantError) as e:
                self._fail(str(e))
            except Exception as e:          # a back-end bug: lose the device, not pyvmm
                log.exception("%s of domain %d: back-end failed", self.name, self.domid)
                self._fail(f"internal error: {e}")

    def _timed_process(self) -> None:
        """process(), with what it cost in the back-end's stats (the I/O cost
        model: wake-ups, wall and CPU time; wall minus CPU is I/O and waits
        for the GIL): the first queue's counters, as only this thread
        serves it."""
        queues = self.queues
        if len(queues) > 1:
            return          # each queue's worker serves, and counts, its own queue
        self._timed(self.process, queues[0].stats if queues else self._device_stats)

    @staticmethod
    def _timed(fn, stats) -> None:
        wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
        try:
            fn()
        finally:
            for key, n in (("worker_runs", 1),
                           ("worker_wall_us", (time.perf_counter_ns() - wall) // 1000),
                           ("worker_cpu_us", (time.thread_time_ns() - cpu) // 1000)):
                stats[key] = stats.get(key, 0) + n

    def _frontend_changed(self) -> None:
        fe = self.frontend_state()
        be = self.backend_state()
        if fe in (XenbusState.Initialised, XenbusState.Connected):
            if not self.connected and self.failed is None and be == XenbusState.InitWait:
                self._write_backend(self.connect(self._read_frontend))
                self.connected = True
                for w in self._queue_workers:
                    w.start()
                    w.kick()                # requests queued before we bound
                self._set_state(XenbusState.Connected)
                log.info("%s of domain %d connected%s", self.name, self.domid,
                         f", {len(self.queues)} queues" if len(self.queues) > 1 else "")
                self.kick()
        elif fe == XenbusState.Closing:
            self._teardown()
            self._set_state(XenbusState.Closing)
        elif fe == XenbusState.Closed:
            self._teardown()
            self._set_state(XenbusState.Closed)
        elif fe in (XenbusState.Initialising, XenbusState.InitWait) and be == XenbusState.Closed:
            self.failed = None               # the frontend starts over: so do we
            self._set_state(XenbusState.InitWait)

    def _teardown(self) -> None:
        was = self.connected
        self.connected = False
        try:
            # no queue is served past this point: then rings may go
            workers, self._queue_workers = self._queue_workers, []
            for w in workers:
                w.stop()
            with self._cond:
                self._queue_failure = None
            if was:
                self.disconnect()
        finally:
            queues, self.queues = self.queues, []
            for q in queues:
                self._retired_stats.update(q.stats)
            ports, self._ports = self._ports, []
            self._port = None
            for port in ports:
                port.close()
            for m in self._maps:
                try:
                    self.host.gnttab.unmap(m)
                except GrantError:
                    pass
            self._maps.clear()

    def _fail(self, why: str) -> None:
        """The frontend broke the protocol: drop the device, say why, keep going."""
        log.warning("%s of domain %d: %s; device shut down", self.name, self.domid, why)
        self.failed = why
        try:
            self._teardown()
            self.store.write(f"{self.be_path}/error", why)
            self._set_state(XenbusState.Closing)
        except Exception:
            log.exception("%s: tearing down after an error failed", self.name)

    def close(self) -> None:
        """Stop the worker and release what connect() took (domain teardown)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            if self._retry is not None:
                self._retry.cancel()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        try:
            self.store.unwatch(f"{self.fe_path}/state", self._token)
        except XenstoreError:
            pass
        self._teardown()
