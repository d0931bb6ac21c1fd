"""A guest that floods its console: what the host keeps stays bounded (the
domain's history, the detached log)."""
from __future__ import annotations

import os
import threading

from pyvmm import launch
from pyvmm.xen_abi.hypervisor.domain import ConsoleHistory

MiB = 1 << 20


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
