"""Python side of the shim's privileged-instruction emulator (shim/priv.c):
the per-vCPU emulation state and tracing counters it keeps in the second
page of each vCPU's percpu block (PRIV in shim/layout.py)."""
from __future__ import annotations

import struct

from pyvmm.xen_abi import abi
from pyvmm.xen_abi.shim.layout import PRIV, PRIV_CNT_HCALL, PRIV_CNT_IRQ, PRIV_CNT_N, PRIV_CNT_SYSCALL, PRIV_OFF

STATE_FIELDS = ("vcr4", "iopl", "tsc_aux", "xcr0", "emulated", "msr_unknown", "last_msr",
                "cpuids", "nr_vcpus", "fast_io", "fast_iret", "fast_cli")


def init_vcpu(mem, percpu_off: int, nr_vcpus: int) -> None:
    """Fill the Python-written part of a vCPU's priv state (before it runs)."""
    mem.write(percpu_off + PRIV_OFF, bytes(PRIV.size))
    PRIV.write(mem, percpu_off + PRIV_OFF, nr_vcpus=nr_vcpus)


def set_iopl(mem, percpu_off: int, level: int) -> None:
    """The virtual IOPL of a vCPU that is not running (VCPUOP_initialise)."""
    PRIV.write(mem, percpu_off + PRIV_OFF, iopl=level & 3)


def read_state(mem, percpu_off: int) -> dict:
    base = percpu_off + PRIV_OFF
    state = {name: PRIV.read(mem, base, name) for name in STATE_FIELDS}
    state["dr"] = [PRIV.read(mem, base, "dr", i) for i in range(8)]
    return state


def read_counters(mem, percpu_off: int) -> dict[str, int]:
    """The shim's per-vCPU event counts by name (only the non-zero ones)."""
    raw = struct.unpack(f"<{PRIV_CNT_N}I",
                        mem.read(percpu_off + PRIV_OFF + PRIV.offset("counters"), 4 * PRIV_CNT_N))
    out = {}
    for i, n in enumerate(raw):
        if not n:
            continue
        if i < PRIV_CNT_IRQ:
            name = f"trap {i}"
        elif i == PRIV_CNT_IRQ:
            name = "interrupts"
        elif i == PRIV_CNT_SYSCALL:
            name = "syscall entries"
        else:
            nr = i - PRIV_CNT_HCALL
            try:
                name = f"hypercall {abi.Hypercall(nr).name}"
            except ValueError:
                name = f"hypercall #{nr}"
        out[name] = n
    for field, name in (("fast_io", "fast in/out"), ("fast_iret", "fast iretq"),
                        ("fast_cli", "fast cli/sti")):
        n = PRIV.read(mem, percpu_off + PRIV_OFF, field)
        if n:
            out[f"{name} (#GP fast path)"] = n
    return out
