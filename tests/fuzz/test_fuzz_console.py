"""Fuzzing the console ring (ConsoleRingServer): the guest writes output,
reads input and scribbles on all four indices; the host types input.

Oracles: process() and send_input() never raise; the server writes only
the `in` data area, in_prod and out_cons (never `out`, out_prod or in_cons,
never beyond the ring's fields); while the guest keeps its indices honest
its output reaches the sink exactly and in order, and what the host types
reaches the guest exactly and in order, never overrunning `in`; queued
input stays within MAX_PENDING_INPUT.
"""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from byte_rings import ByteRing
from fuzzlib import Finding, Input, Oracle, SliceRingPage, ci_settings
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
from pyvmm.xen_abi.hypervisor.console_ring import MAX_PENDING_INPUT, ConsoleRingServer

OUT = ByteRing(CONS_RING_OUT, CONS_RING_OUT_CONS, CONS_RING_OUT_PROD, CONSOLE_OUT_SIZE)
IN = ByteRing(CONS_RING_IN, CONS_RING_IN_CONS, CONS_RING_IN_PROD, CONSOLE_IN_SIZE)
INDICES = (CONS_RING_IN_CONS, CONS_RING_IN_PROD, CONS_RING_OUT_CONS, CONS_RING_OUT_PROD)
# what the server may write: the `in` data, in_prod, out_cons
_MAY_WRITE = (slice(CONS_RING_IN, CONS_RING_IN + CONSOLE_IN_SIZE),
              slice(CONS_RING_IN_PROD, CONS_RING_IN_PROD + 4),
              slice(CONS_RING_OUT_CONS, CONS_RING_OUT_CONS + 4))


class Harness:
    MAX_SIZE = 2048

    def one(self, data: bytes) -> None:
        inp = Input(data)
        start = inp.interesting(32)
        g = SliceRingPage((IN, OUT), start)
        g.page[CONSOLE_IN_SIZE + CONSOLE_OUT_SIZE + 16:] = inp.raw(64) * 16   # the rest of the page
        sink = bytearray()
        server = ConsoleRingServer(memoryview(g.page), g.notify, sink.extend)
        honest = True
        written, typed, read = bytearray(), bytearray(), bytearray()
        for _ in range(48):
            if not inp.remaining():
                break
            k = inp.u8()
            if k < 90:
                chunk = inp.blob(3000)
                written += chunk[:g.put(OUT, chunk)]
            elif k < 150:
                chunk = inp.blob(2000)
                server.send_input(chunk)
                typed += chunk
            elif k < 190:
                if honest:
                    used = (g.get(IN.prod) - g.get(IN.cons)) & 0xFFFFFFFF
                    if used > CONSOLE_IN_SIZE:
                        raise Finding(f"`in` overrun: prod {g.get(IN.prod):#x} cons {g.get(IN.cons):#x}")
                read += g.take(IN, inp.u16() % 1500)
            elif k < 215:
                g.set(inp.choice(INDICES), inp.interesting(32))
                honest = False
            expect = bytearray(g.page)
            server.process()
            for s in _MAY_WRITE:
                expect[s] = g.page[s]
            if expect != g.page:
                bad = next(i for i in range(PAGE_SIZE) if expect[i] != g.page[i])
                raise Finding(f"the server wrote offset {bad:#x} of the console page")
            if server.pending_input > MAX_PENDING_INPUT:
                raise Finding(f"{server.pending_input} bytes of input queued")
        if honest:
            server.process()
            read += g.take(IN)
            if bytes(sink) != bytes(written):
                raise Finding(f"the sink got {len(sink)} bytes, the guest wrote {len(written)}")
            dropped = server.dropped_input
            if bytes(read) != bytes(typed[:len(read)]) or len(read) + server.pending_input + dropped \
                    != len(typed):
                raise Finding(f"the guest read {len(read)} of {len(typed)} bytes typed "
                              f"({server.pending_input} pending, {dropped} dropped)")


HARNESS = Harness()


@ci_settings(3000)
@given(st.binary(max_size=Harness.MAX_SIZE))
def test_fuzz_console(data):
    with Oracle() as oracle:
        oracle.run(HARNESS, data)
