"""Python side of the shim's privileged-instruction emulator (shim/priv.c):
the per-vCPU emulation state and tracing counters it keeps in the second
page of each vCPU's percpu block.  Numbers mirror shim/priv.h (checked by
tests/test_stock_boot.py::test_priv_header_matches)."""
from __future__ import annotations

import struct

from pyvmm.xen_abi import abi

PRIV_OFF = 0x1E00
PRIV_VCR4, PRIV_IOPL, PRIV_DR, PRIV_TSC_AUX, PRIV_XCR0 = 0, 8, 16, 80, 88
PRIV_EMULATED, PRIV_MSR_UNKNOWN, PRIV_LAST_MSR, PRIV_CPUIDS, PRIV_NR_VCPUS = 96, 104, 112, 120, 128
PRIV_FAST_IO, PRIV_FAST_IRET = 136, 144   # in/out, iretq done by entry.S's #GP fast paths
PRIV_SIZE = 152
PRIV_CNT_OFF = 0x98
PRIV_CNT_TRAPS, PRIV_CNT_IRQ, PRIV_CNT_SYSCALL, PRIV_CNT_HCALL = 0, 32, 33, 34
PRIV_CNT_NR_HCALL = 48
PRIV_CNT_N = PRIV_CNT_HCALL + PRIV_CNT_NR_HCALL

# Xen's CR4 split for PV guests
PV_CR4_GUEST_MASK = (1 << 2) | (1 << 3) | (1 << 16) | (1 << 18)      # TSD DE FSGSBASE OSXSAVE
PV_CR4_GUEST_VISIBLE_MASK = (1 << 5) | (1 << 6) | (1 << 9) | (1 << 10)  # PAE MCE OSFXSR OSXMMEXCPT


def init_vcpu(mem, percpu_off: int, nr_vcpus: int) -> None:
    """Fill the Python-written part of a vCPU's priv state (before it runs)."""
    mem.write(percpu_off + PRIV_OFF, bytes(PRIV_CNT_OFF + 4 * PRIV_CNT_N))
    mem.write_u64(percpu_off + PRIV_OFF + PRIV_NR_VCPUS, nr_vcpus)


def read_state(mem, percpu_off: int) -> dict:
    base = percpu_off + PRIV_OFF
    u = lambda off: mem.read_u64(base + off)
    return {"vcr4": u(PRIV_VCR4), "iopl": u(PRIV_IOPL),
            "dr": [u(PRIV_DR + 8 * i) for i in range(8)], "tsc_aux": u(PRIV_TSC_AUX),
            "xcr0": u(PRIV_XCR0), "emulated": u(PRIV_EMULATED),
            "msr_unknown": u(PRIV_MSR_UNKNOWN), "last_msr": u(PRIV_LAST_MSR),
            "cpuids": u(PRIV_CPUIDS), "nr_vcpus": u(PRIV_NR_VCPUS), "fast_io": u(PRIV_FAST_IO), "fast_iret": u(PRIV_FAST_IRET)}


def read_counters(mem, percpu_off: int) -> dict[str, int]:
    """The shim's per-vCPU event counts by name (only the non-zero ones)."""
    raw = struct.unpack(f"<{PRIV_CNT_N}I", mem.read(percpu_off + PRIV_OFF + PRIV_CNT_OFF, 4 * PRIV_CNT_N))
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
    for slot, name in ((PRIV_FAST_IO, "fast in/out"), (PRIV_FAST_IRET, "fast iretq")):
        n = mem.read_u64(percpu_off + PRIV_OFF + slot)
        if n:
            out[f"{name} (#GP fast path)"] = n
    return out
