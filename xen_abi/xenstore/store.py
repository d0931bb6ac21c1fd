"""The xenstore database: a tree of nodes with permissions, transactions
and watches, as Xen's docs/misc/xenstore.txt describes it.

* each node has a byte value, children and permissions (owner domid + ACL,
  Xen's "n0"/"r1"/"w2"/"b3" strings);
* transactions work on a snapshot of the whole tree; a commit fails with
  EAGAIN when any node the transaction read or wrote changed meanwhile;
* watches fire on writes, mkdir, rm and set_perms at or below the watched
  path, once immediately on registration, and on "@introduceDomain" /
  "@releaseDomain";
* relative paths are resolved against /local/domain/<domid>;
* unprivileged connections are held to xenstored's per-domain quotas (nodes
  owned, node size, watches, transactions, nodes a transaction touches,
  memory), with xenstored's errors; the host never is.

`XenstoreStore` is used directly by the VMM and back-ends with dom0
privileges; guests reach it through ring.py and protocol.py.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
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

# Per-domain quotas: C xenstored's defaults (tools/xenstored/domain.c,
# `quotas`) and the errors it gives (file and function named on each).  They
# bind unprivileged connections only: the host (dom0) is never refused for a
# guest's usage.  Counts are "at most N".
QUOTA_NODES = 1000  # nodes a domain owns: ENOSPC (core.c create_node)
QUOTA_NODE_SIZE = 2048  # one node's bytes, as _NODE_HEADER below counts them: ENOSPC (core.c write_node_raw)
QUOTA_WATCHES = 128  # watches per domain: ENOSPC (watch.c do_watch)
QUOTA_TRANSACTIONS = 10  # open transactions per connection: ENOSPC (transaction.c do_transaction_start)
QUOTA_TRANSACTION_NODES = 1024  # nodes one transaction reads or writes: ENOSPC (transaction.c access_node)
# Bytes held for a domain: the nodes it owns (path + node), the pending writes
# of its open transactions and its watches (path + token): ENOMEM
# (domain.c domain_memory_add).
QUOTA_MEMORY = 2 * 1024 * 1024 + 512 * 1024
# Replies and events queued for one ring beyond the ring itself before the
# ring stops taking requests: back-pressure, not an error (domain.c
# domain_can_read).
QUOTA_OUTSTANDING = 20
# Xen's node layout, which QUOTA_NODE_SIZE measures: a 16-byte header
# (generation, counts, lengths), 8 bytes per permission, the value and the
# NUL-terminated child names (core.c calc_node_acc_size).
_NODE_HEADER = 16
_PERM_BYTES = 8
# Nodes owned by unprivileged domains, all together: a store-wide cap that
# binds guests only, so that however many guests fill their quotas the host
# can still create nodes (dom0's own nodes are not counted).
MAX_GUEST_NODES = 20000
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

    @functools.cached_property
    def size(self) -> int:
        """Bytes as xenstored measures a node for its node-size quota."""
        return (_NODE_HEADER + _PERM_BYTES * len(self.perms) + len(self.value)
                + sum(len(c) + 1 for c in self.children))

    @property
    def owner(self) -> int:
        return self.perms[0][0]


def _entry_bytes(path: str, node: Node) -> int:
    """What a node costs its owner's memory quota: its path and the node."""
    return len(path) + node.size


class _Usage:
    """Nodes and bytes per owning domain (of a tree, or a transaction's change to it)."""

    def __init__(self):
        self.nodes: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()

    def count(self, path: str, node: Node | None, sign: int) -> None:
        if node is not None:
            self.nodes[node.owner] += sign
            self.bytes[node.owner] += sign * _entry_bytes(path, node)

    def guest_nodes(self) -> int:
        return sum(n for domid, n in self.nodes.items() if domid != 0)


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


def _leaf(path: str) -> str:
    return path.rsplit("/", 1)[1]


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
    nodes: dict  # the transaction's working copy, from a snapshot of the tree
    base: dict = field(default_factory=dict)  # path read or written -> its node in the snapshot
    changed: set = field(default_factory=set)  # paths replaced or removed
    # path -> ((perms, ...), exact), fired at commit: one event per node, as
    # xenstored fires them, however often the transaction changed it
    events: dict = field(default_factory=dict)
    usage: _Usage = field(default_factory=_Usage)  # the change to nodes/bytes per owner
    held_bytes: int = 0  # what the pending writes hold (path + node each)


@dataclass(frozen=True)
class DomainUsage:
    """What counts against a domain's quotas (XenstoreStore.domain_usage)."""
    nodes: int  # nodes it owns
    memory: int  # bytes: nodes it owns, its transactions' pending writes, its watches
    watches: int
    transactions: int


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
        root = Node(b"", ((0, PERM_NONE),), (), next(self._gen))
        self._nodes: dict[str, Node] = {"/": root}
        self._usage = _Usage()  # of self._nodes
        self._usage.count("/", root, +1)
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

    # -- quotas -------------------------------------------------------------

    def domain_usage(self, domid: int) -> DomainUsage:
        """What a domain's unprivileged connections hold, as its quotas count it."""
        with self._lock:
            guest = self._guest_connections(domid)
            return DomainUsage(nodes=self._usage.nodes[domid], memory=self._memory(domid),
                               watches=sum(len(c.watches) for c in guest),
                               transactions=sum(len(c.transactions) for c in guest))

    def _guest_connections(self, domid: int) -> list[Connection]:
        return [c for c in self._connections if c.domid == domid and not c.privileged]

    def _memory(self, domid: int) -> int:
        """Bytes held for a domain: the nodes it owns, its open transactions'
        pending writes and its watches."""
        total = self._usage.bytes[domid]
        for c in self._guest_connections(domid):
            total += sum(t.held_bytes for t in c.transactions.values())
            total += sum(len(w.path) + len(w.token) for w in c.watches)
        return total

    def _check_quotas(self, domid: int, change: _Usage, grown_bytes: int,
                      pending: _Usage | None = None) -> None:
        """Refuse a change that takes domain `domid` over its node or memory
        quota, or guests as a whole over MAX_GUEST_NODES; `pending` is the
        transaction's change the new one comes on top of."""
        added = change.nodes[domid]
        if added > 0:
            owned = self._usage.nodes[domid] + (pending.nodes[domid] if pending else 0)
            if owned + added > QUOTA_NODES:
                raise xs_error(XenErrno.ENOSPC, f"domain {domid} owns {owned} nodes")
        added = change.guest_nodes()
        if added > 0:
            owned = self._usage.guest_nodes() + (pending.guest_nodes() if pending else 0)
            if owned + added > MAX_GUEST_NODES:
                raise xs_error(XenErrno.ENOSPC, "store is full")
        if grown_bytes > 0 and self._memory(domid) + grown_bytes > QUOTA_MEMORY:
            raise xs_error(XenErrno.ENOMEM, f"domain {domid} holds {self._memory(domid)} bytes")

    # -- internal tree access ----------------------------------------------

    def _view(self, conn: Connection, tx_id: int) -> tuple[dict, Transaction | None]:
        if tx_id == 0:
            return self._nodes, None
        tx = conn.transactions.get(tx_id)
        if tx is None:
            raise xs_error(XenErrno.ENOENT, f"no transaction {tx_id}")
        return tx.nodes, tx

    @staticmethod
    def _touch(conn, nodes, tx: Transaction, paths) -> None:
        """Remember the snapshot's node at each path for the commit's conflict
        check; an unprivileged transaction may touch QUOTA_TRANSACTION_NODES."""
        new = {p for p in paths if p not in tx.base}
        if not conn.privileged and len(tx.base) + len(new) > QUOTA_TRANSACTION_NODES:
            raise xs_error(XenErrno.ENOSPC, f"transaction touches over {QUOTA_TRANSACTION_NODES} nodes")
        for p in new:
            tx.base[p] = nodes.get(p)

    def _get(self, conn, nodes: dict, tx: Transaction | None, path: str) -> Node | None:
        if tx is not None:
            self._touch(conn, nodes, tx, (path,))
        return nodes.get(path)

    def _checked(self, conn, nodes, tx, path, want: int) -> Node:
        node = self._get(conn, nodes, tx, path)
        if node is None:
            raise xs_error(XenErrno.ENOENT, path)
        if conn.perm_for(node.perms) & want != want:
            raise xs_error(XenErrno.EACCES, path)
        return node

    def _apply(self, conn, nodes, tx, changes: list[tuple[str, Node | None]]) -> None:
        """Replace (or remove, for None) the node at each path: all of them,
        or none if that takes an unprivileged connection over a quota."""
        if not conn.privileged:
            self._admit(conn, nodes, tx, changes)
        for path, node in changes:
            self._put(nodes, tx, path, node)

    def _admit(self, conn, nodes, tx, changes) -> None:
        if tx is not None:
            self._touch(conn, nodes, tx, [p for p, _ in changes])
        change = _Usage()
        held = 0  # what the transaction's pending writes grow by
        for path, node in changes:
            old = nodes.get(path)
            if (node is not None and node.size >= QUOTA_NODE_SIZE
                    and (old is None or node.size > old.size)):
                raise xs_error(XenErrno.ENOSPC, f"{path}: {node.size} bytes")
            change.count(path, old, -1)
            change.count(path, node, +1)
            if tx is not None:
                held += self._held_change(tx, path, old, node)
        if tx is None:
            self._check_quotas(conn.domid, change, change.bytes[conn.domid])
        else:
            self._check_quotas(conn.domid, change, held, tx.usage)

    @staticmethod
    def _held_change(tx: Transaction, path: str, old: Node | None, new: Node | None) -> int:
        """How the bytes the transaction holds change when `new` replaces `old`
        (a pending write, or the snapshot's node, which costs nothing more)."""
        freed = _entry_bytes(path, old) if old is not None and old is not tx.base[path] else 0
        return (_entry_bytes(path, new) if new is not None else 0) - freed

    def _put(self, nodes, tx, path, node: Node | None) -> None:
        old = nodes.get(path)
        usage = self._usage if tx is None else tx.usage
        usage.count(path, old, -1)
        usage.count(path, node, +1)
        if tx is not None:
            tx.base.setdefault(path, old)
            tx.held_bytes += self._held_change(tx, path, old, node)
            tx.changed.add(path)
        if node is None:
            nodes.pop(path, None)
        else:
            nodes[path] = node

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
        """Record a change; watchers get it if any of `perms` lets them read the node.

        A transaction keeps one event per node (as xenstored does): readable
        with the node's first or latest permissions, and not exact (watches
        below fire too) once any change to it was not."""
        if tx is None:
            events.append((path, perms, exact))
            return
        earlier = tx.events.get(path)
        if earlier is not None:
            first = earlier[0][0]
            perms = (first,) + tuple(p for p in perms[-1:] if p != first)
            exact = exact and earlier[1]
        tx.events[path] = (perms, exact)

    def _create(self, conn, nodes, tx, path: str, value: bytes) -> Node:
        """Create `path` and missing parents; write access on the nearest existing ancestor."""
        missing = []
        cur = path
        while True:
            missing.append(cur)
            cur = _parent(cur)
            anc = self._get(conn, nodes, tx, cur)
            if anc is not None:
                break
        if conn.perm_for(anc.perms) & PERM_WRITE == 0:
            raise xs_error(XenErrno.EACCES, f"cannot create under {cur}")
        perms = anc.perms
        if not conn.privileged:  # unprivileged domains own what they create
            perms = ((conn.domid, perms[0][1]),) + tuple(perms[1:])
        top_down = missing[::-1]
        changes = [(cur, Node(anc.value, anc.perms, anc.children + (_leaf(top_down[0]),),
                              next(self._gen)))]
        for i, p in enumerate(top_down):
            below = tuple(_leaf(c) for c in top_down[i + 1:i + 2])
            changes.append((p, Node(value if p == path else b"", perms, below, next(self._gen))))
        self._apply(conn, nodes, tx, changes)
        return changes[-1][1]

    # -- operations (conn, tx_id, path...) -----------------------------------

    def op_read(self, conn, tx_id, path) -> bytes:
        with self._lock:
            nodes, tx = self._view(conn, tx_id)
            return self._checked(conn, nodes, tx, conn.canonical(path), PERM_READ).value

    def op_write(self, conn, tx_id, path, value: bytes) -> None:
        with self._changes() as events:
            nodes, tx = self._view(conn, tx_id)
            full = conn.canonical(path)
            node = self._get(conn, nodes, tx, full)
            if node is None:
                node = self._create(conn, nodes, tx, full, bytes(value))
            else:
                if conn.perm_for(node.perms) & PERM_WRITE == 0:
                    raise xs_error(XenErrno.EACCES, full)
                node = Node(bytes(value), node.perms, node.children, next(self._gen))
                self._apply(conn, nodes, tx, [(full, node)])
            self._event(events, tx, full, node.perms)

    def op_mkdir(self, conn, tx_id, path) -> None:
        with self._changes() as events:
            nodes, tx = self._view(conn, tx_id)
            full = conn.canonical(path)
            node = self._get(conn, nodes, tx, full)
            if node is not None:
                if conn.perm_for(node.perms) & PERM_WRITE == 0:
                    raise xs_error(XenErrno.EACCES, full)
                return
            node = self._create(conn, nodes, tx, full, b"")
            self._event(events, tx, full, node.perms)

    def op_rm(self, conn, tx_id, path) -> None:
        with self._changes() as events:
            nodes, tx = self._view(conn, tx_id)
            full = conn.canonical(path)
            node = self._get(conn, nodes, tx, full)
            parent_path = _parent(full)
            if node is None:
                # Not an error if the parent exists (xenstore.txt).
                if full != "/" and self._get(conn, nodes, tx, parent_path) is not None:
                    return
                raise xs_error(XenErrno.ENOENT, full)
            if conn.perm_for(node.perms) & PERM_WRITE == 0:
                raise xs_error(XenErrno.EACCES, full)
            if full == "/":
                raise xs_error(XenErrno.EINVAL, "cannot remove the root")
            # Post-order walk: children's events first, each with its own perms.
            removed = []
            stack = [(full, False)]
            while stack:
                p, visited = stack.pop()
                n = nodes[p]
                if not visited:
                    stack.append((p, True))
                    stack.extend((_join(p, c), False) for c in n.children)
                    continue
                removed.append((p, n.perms))
            parent = self._get(conn, nodes, tx, parent_path)
            leaf = _leaf(full)
            changes = [(p, None) for p, _ in removed]
            changes.append((parent_path, Node(parent.value, parent.perms,
                                              tuple(c for c in parent.children if c != leaf),
                                              next(self._gen))))
            self._apply(conn, nodes, tx, changes)
            for p, perms in removed:
                # Watches below a removed parent fire with their own path.
                self._event(events, tx, p, perms, exact=(p != full))

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
            self._apply(conn, nodes, tx, [(full, new)])
            # Fire once, for watchers that could read before or after the change.
            self._event(events, tx, full, node.perms, perms)

    def op_watch(self, conn, path, token, deliver=None, fire_initial: bool = True) -> Watch:
        events = []
        try:
            with self._lock:
                full = conn.canonical(path, allow_special=True)
                if any(w.path == full and w.token == token for w in conn.watches):
                    raise xs_error(XenErrno.EEXIST, f"watch {path} {token}")
                if not conn.privileged:
                    if sum(len(c.watches) for c in self._guest_connections(conn.domid)) >= QUOTA_WATCHES:
                        raise xs_error(XenErrno.ENOSPC, "too many watches")
                    if self._memory(conn.domid) + len(full) + len(token) > QUOTA_MEMORY:
                        raise xs_error(XenErrno.ENOMEM, f"domain {conn.domid} holds too much")
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
            if not conn.privileged and len(conn.transactions) >= QUOTA_TRANSACTIONS:
                raise xs_error(XenErrno.ENOSPC, "too many transactions")
            while True:
                tx_id = next(self._tx_ids) & 0xFFFFFFFF
                if tx_id and not any(tx_id in c.transactions for c in self._connections):
                    break
            # nodes are immutable: a shallow copy is a snapshot
            conn.transactions[tx_id] = Transaction(tx_id, dict(self._nodes))
            return tx_id

    def op_transaction_end(self, conn, tx_id, commit: bool) -> None:
        with self._changes() as events:
            tx = conn.transactions.pop(tx_id, None)
            if tx is None:
                raise xs_error(XenErrno.ENOENT, f"no transaction {tx_id}")
            if not commit:
                return
            for p, node in tx.base.items():
                if self._nodes.get(p) is not node:
                    raise xs_error(XenErrno.EAGAIN, f"conflict on {p}")
            # Nothing the transaction touched has changed, so its change
            # relative to the snapshot is its change to the tree.
            if not conn.privileged:  # its pending bytes (no longer counted) become nodes
                self._check_quotas(conn.domid, tx.usage, tx.usage.bytes[conn.domid])
            for p in tx.changed:
                if p in tx.nodes:
                    self._nodes[p] = tx.nodes[p]
                else:
                    self._nodes.pop(p, None)
            self._usage.nodes.update(tx.usage.nodes)
            self._usage.bytes.update(tx.usage.bytes)
            events.extend((p, perms, exact) for p, (perms, exact) in tx.events.items())

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


