"""Managing running guests, as `xl` does: every pyvmm process serves a
control socket named after its guest; `pyvmm list|console|shutdown|reboot|
destroy|pause|unpause|mem-set|vcpu-set|xenstore` talk to it.

    <runtime dir>/<name>.sock      one per running guest
    runtime dir: $PYVMM_RUNTIME_DIR, else /run/pyvmm (root), else
                 $XDG_RUNTIME_DIR/pyvmm, else /tmp/pyvmm-<uid>; made 0700
                 if missing, refused if it is a symbolic link, another
                 user's, or open to group or others

Protocol: the client sends one JSON line {"op": ...}; the server answers one
JSON line ({"ok": true, ...} or {"ok": false, "error": "..."}).  After a
"console" answer the connection carries raw console bytes both ways until
either side closes it; the guest's recent output (CONSOLE_BACKLOG bytes) is
replayed first, as xenconsoled's log would show it.  A console client that
stops reading is disconnected once CONSOLE_CLIENT_QUEUE bytes wait for it:
the guest never waits for one.

A socket left by a pyvmm that died is found stale (connection refused) and
removed; a live one makes a second guest of the same name one clear error.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import stat
import threading
import time
from pathlib import Path

from pyvmm.errors import UserError

__all__ = ["ControlServer", "runtime_dir", "request", "list_guests", "GuestNotFound",
           "NameInUse", "ControlError", "CONSOLE_BACKLOG"]

CONSOLE_BACKLOG = 64 * 1024
# Guest output waiting for one console client; a client that falls further
# behind (it stopped reading) is dropped rather than let it hold the guest up.
CONSOLE_CLIENT_QUEUE = 1 << 20
SEND_CHUNK = 64 * 1024
SEND_POLL_S = 0.2        # how soon a client's sender notices it is to stop
GOODBYE_WAIT_S = 0.5     # how long a dropped client may take to make room for the reason
CLOSE_FLUSH_S = 2.0      # at close, for the clients to take what is queued
MAX_REQUEST = 4096
CONNECT_TIMEOUT_S = 5.0

log = logging.getLogger(__name__)


class GuestNotFound(Exception):
    pass


class NameInUse(Exception):
    pass


class ControlError(UserError):
    """The runtime directory or a control socket cannot be used; str() is
    one line for the user."""


#: sockaddr_un's sun_path holds 108 bytes, the terminating NUL included
MAX_SOCKET_PATH = 107


_ELSEWHERE = "set PYVMM_RUNTIME_DIR to a directory of yours"


def runtime_dir() -> Path:
    """The directory of the control sockets and logs: made private (0700)
    if missing; refused if another user could have put anything in it."""
    env = os.environ.get("PYVMM_RUNTIME_DIR")
    if env:
        d = Path(env)
    elif os.geteuid() == 0:
        d = Path("/run/pyvmm")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        d = Path(os.environ["XDG_RUNTIME_DIR"]) / "pyvmm"
    else:
        d = Path(f"/tmp/pyvmm-{os.getuid()}")
    try:
        d.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as e:
        raise ControlError(f"cannot make the runtime directory {d}: {e.strerror}; {_ELSEWHERE}") from None
    _check_private(d)
    return d


def _check_private(d: Path) -> None:
    """Only we may create, replace or read what is in d: it is our own
    directory (not a link to one), closed to group and others."""
    st = d.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise ControlError(f"runtime directory {d} is a symbolic link: remove it, or {_ELSEWHERE}")
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"runtime directory {d} is not a directory: remove it, or {_ELSEWHERE}")
    if st.st_uid != os.geteuid():
        raise ControlError(f"runtime directory {d} belongs to another user (uid {st.st_uid}): "
                           f"remove it, or {_ELSEWHERE}")
    if st.st_mode & 0o077:
        raise ControlError(f"runtime directory {d} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}): "
                           f"chmod 700 {d}, or {_ELSEWHERE}")


def _socket_path(name: str) -> Path:
    path = runtime_dir() / f"{name}.sock"
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} is not a socket{' but a symbolic link' if stat.S_ISLNK(mode) else ''}: "
                           f"remove it")
    return path


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CONNECT_TIMEOUT_S)
    try:
        s.connect(str(path))
    except BaseException:
        s.close()
        raise
    return s


def _read_line(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """One line, read a byte at a time: what follows it (console bytes)
    stays in the socket for whoever reads next."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise ValueError("line too long")
    return bytes(buf)


def request(name: str, op: str, **args) -> tuple[dict, socket.socket]:
    """Send one request to the guest called name; returns (reply, socket).
    Raises GuestNotFound when no live pyvmm serves that name."""
    path = _socket_path(name)
    try:
        s = _connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise GuestNotFound(name) from None
    try:
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        line = _read_line(s)
        if not line:
            raise GuestNotFound(name)
        return json.loads(line), s
    except BaseException:
        s.close()
        raise


def list_guests() -> list[dict]:
    """Info of every live guest; stale sockets are removed on the way."""
    out = []
    for path in sorted(runtime_dir().glob("*.sock")):
        name = path.name[:-len(".sock")]
        try:
            reply, s = request(name, "info")
            s.close()
        except GuestNotFound:
            _remove_stale(path)
            continue
        except (OSError, ValueError, ControlError):
            continue                    # busy, dying or not a socket: leave it be
        if reply.get("ok"):
            out.append(reply["info"])
    return out


def _remove_stale(path: Path) -> None:
    try:
        s = _connect(path)
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)
        return
    except FileNotFoundError:
        return
    s.close()


class _ConsoleClient:
    """One attached console.  Guest output waits in a bounded queue that
    the client's own sender thread sends, so console_output (which the
    guest's console and xenstore service wait on) never waits for a client.

    States: open (queueing), flushing (the server closes: send what is
    queued, then hang up), dropped (overflowed: say so, hang up), closed."""

    def __init__(self, conn: socket.socket, backlog: bytes):
        self.conn = conn
        self._queue = bytearray(backlog)
        self._cond = threading.Condition()
        self._state = "open"
        self._sender = threading.Thread(target=self._send_queued, name="pyvmm-console-out", daemon=True)
        self._sender.start()

    def put(self, data: bytes) -> bool:
        """Queue guest output; False if that would pass CONSOLE_CLIENT_QUEUE:
        the client is then dropped."""
        with self._cond:
            if self._state != "open":
                return True
            if len(self._queue) + len(data) > CONSOLE_CLIENT_QUEUE:
                self._state = "dropped"
                self._queue.clear()
                self._cond.notify()
                return False
            self._queue += data
            self._cond.notify()
            return True

    def _set_state(self, state: str) -> None:
        with self._cond:
            if self._state in ("open", "flushing"):
                self._state = state
                self._cond.notify()

    def flush_and_close(self) -> None:
        self._set_state("flushing")

    def close(self) -> None:
        """Stop sending and hang up (the reader's recv ends too)."""
        self._set_state("closed")
        self._hang_up()
        self._sender.join()

    def join(self, timeout: float) -> None:
        self._sender.join(timeout)

    def _hang_up(self) -> None:
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_queued(self) -> None:
        poller = select.poll()
        poller.register(self.conn, select.POLLOUT)
        try:
            while True:
                with self._cond:
                    while not self._queue and self._state == "open":
                        self._cond.wait()
                    if not self._queue or self._state in ("dropped", "closed"):
                        break
                    chunk = bytes(self._queue[:SEND_CHUNK])
                if not poller.poll(SEND_POLL_S * 1000):
                    continue                    # no room: look at the state again
                try:
                    sent = self.conn.send(chunk, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                with self._cond:
                    del self._queue[:sent]
            if self._state == "dropped" and poller.poll(GOODBYE_WAIT_S * 1000):
                self.conn.send(b"\r\npyvmm: this console fell more than "
                               b"%d KiB behind the guest's output and was disconnected; attach again\r\n"
                               % (CONSOLE_CLIENT_QUEUE >> 10), socket.MSG_DONTWAIT)
        except OSError:                         # the client went away
            pass
        finally:
            self._hang_up()


class ControlServer:
    """The running guest's end: a thread serving requests on its socket.

    `target` is an object with: info() -> dict, shutdown(reason) -> None,
    destroy() -> None, pause(), unpause() and mem_set(bytes) -> None or an
    error line, send_console_input(bytes), and `dom`, the running Domain
    or None while a rebooting guest is rebuilt.  Console output reaches
    attached clients through console_output()."""

    def __init__(self, name: str, target):
        self.name = name
        self.target = target
        self.path = _socket_path(name)
        if self.path.exists():
            try:
                s = _connect(self.path)
            except ConnectionRefusedError:
                self.path.unlink(missing_ok=True)          # left by a pyvmm that died
            except FileNotFoundError:
                pass
            else:
                s.close()
                raise NameInUse(name)
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ControlError(f"control socket path {self.path} is longer than {MAX_SOCKET_PATH} bytes; "
                               f"set PYVMM_RUNTIME_DIR to a shorter directory")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(str(self.path))
        except OSError as e:
            self.sock.close()
            raise ControlError(f"cannot make the control socket {self.path}: {e.strerror}") from None
        os.chmod(self.path, 0o600)
        self.sock.listen(8)
        self.started = time.time()
        self._lock = threading.Lock()
        self._consoles: list[_ConsoleClient] = []
        self._backlog = bytearray()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="pyvmm-control", daemon=True)
        self._thread.start()

    # ---- console fan-out ----
    def console_output(self, data: bytes) -> None:
        """Guest output: kept for replay, queued to every attached client.
        Never waits for a client (its caller holds up the guest)."""
        with self._lock:
            self._backlog += data
            del self._backlog[:-CONSOLE_BACKLOG]
            dropped = [c for c in self._consoles if not c.put(data)]
            for c in dropped:
                self._consoles.remove(c)
        for _ in dropped:
            log.warning("dropped a console client: it stopped reading and fell more than %d KiB behind",
                        CONSOLE_CLIENT_QUEUE >> 10)

    @property
    def console_clients(self) -> int:
        with self._lock:
            return len(self._consoles)

    # ---- serving ----
    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="pyvmm-control-conn",
                             daemon=True).start()

    def _reply(self, conn: socket.socket, **fields) -> None:
        conn.sendall(json.dumps(fields).encode() + b"\n")

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(CONNECT_TIMEOUT_S)
        try:
            try:
                line = _read_line(conn, MAX_REQUEST)
                req = json.loads(line)
                op = req["op"]
            except (ValueError, KeyError, TypeError, OSError):
                self._reply(conn, ok=False, error="bad request: send one JSON line with an \"op\"")
                return
            t = self.target
            if op == "info":
                info = {"name": self.name, "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 1),
                        "console_clients": self.console_clients}
                info.update(t.info())
                self._reply(conn, ok=True, info=info)
            elif op == "shutdown":
                reason = req.get("reason", "poweroff")
                if reason not in ("poweroff", "reboot"):
                    self._reply(conn, ok=False, error=f"unknown shutdown reason {reason!r}")
                    return
                t.shutdown(reason)
                self._reply(conn, ok=True)
            elif op == "destroy":
                self._reply(conn, ok=True)
                t.destroy()
            elif op in ("pause", "unpause"):
                error = getattr(t, op)()
                self._reply(conn, ok=error is None, **({"error": error} if error else {}))
            elif op == "mem_set":
                size = req.get("bytes")
                error = t.mem_set(size) if isinstance(size, int) else "give the size in bytes"
                self._reply(conn, ok=error is None, **({"error": error} if error else {}))
            elif op == "vcpu_set":
                count = req.get("count")
                error = t.vcpu_set(count) if isinstance(count, int) else "give the count as a number"
                self._reply(conn, ok=error is None, **({"error": error} if error else {}))
            elif op == "xenstore":
                self._xenstore(conn, req)
            elif op == "console":
                self._attach_console(conn)
                conn = None                      # the console thread owns it now
            else:
                self._reply(conn, ok=False, error=f"unknown op {op!r}")
        except OSError:
            pass
        finally:
            if conn is not None:
                conn.close()

    def _xenstore(self, conn: socket.socket, req: dict) -> None:
        from pyvmm import xenstore_access

        dom = self.target.dom
        if dom is None:
            self._reply(conn, ok=False, error=f"{self.name} is being built; try again in a moment")
            return
        conn.settimeout(None)
        xenstore_access.serve(conn, dom.store, dom.channels.dom_path, req,
                              alive=lambda: self.target.dom is dom and not self._closed)

    def _attach_console(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        self._reply(conn, ok=True)
        with self._lock:                        # the backlog, then the output after it
            client = _ConsoleClient(conn, bytes(self._backlog))
            self._consoles.append(client)
        try:
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                self.target.send_console_input(data)
        except OSError:
            pass
        finally:
            with self._lock:
                if client in self._consoles:
                    self._consoles.remove(client)
            client.close()
            conn.close()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        finally:
            self.path.unlink(missing_ok=True)
            with self._lock:
                clients, self._consoles = self._consoles, []
            for c in clients:
                c.flush_and_close()
            deadline = time.monotonic() + CLOSE_FLUSH_S
            for c in clients:
                c.join(max(deadline - time.monotonic(), 0))
            for c in clients:                   # those that did not take it all in time
                c.close()
