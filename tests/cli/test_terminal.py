"""The CLI terminal: raw mode and its restoration, the escape key, the
input pump; and the console ring feeding it end to end."""
from __future__ import annotations

import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading

import pytest

from pyvmm.errors import UserError
from pyvmm.terminal import Terminal, parse_escape
from pyvmm.xen_abi.hypervisor.console_ring import ConsoleRingServer
from pyvmm.xen_abi.abi import (
    CONS_RING_IN,
    CONS_RING_IN_PROD,
    CONS_RING_OUT,
    CONS_RING_OUT_PROD,
    PAGE_SIZE,
)

U32 = struct.Struct("<I")


@pytest.fixture
def pty_pair():
    master, slave = pty.openpty()
    yield master, slave
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


def _is_raw(fd) -> bool:
    lflag = termios.tcgetattr(fd)[3]
    return not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)


def test_terminal_raw_mode_restored(pty_pair):
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    assert not _is_raw(slave)
    with Terminal(stdin=slave, stdout=slave) as term:
        assert term.is_tty
        assert _is_raw(slave)
    assert termios.tcgetattr(slave) == before
    # Restored on an exception too.
    with pytest.raises(KeyError):
        with Terminal(stdin=slave, stdout=slave):
            assert _is_raw(slave)
            raise KeyError
    assert termios.tcgetattr(slave) == before


def test_terminal_signal_handlers_restored(pty_pair):
    master, slave = pty_pair
    old = signal.getsignal(signal.SIGTERM)
    with Terminal(stdin=slave, stdout=slave):
        assert signal.getsignal(signal.SIGTERM) != old
    assert signal.getsignal(signal.SIGTERM) == old


_CHILD = textwrap.dedent("""
    import signal, sys
    from pyvmm.terminal import Terminal
    t = Terminal(stdin=0, stdout=1)
    t.enter()
    sys.stderr.write("ready\\n"); sys.stderr.flush()
    if sys.argv[1] == "exit":
        sys.exit(3)        # no explicit restore: atexit must do it
    signal.pause()         # until the test's signal ends us
""")


def _default_signals():
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["sigterm", "sighup", "exit"])
def test_terminal_restored_when_process_dies(pty_pair, how):
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    # default dispositions in the child, even when the suite itself runs
    # under nohup (SIGHUP ignored) or with SIGTERM blocked
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, how], stdin=slave, stdout=slave,
                            stderr=subprocess.PIPE, preexec_fn=_default_signals)
    try:
        assert proc.stderr.readline() == b"ready\n"
        if how != "exit":
            assert _is_raw(slave)
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGHUP)
        rc = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if how == "exit":
        assert rc == 3
    else:  # died of the same signal, by default action
        assert rc == -(signal.SIGTERM if how == "sigterm" else signal.SIGHUP)
    assert termios.tcgetattr(slave) == before


def test_escape_key_ends_session(pty_pair):
    master, slave = pty_pair
    got = bytearray()
    with Terminal(stdin=slave, stdout=slave) as term:
        os.write(master, b"ls -l\r\x03more\x1dafter")
        assert term.run(got.extend) == "escape"
        assert term.detached
    # Everything before Ctrl-] (including Ctrl-C, raw) reached the guest, nothing after.
    assert bytes(got) == b"ls -l\r\x03more"


def test_escape_key_as_the_command_line_spells_it():
    assert parse_escape("^]") == b"\x1d"
    assert parse_escape("^a") == parse_escape("^A") == b"\x01"
    assert parse_escape("q") == b"q"
    for bad in ("^1", "ab", ""):
        with pytest.raises(UserError):
            parse_escape(bad)


def test_escape_can_be_disabled_or_changed(pty_pair):
    master, slave = pty_pair
    term = Terminal(stdin=slave, stdout=slave, escape=None)
    assert term.filter_input(b"a\x1db") == b"a\x1db" and not term.detached
    term = Terminal(stdin=slave, stdout=slave, escape=b"\x01")
    assert term.filter_input(b"a\x1db\x01c") == b"a\x1db" and term.detached
    with pytest.raises(ValueError):
        Terminal(stdin=slave, stdout=slave, escape=b"ab")


def test_non_tty_stdin_reads_until_eof():
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        os.write(w, b"echo hi\n" * 100)
        os.close(w)
        got = bytearray()
        with Terminal(stdin=r, stdout=out_w) as term:
            assert not term.is_tty
            assert term.run(got.extend) == "eof"
            term.write(b"guest output\n")
        assert bytes(got) == b"echo hi\n" * 100
        assert os.read(out_r, 100) == b"guest output\n"
    finally:
        for fd in (r, out_r, out_w):
            os.close(fd)


def test_write_is_complete_and_unbuffered():
    r, w = os.pipe()
    data = os.urandom(300_000)  # more than a pipe buffer: write must loop
    received = bytearray()

    def reader():
        while len(received) < len(data):
            received.extend(os.read(r, 65536))

    th = threading.Thread(target=reader)
    th.start()
    term = Terminal(stdin=r, stdout=w)
    term.write(data)
    th.join(timeout=10)
    os.close(r)
    os.close(w)
    assert bytes(received) == data


def test_stop_wakes_run(pty_pair):
    master, slave = pty_pair
    term = Terminal(stdin=slave, stdout=slave)
    result = []
    in_loop = threading.Event()
    th = threading.Thread(target=lambda: result.append(term.run(lambda d: in_loop.set())))
    th.start()
    os.write(master, b"x\n")          # cooked mode: a line reaches run()
    assert in_loop.wait(5), "run() did not forward input"
    term.stop()
    th.join(timeout=5)
    assert result == ["stopped"]
    term.close()


def test_backend_to_terminal_end_to_end(pty_pair):
    master, slave = pty_pair
    page = bytearray(PAGE_SIZE)
    with Terminal(stdin=slave, stdout=slave) as term:
        be = ConsoleRingServer(memoryview(page), lambda: None, term.write)
        page[CONS_RING_OUT:CONS_RING_OUT + 6] = b"login:"
        U32.pack_into(page, CONS_RING_OUT_PROD, 6)
        be.process()
        assert select.select([master], [], [], 5)[0]
        assert os.read(master, 100) == b"login:"
        os.write(master, b"root\r\x1d")
        assert term.run(be.send_input) == "escape"
    assert bytes(page[CONS_RING_IN:CONS_RING_IN + 5]) == b"root\r"
    assert U32.unpack_from(page, CONS_RING_IN_PROD)[0] == 5
