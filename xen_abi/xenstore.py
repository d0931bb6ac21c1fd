"""An in-process xenstore: the tree, its wire protocol, and the shared-ring transport.

Semantics follow Xen's docs/misc/xenstore.txt and xenstore-ring.txt:

* a tree of nodes, each with a byte value, children and permissions
  (owner domid + ACL, Xen's "n0"/"r1"/"w2"/"b3" strings);
* transactions work on a snapshot of the whole tree; a commit fails with
  EAGAIN when any node the transaction read or wrote changed meanwhile;
* watches fire on writes, mkdir, rm and set_perms at or below the watched
  path, once immediately on registration, and on "@introduceDomain" /
  "@releaseDomain";
* relative paths are resolved against /local/domain/<domid>.

`XenstoreStore` is the database, used directly by the VMM and back-ends with
dom0 privileges; `XenstoreRingServer` serves one guest over its ring page.
Guest input is never trusted: every malformed request yields an XS_ERROR
reply, and a ring whose framing or indices are broken is shut down with the
ring's `error` field set, never an exception into the caller.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import re
import struct
import threading
import uuid as uuid_mod
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from .abi import (
    DOMID_SELF,
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_CONNECTED,
    XENSTORE_ERROR_NONE,
    XENSTORE_ERROR_PROTO,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
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
    XenbusState,
    XenErrno,
    XsdSockmsg,
    XsType,
)

log = logging.getLogger(__name__)

# Access bits; "owner" is implied by being perms[0]'s domid.
PERM_NONE = 0
PERM_READ = 1
PERM_WRITE = 2
PERM_BOTH = PERM_READ | PERM_WRITE
PERM_OWNER = 4
_PERM_LETTER = {"n": PERM_NONE, "r": PERM_READ, "w": PERM_WRITE, "b": PERM_BOTH}
_LETTER_OF = {v: k for k, v in _PERM_LETTER.items()}

LOCAL_DOMAIN = "/local/domain"
WATCH_INTRODUCE = "@introduceDomain"
WATCH_RELEASE = "@releaseDomain"

# Domids 0..DOMID_FIRST_RESERVED-1 are real domains.
DOMID_FIRST_RESERVED = DOMID_SELF

# Limits that keep a hostile guest from growing the host process without
# bound (Xen's default quotas are of the same order).
MAX_NODES = 20000
MAX_TRANSACTIONS_PER_CONN = 10
MAX_WATCHES_PER_CONN = 128
MAX_PERMS_PER_NODE = 16
# Pending output (replies and watch events) a ring may hold beyond the ring
# itself: above REPLY_BACKLOG we stop taking requests, above EVENT_BACKLOG we
# drop watch events (watches may fire spuriously, but not be lost silently:
# the drop is logged).
REPLY_BACKLOG = 2 * (XSD_SOCKMSG_SIZE + XENSTORE_PAYLOAD_MAX)
EVENT_BACKLOG = 256 * 1024

_U32 = struct.Struct("<I")
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-/_@]+\Z")
_OK = b"OK\0"


class XenstoreError(Exception):
    """A xenstore operation failed; `errno` is what goes on the wire by name."""

    def __init__(self, errno: XenErrno, why: str = ""):
        super().__init__(f"{errno.name}: {why}" if why else errno.name)
        self.errno = XenErrno(errno)


def _err(errno: XenErrno, why: str = "") -> XenstoreError:
    return XenstoreError(errno, why)


# ---------------------------------------------------------------------------
# Nodes and permissions
# ---------------------------------------------------------------------------

Perms = tuple  # tuple[tuple[int domid, int bits], ...]; [0] = owner + default


@dataclass(frozen=True)
class Node:
    """Immutable: a change replaces the node, so snapshots are shallow dict copies."""

    value: bytes
    perms: Perms
    children: tuple  # leaf names, in creation order
    gen: int


def parse_perms(strings: Iterable[str]) -> Perms:
    out = []
    for s in strings:
        if len(s) < 2 or s[0] not in _PERM_LETTER or not s[1:].isdigit():
            raise _err(XenErrno.EINVAL, f"bad permission {s!r}")
        domid = int(s[1:])
        if domid > 0xFFFF:
            raise _err(XenErrno.EINVAL, f"bad domid in permission {s!r}")
        out.append((domid, _PERM_LETTER[s[0]]))
    if not out:
        raise _err(XenErrno.EINVAL, "empty permission list")
    return tuple(out)


def format_perms(perms: Perms) -> list[str]:
    return [f"{_LETTER_OF[bits & PERM_BOTH]}{domid}" for domid, bits in perms]


def _is_child(path: str, parent: str) -> bool:
    """xenstore.txt's "child": identical, or parent is /, or parent/ prefixes path."""
    if parent == "/":
        return path.startswith("/")
    return path == parent or path.startswith(parent + "/")


def _parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _join(parent: str, leaf: str) -> str:
    return "/" + leaf if parent == "/" else f"{parent}/{leaf}"


def domain_path(domid: int) -> str:
    return f"{LOCAL_DOMAIN}/{domid}"


# ---------------------------------------------------------------------------
# Connections, watches, transactions
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class Watch:
    conn: "Connection"
    path: str  # canonical absolute path or @special
    token: str
    relative_to: str | None  # prefix stripped from event paths for relative watches
    deliver: Callable[[str, str], None]


@dataclass(eq=False)
class Transaction:
    id: int
    base: dict  # the tree when the transaction started
    nodes: dict  # the transaction's working copy
    accessed: set = field(default_factory=set)  # paths read or written
    changed: set = field(default_factory=set)  # paths replaced or removed
    events: list = field(default_factory=list)  # (path, (perms, ...), exact) fired at commit


class Connection:
    """One client of the store: a guest's ring, or the host itself (dom0)."""

    def __init__(self, store: "XenstoreStore", domid: int, privileged: bool,
                 deliver: Callable[[str, str], None] | None):
        self.store = store
        self.domid = domid
        self.privileged = privileged
        self.deliver = deliver  # watch-event sink for ring clients
        self.transactions: dict[int, Transaction] = {}
        self.watches: list[Watch] = []
        self.prefix = domain_path(domid)

    def perm_for(self, perms: Perms) -> int:
        if self.privileged:
            return PERM_BOTH | PERM_OWNER
        owner, default = perms[0]
        if owner == self.domid:
            return PERM_BOTH | PERM_OWNER
        for domid, bits in perms[1:]:
            if domid == self.domid:
                return bits
        return default

    def canonical(self, path: str, allow_special: bool = False) -> str:
        """Validate a client-supplied path and make it absolute (EINVAL if bad)."""
        if not path:
            raise _err(XenErrno.EINVAL, "empty path")
        if path.startswith("@"):
            if allow_special and _PATH_CHARS.match(path):
                return path
            raise _err(XenErrno.EINVAL, f"special path {path!r} not allowed here")
        if not _PATH_CHARS.match(path) or "//" in path:
            raise _err(XenErrno.EINVAL, "bad characters in path")
        if path.startswith("/"):
            if len(path) > XENSTORE_ABS_PATH_MAX:
                raise _err(XenErrno.EINVAL, "path too long")
            if len(path) > 1 and path.endswith("/"):
                raise _err(XenErrno.EINVAL, "trailing slash")
            return path
        if len(path) > XENSTORE_REL_PATH_MAX or path.endswith("/"):
            raise _err(XenErrno.EINVAL, "bad relative path")
        full = f"{self.prefix}/{path}"
        if len(full) > XENSTORE_ABS_PATH_MAX:
            raise _err(XenErrno.EINVAL, "path too long")
        return full


# ---------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------


class XenstoreStore:
    """The xenstore database. Thread-safe; watch callbacks run without its lock held.

    The host API (read/write/...) acts as dom0. Values are bytes; str
    arguments are encoded as ASCII/UTF-8 for convenience.
    """

    def __init__(self):
        self._lock = threading.RLock()
        self._gen = itertools.count(1)
        self._nodes: dict[str, Node] = {"/": Node(b"", ((0, PERM_NONE),), (), next(self._gen))}
        self._tx_ids = itertools.count(1)
        self._connections: list[Connection] = []
        self._introduced: set[int] = {0}
        self._tokens = itertools.count(1)
        self.host = self.connect(0, privileged=True, deliver=None)

    # -- connections ------------------------------------------------------

    def connect(self, domid: int, privileged: bool | None = None,
                deliver: Callable[[str, str], None] | None = None) -> Connection:
        if privileged is None:
            privileged = domid == 0
        conn = Connection(self, domid, privileged, deliver)
        with self._lock:
            self._connections.append(conn)
        return conn

    def disconnect(self, conn: Connection) -> None:
        with self._lock:
            self.reset_connection(conn)
            if conn in self._connections:
                self._connections.remove(conn)

    def reset_connection(self, conn: Connection) -> None:
        """RESET_WATCHES / ring reconnection: drop watches and transactions."""
        with self._lock:
            conn.watches.clear()
            conn.transactions.clear()

    # -- internal tree access ----------------------------------------------

    def _view(self, conn: Connection, tx_id: int) -> tuple[dict, Transaction | None]:
        if tx_id == 0:
            return self._nodes, None
        tx = conn.transactions.get(tx_id)
        if tx is None:
            raise _err(XenErrno.ENOENT, f"no transaction {tx_id}")
        return tx.nodes, tx

    @staticmethod
    def _get(nodes: dict, tx: Transaction | None, path: str) -> Node | None:
        if tx is not None:
            tx.accessed.add(path)
        return nodes.get(path)

    def _checked(self, conn, nodes, tx, path, want: int) -> Node:
        node = self._get(nodes, tx, path)
        if node is None:
            raise _err(XenErrno.ENOENT, path)
        if conn.perm_for(node.perms) & want != want:
            raise _err(XenErrno.EACCES, path)
        return node

    def _put(self, nodes, tx, path, node: Node | None) -> None:
        if node is None:
            nodes.pop(path, None)
        else:
            nodes[path] = node
        if tx is not None:
            tx.accessed.add(path)
            tx.changed.add(path)

    def _event(self, events: list, tx, path: str, *perms: Perms, exact: bool = True) -> None:
        """Record a change; watchers get it if any of `perms` lets them read the node."""
        ev = (path, perms, exact)
        (tx.events if tx is not None else events).append(ev)

    def _create(self, conn, nodes, tx, path: str, value: bytes) -> None:
        """Create `path` and missing parents; write access on the nearest existing ancestor."""
        missing = []
        cur = path
        while True:
            missing.append(cur)
            cur = _parent(cur)
            anc = self._get(nodes, tx, cur)
            if anc is not None:
                break
        if conn.perm_for(anc.perms) & PERM_WRITE == 0:
            raise _err(XenErrno.EACCES, f"cannot create under {cur}")
        if len(nodes) + len(missing) > MAX_NODES:
            raise _err(XenErrno.ENOSPC, "store is full")
        perms = anc.perms
        if not conn.privileged:  # unprivileged domains own what they create
            perms = ((conn.domid, perms[0][1]),) + tuple(perms[1:])
        parent_path, parent = cur, anc
        for p in reversed(missing):
            leaf = p.rsplit("/", 1)[1]
            self._put(nodes, tx, parent_path,
                      Node(parent.value, parent.perms, parent.children + (leaf,), next(self._gen)))
            parent_path = p
            parent = Node(value if p == path else b"", perms, (), next(self._gen))
            self._put(nodes, tx, p, parent)

    # -- operations (conn, tx_id, path...) -----------------------------------

    def op_read(self, conn, tx_id, path) -> bytes:
        with self._lock:
            nodes, tx = self._view(conn, tx_id)
            return self._checked(conn, nodes, tx, conn.canonical(path), PERM_READ).value

    def op_write(self, conn, tx_id, path, value: bytes) -> None:
        events = []
        try:
            with self._lock:
                nodes, tx = self._view(conn, tx_id)
                full = conn.canonical(path)
                node = self._get(nodes, tx, full)
                if node is None:
                    self._create(conn, nodes, tx, full, bytes(value))
                    node = nodes[full]
                else:
                    if conn.perm_for(node.perms) & PERM_WRITE == 0:
                        raise _err(XenErrno.EACCES, full)
                    node = Node(bytes(value), node.perms, node.children, next(self._gen))
                    self._put(nodes, tx, full, node)
                self._event(events, tx, full, node.perms)
        finally:
            self._dispatch(events)

    def op_mkdir(self, conn, tx_id, path) -> None:
        events = []
        try:
            with self._lock:
                nodes, tx = self._view(conn, tx_id)
                full = conn.canonical(path)
                node = self._get(nodes, tx, full)
                if node is not None:
                    if conn.perm_for(node.perms) & PERM_WRITE == 0:
                        raise _err(XenErrno.EACCES, full)
                    return
                self._create(conn, nodes, tx, full, b"")
                self._event(events, tx, full, nodes[full].perms)
        finally:
            self._dispatch(events)

    def op_rm(self, conn, tx_id, path) -> None:
        events = []
        try:
            with self._lock:
                nodes, tx = self._view(conn, tx_id)
                full = conn.canonical(path)
                node = self._get(nodes, tx, full)
                parent_path = _parent(full)
                if node is None:
                    # Not an error if the parent exists (xenstore.txt).
                    if full != "/" and self._get(nodes, tx, parent_path) is not None:
                        return
                    raise _err(XenErrno.ENOENT, full)
                if conn.perm_for(node.perms) & PERM_WRITE == 0:
                    raise _err(XenErrno.EACCES, full)
                if full == "/":
                    raise _err(XenErrno.EINVAL, "cannot remove the root")
                # Post-order walk: children's events first, each with its own perms.
                stack = [(full, False)]
                while stack:
                    p, visited = stack.pop()
                    n = nodes[p]
                    if not visited:
                        stack.append((p, True))
                        stack.extend((_join(p, c), False) for c in n.children)
                        continue
                    self._put(nodes, tx, p, None)
                    # Watches below a removed parent fire with their own path.
                    self._event(events, tx, p, n.perms, exact=(p != full))
                parent = self._get(nodes, tx, parent_path)
                leaf = full.rsplit("/", 1)[1]
                self._put(nodes, tx, parent_path, Node(
                    parent.value, parent.perms,
                    tuple(c for c in parent.children if c != leaf), next(self._gen)))
        finally:
            self._dispatch(events)

    def op_directory(self, conn, tx_id, path) -> list[str]:
        with self._lock:
            nodes, tx = self._view(conn, tx_id)
            return list(self._checked(conn, nodes, tx, conn.canonical(path), PERM_READ).children)

    def op_directory_part(self, conn, tx_id, path, offset: int) -> bytes:
        """<gencnt>|<child>|* from byte `offset` of the child list; a final extra NUL ends it."""
        with self._lock:
            nodes, tx = self._view(conn, tx_id)
            node = self._checked(conn, nodes, tx, conn.canonical(path), PERM_READ)
            gen = str(node.gen).encode() + b"\0"
            listing = b"".join(c.encode() + b"\0" for c in node.children)
            if offset >= len(listing):
                return gen + b"\0"
            room = XENSTORE_PAYLOAD_MAX - len(gen) - 1
            end = offset
            # Whole names only; offsets not on a name boundary are the client's problem.
            while end < len(listing):
                nxt = listing.index(b"\0", end) + 1
                if nxt - offset > room:
                    break
                end = nxt
            if end == offset:
                raise _err(XenErrno.E2BIG, "child name too long")
            return gen + listing[offset:end] + (b"\0" if end == len(listing) else b"")

    def op_get_perms(self, conn, tx_id, path) -> list[str]:
        with self._lock:
            nodes, tx = self._view(conn, tx_id)
            return format_perms(self._checked(conn, nodes, tx, conn.canonical(path), PERM_READ).perms)

    def op_set_perms(self, conn, tx_id, path, perm_strings: list[str]) -> None:
        events = []
        try:
            with self._lock:
                perms = parse_perms(perm_strings)
                if not conn.privileged and len(perms) > MAX_PERMS_PER_NODE:
                    raise _err(XenErrno.ENOSPC, "too many permissions")
                nodes, tx = self._view(conn, tx_id)
                full = conn.canonical(path)
                node = self._checked(conn, nodes, tx, full, PERM_WRITE)
                if not conn.perm_for(node.perms) & PERM_OWNER:
                    raise _err(XenErrno.EACCES, "only the owner may set permissions")
                if not conn.privileged and perms[0][0] != node.perms[0][0]:
                    raise _err(XenErrno.EPERM, "unprivileged domains may not change the owner")
                new = Node(node.value, perms, node.children, next(self._gen))
                self._put(nodes, tx, full, new)
                # Fire once, for watchers that could read before or after the change.
                self._event(events, tx, full, node.perms, perms)
        finally:
            self._dispatch(events)

    def op_watch(self, conn, path, token, deliver=None, fire_initial: bool = True) -> Watch:
        events = []
        try:
            with self._lock:
                full = conn.canonical(path, allow_special=True)
                if any(w.path == full and w.token == token for w in conn.watches):
                    raise _err(XenErrno.EEXIST, f"watch {path} {token}")
                if not conn.privileged and len(conn.watches) >= MAX_WATCHES_PER_CONN:
                    raise _err(XenErrno.E2BIG, "too many watches")
                rel = None if path.startswith(("/", "@")) else conn.prefix + "/"
                w = Watch(conn, full, token, rel, deliver or conn.deliver)
                conn.watches.append(w)
                if fire_initial:
                    events.append(w)
                return w
        finally:
            for w in events:
                self._deliver(w, w.path)

    def op_unwatch(self, conn, path, token) -> None:
        with self._lock:
            full = conn.canonical(path, allow_special=True)
            for w in conn.watches:
                if w.path == full and w.token == token:
                    conn.watches.remove(w)
                    return
            raise _err(XenErrno.ENOENT, f"no watch {path} {token}")

    def op_transaction_start(self, conn) -> int:
        with self._lock:
            if not conn.privileged and len(conn.transactions) >= MAX_TRANSACTIONS_PER_CONN:
                raise _err(XenErrno.ENOSPC, "too many transactions")
            while True:
                tx_id = next(self._tx_ids) & 0xFFFFFFFF
                if tx_id and not any(tx_id in c.transactions for c in self._connections):
                    break
            snapshot = dict(self._nodes)  # nodes are immutable: a shallow copy is a snapshot
            conn.transactions[tx_id] = Transaction(tx_id, snapshot, dict(snapshot))
            return tx_id

    def op_transaction_end(self, conn, tx_id, commit: bool) -> None:
        events = []
        try:
            with self._lock:
                tx = conn.transactions.pop(tx_id, None)
                if tx is None:
                    raise _err(XenErrno.ENOENT, f"no transaction {tx_id}")
                if not commit:
                    return
                for p in tx.accessed:
                    if self._nodes.get(p) is not tx.base.get(p):
                        raise _err(XenErrno.EAGAIN, f"conflict on {p}")
                if len(self._nodes) - len(tx.base) + len(tx.nodes) > MAX_NODES:
                    raise _err(XenErrno.ENOSPC, "store is full")
                for p in tx.changed:
                    if p in tx.nodes:
                        self._nodes[p] = tx.nodes[p]
                    else:
                        self._nodes.pop(p, None)
                events.extend(tx.events)
        finally:
            self._dispatch(events)

    def domain_introduced(self, domid: int) -> bool:
        with self._lock:
            return domid in self._introduced

    def introduce_domain(self, domid: int) -> None:
        with self._lock:
            self._introduced.add(domid)
        self._dispatch([(WATCH_INTRODUCE, (), True)])

    def release_domain(self, domid: int) -> None:
        with self._lock:
            self._introduced.discard(domid)
        self._dispatch([(WATCH_RELEASE, (), True)])

    # -- watch dispatch -------------------------------------------------------

    def _dispatch(self, events: list) -> None:
        """Match events against watches (under the lock), deliver without it."""
        if not events:
            return
        out = []
        with self._lock:
            watches = [w for c in self._connections for w in c.watches]
            for path, perms, exact in events:
                for w in watches:
                    if path.startswith("@"):
                        if w.path == path:
                            out.append((w, path))
                        continue
                    if w.path.startswith("@"):
                        continue
                    if _is_child(path, w.path):
                        epath = path
                    elif not exact and _is_child(w.path, path):
                        epath = w.path
                    else:
                        continue
                    if not any(w.conn.perm_for(p) & PERM_READ for p in perms):
                        continue
                    out.append((w, epath))
        for w, epath in out:
            self._deliver(w, epath)

    @staticmethod
    def _deliver(w: Watch, epath: str) -> None:
        if w.relative_to and epath.startswith(w.relative_to):
            epath = epath[len(w.relative_to):]
        if w.deliver is None:
            return
        try:
            w.deliver(epath, w.token)
        except Exception:  # a faulty watcher must not break the writer
            log.exception("xenstore watch callback for %s failed", w.path)

    # -- host (dom0) API --------------------------------------------------------

    @staticmethod
    def _b(value) -> bytes:
        return value.encode() if isinstance(value, str) else bytes(value)

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.op_read(self.host, tx, path)

    def read_str(self, path: str, default: str | None = None, tx: int = 0) -> str | None:
        try:
            return self.read(path, tx).decode()
        except XenstoreError as e:
            if e.errno == XenErrno.ENOENT and default is not None:
                return default
            raise

    def exists(self, path: str, tx: int = 0) -> bool:
        try:
            self.read(path, tx)
            return True
        except XenstoreError as e:
            if e.errno == XenErrno.ENOENT:
                return False
            raise

    def write(self, path: str, value, tx: int = 0) -> None:
        self.op_write(self.host, tx, path, self._b(value))

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.op_mkdir(self.host, tx, path)

    def rm(self, path: str, tx: int = 0) -> None:
        self.op_rm(self.host, tx, path)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        return self.op_directory(self.host, tx, path)

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        return self.op_get_perms(self.host, tx, path)

    def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        self.op_set_perms(self.host, tx, path, list(perms))

    def watch(self, path: str, callback: Callable[[str, str], None], token: str | None = None) -> str:
        """Call callback(path, token) on changes at or below path (and once now). Returns the token."""
        if token is None:
            token = f"host-{next(self._tokens)}"
        self.op_watch(self.host, path, token, deliver=callback)
        return token

    def unwatch(self, path: str, token: str) -> None:
        self.op_unwatch(self.host, path, token)

    def transaction_start(self) -> int:
        return self.op_transaction_start(self.host)

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        self.op_transaction_end(self.host, tx, commit)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[int]:
        """`with store.transaction() as t:` commits on success (EAGAIN raises), aborts on error."""
        tx = self.transaction_start()
        try:
            yield tx
        except BaseException:
            self.transaction_end(tx, commit=False)
            raise
        self.transaction_end(tx, commit=True)


# ---------------------------------------------------------------------------
# The wire protocol
# ---------------------------------------------------------------------------

# Requests that ignore tx_id (xenstore.txt: "The tx_id in a WATCH request is ignored").
_NO_TX = {XsType.WATCH, XsType.UNWATCH}
_PRIVILEGED_ONLY = {XsType.CONTROL, XsType.INTRODUCE, XsType.RELEASE, XsType.RESUME, XsType.SET_TARGET}


def _strings(payload: bytes) -> list[str]:
    """Split NUL-terminated strings; EINVAL if the last one lacks its NUL."""
    if not payload or payload[-1] != 0:
        raise _err(XenErrno.EINVAL, "argument not NUL-terminated")
    return [s.decode("latin-1") for s in payload[:-1].split(b"\0")]


def _onearg(payload: bytes) -> str:
    args = _strings(payload)
    if len(args) != 1:
        raise _err(XenErrno.EINVAL, "expected one argument")
    return args[0]


def _domid_arg(s: str) -> int:
    if not s.isdigit() or int(s) >= DOMID_FIRST_RESERVED:
        raise _err(XenErrno.EINVAL, f"bad domid {s!r}")
    return int(s)


def handle_request(store: XenstoreStore, conn: Connection, mtype: int, tx_id: int,
                   payload: bytes) -> bytes:
    """Execute one request; return the success payload or raise XenstoreError."""
    try:
        t = XsType(mtype)
    except ValueError:
        raise _err(XenErrno.EINVAL, f"unknown message type {mtype}") from None
    if t in (XsType.WATCH_EVENT, XsType.ERROR):
        raise _err(XenErrno.EINVAL, f"{t.name} is not a request")
    if t in _PRIVILEGED_ONLY and not conn.privileged:
        raise _err(XenErrno.EACCES, f"{t.name} is for dom0 only")
    if t not in _NO_TX and tx_id != 0 and tx_id not in conn.transactions:
        raise _err(XenErrno.ENOENT, f"no transaction {tx_id}")

    if t == XsType.READ:
        return store.op_read(conn, tx_id, _onearg(payload))
    if t == XsType.WRITE:
        nul = payload.find(b"\0")
        if nul < 0:
            raise _err(XenErrno.EINVAL, "WRITE without path terminator")
        store.op_write(conn, tx_id, payload[:nul].decode("latin-1"), payload[nul + 1:])
        return _OK
    if t == XsType.MKDIR:
        store.op_mkdir(conn, tx_id, _onearg(payload))
        return _OK
    if t == XsType.RM:
        store.op_rm(conn, tx_id, _onearg(payload))
        return _OK
    if t == XsType.DIRECTORY:
        return b"".join(c.encode() + b"\0" for c in store.op_directory(conn, tx_id, _onearg(payload)))
    if t == XsType.DIRECTORY_PART:
        args = _strings(payload)
        if len(args) != 2 or not args[1].isdigit():
            raise _err(XenErrno.EINVAL, "DIRECTORY_PART wants path and offset")
        return store.op_directory_part(conn, tx_id, args[0], int(args[1]))
    if t == XsType.GET_PERMS:
        return b"".join(p.encode() + b"\0" for p in store.op_get_perms(conn, tx_id, _onearg(payload)))
    if t == XsType.SET_PERMS:
        args = _strings(payload)
        if len(args) < 2:
            raise _err(XenErrno.EINVAL, "SET_PERMS wants path and permissions")
        store.op_set_perms(conn, tx_id, args[0], args[1:])
        return _OK
    if t == XsType.UNWATCH:
        args = _strings(payload)
        if len(args) < 2:
            raise _err(XenErrno.EINVAL, "UNWATCH wants path and token")
        store.op_unwatch(conn, args[0], args[1])
        return _OK
    if t == XsType.TRANSACTION_START:
        if tx_id != 0:
            raise _err(XenErrno.EBUSY, "TRANSACTION_START inside a transaction")
        return str(store.op_transaction_start(conn)).encode() + b"\0"
    if t == XsType.TRANSACTION_END:
        arg = _onearg(payload)
        if arg not in ("T", "F") or tx_id == 0:
            raise _err(XenErrno.EINVAL, "TRANSACTION_END wants T or F and a transaction")
        store.op_transaction_end(conn, tx_id, arg == "T")
        return _OK
    if t == XsType.GET_DOMAIN_PATH:
        return domain_path(_domid_arg(_onearg(payload))).encode() + b"\0"
    if t == XsType.IS_DOMAIN_INTRODUCED:
        return b"T\0" if store.domain_introduced(_domid_arg(_onearg(payload))) else b"F\0"
    if t == XsType.RESET_WATCHES:
        store.reset_connection(conn)
        return _OK
    if t == XsType.CONTROL:
        args = _strings(payload)
        if args[0] == "print" and len(args) > 1:
            log.info("xenstore control print: %s", args[1])
            return _OK
        if args[0] == "help":
            return b"print\nhelp\n\0"
        raise _err(XenErrno.EINVAL, f"unknown control command {args[0]!r}")
    if t == XsType.INTRODUCE:
        store.introduce_domain(_domid_arg(_strings(payload)[0]))
        return _OK
    if t in (XsType.RELEASE, XsType.RESUME):
        domid = _domid_arg(_strings(payload)[0])
        if t == XsType.RELEASE:
            store.release_domain(domid)
        return _OK
    # WATCH is handled by the transport (its first event must follow the reply);
    # SET_TARGET has no meaning in a single-guest VMM.
    raise _err(XenErrno.ENOSYS, f"{t.name} not supported")


def encode_msg(mtype: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    return XsdSockmsg.build(dict(type=mtype, req_id=req_id, tx_id=tx_id, len=len(payload))) + payload


def error_msg(req_id: int, tx_id: int, errno: XenErrno) -> bytes:
    return encode_msg(XsType.ERROR, req_id, tx_id, errno.name.encode() + b"\0")


# ---------------------------------------------------------------------------
# The shared ring transport
# ---------------------------------------------------------------------------

_RING_MASK = XENSTORE_RING_SIZE - 1
_XS_RING_END = XS_RING_ERROR + 4


class XenstoreRingServer:
    """Serve one guest over its xenstore ring page.

    `ring` is a writable memoryview over (at least) the shared page; `notify`
    signals the guest's store event channel. Call `process()` whenever the
    guest kicks; watch events produced by other clients are pushed into the
    ring as they happen (queued while the ring is full).
    """

    def __init__(self, ring: memoryview, notify: Callable[[], None], store: XenstoreStore, domid: int):
        ring = memoryview(ring).cast("B") if memoryview(ring).format != "B" else memoryview(ring)
        if ring.readonly or len(ring) < _XS_RING_END:
            raise ValueError("xenstore ring must be a writable view of at least the ring layout")
        self._ring = ring
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

    # ring field access: each u32 read once into a local by the callers
    def _get(self, off: int) -> int:
        return _U32.unpack_from(self._ring, off)[0]

    def _set(self, off: int, value: int) -> None:
        _U32.pack_into(self._ring, off, value & 0xFFFFFFFF)

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
            if self.broken or self._out_bytes > REPLY_BACKLOG:
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
                args = _strings(payload)
                if len(args) < 2:
                    raise _err(XenErrno.EINVAL, "WATCH wants path and token")
                # Register without the initial event; it must follow the OK.
                self.store.op_watch(self.conn, args[0], args[1], fire_initial=False)
                self._enqueue(encode_msg(mtype, req_id, tx_id, _OK))
                self._queue_event(args[0], args[1])
                return
            reply = handle_request(self.store, self.conn, mtype, tx_id, payload)
            if len(reply) > XENSTORE_PAYLOAD_MAX:
                raise _err(XenErrno.E2BIG, "reply too long")
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


# ---------------------------------------------------------------------------
# Standard tree (XEN_PV_ABI.md §7.2/§7.3, as libxl builds it)
# ---------------------------------------------------------------------------


def _ro(domid: int) -> list[str]:
    """Owned by dom0, readable by the guest (libxl's "roperm")."""
    return ["n0", f"r{domid}"]


def _rw(domid: int) -> list[str]:
    """Owned by the guest, dom0 has full access anyway (libxl's "rwperm")."""
    return [f"n{domid}"]


def populate_domain(store: XenstoreStore, domid: int, name: str, memory_kib: int, vcpus: int,
                    uuid: str | None = None, console: dict | None = None) -> str:
    """Create /local/domain/<domid>, /local/domain/0 and /vm/<uuid>; return the domain path."""
    if not 0 < domid < DOMID_FIRST_RESERVED:
        raise ValueError(f"bad domU domid {domid}")
    uuid = uuid or str(uuid_mod.uuid4())
    dom = domain_path(domid)
    vm = f"/vm/{uuid}"
    with store.transaction() as t:
        for p in ("/local", LOCAL_DOMAIN, "/vm", "/tool"):
            store.mkdir(p, t)
        d0 = domain_path(0)
        if not store.exists(f"{d0}/domid", t):
            store.write(f"{d0}/name", "Domain-0", t)
            store.write(f"{d0}/domid", "0", t)
            store.mkdir(f"{d0}/backend", t)
            store.set_perms(d0, ["n0"], t)
        store.mkdir(vm, t)
        store.set_perms(vm, _ro(domid), t)
        store.write(f"{vm}/name", name, t)
        store.write(f"{vm}/uuid", uuid, t)
        store.write(f"{vm}/image/ostype", "linux", t)

        store.mkdir(dom, t)
        store.set_perms(dom, _ro(domid), t)
        # Children created below inherit the domain dir's read-only perms.
        store.write(f"{dom}/domid", str(domid), t)
        store.write(f"{dom}/name", name, t)
        store.write(f"{dom}/vm", vm, t)
        store.write(f"{dom}/memory/target", str(memory_kib), t)
        store.write(f"{dom}/memory/static-max", str(memory_kib), t)
        for n in range(vcpus):
            store.write(f"{dom}/cpu/{n}/availability", "online", t)
        store.mkdir(f"{dom}/device", t)
        store.mkdir(f"{dom}/control", t)
        # Linux checks this to use XS_RESET_WATCHES (HVM only); harmless for PV.
        store.write(f"{dom}/control/platform-feature-multiprocessor-suspend", "1", t)
        store.write(f"{dom}/control/platform-feature-xs_reset_watches", "1", t)
        # Written by the guest: guest-owned.
        for p in ("control/shutdown", "control/feature-poweroff", "control/feature-reboot",
                  "control/feature-suspend", "control/sysrq", "data", "drivers", "error",
                  "feature", "attr"):
            full = f"{dom}/{p}"
            store.mkdir(full, t)
            store.set_perms(full, _rw(domid), t)
        cons = {"limit": "1048576", "type": "xenconsoled", "output": "pty"}
        cons.update(console or {})
        store.mkdir(f"{dom}/console", t)
        store.set_perms(f"{dom}/console", [f"n{domid}", "r0"], t)
        for k, v in cons.items():
            store.write(f"{dom}/console/{k}", str(v), t)
    return dom


def add_device(store: XenstoreStore, domid: int, kind: str, devid: int | str,
               frontend: dict, backend: dict, backend_domid: int = 0) -> tuple[str, str]:
    """Create a split device's frontend and backend directories (state Initialising).

    The frontend dir is owned by the guest and readable by the back-end
    domain; the backend dir is owned by the back-end domain and readable by
    the guest. Returns (frontend_path, backend_path).
    """
    fe = f"{domain_path(domid)}/device/{kind}/{devid}"
    be = f"{domain_path(backend_domid)}/backend/{kind}/{domid}/{devid}"
    init = str(int(XenbusState.Initialising))
    with store.transaction() as t:
        store.mkdir(fe, t)
        store.set_perms(fe, [f"n{domid}", f"r{backend_domid}"], t)
        fe_vals = {"backend": be, "backend-id": str(backend_domid), "state": init}
        fe_vals.update({k: str(v) for k, v in frontend.items()})
        for k, v in fe_vals.items():
            store.write(f"{fe}/{k}", v, t)  # inherits the frontend dir's perms
        store.mkdir(be, t)
        store.set_perms(be, [f"n{backend_domid}", f"r{domid}"], t)
        be_vals = {"frontend": fe, "frontend-id": str(domid), "online": "1", "state": init}
        be_vals.update({k: str(v) for k, v in backend.items()})
        for k, v in be_vals.items():
            store.write(f"{be}/{k}", v, t)
    return fe, be
