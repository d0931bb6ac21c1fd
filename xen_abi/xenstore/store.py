"""The xenstore database: a tree of nodes with permissions, transactions
and watches, as Xen's docs/misc/xenstore.txt describes it.

* each node has a byte value, children and permissions (owner domid + ACL,
  Xen's "n0"/"r1"/"w2"/"b3" strings);
* transactions work on a snapshot of the whole tree; a commit fails with
  EAGAIN when any node the transaction read or wrote changed meanwhile;
* watches fire on writes, mkdir, rm and set_perms at or below the watched
  path, once immediately on registration, and on "@introduceDomain" /
  "@releaseDomain";
* relative paths are resolved against /local/domain/<domid>.

`XenstoreStore` is used directly by the VMM and back-ends with dom0
privileges; guests reach it through ring.py and protocol.py.
"""
from __future__ import annotations

import contextlib
import logging
import itertools
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from ..abi import (
    DOMID_SELF,
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    XSD_SOCKMSG_SIZE,
    XenErrno,
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

_PATH_CHARS = re.compile(r"[A-Za-z0-9\-/_@]+\Z")
OK = b"OK\0"


class XenstoreError(Exception):
    """A xenstore operation failed; `errno` is what goes on the wire by name."""

    def __init__(self, errno: XenErrno, why: str = ""):
        super().__init__(f"{errno.name}: {why}" if why else errno.name)
        self.errno = XenErrno(errno)


def xs_error(errno: XenErrno, why: str = "") -> XenstoreError:
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
            raise xs_error(XenErrno.EINVAL, f"bad permission {s!r}")
        domid = int(s[1:])
        if domid > 0xFFFF:
            raise xs_error(XenErrno.EINVAL, f"bad domid in permission {s!r}")
        out.append((domid, _PERM_LETTER[s[0]]))
    if not out:
        raise xs_error(XenErrno.EINVAL, "empty permission list")
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
            raise xs_error(XenErrno.EINVAL, "empty path")
        if path.startswith("@"):
            if allow_special and _PATH_CHARS.match(path):
                return path
            raise xs_error(XenErrno.EINVAL, f"special path {path!r} not allowed here")
        if not _PATH_CHARS.match(path) or "//" in path:
            raise xs_error(XenErrno.EINVAL, "bad characters in path")
        if path.startswith("/"):
            if len(path) > XENSTORE_ABS_PATH_MAX:
                raise xs_error(XenErrno.EINVAL, "path too long")
            if len(path) > 1 and path.endswith("/"):
                raise xs_error(XenErrno.EINVAL, "trailing slash")
            return path
        if len(path) > XENSTORE_REL_PATH_MAX or path.endswith("/"):
            raise xs_error(XenErrno.EINVAL, "bad relative path")
        full = f"{self.prefix}/{path}"
        if len(full) > XENSTORE_ABS_PATH_MAX:
            raise xs_error(XenErrno.EINVAL, "path too long")
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
            raise xs_error(XenErrno.ENOENT, f"no transaction {tx_id}")
        return tx.nodes, tx

    @staticmethod
    def _get(nodes: dict, tx: Transaction | None, path: str) -> Node | None:
        if tx is not None:
            tx.accessed.add(path)
        return nodes.get(path)

    def _checked(self, conn, nodes, tx, path, want: int) -> Node:
        node = self._get(nodes, tx, path)
        if node is None:
            raise xs_error(XenErrno.ENOENT, path)
        if conn.perm_for(node.perms) & want != want:
            raise xs_error(XenErrno.EACCES, path)
        return node

    def _put(self, nodes, tx, path, node: Node | None) -> None:
        if node is None:
            nodes.pop(path, None)
        else:
            nodes[path] = node
        if tx is not None:
            tx.accessed.add(path)
            tx.changed.add(path)

    @contextlib.contextmanager
    def _changes(self) -> Iterator[list]:
        """Hold the lock for one change, which collects its watch events in the
        list yielded; fire them once the lock is released (also the ones
        collected before a failure)."""
        events = []
        try:
            with self._lock:
                yield events
        finally:
            self._dispatch(events)

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
            raise xs_error(XenErrno.EACCES, f"cannot create under {cur}")
        if len(nodes) + len(missing) > MAX_NODES:
            raise xs_error(XenErrno.ENOSPC, "store is full")
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
        with self._changes() as events:
            nodes, tx = self._view(conn, tx_id)
            full = conn.canonical(path)
            node = self._get(nodes, tx, full)
            if node is None:
                self._create(conn, nodes, tx, full, bytes(value))
                node = nodes[full]
            else:
                if conn.perm_for(node.perms) & PERM_WRITE == 0:
                    raise xs_error(XenErrno.EACCES, full)
                node = Node(bytes(value), node.perms, node.children, next(self._gen))
                self._put(nodes, tx, full, node)
            self._event(events, tx, full, node.perms)

    def op_mkdir(self, conn, tx_id, path) -> None:
        with self._changes() as events:
            nodes, tx = self._view(conn, tx_id)
            full = conn.canonical(path)
            node = self._get(nodes, tx, full)
            if node is not None:
                if conn.perm_for(node.perms) & PERM_WRITE == 0:
                    raise xs_error(XenErrno.EACCES, full)
                return
            self._create(conn, nodes, tx, full, b"")
            self._event(events, tx, full, nodes[full].perms)

    def op_rm(self, conn, tx_id, path) -> None:
        with self._changes() as events:
            nodes, tx = self._view(conn, tx_id)
            full = conn.canonical(path)
            node = self._get(nodes, tx, full)
            parent_path = _parent(full)
            if node is None:
                # Not an error if the parent exists (xenstore.txt).
                if full != "/" and self._get(nodes, tx, parent_path) is not None:
                    return
                raise xs_error(XenErrno.ENOENT, full)
            if conn.perm_for(node.perms) & PERM_WRITE == 0:
                raise xs_error(XenErrno.EACCES, full)
            if full == "/":
                raise xs_error(XenErrno.EINVAL, "cannot remove the root")
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
                raise xs_error(XenErrno.E2BIG, "child name too long")
            return gen + listing[offset:end] + (b"\0" if end == len(listing) else b"")

    def op_get_perms(self, conn, tx_id, path) -> list[str]:
        with self._lock:
            nodes, tx = self._view(conn, tx_id)
            return format_perms(self._checked(conn, nodes, tx, conn.canonical(path), PERM_READ).perms)

    def op_set_perms(self, conn, tx_id, path, perm_strings: list[str]) -> None:
        with self._changes() as events:
            perms = parse_perms(perm_strings)
            if not conn.privileged and len(perms) > MAX_PERMS_PER_NODE:
                raise xs_error(XenErrno.ENOSPC, "too many permissions")
            nodes, tx = self._view(conn, tx_id)
            full = conn.canonical(path)
            node = self._checked(conn, nodes, tx, full, PERM_WRITE)
            if not conn.perm_for(node.perms) & PERM_OWNER:
                raise xs_error(XenErrno.EACCES, "only the owner may set permissions")
            if not conn.privileged and perms[0][0] != node.perms[0][0]:
                raise xs_error(XenErrno.EPERM, "unprivileged domains may not change the owner")
            new = Node(node.value, perms, node.children, next(self._gen))
            self._put(nodes, tx, full, new)
            # Fire once, for watchers that could read before or after the change.
            self._event(events, tx, full, node.perms, perms)

    def op_watch(self, conn, path, token, deliver=None, fire_initial: bool = True) -> Watch:
        events = []
        try:
            with self._lock:
                full = conn.canonical(path, allow_special=True)
                if any(w.path == full and w.token == token for w in conn.watches):
                    raise xs_error(XenErrno.EEXIST, f"watch {path} {token}")
                if not conn.privileged and len(conn.watches) >= MAX_WATCHES_PER_CONN:
                    raise xs_error(XenErrno.E2BIG, "too many watches")
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
            raise xs_error(XenErrno.ENOENT, f"no watch {path} {token}")

    def op_transaction_start(self, conn) -> int:
        with self._lock:
            if not conn.privileged and len(conn.transactions) >= MAX_TRANSACTIONS_PER_CONN:
                raise xs_error(XenErrno.ENOSPC, "too many transactions")
            while True:
                tx_id = next(self._tx_ids) & 0xFFFFFFFF
                if tx_id and not any(tx_id in c.transactions for c in self._connections):
                    break
            snapshot = dict(self._nodes)  # nodes are immutable: a shallow copy is a snapshot
            conn.transactions[tx_id] = Transaction(tx_id, snapshot, dict(snapshot))
            return tx_id

    def op_transaction_end(self, conn, tx_id, commit: bool) -> None:
        with self._changes() as events:
            tx = conn.transactions.pop(tx_id, None)
            if tx is None:
                raise xs_error(XenErrno.ENOENT, f"no transaction {tx_id}")
            if not commit:
                return
            for p in tx.accessed:
                if self._nodes.get(p) is not tx.base.get(p):
                    raise xs_error(XenErrno.EAGAIN, f"conflict on {p}")
            if len(self._nodes) - len(tx.base) + len(tx.nodes) > MAX_NODES:
                raise xs_error(XenErrno.ENOSPC, "store is full")
            for p in tx.changed:
                if p in tx.nodes:
                    self._nodes[p] = tx.nodes[p]
                else:
                    self._nodes.pop(p, None)
            events.extend(tx.events)

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


