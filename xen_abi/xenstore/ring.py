"""The xenstore shared-ring transport (Xen's docs/misc/xenstore-ring.txt):
`XenstoreRingServer` serves one guest over its ring page.  A ring whose
framing or indices are broken is shut down with the ring's `error` field
set, never an exception into the caller.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

from ..abi import (
    XENSTORE_CONNECTED,
    XENSTORE_ERROR_NONE,
    XENSTORE_ERROR_PROTO,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_RECONNECT,
    XENSTORE_RING_SIZE,
    XENSTORE_SERVER_FEATURE_ERROR,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
    XS_RING_CONNECTION,
    XS_RING_ERROR,
    XS_RING_REQ,
    XS_RING_REQ_CONS,
    XS_RING_REQ_PROD,
    XS_RING_RSP,
    XS_RING_RSP_CONS,
    XS_RING_RSP_PROD,
    XS_RING_SERVER_FEATURES,
    XSD_SOCKMSG_SIZE,
    XenErrno,
    XsdSockmsg,
    XsType,
)
from ..memory.shared_page import u32_fields, writable_bytes
from .protocol import encode_msg, error_msg, handle_request, split_strings
from .store import (EVENT_BACKLOG, OK, QUOTA_OUTSTANDING, REPLY_BACKLOG, XenstoreError, XenstoreStore,
                    xs_error)

log = logging.getLogger(__name__)
# ---------------------------------------------------------------------------
# The shared ring transport
# ---------------------------------------------------------------------------

_RING_MASK = XENSTORE_RING_SIZE - 1
_XS_RING_END = XS_RING_ERROR + 4
_INDEX_BASE = XS_RING_REQ_CONS  # the u32 fields (indices, features, connection, error) start here


class XenstoreRingServer:
    """Serve one guest over its xenstore ring page.

    `ring` is a writable memoryview over (at least) the shared page; `notify`
    signals the guest's store event channel. Call `process()` whenever the
    guest kicks; watch events produced by other clients are pushed into the
    ring as they happen (queued while the ring is full).
    """

    def __init__(self, ring: memoryview, notify: Callable[[], None], store: XenstoreStore, domid: int):
        ring = writable_bytes(ring, _XS_RING_END, "xenstore ring")
        self._ring = ring
        # indices, features, connection, error: each moved whole (shared_page.py)
        self._fields = u32_fields(ring, _INDEX_BASE, _XS_RING_END)
        self._notify = notify
        self.store = store
        self.domid = domid
        self.conn = store.connect(domid, deliver=self._queue_event)
        self._lock = threading.RLock()
        self._inbuf = bytearray()
        self._out: collections.deque[bytes] = collections.deque()
        self._out_off = 0  # bytes of _out[0] already in the ring
        self._out_bytes = 0  # total bytes queued, minus _out_off
        self._in_process = 0
        self._kick = False
        self.broken = False
        self.closed = False
        self.dropped_events = 0
        features = self._get(XS_RING_SERVER_FEATURES)
        self._set(XS_RING_SERVER_FEATURES,
                  features | XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR)
        store.introduce_domain(domid)

    @property
    def outstanding(self) -> int:
        """Replies and events waiting for room in the ring (requests are
        answered as they are taken, so none waits for an answer)."""
        return len(self._out)

    # ring field access: each u32 read once into a local by the callers
    def _get(self, off: int) -> int:
        return self._fields[(off - _INDEX_BASE) >> 2]

    def _set(self, off: int, value: int) -> None:
        self._fields[(off - _INDEX_BASE) >> 2] = value & 0xFFFFFFFF

    def close(self) -> None:
        """Disconnect: drop watches and transactions, fire @releaseDomain; process() is then a no-op."""
        with self._lock:
            self.closed = True
            self._out.clear()
            self._out_off = self._out_bytes = 0
        self.store.disconnect(self.conn)
        self.store.release_domain(self.domid)

    # -- public ---------------------------------------------------------------

    def process(self) -> None:
        """Consume complete requests, produce replies/events. Never raises."""
        with self._lock:
            self._in_process += 1
            try:
                self._process_locked()
            except Exception:  # a bug here must not take the VMM down
                log.exception("xenstore: internal error serving domain %d", self.domid)
                self._break(XENSTORE_ERROR_PROTO, "internal error")
            finally:
                self._in_process -= 1
                kick, self._kick = self._kick, False
            if kick:
                self._signal()

    # -- internals ------------------------------------------------------------

    def _signal(self) -> None:
        try:
            self._notify()
        except Exception:
            log.exception("xenstore: notify for domain %d failed", self.domid)

    def _break(self, error: int, why: str) -> None:
        if not self.broken:
            log.error("xenstore: ring of domain %d broken (error %d): %s", self.domid, error, why)
        self.broken = True
        self._inbuf.clear()
        self._out.clear()
        self._out_off = self._out_bytes = 0
        self.store.reset_connection(self.conn)
        self._set(XS_RING_ERROR, error)
        self._kick = True

    def _reconnect(self) -> None:
        log.info("xenstore: domain %d requested ring reconnection", self.domid)
        self._inbuf.clear()
        self._out.clear()
        self._out_off = self._out_bytes = 0
        self.store.reset_connection(self.conn)
        for off in (XS_RING_REQ_CONS, XS_RING_REQ_PROD, XS_RING_RSP_CONS, XS_RING_RSP_PROD):
            self._set(off, 0)
        self._set(XS_RING_ERROR, XENSTORE_ERROR_NONE)
        self.broken = False
        self._set(XS_RING_CONNECTION, XENSTORE_CONNECTED)
        self._kick = True

    def _process_locked(self) -> None:
        if self.closed:
            return
        if self._get(XS_RING_CONNECTION) == XENSTORE_RECONNECT:
            self._reconnect()
        if self.broken:
            return
        while True:
            self._flush()
            if self.broken or self.outstanding >= QUOTA_OUTSTANDING or self._out_bytes > REPLY_BACKLOG:
                return  # back-pressure: wait for the guest to read replies
            msg = self._read_request()
            if msg is None:
                return
            self._serve(*msg)

    def _read_request(self):
        """Copy ring bytes until one whole message is buffered; None if incomplete."""
        cons = self._get(XS_RING_REQ_CONS)
        prod = self._get(XS_RING_REQ_PROD)
        avail = (prod - cons) & 0xFFFFFFFF
        if avail > XENSTORE_RING_SIZE:
            self._break(XENSTORE_ERROR_RINGIDX, f"request indices prod={prod:#x} cons={cons:#x}")
            return None
        while True:
            if len(self._inbuf) < XSD_SOCKMSG_SIZE:
                need = XSD_SOCKMSG_SIZE - len(self._inbuf)
            else:
                hdr = XsdSockmsg.parse(bytes(self._inbuf[:XSD_SOCKMSG_SIZE]))
                if hdr.len > XENSTORE_PAYLOAD_MAX:
                    # Framing is lost: answer once, then stop talking to this ring.
                    self._enqueue(error_msg(hdr.req_id, hdr.tx_id, XenErrno.E2BIG))
                    self._flush()
                    self._break(XENSTORE_ERROR_PROTO, f"message length {hdr.len} > {XENSTORE_PAYLOAD_MAX}")
                    return None
                need = XSD_SOCKMSG_SIZE + hdr.len - len(self._inbuf)
                if need == 0:
                    payload = bytes(self._inbuf[XSD_SOCKMSG_SIZE:])
                    self._inbuf.clear()
                    return hdr.type, hdr.req_id, hdr.tx_id, payload
            n = min(need, avail)
            if n == 0:
                # Linux's xb_write notifies only if we had consumed all it
                # wrote before (old prod <= req_cons), and writes a header and
                # its payload separately: having published cons, look at prod
                # again, or the rest of a message that arrived meanwhile would
                # wait for a notification that never comes (the ring
                # protocol's final check).
                prod = self._get(XS_RING_REQ_PROD)
                avail = (prod - cons) & 0xFFFFFFFF
                if avail > XENSTORE_RING_SIZE:
                    self._break(XENSTORE_ERROR_RINGIDX, f"request indices prod={prod:#x} cons={cons:#x}")
                    return None
                n = min(need, avail)
                if n == 0:
                    return None
            start = cons & _RING_MASK
            first = min(n, XENSTORE_RING_SIZE - start)
            self._inbuf += self._ring[XS_RING_REQ + start:XS_RING_REQ + start + first]
            if n > first:
                self._inbuf += self._ring[XS_RING_REQ:XS_RING_REQ + n - first]
            cons = (cons + n) & 0xFFFFFFFF
            avail -= n
            # Data copied before cons is published (Python stores are in program order).
            self._set(XS_RING_REQ_CONS, cons)
            self._kick = True

    def _serve(self, mtype: int, req_id: int, tx_id: int, payload: bytes) -> None:
        try:
            if mtype == XsType.WATCH:
                args = split_strings(payload)
                if len(args) < 2:
                    raise xs_error(XenErrno.EINVAL, "WATCH wants path and token")
                # Register without the initial event; it must follow the OK.
                self.store.op_watch(self.conn, args[0], args[1], fire_initial=False)
                self._enqueue(encode_msg(mtype, req_id, tx_id, OK))
                self._queue_event(args[0], args[1])
                return
            reply = handle_request(self.store, self.conn, mtype, tx_id, payload)
            if len(reply) > XENSTORE_PAYLOAD_MAX:
                raise xs_error(XenErrno.E2BIG, "reply too long")
            self._enqueue(encode_msg(mtype, req_id, tx_id, reply))
        except XenstoreError as e:
            log.debug("xenstore: domain %d request type %d: %s", self.domid, mtype, e)
            self._enqueue(error_msg(req_id, tx_id, e.errno))

    def _enqueue(self, msg: bytes) -> None:
        self._out.append(msg)
        self._out_bytes += len(msg)

    def _queue_event(self, epath: str, token: str) -> None:
        payload = epath.encode("latin-1") + b"\0" + token.encode("latin-1") + b"\0"
        with self._lock:
            if self.broken or self.closed:
                return
            if len(payload) > XENSTORE_PAYLOAD_MAX or self._out_bytes > EVENT_BACKLOG:
                self.dropped_events += 1
                log.warning("xenstore: dropping watch event %s for domain %d", epath, self.domid)
                return
            self._enqueue(encode_msg(XsType.WATCH_EVENT, 0, 0, payload))
            if not self._in_process:  # from another client's write: push it now
                self._flush()
                kick, self._kick = self._kick, False
                if kick:
                    self._signal()

    def _flush(self) -> None:
        """Move queued output into rsp without overwriting unconsumed bytes."""
        if not self._out or self.broken:
            return
        cons = self._get(XS_RING_RSP_CONS)
        prod = self._get(XS_RING_RSP_PROD)
        used = (prod - cons) & 0xFFFFFFFF
        if used > XENSTORE_RING_SIZE:
            self._break(XENSTORE_ERROR_RINGIDX, f"response indices prod={prod:#x} cons={cons:#x}")
            return
        space = XENSTORE_RING_SIZE - used
        wrote = 0
        while self._out and space:
            msg = self._out[0]
            chunk = msg[self._out_off:self._out_off + space]
            start = prod & _RING_MASK
            first = min(len(chunk), XENSTORE_RING_SIZE - start)
            self._ring[XS_RING_RSP + start:XS_RING_RSP + start + first] = chunk[:first]
            if len(chunk) > first:
                self._ring[XS_RING_RSP:XS_RING_RSP + len(chunk) - first] = chunk[first:]
            prod = (prod + len(chunk)) & 0xFFFFFFFF
            space -= len(chunk)
            wrote += len(chunk)
            self._out_off += len(chunk)
            if self._out_off == len(msg):
                self._out.popleft()
                self._out_off = 0
        if wrote:
            self._out_bytes -= wrote
            self._set(XS_RING_RSP_PROD, prod)  # data first, then the index
            self._kick = True


