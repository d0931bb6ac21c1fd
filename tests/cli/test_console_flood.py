"""A guest that floods its console, and console clients that stop reading:
what the host keeps stays bounded (the domain's history, the replay
backlog, each client's queue, the detached log) and the guest never waits
for a client."""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time

import pytest

from pyvmm import control, launch
from pyvmm.xen_abi.hypervisor.domain import CONSOLE_HISTORY, ConsoleHistory
from waiting import wait_for

MiB = 1 << 20
# One console_output / console_write may take this long at most: a blocked
# send would take forever, a queued one takes microseconds.
PROMPT_S = 0.5


_CYCLE = bytes(i * 7 % 251 for i in range(251))


def _pattern(offset: int, size: int) -> bytes:
    """Console bytes that say where in the stream they are (modulo 251, a
    prime: no chunk size lines up with it)."""
    start = offset % len(_CYCLE)
    return (_CYCLE * ((start + size) // len(_CYCLE) + 1))[start:start + size]


def test_history_keeps_the_tail_and_counts_everything():
    h = ConsoleHistory(limit=10)
    h.append(b"0123456")
    assert (h.read(), h.read(3), h.total) == (b"0123456", b"3456", 7)
    h.append(b"789abcdef")
    assert h.total == 16 and h.start == 6
    assert h.read() == b"6789abcdef"
    assert h.read(12) == b"cdef"              # an offset inside the window means what it meant
    assert h.read(2) == b"6789abcdef"         # one older than it reads from the oldest byte kept
    assert h.read(16) == b""
    h.append(b"x" * 25)                       # one piece larger than the window
    assert h.read() == b"x" * 10 and h.total == 41


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVMM_RUNTIME_DIR", str(tmp_path))
    srv = control.ControlServer("flood", _NoGuest())
    yield srv
    srv.close()


class _NoGuest:
    def info(self):
        return {}

    def send_console_input(self, data):
        pass


def _console(name: str) -> socket.socket:
    reply, s = control.request(name, "console")
    assert reply["ok"], reply
    s.settimeout(30)
    return s


class _Reader(threading.Thread):
    """A console client that keeps reading."""

    def __init__(self, sock: socket.socket):
        super().__init__(daemon=True)
        self.sock, self.got = sock, bytearray()

    def run(self):
        while data := self.sock.recv(MiB):
            self.got += data


def _flood(write, total: int, chunk: int, pace=lambda sent: None) -> float:
    """write() `total` bytes in `chunk`s from another thread, so that a
    write that blocks fails the test instead of hanging it; returns the
    slowest write's time."""
    slowest = [0.0]

    def run():
        for offset in range(0, total, chunk):
            pace(offset)
            t = time.monotonic()
            write(_pattern(offset, chunk))
            slowest[0] = max(slowest[0], time.monotonic() - t)

    writer = threading.Thread(target=run, daemon=True)
    writer.start()
    writer.join(120)
    assert not writer.is_alive(), "console output blocked on a client that does not read"
    return slowest[0]


def test_a_client_that_stops_reading_is_dropped_and_holds_up_nobody(server, caplog):
    srv = server
    stalled = _console("flood")
    reader = _Reader(_console("flood"))
    reader.start()
    wait_for(lambda: srv.console_clients == 2, "both console clients registered")
    total, chunk = 8 * MiB, 2048

    def keep_reader_near(offset):               # a real guest's output is paced by its ring
        wait_for(lambda: offset - len(reader.got) < control.CONSOLE_CLIENT_QUEUE // 2,
                 "the reading client to keep up", 30)

    with caplog.at_level(logging.WARNING, logger="pyvmm.control"):
        slowest = _flood(srv.console_output, total, chunk, keep_reader_near)
    assert slowest < PROMPT_S, f"a console_output call took {slowest:.2f} s"
    wait_for(lambda: len(reader.got) == total, "the reading client to get everything", 30)
    assert bytes(reader.got) == _pattern(0, total)
    assert srv.console_clients == 1
    assert "dropped a console client" in caplog.text
    # the stalled client got a beginning of the output, then the end of the connection
    got = bytearray()
    while data := stalled.recv(MiB):
        got += data
    assert len(got) < total and got.startswith(_pattern(0, 4096))
    stalled.close()
    reader.sock.shutdown(socket.SHUT_RDWR)
    reader.join(10)
    reader.sock.close()


def test_flood_through_the_domain_keeps_the_host_bounded(server):
    """What the CLI wires up: the domain's console output fanned out by the
    control server, a stalled client attached; 64 MiB later the guest's
    writes are still prompt and every copy kept is bounded."""
    from pyvmm.guests.testguests import build_testguest
    from pyvmm.xen_abi.hypervisor.domain import Domain

    srv = server
    stalled = _console("flood")
    wait_for(lambda: srv.console_clients == 1, "the console client registered")
    total, chunk = 64 * MiB, 64 * 1024
    with Domain(str(build_testguest("hello")), ram_size=32 * MiB) as dom:
        dom.on_console_output.add(srv.console_output)
        slowest = _flood(dom.console_write, total, chunk)
        text, end = dom.read_console()
        assert end == total and len(text) == CONSOLE_HISTORY
        assert text == _pattern(total - CONSOLE_HISTORY, CONSOLE_HISTORY)
        assert dom.read_console(total - 100) == (_pattern(total - 100, 100), total)
        assert sys.getsizeof(dom._console_history._tail) < 3 * CONSOLE_HISTORY    # tail, a chunk, slack
    assert slowest < PROMPT_S, f"a console_write call took {slowest:.2f} s"
    wait_for(lambda: srv.console_clients == 0, "the stalled client to be dropped")
    assert sys.getsizeof(srv._backlog) < 3 * control.CONSOLE_BACKLOG
    late = _console("flood")                       # a new client is replayed the recent tail
    replay = bytearray()
    while len(replay) < control.CONSOLE_BACKLOG:
        replay += late.recv(MiB)
    assert bytes(replay) == _pattern(total - control.CONSOLE_BACKLOG, control.CONSOLE_BACKLOG)
    late.close()
    stalled.close()


def test_detached_log_is_capped_and_rotated(tmp_path):
    log = tmp_path / "g.log"
    log.write_bytes(b"an earlier run\n")
    limit, total = 256 * 1024, 3 * MiB + 12345
    source, sink = os.pipe()
    pump = threading.Thread(target=launch._pump_log, args=(source, log, launch._open_log(log), limit))
    pump.start()
    data = _pattern(0, total)
    with os.fdopen(sink, "wb") as w:
        for offset in range(0, total, 4096):
            w.write(data[offset:offset + 4096])
    pump.join(30)
    os.close(source)
    assert not pump.is_alive()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.log", "g.log.1"]
    current, previous = log.read_bytes(), (tmp_path / "g.log.1").read_bytes()
    assert len(current) <= limit and len(previous) <= limit
    assert data.endswith(previous + current)       # the newest output, in order, nothing lost between
