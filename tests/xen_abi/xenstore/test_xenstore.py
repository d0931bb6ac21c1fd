"""xenstore end to end: a guest-side client drives the real ring protocol.

The client below builds requests the way Linux's xenbus does (header +
payload written into `req` as space allows, kick, read `rsp`), over a
bytearray-backed page with a counting notify.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import threading

import pytest

from byte_rings import ByteRing, GuestRingPage
from pyvmm.xen_abi.abi import (
    XENSTORE_ABS_PATH_MAX,
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
from pyvmm.xen_abi.xenstore.ring import XenstoreRingServer
from pyvmm.xen_abi.xenstore import store as store_module
from pyvmm.xen_abi.xenstore.store import (
    QUOTA_MEMORY,
    QUOTA_NODE_SIZE,
    QUOTA_NODES,
    QUOTA_OUTSTANDING,
    QUOTA_TRANSACTION_NODES,
    QUOTA_WATCHES,
    XenstoreError,
    XenstoreStore,
)
from pyvmm.xen_abi.xenstore.toolstack import add_device, populate_domain

REQ = ByteRing(XS_RING_REQ, XS_RING_REQ_CONS, XS_RING_REQ_PROD, XENSTORE_RING_SIZE)
RSP = ByteRing(XS_RING_RSP, XS_RING_RSP_CONS, XS_RING_RSP_PROD, XENSTORE_RING_SIZE)


class GuestClient(GuestRingPage):
    """A minimal xenbus: one outstanding request at a time, events collected aside."""

    def __init__(self, store: XenstoreStore, domid: int, start_index: int = 0):
        super().__init__((REQ, RSP), start_index)
        self.mv = memoryview(self.page)
        self.store = store
        self.domid = domid
        self.server = XenstoreRingServer(self.mv, self.notify, store, domid)
        self.rx = bytearray()
        self.events: list[tuple[str, str]] = []
        self.replies: list[tuple[int, int, int, bytes]] = []
        self.req_id = 0
        self.max_outstanding_rsp = 0

    # -- raw ring I/O ------------------------------------------------------

    def push(self, data: bytes) -> int:
        """Write as much of data into req as fits; returns bytes written."""
        return self.put(REQ, data)

    def pull(self) -> None:
        """Drain rsp into rx and split complete messages into replies/events."""
        data = self.take(RSP)
        self.max_outstanding_rsp = max(self.max_outstanding_rsp, len(data))
        self.rx += data
        while len(self.rx) >= XSD_SOCKMSG_SIZE:
            h = XsdSockmsg.parse(bytes(self.rx[:XSD_SOCKMSG_SIZE]))
            if len(self.rx) < XSD_SOCKMSG_SIZE + h.len:
                break
            body = bytes(self.rx[XSD_SOCKMSG_SIZE:XSD_SOCKMSG_SIZE + h.len])
            del self.rx[:XSD_SOCKMSG_SIZE + h.len]
            if h.type == XsType.WATCH_EVENT:
                assert h.req_id == 0 and h.tx_id == 0
                path, token, tail = body.split(b"\0")
                assert tail == b""
                self.events.append((path.decode(), token.decode()))
            else:
                self.replies.append((h.type, h.req_id, h.tx_id, body))

    def send(self, mtype: int, payload: bytes, tx: int = 0, req_id: int | None = None) -> int:
        if req_id is None:
            self.req_id += 1
            req_id = self.req_id
        msg = XsdSockmsg.build(dict(type=mtype, req_id=req_id, tx_id=tx, len=len(payload))) + payload
        while msg:
            n = self.push(msg)
            msg = msg[n:]
            self.server.process()
            self.pull()
        return req_id

    def call(self, mtype: int, payload: bytes, tx: int = 0) -> bytes:
        req_id = self.send(mtype, payload, tx)
        # Like xenbus: keep draining (events may be queued ahead of our reply).
        for _ in range(1000):
            for r in self.replies:
                if r[1] == req_id:
                    self.replies.remove(r)
                    rtype, _, rtx, body = r
                    assert rtx == tx
                    if rtype == XsType.ERROR:
                        assert body.endswith(b"\0")
                        raise XenstoreError(XenErrno[body[:-1].decode()])
                    assert rtype == mtype
                    return body
            self.server.process()
            self.pull()
        raise AssertionError(f"no reply to request {req_id}")

    # -- xenbus-like helpers -----------------------------------------------

    def read(self, path, tx=0) -> bytes:
        return self.call(XsType.READ, path.encode() + b"\0", tx)

    def write(self, path, value, tx=0):
        value = value.encode() if isinstance(value, str) else value
        assert self.call(XsType.WRITE, path.encode() + b"\0" + value, tx) == b"OK\0"

    def mkdir(self, path, tx=0):
        assert self.call(XsType.MKDIR, path.encode() + b"\0", tx) == b"OK\0"

    def rm(self, path, tx=0):
        assert self.call(XsType.RM, path.encode() + b"\0", tx) == b"OK\0"

    def directory(self, path, tx=0) -> list[str]:
        body = self.call(XsType.DIRECTORY, path.encode() + b"\0", tx)
        return [c.decode() for c in body.split(b"\0")[:-1]]

    def get_perms(self, path, tx=0) -> list[str]:
        return [p.decode() for p in self.call(XsType.GET_PERMS, path.encode() + b"\0", tx).split(b"\0")[:-1]]

    def set_perms(self, path, perms, tx=0):
        payload = path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms)
        assert self.call(XsType.SET_PERMS, payload, tx) == b"OK\0"

    def watch(self, path, token):
        assert self.call(XsType.WATCH, f"{path}\0{token}\0".encode()) == b"OK\0"

    def unwatch(self, path, token):
        assert self.call(XsType.UNWATCH, f"{path}\0{token}\0".encode()) == b"OK\0"

    def tx_start(self) -> int:
        body = self.call(XsType.TRANSACTION_START, b"\0")
        assert body.endswith(b"\0")
        return int(body[:-1])

    def tx_end(self, tx, commit=True):
        assert self.call(XsType.TRANSACTION_END, b"T\0" if commit else b"F\0", tx) == b"OK\0"

    def take_events(self):
        self.server.process()
        self.pull()
        ev, self.events = self.events, []
        return ev


def errno_of(fn, *args) -> XenErrno:
    with pytest.raises(XenstoreError) as ei:
        fn(*args)
    return ei.value.errno


@pytest.fixture
def store():
    s = XenstoreStore()
    populate_domain(s, 1, "guest1", 262144, 2)
    populate_domain(s, 2, "guest2", 131072, 1)
    return s


@pytest.fixture
def g(store):
    return GuestClient(store, 1)


# ---------------------------------------------------------------------------


def test_ring_advertises_features_and_notifies(g):
    feats = g.get(XS_RING_SERVER_FEATURES)
    assert feats & XENSTORE_SERVER_FEATURE_RECONNECTION and feats & XENSTORE_SERVER_FEATURE_ERROR
    before = g.kicks
    assert g.read("domid") == b"1"
    assert g.kicks > before


def test_read_write_relative_and_absolute(g, store):
    assert g.read("name") == b"guest1"
    assert g.read("/local/domain/1/name") == b"guest1"
    assert g.read("memory/target") == b"262144"
    g.write("data/a/b/c", b"bin\0ary\xff")  # values are binary-safe
    assert g.read("/local/domain/1/data/a/b/c") == b"bin\0ary\xff"
    assert store.read("/local/domain/1/data/a/b/c") == b"bin\0ary\xff"
    assert g.read("data/a/b") == b""  # created parent, empty value
    # Nodes a guest creates are owned by it, ACL inherited from the parent.
    assert g.get_perms("data/a/b/c") == ["n1"]
    assert errno_of(g.read, "data/missing") == XenErrno.ENOENT
    # Host-side writes are visible to the guest.
    store.write("/local/domain/1/control/shutdown", "poweroff")
    assert g.read("control/shutdown") == b"poweroff"


def test_mkdir_rm_directory(g):
    g.mkdir("data/d1/d2")
    g.write("data/d1/v", "x")
    g.mkdir("data/d1")  # existing: fine, value unchanged
    assert g.read("data/d1") == b""
    assert sorted(g.directory("data/d1")) == ["d2", "v"]
    g.rm("data/d1/nonexistent")  # parent exists: not an error
    assert errno_of(g.rm, "data/nothere/child") == XenErrno.ENOENT
    g.rm("data/d1")
    assert errno_of(g.read, "data/d1/v") == XenErrno.ENOENT
    assert "d1" not in g.directory("data")
    assert errno_of(g.directory, "data/d1") == XenErrno.ENOENT


def test_host_cannot_remove_root(store):
    with pytest.raises(XenstoreError) as ei:
        store.rm("/")
    assert ei.value.errno == XenErrno.EINVAL


def test_directory_part_pages_long_listings(g, store):
    names = [f"child-with-a-rather-long-name-{i:04d}" for i in range(300)]
    with store.transaction() as t:
        for n in names:
            store.write(f"/local/domain/1/data/big/{n}", "", t)
    # The whole listing exceeds one payload: DIRECTORY says E2BIG.
    assert errno_of(g.directory, "data/big") == XenErrno.E2BIG
    got, off, gens, calls = [], 0, set(), 0
    while True:
        body = g.call(XsType.DIRECTORY_PART, f"data/big\0{off}\0".encode())
        assert len(body) <= XENSTORE_PAYLOAD_MAX
        gen, rest = body.split(b"\0", 1)
        gens.add(gen)
        calls += 1
        if rest == b"\0":
            break
        done = rest.endswith(b"\0\0")
        chunk = rest[:-1] if done else rest
        items = chunk.split(b"\0")[:-1]
        got += [i.decode() for i in items]
        off += len(chunk)
        if done:
            break
    assert got == names
    assert calls >= 3 and len(gens) == 1
    # Offset beyond the end: gencount and an empty list.
    body = g.call(XsType.DIRECTORY_PART, b"data/big\0999999\0")
    assert body.endswith(b"\0\0") and body.count(b"\0") == 2


def test_permissions_between_domains(store, g):
    g2 = GuestClient(store, 2)
    g.write("data/secret", "s1")
    assert errno_of(g2.read, "/local/domain/1/data/secret") == XenErrno.EACCES
    assert errno_of(g2.write, "/local/domain/1/data/secret", "x") == XenErrno.EACCES
    assert errno_of(g2.write, "/local/domain/1/data/new", "x") == XenErrno.EACCES
    assert errno_of(g2.rm, "/local/domain/1/data/secret") == XenErrno.EACCES
    assert errno_of(g2.directory, "/local/domain/1") == XenErrno.EACCES
    assert errno_of(g.read, "/local/domain/0/name") == XenErrno.EACCES
    assert errno_of(g.write, "/local/domain/0/x", "y") == XenErrno.EACCES
    assert errno_of(g.write, "/evil", "y") == XenErrno.EACCES
    # The domain dir is dom0's (guest may read, not write).
    assert g.get_perms("/local/domain/1") == ["n0", "r1"]
    assert g.read("name") == b"guest1"
    assert errno_of(g.write, "name", "renamed") == XenErrno.EACCES
    assert errno_of(g.write, "newtop", "x") == XenErrno.EACCES
    assert store.read("/local/domain/1/name") == b"guest1"
    # Granting read to domain 2 through an ACL entry.
    g.set_perms("data/secret", ["n1", "r2"])
    assert g2.read("/local/domain/1/data/secret") == b"s1"
    assert errno_of(g2.write, "/local/domain/1/data/secret", "x") == XenErrno.EACCES


def test_get_set_perms(g, store):
    assert g.get_perms("control/shutdown") == ["n1"]
    assert g.get_perms("name") == ["n0", "r1"]
    g.write("data/p", "v")
    g.set_perms("data/p", ["n1", "b2", "w3"])
    assert g.get_perms("data/p") == ["n1", "b2", "w3"]
    assert store.get_perms("/local/domain/1/data/p") == ["n1", "b2", "w3"]
    assert errno_of(g.set_perms, "data/p", ["n5"]) == XenErrno.EPERM  # no owner change
    assert errno_of(g.set_perms, "name", ["n1"]) == XenErrno.EACCES  # not the owner
    assert errno_of(g.set_perms, "data/p", ["x1"]) == XenErrno.EINVAL
    assert errno_of(g.set_perms, "data/p", ["r"]) == XenErrno.EINVAL
    assert errno_of(g.call, XsType.SET_PERMS, b"data/p\0") == XenErrno.EINVAL
    # dom0 may hand a node to someone else.
    store.set_perms("/local/domain/1/data/p", ["n2"])
    assert errno_of(g.read, "data/p") == XenErrno.EACCES


def test_domain_queries_and_privileged_ops(g):
    assert g.call(XsType.GET_DOMAIN_PATH, b"1\0") == b"/local/domain/1\0"
    assert g.call(XsType.GET_DOMAIN_PATH, b"7\0") == b"/local/domain/7\0"
    assert errno_of(g.call, XsType.GET_DOMAIN_PATH, b"abc\0") == XenErrno.EINVAL
    assert errno_of(g.call, XsType.GET_DOMAIN_PATH, b"70000\0") == XenErrno.EINVAL
    assert g.call(XsType.IS_DOMAIN_INTRODUCED, b"1\0") == b"T\0"
    assert g.call(XsType.IS_DOMAIN_INTRODUCED, b"0\0") == b"T\0"
    assert g.call(XsType.IS_DOMAIN_INTRODUCED, b"9\0") == b"F\0"
    for t, payload in [(XsType.INTRODUCE, b"3\0" b"100\0" b"5\0"), (XsType.RELEASE, b"1\0"),
                       (XsType.RESUME, b"1\0"), (XsType.SET_TARGET, b"1\0" b"2\0"),
                       (XsType.CONTROL, b"print\0hello\0")]:
        assert errno_of(g.call, t, payload) == XenErrno.EACCES


def test_watch_immediate_event_child_writes_and_rm(g, store):
    g.watch("control/shutdown", "tok-sd")
    # The reply comes first, then exactly one immediate event with the path as given.
    assert g.take_events() == [("control/shutdown", "tok-sd")]
    store.write("/local/domain/1/control/shutdown", "reboot")
    # Host-side writes push the event without a guest kick.
    g.pull()
    assert g.events == [("control/shutdown", "tok-sd")]
    g.events.clear()

    g.watch("/local/domain/1/data", "abs")
    assert g.take_events() == [("/local/domain/1/data", "abs")]
    g.write("data/x/y", "1")  # creates x and y: one event for the written path
    assert g.take_events() == [("/local/domain/1/data/x/y", "abs")]
    g.mkdir("data/m")
    assert g.take_events() == [("/local/domain/1/data/m", "abs")]
    g.watch("data/x/y/z", "deep")  # below the node that will be removed
    assert g.take_events() == [("data/x/y/z", "deep")]
    g.rm("data/x")
    ev = g.take_events()
    assert ("/local/domain/1/data/x", "abs") in ev
    assert ("/local/domain/1/data/x/y", "abs") in ev
    assert ("data/x/y/z", "deep") in ev  # the watch path itself, relative as registered
    g.write("data/unrelated", "1")
    assert ("data/x/y/z", "deep") not in g.take_events()

    assert errno_of(g.watch, "/local/domain/1/data", "abs") == XenErrno.EEXIST
    assert errno_of(g.watch, "data", "abs") == XenErrno.EEXIST  # same node, relative spelling
    g.unwatch("/local/domain/1/data", "abs")
    g.write("data/after", "1")
    assert g.take_events() == []
    assert errno_of(g.unwatch, "/local/domain/1/data", "abs") == XenErrno.ENOENT


def test_watch_special_paths_and_permissions(g, store):
    g.watch("@releaseDomain", "rel")
    g.watch("@introduceDomain", "intro")
    assert g.take_events() == [("@releaseDomain", "rel"), ("@introduceDomain", "intro")]
    store.release_domain(2)
    g.pull()
    assert g.events == [("@releaseDomain", "rel")]
    g.events.clear()
    store.introduce_domain(2)
    assert g.take_events() == [("@introduceDomain", "intro")]
    assert errno_of(g.read, "@releaseDomain") == XenErrno.EINVAL  # only watches take @ paths
    # Events for nodes the watcher cannot read are not sent.
    g.watch("/local/domain/2", "other")
    assert g.take_events() == [("/local/domain/2", "other")]
    store.write("/local/domain/2/data/x", "1")
    assert g.take_events() == []
    g.call(XsType.RESET_WATCHES, b"\0")
    store.write("/local/domain/1/control/shutdown", "halt")
    store.release_domain(2)
    assert g.take_events() == []


def test_host_watch_callback_sees_guest_writes(g, store):
    fe, be = add_device(store, 1, "vbd", 51712, {"virtual-device": 51712, "device-type": "disk"},
                        {"sectors": 0})
    seen = []
    token = store.watch(f"{fe}/state", lambda p, t: seen.append((p, t)))
    assert seen == [(f"{fe}/state", token)]
    g.write("device/vbd/51712/state", "3")
    assert seen[-1] == (f"{fe}/state", token)
    assert store.read(f"{fe}/state") == b"3"
    store.unwatch(f"{fe}/state", token)
    g.write("device/vbd/51712/state", "4")
    assert len(seen) == 2


def test_transactions_commit_abort_conflict(g, store):
    g.watch("data", "w")
    g.take_events()
    t = g.tx_start()
    assert t != 0
    g.write("data/tx/a", "1", tx=t)
    assert g.read("data/tx/a", tx=t) == b"1"
    assert errno_of(g.read, "data/tx/a") == XenErrno.ENOENT  # invisible outside
    assert g.take_events() == []  # events wait for the commit
    g.tx_end(t, commit=True)
    assert g.read("data/tx/a") == b"1"
    assert ("data/tx/a", "w") in g.take_events()

    t = g.tx_start()
    g.write("data/tx/a", "2", tx=t)
    g.tx_end(t, commit=False)
    assert g.read("data/tx/a") == b"1"
    assert g.take_events() == []
    assert errno_of(g.read, "data/tx/a", t) == XenErrno.ENOENT  # tx id gone

    # Conflict: read in tx, changed outside, commit fails with EAGAIN.
    t = g.tx_start()
    assert g.read("data/tx/a", tx=t) == b"1"
    g.write("data/tx/b", "x", tx=t)
    store.write("/local/domain/1/data/tx/a", "host")
    assert errno_of(g.tx_end, t, True) == XenErrno.EAGAIN
    assert errno_of(g.read, "data/tx/b") == XenErrno.ENOENT
    # Unrelated concurrent writes do not conflict.
    t = g.tx_start()
    g.write("data/tx/c", "c", tx=t)
    store.write("/local/domain/1/data/elsewhere", "e")
    g.tx_end(t)
    assert g.read("data/tx/c") == b"c"
    # rm inside a transaction
    t = g.tx_start()
    g.rm("data/tx", tx=t)
    assert g.read("data/tx/a") == b"host"
    g.tx_end(t)
    assert errno_of(g.read, "data/tx/a") == XenErrno.ENOENT
    # Protocol misuse.
    assert errno_of(g.call, XsType.TRANSACTION_START, b"\0", 12345) == XenErrno.ENOENT
    t = g.tx_start()
    assert errno_of(g.call, XsType.TRANSACTION_START, b"\0", t) == XenErrno.EBUSY
    assert errno_of(g.call, XsType.TRANSACTION_END, b"X\0", t) == XenErrno.EINVAL
    g.tx_end(t, commit=False)


def test_transaction_limit(g):
    ids = [g.tx_start() for _ in range(10)]
    assert len(set(ids)) == 10
    assert errno_of(g.tx_start) == XenErrno.ENOSPC
    g.tx_end(ids[0], commit=False)
    g.tx_start()


def test_host_transaction_context_manager(store):
    with store.transaction() as t:
        store.write("/local/domain/1/data/h", "1", t)
        assert not store.exists("/local/domain/1/data/h")
    assert store.read("/local/domain/1/data/h") == b"1"
    with pytest.raises(RuntimeError):
        with store.transaction() as t:
            store.write("/local/domain/1/data/h2", "1", t)
            raise RuntimeError
    assert not store.exists("/local/domain/1/data/h2")


def test_ring_wraparound_many_messages(store):
    g = GuestClient(store, 1, start_index=0xFFFFFF00)  # u32 wrap early on
    for i in range(600):
        val = (f"value-{i}-" * (i % 37 + 1)).encode()
        g.write(f"data/n{i % 50}", val)
        assert g.read(f"data/n{i % 50}") == val
    big = bytes(range(256)) * 15  # 3840 bytes: messages larger than the ring
    store.write("/local/domain/1/data/big", big)  # over a guest's node size: the host writes it
    assert g.read("data/big") == big
    g.write("data/big2", big[:2000])
    assert g.read("data/big2") == big[:2000]
    assert g.get(XS_RING_REQ_PROD) < 0xFFFFFF00  # indices really wrapped
    assert g.get(XS_RING_RSP_PROD) < 0xFFFFFF00
    assert g.get(XS_RING_ERROR) == XENSTORE_ERROR_NONE


def test_full_response_ring_never_overwritten(g, store):
    store.write("/local/domain/1/data/kb", b"k" * 1000)
    ids = []
    # Queue many READs without reading any reply; the server must stop at a full ring.
    for _ in range(30):
        g.req_id += 1
        msg = XsdSockmsg.build(dict(type=XsType.READ, req_id=g.req_id, tx_id=0, len=8)) + b"data/kb\0"
        if g.push(msg) < len(msg):
            break
        ids.append(g.req_id)
        g.server.process()
        used = (g.get(XS_RING_RSP_PROD) - g.get(XS_RING_RSP_CONS)) & 0xFFFFFFFF
        assert used <= XENSTORE_RING_SIZE
    assert (g.get(XS_RING_RSP_PROD) - g.get(XS_RING_RSP_CONS)) & 0xFFFFFFFF == XENSTORE_RING_SIZE
    # Back-pressure: not every request has been consumed while replies are stuck.
    assert g.get(XS_RING_REQ_CONS) != g.get(XS_RING_REQ_PROD)
    for _ in range(60):
        g.pull()
        g.server.process()
    g.pull()
    got = [r[1] for r in g.replies if r[0] == XsType.READ and r[3] == b"k" * 1000]
    assert got == ids
    assert g.get(XS_RING_REQ_CONS) == g.get(XS_RING_REQ_PROD)


def _raw(g, data: bytes):
    g.push(data)
    g.server.process()  # must not raise
    g.pull()


def test_malformed_requests_get_error_replies(g):
    def err_of(mtype, payload, tx=0):
        with pytest.raises(XenstoreError) as ei:
            g.call(mtype, payload, tx)
        return ei.value.errno

    assert err_of(XsType.READ, b"data/no-nul") == XenErrno.EINVAL
    assert err_of(XsType.READ, b"") == XenErrno.EINVAL
    assert err_of(XsType.READ, b"a\0b\0") == XenErrno.EINVAL
    assert err_of(XsType.WRITE, b"data/no-nul-at-all") == XenErrno.EINVAL
    assert err_of(99, b"x\0") == XenErrno.EINVAL
    assert err_of(20, b"x\0") == XenErrno.EINVAL  # a hole in the type numbers
    assert err_of(XsType.WATCH_EVENT, b"x\0t\0") == XenErrno.EINVAL
    assert err_of(XsType.ERROR, b"EINVAL\0") == XenErrno.EINVAL
    assert err_of(XsType.READ, b"name\0", tx=0xDEADBEEF) == XenErrno.ENOENT
    assert err_of(XsType.WATCH, b"onlypath\0") == XenErrno.EINVAL
    for bad in ["data/a b", "data//x", "data/x/", "", "data/\xe9", "/local/domain/1/../0"]:
        assert err_of(XsType.WRITE, bad.encode("latin-1") + b"\0v") == XenErrno.EINVAL, bad
    assert err_of(XsType.READ, b"/" + b"a" * XENSTORE_ABS_PATH_MAX + b"\0") == XenErrno.EINVAL
    assert err_of(XsType.READ, b"a" * 2100 + b"\0") == XenErrno.EINVAL
    # Still healthy afterwards.
    assert g.read("name") == b"guest1"
    assert g.get(XS_RING_ERROR) == XENSTORE_ERROR_NONE


def test_oversized_length_breaks_ring_with_proto_error(g):
    hdr = XsdSockmsg.build(dict(type=XsType.READ, req_id=77, tx_id=0, len=XENSTORE_PAYLOAD_MAX + 1))
    _raw(g, hdr + b"name\0")
    assert g.replies == [(XsType.ERROR, 77, 0, b"E2BIG\0")]
    assert g.server.broken
    assert g.get(XS_RING_ERROR) == XENSTORE_ERROR_PROTO
    g.replies.clear()
    _raw(g, XsdSockmsg.build(dict(type=XsType.READ, req_id=78, tx_id=0, len=5)) + b"name\0")
    assert g.replies == []  # a broken ring is not served


def test_bogus_request_indices_break_ring(g):
    g.set(XS_RING_REQ_PROD, g.get(XS_RING_REQ_CONS) + 5000)
    g.server.process()
    assert g.server.broken and g.get(XS_RING_ERROR) == XENSTORE_ERROR_RINGIDX


def test_bogus_response_indices_break_ring(g):
    g.set(XS_RING_RSP_CONS, g.get(XS_RING_RSP_PROD) - 2000)
    msg = XsdSockmsg.build(dict(type=XsType.READ, req_id=1, tx_id=0, len=5)) + b"name\0"
    g.push(msg)
    g.server.process()
    assert g.server.broken and g.get(XS_RING_ERROR) == XENSTORE_ERROR_RINGIDX


def test_reconnect_resets_broken_ring(g, store):
    g.watch("data", "w")
    g.take_events()
    g.set(XS_RING_REQ_PROD, 0x12345678)
    g.server.process()
    assert g.server.broken
    g.set(XS_RING_CONNECTION, XENSTORE_RECONNECT)
    kicks = g.kicks
    g.server.process()
    assert g.get(XS_RING_CONNECTION) == XENSTORE_CONNECTED
    assert g.get(XS_RING_ERROR) == XENSTORE_ERROR_NONE
    assert g.kicks > kicks
    for off in (XS_RING_REQ_CONS, XS_RING_REQ_PROD, XS_RING_RSP_CONS, XS_RING_RSP_PROD):
        assert g.get(off) == 0
    g.rx.clear()
    assert g.read("name") == b"guest1"
    store.write("/local/domain/1/data/z", "1")  # the old watch is gone
    assert g.take_events() == []


def test_random_garbage_never_raises(store):
    import random

    rng = random.Random(1234)
    for trial in range(40):
        g = GuestClient(store, 1, start_index=rng.getrandbits(32))
        for _ in range(20):
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300)))
            if rng.random() < 0.5:  # plausible header, random body
                blob = XsdSockmsg.build(dict(type=rng.randrange(0, 25), req_id=1,
                                             tx_id=rng.choice([0, 1, 99]), len=len(blob))) + blob
            if rng.random() < 0.05:
                g.set(XS_RING_RSP_CONS, rng.getrandbits(32))
            g.push(blob)
            g.server.process()
            try:
                g.pull()
            except AssertionError:
                pass  # guest scribbled its own rsp_cons: its problem, not ours
        assert g.get(XS_RING_ERROR) in (XENSTORE_ERROR_NONE, XENSTORE_ERROR_PROTO, XENSTORE_ERROR_RINGIDX)
    # The store survives and still serves a fresh guest.
    assert GuestClient(store, 1).read("name") == b"guest1"


def test_populate_domain_tree(store):
    d = "/local/domain/1"
    assert store.read(f"{d}/domid") == b"1"
    assert store.read(f"{d}/name") == b"guest1"
    assert store.read(f"{d}/memory/static-max") == b"262144"
    assert store.read(f"{d}/cpu/1/availability") == b"online"
    assert store.read("/local/domain/0/name") == b"Domain-0"
    assert store.read("/local/domain/0/domid") == b"0"
    vm = store.read(f"{d}/vm").decode()
    assert vm.startswith("/vm/") and store.read(f"{vm}/name") == b"guest1"
    for p in ("control/shutdown", "control/feature-poweroff", "data", "drivers", "error", "feature", "attr"):
        assert store.get_perms(f"{d}/{p}") == ["n1"], p
    assert store.get_perms(d) == ["n0", "r1"]
    assert store.get_perms(f"{d}/memory/target") == ["n0", "r1"]
    assert set(store.directory(f"{d}/console")) >= {"limit", "type"}
    assert store.directory(f"{d}/device") == []


def test_add_device_frontend_backend_perms(store, g):
    fe, be = add_device(store, 1, "vif", 0, {"handle": 0, "mac": "00:16:3e:00:00:01"},
                        {"feature-rx-copy": 1})
    assert fe == "/local/domain/1/device/vif/0"
    assert be == "/local/domain/0/backend/vif/1/0"
    assert store.read(f"{fe}/backend") == be.encode()
    assert store.read(f"{fe}/backend-id") == b"0"
    assert store.read(f"{fe}/state") == b"1"
    assert store.read(f"{be}/frontend") == fe.encode()
    assert store.read(f"{be}/frontend-id") == b"1"
    assert store.read(f"{be}/online") == b"1"
    assert store.get_perms(f"{fe}/state") == ["n1", "r0"]
    assert store.get_perms(f"{be}/state") == ["n0", "r1"]
    # From the guest: frontend writable, backend readable only.
    assert g.directory("device/vif") == ["0"]
    assert g.read(f"{be}/feature-rx-copy") == b"1"
    g.write("device/vif/0/tx-ring-ref", "8")
    assert errno_of(g.write, f"{be}/state", "4") == XenErrno.EACCES
    g2 = GuestClient(store, 2)
    assert errno_of(g2.read, f"{fe}/mac") == XenErrno.EACCES
    assert errno_of(g2.read, f"{be}/state") == XenErrno.EACCES


def test_concurrent_host_writes_and_guest_requests(store):
    g = GuestClient(store, 1)
    g.watch("control", "c")
    g.take_events()
    writes = 300

    def writer():
        for i in range(writes):
            store.write("/local/domain/1/control/shutdown", str(i))

    th = threading.Thread(target=writer)
    th.start()
    lock = g.server._lock  # the client must not race its own ring either
    for i in range(150):
        with lock:
            g.write(f"data/c{i % 5}", str(i))
            assert g.read(f"data/c{i % 5}") == str(i).encode()
    th.join()
    for _ in range(200):
        with lock:
            g.pull()
            g.server.process()
    assert g.get(XS_RING_ERROR) == XENSTORE_ERROR_NONE
    # Every host write reached the guest as an event, relative as registered, none lost.
    assert g.events == [("control/shutdown", "c")] * writes, (len(g.events), g.server.dropped_events)


def test_set_perms_fires_one_event_and_respects_readability(g, store):
    g.write("data/sp", "v")
    g.watch("data/sp", "w")
    g.take_events()
    g.set_perms("data/sp", ["n1", "r2"])
    assert g.take_events() == [("data/sp", "w")]
    g2 = GuestClient(store, 2)
    g2.watch("/local/domain/1/data/sp", "w2")
    assert g2.take_events() == [("/local/domain/1/data/sp", "w2")]
    # Made unreadable for domain 2: it still hears of that change (readable before) ...
    store.set_perms("/local/domain/1/data/sp", ["n1"])
    assert g2.take_events() == [("/local/domain/1/data/sp", "w2")]
    # ... but not of later writes it cannot read.
    g.write("data/sp", "v2")
    assert g2.take_events() == []


def test_close_releases_domain_and_stops_serving(store):
    seen = []
    store.watch("@releaseDomain", lambda p, t: seen.append(p))
    g = GuestClient(store, 1)
    g.watch("data", "w")
    g.take_events()
    g.server.close()
    assert seen == ["@releaseDomain", "@releaseDomain"]
    assert not store.domain_introduced(1)
    store.write("/local/domain/1/data/x", "1")
    g.push(XsdSockmsg.build(dict(type=XsType.READ, req_id=1, tx_id=0, len=5)) + b"name\0")
    g.server.process()
    g.pull()
    assert g.events == [] and g.replies == []


def test_payload_arriving_while_header_is_consumed_is_served(g, store):
    """Linux's xb_write writes a header and then its payload, and notifies
    only when the server had consumed everything before (old prod <=
    req_cons).  A payload written while the server is taking the header
    (after it read prod, before it published cons) therefore comes with no
    notification: the server must look at prod again after publishing cons
    (the boot hung in xs_talkv without this)."""
    payload = b"control/feature-poweroff\x001"
    hdr = XsdSockmsg.build(dict(type=XsType.WRITE, req_id=7, tx_id=0, len=len(payload)))
    g.push(hdr)
    srv = g.server
    real_set = srv._set
    injected = []

    def set_and_race(off, value):
        real_set(off, value)
        if off == XS_RING_REQ_CONS and not injected:
            injected.append(g.get(XS_RING_REQ_PROD))
            g.push(payload)          # the guest's second xb_write: it sees the old cons
    srv._set = set_and_race
    srv.process()                    # the one notification, for the header
    srv._set = real_set
    g.pull()
    assert injected, "the race window was not exercised"
    assert [r[:2] for r in g.replies] == [(XsType.WRITE, 7)], g.replies
    assert store.read("/local/domain/1/control/feature-poweroff") == b"1"


# ---------------------------------------------------------------------------
# Quotas (issue 11, item 2): a hostile guest gets xenstored's error, the
# store stays usable, the host can still write device keys, and what the
# guest holds stays bounded by the store's own accounting.
# ---------------------------------------------------------------------------


def _host_can_attach_a_device(store, devid: int):
    fe, be = add_device(store, 1, "vbd", devid, {"virtual-device": devid}, {"sectors": 0})
    store.write(f"{be}/state", "2")
    assert store.read(f"{fe}/backend") == be.encode()


def _fill_node_quota(g, store) -> list[str]:
    """Create nodes (few per directory, or the directory's node would be
    too big) until the guest owns QUOTA_NODES; returns their paths."""
    made = []
    while store.domain_usage(1).nodes < QUOTA_NODES:
        path = f"data/d{len(made) // 50}/n{len(made) % 50}"
        g.write(path, "x")
        made.append(path)
    return made


def test_node_quota(g, store):
    made = _fill_node_quota(g, store)
    assert store.domain_usage(1).nodes == QUOTA_NODES
    assert errno_of(g.write, "data/one-more", "x") == XenErrno.ENOSPC
    assert errno_of(g.mkdir, "data/d0/n0/child") == XenErrno.ENOSPC
    t = g.tx_start()  # inside a transaction as well
    assert errno_of(g.write, "data/one-more", "x", t) == XenErrno.ENOSPC
    g.tx_end(t, commit=False)
    assert store.domain_usage(1).nodes == QUOTA_NODES
    # Still usable: reads, rewrites of its own nodes, and the host's writes.
    assert g.read(made[-1]) == b"x"
    g.write(made[-1], "y")
    _host_can_attach_a_device(store, 51712)  # frontend nodes owned by the guest: over its quota
    assert store.domain_usage(1).nodes > QUOTA_NODES
    # Removing nodes gives room back.
    g.rm("data/d0")
    g.write("data/again", "x")


def test_node_quota_holds_at_commit(g, store):
    """Two transactions may each stay within the quota; the second commit may not."""
    _fill_node_quota(g, store)
    g.rm("data/d0/n0")
    g.rm("data/d0/n1")
    t1, t2 = g.tx_start(), g.tx_start()
    g.write("data/d0/t1a", "x", t1)  # different directories: no conflict
    g.write("data/d0/t1b", "x", t1)
    g.write("data/d1/t2", "x", t2)
    g.tx_end(t1)
    assert errno_of(g.tx_end, t2, True) == XenErrno.ENOSPC
    assert store.domain_usage(1).nodes == QUOTA_NODES
    assert errno_of(g.read, "data/d1/t2") == XenErrno.ENOENT


def test_guests_together_cannot_fill_the_store(store, monkeypatch):
    """MAX_GUEST_NODES binds guests only: the host always has room."""
    g1, g2 = GuestClient(store, 1), GuestClient(store, 2)
    g1.write("data/a", "x")
    total = store.domain_usage(1).nodes + store.domain_usage(2).nodes
    monkeypatch.setattr(store_module, "MAX_GUEST_NODES", total + 1)
    g2.write("data/b", "x")
    assert errno_of(g2.write, "data/c", "x") == XenErrno.ENOSPC
    assert errno_of(g1.write, "data/c", "x") == XenErrno.ENOSPC
    _host_can_attach_a_device(store, 51712)
    store.write("/local/domain/0/backend/new-dir/key", "v")
    g1.write("data/a", "rewrite")  # no new node: fine


def test_node_size_quota(g, store):
    # 16-byte header, 8 bytes per permission, the value, the child names.
    g.write("data/v", b"x" * (QUOTA_NODE_SIZE - 16 - 8 - 1))
    assert errno_of(g.write, "data/v", b"x" * (QUOTA_NODE_SIZE - 16 - 8)) == XenErrno.ENOSPC
    assert errno_of(g.write, "data/new", b"x" * 3000) == XenErrno.ENOSPC
    assert errno_of(g.read, "data/new") == XenErrno.ENOENT  # nothing half made
    assert g.read("data/v") == b"x" * (QUOTA_NODE_SIZE - 16 - 8 - 1)
    # A directory's node holds its child names: it cannot grow past the quota.
    name = "c" * 99
    made = 0
    with pytest.raises(XenstoreError) as ei:
        while True:
            g.write(f"data/dir/{name}{made:04d}", "")
            made += 1
    assert ei.value.errno == XenErrno.ENOSPC
    assert made == (QUOTA_NODE_SIZE - 16 - 8 - 1) // (len(name) + 4 + 1)
    assert len(g.directory("data/dir")) == made
    # Not for the host, and shrinking is always allowed.
    store.write("/local/domain/1/data/v", b"h" * 4000)
    store.write(f"/local/domain/1/data/dir/{name}-host", "")
    g.write("data/v", b"small")
    g.rm(f"data/dir/{name}0000")
    _host_can_attach_a_device(store, 51712)


def test_watch_quota(g, store):
    for i in range(QUOTA_WATCHES):
        g.watch(f"data/w{i}", "t")
    assert store.domain_usage(1).watches == QUOTA_WATCHES
    assert errno_of(g.watch, "data/one-more", "t") == XenErrno.ENOSPC
    g.unwatch("data/w0", "t")
    g.watch("data/one-more", "t")
    g.take_events()
    # The host's watches are not the guest's.
    seen = []
    store.watch("/local/domain/1/data", lambda p, t: seen.append(p))
    _host_can_attach_a_device(store, 51712)
    g.write("data/w5", "x")
    assert ("data/w5", "t") in g.take_events()
    assert seen[-1] == "/local/domain/1/data/w5"


def test_memory_quota_counts_nodes_and_watches(g, store, monkeypatch):
    """The nodes a guest owns (path + node) and its watches (path + token)
    share its memory quota (a smaller one here, to fill it quickly)."""
    monkeypatch.setattr(store_module, "QUOTA_MEMORY", store.domain_usage(1).memory + 40000)
    made = 0
    with pytest.raises(XenstoreError) as ei:
        while True:
            g.write(f"data/n{made}", b"v" * 1900)
            made += 1
    assert ei.value.errno == XenErrno.ENOMEM
    assert made == 40000 // (len("/local/domain/1/data/n0") + 16 + 8 + 1900 + len("n0") + 1)
    assert errno_of(g.read, f"data/n{made}") == XenErrno.ENOENT
    assert store.domain_usage(1).memory <= store_module.QUOTA_MEMORY
    assert errno_of(g.watch, "data", "t" * 2000) == XenErrno.ENOMEM
    g.watch("data", "t")  # what is left is enough for a small one
    g.take_events()
    _host_can_attach_a_device(store, 51712)
    store.write("/local/domain/1/data/n0", b"h" * 4000)  # the host is never refused
    g.rm("data/n0")  # shrinking is always allowed, and gives room back
    g.write("data/again", b"v" * 1900)


def test_transaction_rewrites_hold_one_node(store):
    """Issue 11: two million writes in one transaction grew pyvmm by 384 MiB
    (one queued watch event per write).  A transaction keeps one pending node
    and one event per path however often it writes it."""
    conn = store.connect(1)
    t = store.op_transaction_start(conn)
    tx = conn.transactions[t]
    for i in range(20000):
        store.op_write(conn, t, "data/hot", str(i).encode())
    assert len(tx.events) == 1 and len(tx.changed) <= 2
    entry = len("/local/domain/1/data/hot") + 16 + 8 + len(b"19999")
    assert tx.held_bytes == entry + len("/local/domain/1/data") + 16 + 8 + len("hot") + 1
    seen = []
    store.watch("/local/domain/1/data/hot", lambda p, tok: seen.append(p))
    seen.clear()
    store.op_transaction_end(conn, t, True)
    assert seen == ["/local/domain/1/data/hot"]
    assert store.read("/local/domain/1/data/hot") == b"19999"


def test_transaction_nodes_quota(g, store):
    with store.transaction() as t:
        for i in range(QUOTA_TRANSACTION_NODES + 50):
            store.write(f"/local/domain/1/data/h/{i // 50}/{i % 50}", "x", t)
    t = g.tx_start()
    read = 0
    with pytest.raises(XenstoreError) as ei:
        while True:
            g.read(f"data/h/{read // 50}/{read % 50}", t)
            read += 1
    assert ei.value.errno == XenErrno.ENOSPC  # reads touch nodes too
    assert len(g.server.conn.transactions[t].base) == QUOTA_TRANSACTION_NODES
    assert errno_of(g.write, "data/new", "y", t) == XenErrno.ENOSPC
    g.write("data/h/0/0", "y", t)  # nodes already touched stay usable
    g.tx_end(t)
    assert g.read("data/h/0/0") == b"y"
    assert errno_of(g.read, "data/new") == XenErrno.ENOENT
    # An rm too big for a transaction changes nothing.
    t = g.tx_start()
    assert errno_of(g.rm, "data/h", t) == XenErrno.ENOSPC
    g.tx_end(t)
    assert g.read("data/h/0/1") == b"x"
    _host_can_attach_a_device(store, 51712)


def test_transactions_rewriting_the_store_stay_within_memory(g, store):
    """Issue 11: ten transactions rewriting a full store grew pyvmm by 1 GiB.
    Their pending writes count against the guest's memory quota."""
    for i in range(200):
        g.write(f"data/d{i // 50}/n{i % 50}", "x")
    before = store.domain_usage(1).memory
    value = b"v" * 1900
    txs = [g.tx_start() for _ in range(10)]
    refused = 0
    for t in txs:
        for i in range(200):
            try:
                g.write(f"data/d{i // 50}/n{i % 50}", value, t)
            except XenstoreError as e:
                assert e.errno == XenErrno.ENOMEM
                refused += 1
    held = [g.server.conn.transactions[t].held_bytes for t in txs]
    assert refused > 0 and held[-1] < held[0]
    assert store.domain_usage(1).memory <= QUOTA_MEMORY
    assert before + sum(held) == store.domain_usage(1).memory
    assert errno_of(g.watch, "data/w", "t" * 2000) == XenErrno.ENOMEM
    # Usable: reads, small live writes within the memory left, the host.
    assert g.read("data/d0/n0") == b"x"
    _host_can_attach_a_device(store, 51712)
    for t in txs:
        g.tx_end(t, commit=False)
    assert store.domain_usage(1).memory < before + 2048  # the device's frontend nodes
    t = g.tx_start()
    g.write("data/d0/n0", value, t)
    g.tx_end(t)
    assert g.read("data/d0/n0") == value


def test_outstanding_replies_stop_taking_requests(g):
    """A guest that sends requests without reading replies is slowed down,
    not disconnected: the ring holds at most QUOTA_OUTSTANDING queued replies."""
    sent = 0
    msg = XsdSockmsg.build(dict(type=XsType.READ, req_id=0, tx_id=0, len=5)) + b"name\0"
    while True:
        if g.push(msg) < len(msg):
            break
        sent += 1
        g.server.process()
        assert g.server.outstanding <= QUOTA_OUTSTANDING
    assert g.server.outstanding == QUOTA_OUTSTANDING
    assert g.get(XS_RING_REQ_CONS) != g.get(XS_RING_REQ_PROD)  # the rest waits in the ring
    for _ in range(200):
        g.pull()
        g.server.process()
    g.pull()
    assert len(g.replies) == sent
    assert all(r[0] == XsType.READ and r[3] == b"guest1" for r in g.replies)
    assert g.get(XS_RING_ERROR) == XENSTORE_ERROR_NONE


# ---------------------------------------------------------------------------
# A busy client (issue 11, item 7)
# ---------------------------------------------------------------------------

# The guest's other vCPU, played by a native thread: while pyvmm serves the
# ring it keeps reading the two indices pyvmm produces (req_cons, rsp_prod),
# as Linux's xb_write/xb_read do on any CPU at any moment, and counts every
# value that is behind one it saw before.  Linux's check_indexes() treats such
# a value as a broken ring: it zeroes its own indices and fails the request
# with -EIO.
_INDEX_WATCHER_C = r"""
#include <stdint.h>
#include <pthread.h>

static volatile const uint32_t *words[2];
static volatile int stop;
static unsigned long went_back, reads;
static uint32_t first_before, first_after;
static pthread_t thread;

static void *watch(void *unused)
{
    uint32_t last[2] = { *words[0], *words[1] };
    while (!stop) {
        for (int i = 0; i < 2; i++) {
            uint32_t now = *words[i];
            if ((uint32_t)(now - last[i]) > 0x80000000u && !went_back++) {
                first_before = last[i];
                first_after = now;
            }
            last[i] = now;
        }
        reads++;
    }
    return 0;
}

void watcher_start(void *req_cons, void *rsp_prod)
{
    words[0] = req_cons;
    words[1] = rsp_prod;
    stop = 0;
    went_back = reads = 0;
    pthread_create(&thread, 0, watch, 0);
}

/* how often an index went back; *nreads polls, *first = the first (before, after) */
unsigned long watcher_stop(unsigned long *nreads, uint32_t *first)
{
    stop = 1;
    pthread_join(thread, 0);
    *nreads = reads;
    first[0] = first_before;
    first[1] = first_after;
    return went_back;
}
"""


@pytest.fixture
def index_watcher(tmp_path):
    """start(page) watches the page's req_cons and rsp_prod from a native
    thread; stop() returns how often one was seen going backwards, how many
    polls it made, and the first backward step (before, after)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc to build the native index watcher")
    src = tmp_path / "watcher.c"
    src.write_text(_INDEX_WATCHER_C)
    lib_path = tmp_path / "watcher.so"
    subprocess.run([gcc, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(lib_path), str(src)],
                   check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.watcher_stop.restype = ctypes.c_ulong
    pinned = []

    class Watcher:
        def start(self, page: bytearray):
            base = ctypes.addressof((ctypes.c_char * len(page)).from_buffer(page))
            pinned.append(page)
            lib.watcher_start(ctypes.c_void_p(base + XS_RING_REQ_CONS),
                              ctypes.c_void_p(base + XS_RING_RSP_PROD))

        def stop(self) -> tuple[int, int, tuple[int, int]]:
            reads, first = ctypes.c_ulong(), (ctypes.c_uint32 * 2)()
            went_back = lib.watcher_stop(ctypes.byref(reads), first)
            return went_back, reads.value, tuple(first)

    return Watcher()


def _pipelined_writes(g, count: int, value: bytes) -> dict[int, bytes]:
    """Like Linux's xenbus under a process writing /dev/xen/xenbus in a loop:
    requests go into the ring as space allows, without waiting for replies,
    and replies are taken as they come; returns {req_id: reply payload}."""
    pending = [XsdSockmsg.build(dict(type=XsType.WRITE, req_id=i + 1, tx_id=0,
                                     len=len(f"data/n{i:05d}") + 1 + len(value)))
               + f"data/n{i:05d}".encode() + b"\0" + value for i in range(count)]
    pending.reverse()
    partial = b""
    replies = {}
    stalled = 0
    while len(replies) < count:
        if not partial and pending:
            partial = pending.pop()
        moved = g.push(partial) if partial else 0
        partial = partial[moved:]
        g.server.process()           # the guest's kick
        g.pull()
        for mtype, req_id, _, body in g.replies:
            replies[req_id] = (mtype, body)
        got = len(g.replies)
        g.replies.clear()
        stalled = 0 if moved or got else stalled + 1
        assert stalled < 100, f"no progress after {len(replies)} replies"
        assert not g.server.broken
    return replies


def test_busy_client_index_stores_never_go_backwards(store, index_watcher):
    """Issue 11 item 7: about 400 pipelined 2 KB writes into, the guest's
    xenbus saw req_cons = 0 for an instant: struct.pack_into zero-fills the
    field before storing the value, so every index store briefly published 0.
    Linux then zeroed its own indices and failed every later request with
    -EIO, and pyvmm saw prod=0 and broke the ring (RINGIDX)."""
    g = GuestClient(store, 1, start_index=0x10000000)  # far from 0: a stray 0 shows
    index_watcher.start(g.page)
    try:
        replies = _pipelined_writes(g, 1500, b"v" * 2000)
    finally:
        went_back, reads, (before, after) = index_watcher.stop()
    assert reads > 0
    assert went_back == 0, (f"the guest saw an index go backwards {went_back} times, "
                            f"first from {before:#x} to {after:#x}")
    assert g.get(XS_RING_ERROR) == XENSTORE_ERROR_NONE
    assert len(replies) == 1500
    # Served: OK until the directory's node is full (its child names), then
    # xenstored's ENOSPC, never a broken ring.
    assert set(replies.values()) == {(XsType.WRITE, b"OK\0"), (XsType.ERROR, b"ENOSPC\0")}
    assert g.read("data/n00000") == b"v" * 2000
