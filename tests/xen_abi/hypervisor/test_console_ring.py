"""The console back-end's ring handling (hvc_xen's side played from Python)."""
from __future__ import annotations

import random

import pytest

from byte_rings import U32, ByteRing, GuestRingPage
from pyvmm.xen_abi.hypervisor.console_ring import ConsoleRingServer
from pyvmm.xen_abi.abi import (
    CONS_RING_IN,
    CONS_RING_IN_CONS,
    CONS_RING_IN_PROD,
    CONS_RING_OUT,
    CONS_RING_OUT_CONS,
    CONS_RING_OUT_PROD,
    CONSOLE_IN_SIZE,
    CONSOLE_OUT_SIZE,
    PAGE_SIZE,
)

OUT = ByteRing(CONS_RING_OUT, CONS_RING_OUT_CONS, CONS_RING_OUT_PROD, CONSOLE_OUT_SIZE)
IN = ByteRing(CONS_RING_IN, CONS_RING_IN_CONS, CONS_RING_IN_PROD, CONSOLE_IN_SIZE)


class GuestConsole(GuestRingPage):
    """The hvc_xen side of the ring."""

    def __init__(self, start=0):
        super().__init__((IN, OUT), start)
        self.output = bytearray()
        self.be = ConsoleRingServer(memoryview(self.page), self.notify, self.output.extend)

    def put_out(self, data: bytes) -> int:
        return self.put(OUT, data)

    def take_in(self, limit=None) -> bytes:
        return self.take(IN, limit)


@pytest.mark.parametrize("start", [0, CONSOLE_OUT_SIZE - 7, 0xFFFFFF00])
def test_output_drained_with_wraparound(start):
    g = GuestConsole(start)
    rng = random.Random(start)
    sent = bytearray()
    for _ in range(200):
        chunk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, CONSOLE_OUT_SIZE + 1)))
        n = g.put_out(chunk)
        assert n == len(chunk)  # the back-end emptied the ring last time
        sent += chunk
        kicks = g.kicks
        assert g.be.process() == chunk
        assert g.get(CONS_RING_OUT_CONS) == g.get(CONS_RING_OUT_PROD)
        assert g.kicks == kicks + 1  # the guest may be waiting for space
    assert g.output == sent
    assert g.be.bytes_out == len(sent)
    if start == 0xFFFFFF00:
        assert g.get(CONS_RING_OUT_PROD) < start  # the u32 index wrapped


def test_full_output_ring_and_idle_kick():
    g = GuestConsole(5)
    data = bytes(range(256)) * 10
    assert g.put_out(data) == CONSOLE_OUT_SIZE  # ring full, guest would now yield
    g.be.process()
    assert g.put_out(data[CONSOLE_OUT_SIZE:]) == len(data) - CONSOLE_OUT_SIZE
    g.be.process()
    assert bytes(g.output) == data
    kicks = g.kicks
    assert g.be.process() == b""  # nothing to do: no spurious notify
    assert g.kicks == kicks


class EventDrivenWriter(GuestConsole):
    """A frontend that writes what fits of its message, then waits for the
    console event rather than poll (hvc_xen yields and polls; the protocol
    allows either) and writes more from its event handler."""

    def __init__(self, message: bytes, start: int):
        super().__init__(start)
        self.message = message
        self.sent = self.put_out(message)
        self.free_when_woken = []

    def notify(self):                     # the back-end raised the console event
        used = (self.get(CONS_RING_OUT_PROD) - self.get(CONS_RING_OUT_CONS)) & 0xFFFFFFFF
        self.free_when_woken.append(CONSOLE_OUT_SIZE - used)
        self.sent += self.put_out(self.message[self.sent:])


def test_writer_waiting_on_a_full_ring_is_woken_with_the_space():
    """Every drain notifies, and only after out_cons is published: a writer
    waiting on a full ring is never left waiting on one already emptied."""
    message = random.Random(11).randbytes(5 * CONSOLE_OUT_SIZE + 123)
    g = EventDrivenWriter(message, CONSOLE_OUT_SIZE - 100)
    assert g.sent == CONSOLE_OUT_SIZE     # full: now it waits for the event
    drains = 0
    while g.get(CONS_RING_OUT_CONS) != g.get(CONS_RING_OUT_PROD):
        assert g.be.process()
        drains += 1
    assert bytes(g.output) == message
    assert drains == -(-len(message) // CONSOLE_OUT_SIZE)          # a full ring each time
    assert g.free_when_woken == [CONSOLE_OUT_SIZE] * drains       # one event per drain, space already free


def test_bad_output_indices_do_not_raise():
    g = GuestConsole(100)
    g.set(CONS_RING_OUT_PROD, 100 + CONSOLE_OUT_SIZE + 1)
    assert g.be.process() == b""
    assert g.be.bad_indices == 1
    assert g.get(CONS_RING_OUT_CONS) == g.get(CONS_RING_OUT_PROD)  # resynchronised
    g.put_out(b"after")
    assert g.be.process() == b"after"


def test_input_respects_ring_space():
    g = GuestConsole(0xFFFFFFF0)
    # The guest has 1014 unread bytes: only 10 free.
    g.be.send_input(b"u" * 1014)
    assert (g.get(CONS_RING_IN_PROD) - g.get(CONS_RING_IN_CONS)) & 0xFFFFFFFF == 1014
    unread = bytes(g.page[CONS_RING_IN:CONS_RING_IN + CONSOLE_IN_SIZE])
    text = random.Random(7).randbytes(3000)
    kicks = g.kicks
    assert g.be.send_input(text) == 10
    assert g.kicks == kicks + 1
    assert g.be.pending_input == len(text) - 10
    # The 1014 unconsumed bytes are untouched.
    now = bytes(g.page[CONS_RING_IN:CONS_RING_IN + CONSOLE_IN_SIZE])
    cons = g.get(CONS_RING_IN_CONS)
    for i in range(1014):
        k = (cons + i) % CONSOLE_IN_SIZE
        assert now[k] == unread[k]
    received = g.take_in()[1014:]
    # Each guest kick lets the back-end push more.
    while g.be.pending_input:
        g.be.process()
        received += g.take_in(limit=333)
    received += g.take_in()
    assert received == text
    assert g.be.bytes_in == 1014 + len(text)


def test_bad_input_indices_do_not_raise():
    g = GuestConsole(0)
    g.set(CONS_RING_IN_CONS, 5000)  # guest scribbled: used looks > ring size
    assert g.be.send_input(b"abc") == 0
    assert g.be.bad_indices == 1 and g.be.pending_input == 3


def test_rejects_short_or_readonly_ring():
    with pytest.raises(ValueError):
        ConsoleRingServer(memoryview(bytearray(100)), lambda: None)
    with pytest.raises(ValueError):
        ConsoleRingServer(memoryview(bytes(PAGE_SIZE)), lambda: None)


def test_sink_failure_is_contained():
    page = bytearray(PAGE_SIZE)

    def bad_sink(_):
        raise OSError("stdout gone")

    be = ConsoleRingServer(memoryview(page), lambda: None, bad_sink)
    page[CONS_RING_OUT:CONS_RING_OUT + 2] = b"hi"
    U32.pack_into(page, CONS_RING_OUT_PROD, 2)
    assert be.process() == b"hi"


# ---------------------------------------------------------------------------
# Terminal
# ---------------------------------------------------------------------------
