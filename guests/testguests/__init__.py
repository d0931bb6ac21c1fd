"""Tiny freestanding PV test kernels (C + a shared start-up/linker script),
built with gcc (pyvmm/toolchain.py) into the cache on first use.  Xen's
numbers come from xen_numbers.h, generated from xen_abi/abi.py.

    path = build_testguest("hello")            # -> Path of the ELF
"""
from __future__ import annotations

from pathlib import Path

from pyvmm import toolchain
from pyvmm.xen_abi.shim import layout

HERE = Path(__file__).resolve().parent
# guests that ask for a hypercall page (XEN_ELFNOTE_HYPERCALL_PAGE)
WITH_HYPERCALL_PAGE = {"hcpage"}
# extra shared sources per guest
EXTRA_SOURCES = {"usermode": ("traps_entry.S",), "mmu": ("traps_entry.S",),
                 "ptwr": ("traps_entry.S",), "gdt": ("traps_entry.S",),
                 "mmu_m2p": ("traps_entry.S",), "privio": ("traps_entry.S",),
                 "xsave": ("traps_entry.S",), "shimcost": ("traps_entry.S",),
                 "softint": ("traps_entry.S", "user_run.S"),
                 "fsgsbase": ("traps_entry.S", "user_run.S"),
                 "userio": ("traps_entry.S", "user_run.S"), "vcpuldt": ("traps_entry.S",),
                 "debugreg": ("traps_entry.S",),
                 "stalepte": ("traps_entry.S",), "pgrace": ("traps_entry.S",),
                 "mmufuzz": ("traps_entry.S",), "shimfuzz": ("traps_entry.S",)}
CFLAGS = ["-O2", "-std=gnu11", "-ffreestanding", "-nostdlib", "-fno-builtin", "-mno-red-zone",
          "-mgeneral-regs-only", "-mcmodel=kernel", "-fno-pic", "-fno-pie", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-fcf-protection=none", "-Wall", "-Werror"]


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.c") if p.stem != "tg")


def build_testguest(name: str) -> Path:
    src = HERE / f"{name}.c"
    if not src.exists():
        raise FileNotFoundError(f"no test guest {name!r} (have {', '.join(names())})")
    extra = sorted(HERE.glob(f"{name}_*.S")) + [HERE / n for n in EXTRA_SOURCES.get(name, ())]
    built = toolchain.build(
        f"testguests/{name}", [HERE / "start.S", HERE / "tg.c", src, *extra], cflags=CFLAGS,
        defines={"WITH_HYPERCALL_PAGE": 1} if name in WITH_HYPERCALL_PAGE else {},
        include_dirs=[HERE], generated_headers={"xen_numbers.h": layout.xen_numbers_header()},
        link=toolchain.Link(script=HERE / "tg.ld"))
    return built.elf
