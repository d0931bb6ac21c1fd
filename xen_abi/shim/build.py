"""Build and load the CPL0 shim (xen_abi/shim/*.c, *.S).

The shim is compiled with the system gcc (pyvmm/toolchain.py) into
~/.cache/pyvmm/shim-<hash>/, keyed by the sources, the flags and the headers
generated from layout.py (xen_numbers.h, shim_layout.h), and linked at
SHIM_VA inside the VMM region's linear mapping.

Deviation from the brief's suggested flags: the shim lives at
0xffff8080_0004_0000, outside the top 2 GiB that -mcmodel=kernel requires,
so it is built -fpie -fvisibility=hidden (everything RIP-relative; the
region is far smaller than 2 GiB) and linked as a static non-PIE image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyvmm import toolchain

from pyvmm.xen_abi.memory import vmm_region as region
from pyvmm.xen_abi.shim import layout

SHIM_DIR = Path(__file__).resolve().parent
SOURCES = ("shim.c", "entry.S", "events.c", "mmu.c", "priv.c", "pit.c", "smp.c")
CFLAGS = [
    "-O2", "-std=gnu11", "-ffreestanding", "-nostdlib", "-fno-builtin",
    "-mno-red-zone", "-mgeneral-regs-only", "-fpie", "-fvisibility=hidden",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fcf-protection=none",
    "-Wall", "-Werror",
]


class ShimBuildError(RuntimeError):
    pass


@dataclass
class ShimImage:
    image: bytes          # flat, starts at `base`
    base: int             # link address (VA)
    size: int             # including bss
    symbols: dict[str, int] = field(default_factory=dict)

    def sym(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise KeyError(f"shim has no symbol {name!r}") from None


def build_shim() -> ShimImage:
    base = region.REGION_VA + region.SHIM_OFF
    built = toolchain.build(
        "shim", [SHIM_DIR / n for n in SOURCES], cflags=CFLAGS, include_dirs=[SHIM_DIR],
        generated_headers=layout.c_headers(),
        link=toolchain.Link(script=SHIM_DIR / "shim.ld",
                            flags=("--no-dynamic-linker", f"--defsym=SHIM_VA={base:#x}")),
        flat=["-R", ".bss"])
    size = built.symbols["shim_end"] - base
    if size > region.SHIM_MAX:
        raise ShimBuildError(f"shim is {size} bytes, more than the {region.SHIM_MAX} reserved")
    return ShimImage(built.flat, base, size, built.symbols)
