"""`pyvmm xenstore NAME ls|read|write|rm|watch [PATH [VALUE]]`: a running
guest's xenstore from the host, as dom0's xenstore-ls, -read, -write, -rm
and -watch show it; the path `backend/vbd/1/51712` is relative to the
guest's home (/local/domain/<domid>), `/local/domain/0/backend` absolute.

Two halves, over the guest's control socket (pyvmm/control.py):

* `serve()` runs in the guest's pyvmm, acting as dom0 on its store
  (xen_abi/xenstore/store.py): one JSON line answers, then for ls one line
  per node and an end line, for watch one line per event until the client
  hangs up or the guest ends.  A watch client that stops reading is
  dropped once WATCH_QUEUE events wait: the store's writer (maybe the
  guest's xenstore ring) never waits for it.
* `main()` is the command: it prints what xenstore-ls prints (one space
  of indent per level, `name = "value"`), values escaped so that a
  guest's bytes cannot drive the user's terminal.
"""
from __future__ import annotations

import json
import select
import socket
import sys
import threading

__all__ = ["serve", "main", "add_parser", "escape_value"]

COMMANDS = ("ls", "read", "write", "rm", "watch")
WATCH_QUEUE = 1024          # events waiting for a slow watch client
WATCH_POLL_S = 0.5          # how soon a watch notices its guest ended
WATCH_SEND_S = 10.0         # a watch client that takes no event for this long is dropped
LINE_LIMIT = 1 << 20        # one node: xenstored's payload limit is 4 KiB


def _text(value: bytes) -> str:
    """Bytes into JSON without loss (latin-1 maps each byte to one char)."""
    return value.decode("latin-1")


def escape_value(value: bytes) -> str:
    """Printable ASCII as is; quotes, backslashes and the rest escaped."""
    out = []
    for b in value:
        c = chr(b)
        if c in '"\\':
            out.append("\\" + c)
        elif 0x20 <= b < 0x7F:
            out.append(c)
        else:
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c, f"\\x{b:02x}"))
    return "".join(out)


# ---- server half: in the guest's pyvmm ----

def _resolve(home: str, path: str) -> str:
    if path.startswith(("/", "@")):
        return path
    return f"{home}/{path}".rstrip("/") if path else home


def _send(conn: socket.socket, **fields) -> None:
    conn.sendall(json.dumps(fields).encode() + b"\n")


def serve(conn: socket.socket, store, home: str, req: dict, alive) -> None:
    """One xenstore request from a control connection; `alive()` is false
    once the domain this store belongs to has ended (or rebooted)."""
    from pyvmm.xen_abi.xenstore.store import XenstoreError

    cmd, raw = req.get("cmd"), req.get("path", "")
    if cmd not in COMMANDS or not isinstance(raw, str):
        _send(conn, ok=False, error=f"xenstore: unknown command {cmd!r} (use {', '.join(COMMANDS)})")
        return
    path = _resolve(home, raw if raw or cmd != "ls" else "/")
    try:
        if cmd == "read":
            _send(conn, ok=True, value=_text(store.read(path)))
        elif cmd == "write":
            value = req.get("value")
            if not isinstance(value, str):
                _send(conn, ok=False, error="xenstore write: give the value to write")
                return
            store.write(path, value.encode())
            _send(conn, ok=True)
        elif cmd == "rm":
            store.rm(path)
            _send(conn, ok=True)
        elif cmd == "ls":
            nodes = _walk(store, path)
            _send(conn, ok=True, path=path)
            for depth, name, value in nodes:
                _send(conn, depth=depth, name=name, value=_text(value))
            _send(conn, end=True)
        else:
            _watch(conn, store, path, alive)
    except XenstoreError as e:
        why = _ERRORS.get(e.errno.name, e.errno.name)
        _send(conn, ok=False, error=f"xenstore {cmd} {path}: {why}")


# what xenstored's error codes mean to someone at the host's shell
_ERRORS = {"ENOENT": "no such node", "EACCES": "permission denied", "EINVAL": "not a valid path",
           "EEXIST": "already exists", "E2BIG": "value too large", "ENOSPC": "the store is full"}


def _walk(store, root: str) -> list[tuple[int, str, bytes]]:
    """(depth, leaf name, value) of every node below root, depth first in
    the store's order, as xenstore-ls lists them; nodes removed meanwhile
    are skipped.  A loop, not recursion: a guest may nest a path a
    thousand levels deep."""
    from pyvmm.xen_abi.xenstore.store import XenstoreError

    store.read(root)                       # ENOENT for a missing root
    out: list[tuple[int, str, bytes]] = []
    stack: list[tuple[str, int, str | None, bytes]] = [(root, 0, None, b"")]
    while stack:
        path, depth, leaf, value = stack.pop()
        if leaf is not None:
            out.append((depth, leaf, value))
        try:
            children = store.directory(path)
        except XenstoreError:
            continue
        for name in reversed(children):    # the first child is popped next
            child = path.rstrip("/") + "/" + name
            try:
                stack.append((child, depth + 1, name, store.read(child)))
            except XenstoreError:
                continue
    return out


class _WatchQueue:
    """Events for one watch client, filled by the store's writer thread
    (which must never wait) and sent by the connection's thread."""

    def __init__(self):
        self.cond = threading.Condition()
        self.events: list[str] = []
        self.overflowed = False

    def put(self, path: str, _token: str) -> None:
        with self.cond:
            if len(self.events) >= WATCH_QUEUE:
                self.overflowed = True
            else:
                self.events.append(path)
            self.cond.notify()


def _watch(conn: socket.socket, store, path: str, alive) -> None:
    q = _WatchQueue()
    token = store.watch(path, q.put)         # fires once now, as xenstore-watch shows
    _send(conn, ok=True, path=path)
    conn.settimeout(WATCH_SEND_S)              # a client that stops reading is let go
    try:
        while alive():
            with q.cond:
                if not q.events and not q.overflowed:
                    q.cond.wait(WATCH_POLL_S)
                events, q.events = q.events, []
                overflowed = q.overflowed
            for event in events:
                _send(conn, event=event)
            if overflowed:
                _send(conn, error=f"xenstore watch: more than {WATCH_QUEUE} events waited for this "
                                  f"client; watch again")
                return
            if _hung_up(conn):
                return
        _send(conn, error="xenstore watch: the guest ended")
    except OSError:
        pass                                  # the client went away
    finally:
        store.unwatch(path, token)


def _hung_up(conn: socket.socket) -> bool:
    """The client closed its end (it sends nothing after its request)."""
    if not select.select([conn], [], [], 0)[0]:
        return False
    return conn.recv(1, socket.MSG_PEEK) == b""


# ---- client half: the command ----

def add_parser(sub) -> None:
    x = sub.add_parser("xenstore", help="read or change a running guest's xenstore, as dom0's "
                                        "xenstore-ls/-read/-write/-rm/-watch do")
    x.add_argument("name", help="the guest")
    x.add_argument("cmd", choices=COMMANDS)
    x.add_argument("path", nargs="?", default="",
                   help="absolute, or relative to the guest's /local/domain/<domid> (ls: default /)")
    x.add_argument("value", nargs="?", help="for write: the value")


def main(args) -> int:
    """Run one `pyvmm xenstore` command; UserError for what the guest's pyvmm refuses."""
    from pyvmm.control import request
    from pyvmm.errors import UserError

    if args.cmd != "ls" and not args.path:
        raise UserError(f"pyvmm xenstore {args.cmd}: give a path, e.g. 'device' or /local/domain")
    if (args.cmd == "write") != (args.value is not None):
        raise UserError("pyvmm xenstore: only write takes a value: pyvmm xenstore NAME write PATH VALUE")
    fields = {"cmd": args.cmd, "path": args.path}
    if args.value is not None:
        fields["value"] = args.value
    reply, sock = request(args.name, "xenstore", **fields)
    with sock:
        if not reply.get("ok"):
            raise UserError(reply.get("error", "the guest's pyvmm refused"))
        if args.cmd == "read":
            print(escape_value(reply["value"].encode("latin-1")))
        elif args.cmd in ("ls", "watch"):
            sock.settimeout(None)
            return _stream(sock, args.cmd)
    return 0


def _stream(sock: socket.socket, cmd: str) -> int:
    lines = sock.makefile("rb")
    try:
        while line := lines.readline(LINE_LIMIT):
            msg = json.loads(line)
            if "error" in msg:
                print(f"pyvmm: {msg['error']}", file=sys.stderr)
                return 1
            if msg.get("end"):
                return 0
            if cmd == "ls":
                print(f"{' ' * (msg['depth'] - 1)}{msg['name']} = "
                      f"\"{escape_value(msg['value'].encode('latin-1'))}\"", flush=False)
            else:
                print(msg["event"], flush=True)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:                   # `| head`: the reader has what it wanted
        sys.stdout = None                     # nothing more to flush at exit
        return 0
    # the connection closed without an end line: the guest's pyvmm is gone
    print(f"pyvmm: xenstore {cmd}: the guest ended", file=sys.stderr)
    return 1
