"""Tiny freestanding PV test kernels (C + a shared start-up/linker script),
built with gcc into the cache on first use.

    path = build_testguest("hello")            # -> Path of the ELF
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pyvmm.cache import cache_root

HERE = Path(__file__).resolve().parent
COMMON = ("tg.h", "tg.c", "start.S", "tg.ld", "tg_events.h")   # tg_events.h: event guests
# guests that ask for a hypercall page (XEN_ELFNOTE_HYPERCALL_PAGE)
WITH_HYPERCALL_PAGE = {"hcpage"}
# extra shared sources per guest
EXTRA_SOURCES = {"usermode": ("traps_entry.S",), "mmu": ("traps_entry.S",),
                 "ptwr": ("traps_entry.S",), "gdt": ("traps_entry.S",),
                 "mmu_m2p": ("traps_entry.S",), "privio": ("traps_entry.S",),
                 "xsave": ("traps_entry.S",)}
CFLAGS = ["-O2", "-std=gnu11", "-ffreestanding", "-nostdlib", "-fno-builtin", "-mno-red-zone",
          "-mgeneral-regs-only", "-mcmodel=kernel", "-fno-pic", "-fno-pie", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-fcf-protection=none", "-Wall", "-Werror"]


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.c") if p.stem != "tg")


def _cache() -> Path:
    return cache_root() / "testguests"


def _run(cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed: {p.stderr.strip()[:2000]}")
    return p.stdout


def build_testguest(name: str) -> Path:
    src = HERE / f"{name}.c"
    if not src.exists():
        raise FileNotFoundError(f"no test guest {name!r} (have {', '.join(names())})")
    defs = ["-DWITH_HYPERCALL_PAGE"] if name in WITH_HYPERCALL_PAGE else []
    extra = sorted(HERE.glob(f"{name}_*.S")) + [HERE / n for n in EXTRA_SOURCES.get(name, ())]
    texts = [(HERE / n).read_text() for n in COMMON] + [src.read_text()] + [p.read_text() for p in extra]
    texts += [p.read_text() for p in sorted(HERE.glob("*.h"))]   # shared headers (tg.h, mmutest.h)
    key = hashlib.sha256(json.dumps([texts, CFLAGS, defs]).encode()).hexdigest()[:20]
    out = _cache() / f"{name}-{key}.elf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        objs = []
        for s in [HERE / "start.S", HERE / "tg.c", src, *extra]:
            o = td / (s.name + ".o")
            _run(["gcc", *CFLAGS, *defs, "-I", HERE, "-c", s, "-o", o])
            objs.append(o)
        elf = td / "guest.elf"
        _run(["ld", "-static", "-nostdlib", "--no-warn-rwx-segments", "-T", HERE / "tg.ld",
              "-o", elf, *objs])
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        shutil.copy(elf, tmp)
        os.replace(tmp, out)
    return out
