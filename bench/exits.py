"""Round-trip cost of a port-I/O exit handled in Python.

A CPL0 guest runs `out` to a port COUNT times in a loop; each one exits to
Python (Vcpu.run) and goes straight back. The same loop without the `out`
measures the guest-side cost (on kvm_pvm CPL0 code is interpreted), which is
subtracted. Figures, not pass/fail:  python bench/exits.py [COUNT]
"""
from __future__ import annotations

import fcntl
import sys
import time

from pyvmm.vmm.flatvm import FlatVm, assemble
from pyvmm.vmm.kvm import KVM_RUN, ExitReason, Kvm
from pyvmm.vmm.quirks import detect_quirks

PORT_BENCH = 0x530
PORT_DONE = 0x531
DEFAULT_COUNT = 20000
REPEATS = 3


def _binary(count, outs):
    return assemble("outloop.S", defines=dict(COUNT=count, OUTS=int(outs),
                                              PORT_BENCH=PORT_BENCH, PORT_DONE=PORT_DONE))


def raw_loop(kvm: Kvm, count: int) -> float:
    """The same exits with a bare KVM_RUN ioctl and no decoding (the floor)."""
    with FlatVm(kvm, _binary(count, True)) as f:
        fd = f.vcpu.fd
        t0 = time.perf_counter()
        for _ in range(count + 1):
            fcntl.ioctl(fd, KVM_RUN, 0)
        return time.perf_counter() - t0


def run_loop(kvm: Kvm, count: int, outs: bool) -> tuple[float, int]:
    """Seconds for the whole guest loop and the number of exits taken."""
    with FlatVm(kvm, _binary(count, outs)) as f:
        run = f.vcpu.run
        exits = 0
        t0 = time.perf_counter()
        while True:
            ex = run()
            if ex.reason != ExitReason.IO:
                raise RuntimeError(f"unexpected exit {ex}")
            if ex.port == PORT_DONE:
                break
            exits += 1
        return time.perf_counter() - t0, exits


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    count = int(argv[0]) if argv else DEFAULT_COUNT
    kvm = Kvm()
    q = detect_quirks()
    best_out = min(run_loop(kvm, count, True)[0] for _ in range(REPEATS))
    best_nop = min(run_loop(kvm, count, False)[0] for _ in range(REPEATS))
    best_raw = min(raw_loop(kvm, count) for _ in range(REPEATS))
    per_exit = (best_out - best_nop) / count * 1e6
    print(f"host KVM: {'kvm_pvm' if q.is_pvm else 'KVM'}; {count} iterations, best of {REPEATS}")
    print(f"  loop with out:    {best_out / count * 1e6:8.2f} us/iteration")
    print(f"  loop without out: {best_nop / count * 1e6:8.2f} us/iteration (guest-side cost)")
    print(f"  bare KVM_RUN loop:   {best_raw / count * 1e6:8.2f} us/iteration (no decoding)")
    print(f"  out exit round trip handled in Python: {per_exit:.2f} us/exit "
          f"(bare ioctl: {(best_raw - best_nop) / count * 1e6:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
