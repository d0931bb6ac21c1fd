"""Managing running guests, as `xl` does: every pyvmm process serves a
control socket named after its guest; `pyvmm list|console|shutdown|destroy`
talk to it.

    <runtime dir>/<name>.sock      one per running guest
    runtime dir: $PYVMM_RUNTIME_DIR, else /run/pyvmm (root), else
                 $XDG_RUNTIME_DIR/pyvmm, else /tmp/pyvmm-<uid>; made 0700
                 if missing, refused if it is a symbolic link, another
                 user's, or open to group or others

Protocol: the client sends one JSON line {"op": ...}; the server answers one
JSON line ({"ok": true, ...} or {"ok": false, "error": "..."}).  After a
"console" answer the connection carries raw console bytes both ways until
either side closes it; the guest's recent output (CONSOLE_BACKLOG bytes) is
replayed first, as xenconsoled's log would show it.

A socket left by a pyvmm that died is found stale (connection refused) and
removed; a live one makes a second guest of the same name one clear error.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

from pyvmm.errors import UserError

__all__ = ["ControlServer", "runtime_dir", "request", "list_guests", "GuestNotFound",
           "NameInUse", "ControlError", "CONSOLE_BACKLOG"]

CONSOLE_BACKLOG = 64 * 1024
MAX_REQUEST = 4096
CONNECT_TIMEOUT_S = 5.0


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


class ControlServer:
    """The running guest's end: a thread serving requests on its socket.

    `target` is an object with: info() -> dict, shutdown(reason) -> None,
    destroy() -> None, send_console_input(bytes); the launcher swaps it
    when a rebooting guest is rebuilt.  Console output reaches attached
    clients through console_output()."""

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
        self._consoles: list[socket.socket] = []
        self._backlog = bytearray()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="pyvmm-control", daemon=True)
        self._thread.start()

    # ---- console fan-out ----
    def console_output(self, data: bytes) -> None:
        with self._lock:
            self._backlog += data
            del self._backlog[:-CONSOLE_BACKLOG]
            clients = list(self._consoles)
        for c in clients:
            try:
                c.sendall(data)
            except OSError:
                self._drop_console(c)

    def _drop_console(self, c: socket.socket) -> None:
        with self._lock:
            if c in self._consoles:
                self._consoles.remove(c)
        try:
            c.close()
        except OSError:
            pass

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

    def _attach_console(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        self._reply(conn, ok=True)
        with self._lock:
            conn.sendall(bytes(self._backlog))
            self._consoles.append(conn)
        try:
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                self.target.send_console_input(data)
        except OSError:
            pass
        finally:
            self._drop_console(conn)

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        finally:
            self.path.unlink(missing_ok=True)
            with self._lock:
                clients, self._consoles = self._consoles, []
            for c in clients:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                    c.close()
                except OSError:
                    pass
