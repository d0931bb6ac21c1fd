"""Build and load the CPL0 shim (xen_abi/shim/*.c, *.S).

The shim is compiled with the system gcc into ~/.cache/pyvmm/shim-<hash>/,
keyed by a hash of the sources, the flags and the layout defines, and linked
at SHIM_VA inside the VMM region's linear mapping.

Deviation from the brief's suggested flags: the shim lives at
0xffff8080_0004_0000, outside the top 2 GiB that -mcmodel=kernel requires,
so it is built -fpie -fvisibility=hidden (everything RIP-relative; the
region is far smaller than 2 GiB) and linked as a static non-PIE image.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.cache import cache_root

from pyvmm.xen_abi.memory import vmm_region as layout
SHIM_DIR = Path(__file__).resolve().parent
SOURCES = ("shim.c", "entry.S", "events.c", "mmu.c", "priv.c")
HEADERS = ("xen_abi.h", "shim.ld", "events.h", "shim.h", "priv.h")
CFLAGS = [
    "-O2", "-std=gnu11", "-ffreestanding", "-nostdlib", "-fno-builtin",
    "-mno-red-zone", "-mgeneral-regs-only", "-fpie", "-fvisibility=hidden",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fcf-protection=none",
    "-fno-jump-tables", "-Wall", "-Werror",
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


def _run(cmd, cwd=None) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    if p.returncode:
        raise ShimBuildError(f"{Path(str(cmd[0])).name} failed: {p.stderr.strip()[:2000]}")
    return p.stdout


def build_shim(defines: dict[str, int] | None = None) -> ShimImage:
    defs = layout.shim_defines()
    defs.update(defines or {})
    texts = {n: (SHIM_DIR / n).read_text() for n in SOURCES + HEADERS}
    key = hashlib.sha256(json.dumps([texts, CFLAGS, sorted(defs.items()),
                                     _run(["gcc", "--version"]).splitlines()[0]]).encode()).hexdigest()[:20]
    out = cache_root() / f"shim-{key}"
    meta = out / "shim.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        return ShimImage((out / "shim.bin").read_bytes(), m["base"], m["size"], m["symbols"])
    for tool in ("gcc", "ld", "objcopy", "nm"):
        if shutil.which(tool) is None:
            raise ShimBuildError(f"building the shim needs {tool!r} on PATH")
    dflags = [f"-D{k}={v:#x}UL" if k.endswith("_VA") else f"-D{k}={v:#x}" for k, v in defs.items()]
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        objs = []
        for src in SOURCES:
            obj = td / (src + ".o")
            _run(["gcc", *CFLAGS, *dflags, "-I", SHIM_DIR, "-c", SHIM_DIR / src, "-o", obj])
            objs.append(obj)
        elf = td / "shim.elf"
        _run(["ld", "-static", "-nostdlib", "--no-dynamic-linker", "--no-warn-rwx-segments",
              f"--defsym=SHIM_VA={defs['SHIM_VA']:#x}", "-T", SHIM_DIR / "shim.ld",
              "-o", elf, *objs])
        flat = td / "shim.bin"
        _run(["objcopy", "-O", "binary", "-R", ".bss", elf, flat])
        syms = {}
        for line in _run(["nm", elf]).splitlines():
            parts = line.split()
            if len(parts) == 3:
                syms[parts[2]] = int(parts[0], 16)
        image = flat.read_bytes()
        base = defs["SHIM_VA"]
        size = syms["shim_end"] - base
        if size > layout.SHIM_MAX:
            raise ShimBuildError(f"shim is {size} bytes, more than the {layout.SHIM_MAX} reserved")
        tmp = Path(tempfile.mkdtemp(dir=cache_root() if cache_root().exists() else None))
        (tmp / "shim.bin").write_bytes(image)
        (tmp / "shim.json").write_text(json.dumps({"base": base, "size": size, "symbols": syms}))
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)   # a concurrent build won
    return ShimImage(image, base, size, syms)
