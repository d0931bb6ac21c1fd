"""The user's terminal as a guest's console, for `pyvmm` and `pyvmm console`
(the guest's end, the console ring, is served by
pyvmm.xen_abi.hypervisor.console_ring.ConsoleRingServer).

`Terminal`: stdin in raw mode when it is a TTY (always
restored: context manager, atexit and SIGTERM/SIGHUP/SIGQUIT handlers), an
escape byte (Ctrl-] by default, like telnet and virsh) that ends the
session, and plain reading until EOF when stdin is a pipe. Nothing here
knows about KVM; the launcher wires the console ring to a terminal.
`parse_escape` reads the escape key as the command line spells it.
"""
from __future__ import annotations

import atexit
import os
import select
import signal
import termios
import threading
from typing import Callable

from pyvmm.errors import UserError

ESCAPE_CTRL_RBRACKET = b"\x1d"  # Ctrl-]


def parse_escape(text: str) -> bytes:
    """`--escape` as the user writes it: '^]' -> b'\\x1d'; a single character stands for itself."""
    if len(text) == 2 and text[0] == "^":
        c = text[1].upper()
        if "@" <= c <= "_":
            return bytes([ord(c) - 0x40])
    if len(text) == 1:
        return text.encode()
    raise UserError(f"--escape {text!r}: use ^X notation, e.g. ^] or ^A")


def _raw_attrs(attrs: list) -> list:
    """cfmakeraw for input (no echo, no line editing, no ISIG: Ctrl-C goes to the
    guest), but keep output post-processing so host-side messages still render."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP
               | termios.IXON | termios.INLCR | termios.IGNCR | termios.PARMRK)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class Terminal:
    """The user's end of a console session.

    with Terminal() as term:
        term.run(backend.send_input)     # returns "escape", "eof" or "stopped"

    guest output goes to term.write(). stdin/stdout are fds (default 0/1).
    """

    _CATCH = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self, stdin: int = 0, stdout: int = 1, escape: bytes | None = ESCAPE_CTRL_RBRACKET):
        if escape is not None and len(escape) != 1:
            raise ValueError("escape must be a single byte")
        self.stdin = stdin
        self.stdout = stdout
        self.escape = escape
        self.is_tty = os.isatty(stdin)
        self._saved: list | None = None
        self._old_handlers: dict = {}
        self._atexit = False
        self.detached = False
        self.eof = False
        self._stop_r, self._stop_w = os.pipe()

    # -- raw mode and its restoration -------------------------------------------

    def __enter__(self) -> "Terminal":
        self.enter()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def enter(self) -> None:
        if self.is_tty and self._saved is None:
            self._saved = termios.tcgetattr(self.stdin)
            atexit.register(self.restore)
            self._atexit = True
            self._install_signal_handlers()
            termios.tcsetattr(self.stdin, termios.TCSANOW, _raw_attrs(self._saved))

    def restore(self) -> None:
        """Put the terminal back as it was; idempotent and safe on any exit path."""
        saved, self._saved = self._saved, None
        if saved is not None:
            try:
                termios.tcsetattr(self.stdin, termios.TCSAFLUSH, saved)
            except termios.error:
                pass  # the tty went away (hangup): nothing to restore
        self._restore_signal_handlers()
        if self._atexit:
            atexit.unregister(self.restore)
            self._atexit = False

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; atexit still covers us
        for sig in self._CATCH:
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):
                pass

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        handlers, self._old_handlers = self._old_handlers, {}
        for sig, old in handlers.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                pass

    def _on_signal(self, signum, frame) -> None:
        old = self._old_handlers.get(signum, signal.SIG_DFL)
        self.restore()  # also reinstalls the previous handler
        if callable(old):
            old(signum, frame)
        elif old != signal.SIG_IGN:
            # Default action: die by the same signal, with the terminal sane.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    # -- I/O ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Unbuffered output of guest bytes."""
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.stdout, view)
            except InterruptedError:
                continue
            except BlockingIOError:
                select.select([], [self.stdout], [])
                continue
            view = view[n:]

    def filter_input(self, data: bytes) -> bytes:
        """Cut input at the escape byte; sets `detached` when it is seen."""
        if self.escape is not None:
            i = data.find(self.escape)
            if i >= 0:
                self.detached = True
                return data[:i]
        return data

    def read(self, timeout: float | None = None) -> bytes | None:
        """One chunk of user input (escape stripped); b"" on EOF or escape, None on timeout."""
        if self.detached or self.eof:
            return b""
        r, _, _ = select.select([self.stdin, self._stop_r], [], [], timeout)
        if self._stop_r in r:
            return None
        if self.stdin not in r:
            return None
        try:
            data = os.read(self.stdin, 4096)
        except OSError:  # EIO: the pty's other side closed
            data = b""
        if not data:
            self.eof = True
            return b""
        return self.filter_input(data)

    def stop(self) -> None:
        """Wake run() from another thread (e.g. the guest shut down)."""
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass

    def run(self, on_input: Callable[[bytes], None]) -> str:
        """Forward input until the escape byte ("escape"), EOF ("eof") or stop() ("stopped")."""
        while True:
            data = self.read()
            if data is None:
                if self._stop_r in select.select([self._stop_r], [], [], 0)[0]:
                    os.read(self._stop_r, 64)
                    return "stopped"
                continue
            if data:
                on_input(data)
            if self.detached:
                return "escape"
            if self.eof:
                return "eof"

    def close(self) -> None:
        self.restore()
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stop_r = self._stop_w = -1
