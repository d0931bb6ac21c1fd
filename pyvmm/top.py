"""`pyvmm top [-d SECONDS] [-n COUNT]`: the running guests' CPU, memory,
disk and network rates, as `xl top` shows domains.  Each guest's control
socket reports counters (pyvmm/launch.py info(): the process's CPU time,
back-end byte counts, the balloon's figures); the rates are their change
over the interval.  On a terminal it redraws until Ctrl-C; otherwise it
prints COUNT tables (default 1), for scripts."""
from __future__ import annotations

import sys
import time

from pyvmm.control import list_guests

__all__ = ["add_parser", "main"]

CLEAR = "\x1b[H\x1b[2J"
COLUMNS = ("NAME", "STATE", "CPU%", "MEM(MiB)", "HOST(MiB)", "DISK-R(MB/s)", "DISK-W(MB/s)",
           "NET-RX(MB/s)", "NET-TX(MB/s)")


def add_parser(sub) -> None:
    t = sub.add_parser("top", help="CPU, memory, disk and network rates per guest, as xl top")
    t.add_argument("-d", "--delay", type=float, default=2.0, metavar="SECONDS",
                   help="the interval the rates are measured over (default 2)")
    t.add_argument("-n", "--iterations", type=int, default=None, metavar="COUNT",
                   help="tables to print (default: until Ctrl-C on a terminal, else 1)")


def _snapshot() -> tuple[float, dict[str, dict]]:
    return time.monotonic(), {g["name"]: g for g in list_guests()}


def rows(before: tuple[float, dict], after: tuple[float, dict]) -> list[tuple[str, ...]]:
    """One row per guest in `after`; rates over the time between the two."""
    dt = max(after[0] - before[0], 1e-6)
    out = []
    for name, g in sorted(after[1].items()):
        old = before[1].get(name)
        if old is None or old.get("pid") != g.get("pid"):       # new since, or another process
            rate = lambda *_: "-"                               # noqa: E731
        else:
            def rate(get, scale=1.0, old=old, g=g) -> str:
                return f"{max(get(g) - get(old), 0) / dt * scale:.1f}"
        io = lambda key: (lambda x: x.get("io", {}).get(key, 0))   # noqa: E731
        out.append((name, g.get("state", "?"), rate(lambda x: x.get("cpu_s", 0), 100.0),
                    str(g.get("memory_current_mib", g.get("memory_mib", "?"))),
                    str(g.get("memory_host_mib", "?")),
                    *(rate(io(k), 1e-6) for k in ("disk_read_bytes", "disk_write_bytes",
                                                  "net_rx_bytes", "net_tx_bytes"))))
    return out


def _table(lines: list[tuple[str, ...]]) -> str:
    lines = [COLUMNS, *lines]
    widths = [max(len(r[i]) for r in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in lines)


def main(args) -> int:
    tty = sys.stdout.isatty()
    count = args.iterations if args.iterations is not None else (None if tty else 1)
    if args.delay <= 0:
        from pyvmm.errors import UserError
        raise UserError(f"top -d {args.delay}: the interval must be more than 0 seconds")
    before = _snapshot()
    shown = 0
    try:
        while count is None or shown < count:
            time.sleep(args.delay)
            after = _snapshot()
            text = _table(rows(before, after))
            print((CLEAR if tty else ("\n" if shown else "")) + text, flush=True)
            before, shown = after, shown + 1
    except KeyboardInterrupt:
        pass
    return 0
