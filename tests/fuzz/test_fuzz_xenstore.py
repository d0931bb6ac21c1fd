"""Fuzzing the xenstore wire: raw bytes and mangled requests into the real
XenstoreRingServer over a ring page, as a hostile guest writes them.

Each input is a fresh store (a domain's usual tree) and a list of guest
actions: well-formed requests with fuzzed types, tx ids, paths, values,
permissions, watches; headers with lying lengths; raw bytes; index and
connection-field tampering; partial reads of the response ring; dom0 writes
that fire the guest's watches from another client.

Oracles: the server never lets an exception out, never breaks the ring on
well-framed input, never overruns rsp; every reply parses, comes in request
order with the request's req_id/tx_id and type (or XS_ERROR with a Xen
errno name); the tree stays consistent (parents list their children, the
per-domain usage matches a recount) and within the guest's quotas; queued
output stays bounded.
"""
from __future__ import annotations

import collections
import itertools

from hypothesis import given
from hypothesis import strategies as st

from byte_rings import ByteRing
from fuzzlib import Finding, Input, Oracle, SliceRingPage, ci_settings
from pyvmm.xen_abi.abi import (
    XENSTORE_ERROR_NONE,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_RECONNECT,
    XENSTORE_RING_SIZE,
    XS_RING_CONNECTION,
    XS_RING_ERROR,
    XS_RING_REQ,
    XS_RING_REQ_CONS,
    XS_RING_REQ_PROD,
    XS_RING_RSP,
    XS_RING_RSP_CONS,
    XS_RING_RSP_PROD,
    XSD_SOCKMSG_SIZE,
    XenErrno,
    XsdSockmsg,
    XsType,
)
from pyvmm.xen_abi.xenstore import store as xs_store
from pyvmm.xen_abi.xenstore.ring import XenstoreRingServer
from pyvmm.xen_abi.xenstore.store import EVENT_BACKLOG, REPLY_BACKLOG, XenstoreError, XenstoreStore, _Usage
from pyvmm.xen_abi.xenstore.toolstack import add_device, populate_domain

DOMID = 1
REQ = ByteRing(XS_RING_REQ, XS_RING_REQ_CONS, XS_RING_REQ_PROD, XENSTORE_RING_SIZE)
RSP = ByteRing(XS_RING_RSP, XS_RING_RSP_CONS, XS_RING_RSP_PROD, XENSTORE_RING_SIZE)
ERRNO_NAMES = {e.name.encode() + b"\0" for e in XenErrno}

# Paths a guest would name, and ones it should not: relative, absolute,
# other domains', special, malformed, long.
PATHS = [
    "device", "device/vbd/51712/state", "control/shutdown", "memory/target", "data", "data/x",
    "console/ring-ref", "name", "cpu/0/availability", "a/b/c/d", "x", "",
    "/", "/local", "/local/domain", "/local/domain/1", "/local/domain/1/data/y",
    "/local/domain/0", "/local/domain/0/backend/vbd/1/51712/state", "/vm", "/tool", "/local/domain/2/z",
    "@introduceDomain", "@releaseDomain", "@other", "/a//b", "a/", "/local/", "bad path", "ü", "a\x01b",
    "/" + "a" * 3071, "/" + "a" * 3072, "b" * 2048, "b" * 2049, "@", "/@x", "../x", ".", "-_@/",
]
PERMS = ["n0", "r1", "w1", "b1", "n1", "b0", "r2", "x1", "n", "n65535", "n65536", "b01", "r-1", "", "n1 "]
TYPES = [t for t in XsType] + [20, 23, 0xFFFFFFFF, 1 << 31, 24]


class GuestRing(SliceRingPage):
    def __init__(self):
        super().__init__((REQ, RSP))
        self.mv = memoryview(self.page)


def build_store() -> XenstoreStore:
    store = XenstoreStore()
    populate_domain(store, DOMID, "fuzz", 65536, 2, uuid="00000000-0000-0000-0000-000000000001",
                    console={"ring-ref": 5, "port": 2})
    add_device(store, DOMID, "vbd", 51712, {"virtual-device": 51712}, {"state": 2})
    store.write(f"/local/domain/{DOMID}/data/seed", "1")
    store.set_perms(f"/local/domain/{DOMID}/data", [f"n{DOMID}"])
    store.write("/local/domain/2/z", "other guest")
    store.set_perms("/local/domain/2", ["n2"])
    return store


_TEMPLATE = build_store()


def new_store() -> XenstoreStore:
    """A copy of the template (nodes are immutable: a dict copy is a snapshot)."""
    store = XenstoreStore()
    store._nodes = dict(_TEMPLATE._nodes)
    for what in ("nodes", "bytes"):
        getattr(store._usage, what).update(getattr(_TEMPLATE._usage, what))
        getattr(store._usage, what).subtract(getattr(XenstoreStore()._usage, what))
    store._gen = itertools.count(max(n.gen for n in store._nodes.values()) + 1)
    return store


def check_store(store: XenstoreStore) -> None:
    """The tree is consistent and its usage accounting matches a recount."""
    nodes = store._nodes
    usage = _Usage()
    for path, node in nodes.items():
        usage.count(path, node, +1)
        if len(set(node.children)) != len(node.children):
            raise Finding(f"{path}: duplicate children {node.children}")
        for c in node.children:
            if xs_store._join(path, c) not in nodes:
                raise Finding(f"{path} lists child {c!r} that does not exist")
        if path != "/":
            parent = nodes.get(xs_store._parent(path))
            if parent is None or xs_store._leaf(path) not in parent.children:
                raise Finding(f"{path} is not listed by its parent")
    for what in ("nodes", "bytes"):
        want = {k: v for k, v in getattr(usage, what).items() if v}
        have = {k: v for k, v in getattr(store._usage, what).items() if v}
        if want != have:
            raise Finding(f"usage.{what} {have} but a recount gives {want}")
    u = store.domain_usage(DOMID)
    if u.nodes > xs_store.QUOTA_NODES or u.memory > xs_store.QUOTA_MEMORY:
        raise Finding(f"domain {DOMID} over its quota: {u}")


class Harness:
    MAX_SIZE = 4096

    def one(self, data: bytes) -> None:
        inp = Input(data)
        store = new_store()
        g = GuestRing()
        server = XenstoreRingServer(g.mv, g.notify, store, DOMID)
        self.g, self.server, self.store = g, server, store
        self.framed = True          # only whole, honest messages so far: replies are checkable
        self.sent: collections.deque = collections.deque()   # (type, req_id, tx_id) awaiting reply
        self.rx = bytearray()
        self.tx_ids = [0]
        self.unsent = b""
        self.error_touched = False
        try:
            for _ in range(32):
                if not inp.remaining():
                    break
                self.action(inp)
                server.process()
                if inp.chance(200):
                    self.pull()
            # the guest reads everything: what is queued must come out
            for _ in range(64):
                server.process()
                if not self.pull():
                    break
            if server.broken and self.framed:
                raise Finding(f"ring broken (error {g.get(XS_RING_ERROR)}) by well-framed input")
            if not self.error_touched and server.broken != (g.get(XS_RING_ERROR) != XENSTORE_ERROR_NONE):
                raise Finding("broken flag and the ring's error field disagree")
            if self.framed and not server.broken and self.sent and not self.unsent:
                raise Finding(f"requests {list(self.sent)[:3]} never answered")
            check_store(store)
        finally:
            server.close()
            check_store(store)

    # -- guest actions -----------------------------------------------------

    def action(self, inp: Input) -> None:
        k = inp.u8()
        if k < 170:
            self.request(inp)
        elif k < 190:
            self.send_bytes(inp.blob(600), framed=False)
        elif k < 205:   # a header whose length lies, then some bytes
            hdr = XsdSockmsg.build(dict(type=inp.choice(TYPES) & 0xFFFFFFFF, req_id=inp.u32(),
                                        tx_id=inp.u32(), len=inp.interesting(32)))
            self.send_bytes(hdr + inp.blob(64), framed=False)
        elif k < 220:   # the guest scribbles on an index or the connection field
            off = inp.choice([XS_RING_REQ_CONS, XS_RING_REQ_PROD, XS_RING_RSP_CONS, XS_RING_RSP_PROD,
                              XS_RING_CONNECTION, XS_RING_ERROR])
            val = inp.interesting(32)
            if off == XS_RING_CONNECTION and inp.chance(128):
                val = XENSTORE_RECONNECT
            self.g.set(off, val)
            self.framed = False
            self.error_touched |= off == XS_RING_ERROR
        elif k < 240:   # another client (dom0) changes what the guest may watch
            path = inp.choice(["/local/domain/1/data/x", "/local/domain/1/device/vbd/51712/state",
                               "/local/domain/1", "/vm", "/local/domain/0/backend/x"])
            try:
                if inp.chance(128):
                    self.store.write(path, inp.blob(32))
                else:
                    self.store.rm(path)
            except XenstoreError as e:      # the guest may have removed its parent
                if e.errno != XenErrno.ENOENT:
                    raise
        elif k < 245:
            self.store.introduce_domain(inp.u16())
        else:
            self.pull(limit=inp.u16() % 300)

    def request(self, inp: Input) -> None:
        t = inp.choice(TYPES)
        payload = self.payload(inp, t)
        tx = inp.choice(self.tx_ids) if inp.chance(200) else inp.interesting(32)
        req_id = inp.u32()
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            self.framed = False
        self.sent.append((t, req_id, tx))
        self.send_bytes(XsdSockmsg.build(dict(type=t & 0xFFFFFFFF, req_id=req_id, tx_id=tx,
                                              len=len(payload))) + payload, framed=True)

    @staticmethod
    def payload(inp: Input, t: int) -> bytes:
        def path():
            p = inp.choice(PATHS)
            return (p + inp.choice(["", "/new", "/x/y", "/" + "q" * inp.u8()])).encode("utf-8", "replace")

        k = inp.u8()
        if k < 30:
            return inp.blob(300)                                  # anything
        parts = []
        if t == XsType.WRITE:
            return path() + b"\0" + inp.blob(3000)
        if t == XsType.SET_PERMS:
            parts = [path()] + [inp.choice(PERMS).encode() for _ in range(inp.below(20))]
        elif t in (XsType.WATCH, XsType.UNWATCH):
            parts = [path(), inp.choice([b"tok", b"", b"t2", b"x" * inp.u8()])]
        elif t == XsType.TRANSACTION_END:
            parts = [inp.choice([b"T", b"F", b"", b"TT"])]
        elif t == XsType.DIRECTORY_PART:
            parts = [path(), str(inp.interesting(16)).encode()]
        elif t in (XsType.GET_DOMAIN_PATH, XsType.IS_DOMAIN_INTRODUCED, XsType.INTRODUCE,
                   XsType.RELEASE, XsType.RESUME):
            parts = [inp.choice([b"0", b"1", b"2", b"32752", b"x", b"", b"-1", b"00001"])]
        elif t == XsType.CONTROL:
            parts = [inp.choice([b"print", b"help", b"log", b""])] + [b"x"] * inp.below(3)
        else:
            parts = [path() for _ in range(1 + inp.below(2))]
        body = b"\0".join(parts) + b"\0"
        if inp.chance(20):
            body = body[:-1]                                       # no terminating NUL
        return body

    def send_bytes(self, data: bytes, framed: bool) -> None:
        if not framed:
            self.framed = False
        data = self.unsent + data
        for _ in range(16):     # the guest waits for room as xb_write does
            n = self.g.put(REQ, data)
            data = data[n:]
            self.server.process()
            if not data:
                break
            self.pull()
        self.unsent = data

    def pull(self, limit: int | None = None) -> int:
        g = self.g
        cons, prod = g.get(RSP.cons), g.get(RSP.prod)
        if (prod - cons) & 0xFFFFFFFF > XENSTORE_RING_SIZE:
            if self.framed:
                raise Finding(f"server overran rsp: prod {prod:#x} cons {cons:#x}")
            return 0
        data = g.take(RSP, limit)
        self.rx += data
        if self.framed:
            self.parse_replies()
        if self.server._out_bytes > REPLY_BACKLOG + EVENT_BACKLOG + 2 * XENSTORE_PAYLOAD_MAX:
            raise Finding(f"{self.server._out_bytes} bytes of output queued")
        return len(data)

    def parse_replies(self) -> None:
        while len(self.rx) >= XSD_SOCKMSG_SIZE:
            h = XsdSockmsg.parse(bytes(self.rx[:XSD_SOCKMSG_SIZE]))
            if h.len > XENSTORE_PAYLOAD_MAX:
                raise Finding(f"reply of {h.len} bytes")
            if len(self.rx) < XSD_SOCKMSG_SIZE + h.len:
                return
            body = bytes(self.rx[XSD_SOCKMSG_SIZE:XSD_SOCKMSG_SIZE + h.len])
            del self.rx[:XSD_SOCKMSG_SIZE + h.len]
            if h.type == XsType.WATCH_EVENT:
                if h.req_id or h.tx_id or body.count(b"\0") < 2 or not body.endswith(b"\0"):
                    raise Finding(f"bad watch event {h} {body!r}")
                continue
            if not self.sent:
                raise Finding(f"reply {h} to no request")
            t, req_id, tx = self.sent.popleft()
            if h.req_id != req_id or h.tx_id != tx:
                raise Finding(f"reply {h} to request type {t} req_id {req_id} tx {tx}")
            if h.type == XsType.ERROR:
                if body not in ERRNO_NAMES:
                    raise Finding(f"error reply {body!r}")
            elif h.type != t:
                raise Finding(f"reply type {h.type} to request type {t}")
            elif t == XsType.TRANSACTION_START:
                self.tx_ids.append(int(body[:-1]))


FUZZ = ci_settings(1000)


@FUZZ
@given(st.binary(max_size=Harness.MAX_SIZE))
def test_fuzz_xenstore_wire(data):
    with Oracle() as oracle:
        oracle.run(HARNESS, data)


HARNESS = Harness()
