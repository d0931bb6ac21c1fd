"""The PV console ring (io/console.h): the host end, as xenconsoled serves it.

`ConsoleRingServer` drains `out` (guest -> host, 2048 bytes) into an output
sink and feeds host input into `in` (host -> guest, 1024 bytes) as space
allows, signalling the guest's console event channel.  hvc_xen spins with
SCHEDOP_yield while `out` is full, so `process()` must run promptly on every
kick; other frontends wait for the event instead, so every drain notifies,
once out_cons is published (as xenconsoled does).  Throughput and what each
guest console write costs: bench/console.py.  Like the xenstore ring server it belongs to the start-of-day ABI the
domain builder sets up; the user's terminal is in pyvmm/terminal.py.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from pyvmm.xen_abi.abi import (
    CONS_RING_IN,
    CONS_RING_IN_CONS,
    CONS_RING_IN_PROD,
    CONS_RING_OUT,
    CONS_RING_OUT_CONS,
    CONS_RING_OUT_PROD,
    CONSOLE_IN_SIZE,
    CONSOLE_OUT_SIZE,
)
from pyvmm.xen_abi.memory.shared_page import u32_fields, writable_bytes

log = logging.getLogger(__name__)

_INDICES_START = CONS_RING_IN_CONS         # in_cons, in_prod, out_cons, out_prod
_RING_END = CONS_RING_OUT_PROD + 4
# Host input waiting for room in `in`; beyond this, typed-ahead input is dropped.
MAX_PENDING_INPUT = 64 * 1024

class ConsoleRingServer:
    """The host end of one guest's console ring page (what xenconsoled does).

    ring: writable memoryview over the console page.
    notify: signals the guest's console event channel.
    sink: receives guest output bytes (e.g. Terminal.write); may be None.
    """

    def __init__(self, ring: memoryview, notify: Callable[[], None],
                 sink: Callable[[bytes], None] | None = None):
        ring = writable_bytes(ring, _RING_END, "console ring")
        self._ring = ring
        self._indices = u32_fields(ring, _INDICES_START, _RING_END)   # shared_page.py: why
        self._notify = notify
        self.sink = sink
        self._lock = threading.Lock()
        self._pending = bytearray()
        self.bytes_out = 0
        self.bytes_in = 0
        self.dropped_input = 0
        self.bad_indices = 0

    def _get(self, off: int) -> int:
        return self._indices[(off - _INDICES_START) >> 2]

    def _set(self, off: int, value: int) -> None:
        self._indices[(off - _INDICES_START) >> 2] = value & 0xFFFFFFFF

    def _signal(self) -> None:
        try:
            self._notify()
        except Exception:
            log.exception("console: notify failed")

    # -- guest -> host ---------------------------------------------------------

    def _drain_locked(self) -> bytes:
        cons = self._get(CONS_RING_OUT_CONS)
        prod = self._get(CONS_RING_OUT_PROD)  # read once; the guest may move it
        avail = (prod - cons) & 0xFFFFFFFF
        if avail == 0:
            return b""
        if avail > CONSOLE_OUT_SIZE:
            # Inconsistent indices from the guest: resynchronise, lose nothing of ours.
            self.bad_indices += 1
            log.warning("console: bad out indices prod=%#x cons=%#x, skipping", prod, cons)
            self._set(CONS_RING_OUT_CONS, prod)
            return b""
        start = cons & (CONSOLE_OUT_SIZE - 1)
        first = min(avail, CONSOLE_OUT_SIZE - start)
        data = bytes(self._ring[CONS_RING_OUT + start:CONS_RING_OUT + start + first])
        if avail > first:
            data += bytes(self._ring[CONS_RING_OUT:CONS_RING_OUT + avail - first])
        self._set(CONS_RING_OUT_CONS, prod)  # after the copy
        self.bytes_out += len(data)
        return data

    # -- host -> guest ---------------------------------------------------------

    def _push_locked(self) -> int:
        if not self._pending:
            return 0
        cons = self._get(CONS_RING_IN_CONS)
        prod = self._get(CONS_RING_IN_PROD)
        used = (prod - cons) & 0xFFFFFFFF
        if used > CONSOLE_IN_SIZE:
            self.bad_indices += 1
            log.warning("console: bad in indices prod=%#x cons=%#x, not writing", prod, cons)
            return 0
        n = min(CONSOLE_IN_SIZE - used, len(self._pending))
        for i in range(n):  # short strings: a plain loop handles the wrap simply
            self._ring[CONS_RING_IN + ((prod + i) & (CONSOLE_IN_SIZE - 1))] = self._pending[i]
        if n:
            del self._pending[:n]
            self._set(CONS_RING_IN_PROD, prod + n)  # data first, then the index
            self.bytes_in += n
        return n

    # -- public ------------------------------------------------------------------

    def send_input(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes went into the ring now."""
        with self._lock:
            room = MAX_PENDING_INPUT - len(self._pending)
            if len(data) > room:
                self.dropped_input += len(data) - max(room, 0)
                data = data[:max(room, 0)]
            self._pending += data
            n = self._push_locked()
        if n:
            self._signal()
        return n

    def describe(self) -> str:
        """The ring's indices and totals, for status reports (trace.py)."""
        g = self._get
        return (f"console ring: in prod={g(CONS_RING_IN_PROD):#x} cons={g(CONS_RING_IN_CONS):#x} "
                f"({len(self._pending)} more waiting), out prod={g(CONS_RING_OUT_PROD):#x} "
                f"cons={g(CONS_RING_OUT_CONS):#x}; {self.bytes_in} bytes in, {self.bytes_out} out, "
                f"{self.dropped_input} dropped, {self.bad_indices} bad indices")

    @property
    def pending_input(self) -> int:
        return len(self._pending)

    def process(self) -> bytes:
        """On a guest kick: drain output to the sink, push queued input. Never raises."""
        try:
            with self._lock:
                data = self._drain_locked()
                pushed = self._push_locked()
        except Exception:
            log.exception("console: ring processing failed")
            return b""
        if data or pushed:
            self._signal()  # out space freed / input available
        if data and self.sink is not None:
            try:
                self.sink(data)
            except Exception:
                log.exception("console: output sink failed")
        return data
