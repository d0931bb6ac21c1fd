"""Kernel-module dependency resolution without depmod.

Debian's kernel packages do not ship ``modules.dep`` (``depmod`` creates it
at install time), so dependencies come from each module's ``.modinfo`` ELF
section (``depends=a,b``).  A ``modules.dep``, when present, is used
instead.  Modules may be stored plain (``.ko``) or compressed
(``.ko.xz``/``.ko.zst``/``.ko.gz``); :func:`module_bytes` returns them
decompressed, because busybox ``insmod`` only loads plain ELF objects.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import zstandard

__all__ = ["ModuleError", "module_name", "module_bytes", "modinfo",
           "ModuleIndex"]

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
# Elf64_Ehdr fields we need: e_shoff at 0x28, e_shentsize/e_shnum/e_shstrndx
# at 0x3a..0x3f.
_EHDR = struct.Struct("<40xQ10xHHH")
# Elf64_Shdr: sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, ...
_SHDR = struct.Struct("<IIQQQQ24x")
_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class ModuleError(RuntimeError):
    """A module is missing or malformed."""


def module_name(path: Path | str) -> str:
    """Kernel module name of a file: basename without suffix, '-' -> '_'."""
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def module_bytes(path: Path) -> bytes:
    """The module's ELF object, decompressed if it is stored compressed."""
    data = Path(path).read_bytes()
    name = Path(path).name
    try:
        if name.endswith(".xz"):
            data = lzma.decompress(data)
        elif name.endswith(".zst"):
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        elif name.endswith(".gz"):
            data = gzip.decompress(data)
    except (lzma.LZMAError, zstandard.ZstdError, OSError, EOFError) as e:
        raise ModuleError(f"{path}: cannot decompress: {e}") from None
    if data[:4] != _ELF_MAGIC:
        raise ModuleError(f"{path}: not an ELF object")
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of the ``.modinfo`` section (a key such as
    ``alias`` may repeat, hence lists)."""
    if (elf[:4] != _ELF_MAGIC or elf[4] != _ELFCLASS64
            or elf[5] != _ELFDATA2LSB):
        raise ModuleError("not a little-endian ELF64 object")
    try:
        shoff, shentsize, shnum, shstrndx = _EHDR.unpack_from(elf, 0)
        sections = [_SHDR.unpack_from(elf, shoff + i * shentsize)
                    for i in range(shnum)]
        strtab_off = sections[shstrndx][4]
    except (struct.error, IndexError):
        raise ModuleError("truncated ELF section table") from None
    for sh_name, _type, _flags, _addr, off, size in sections:
        end = elf.find(b"\0", strtab_off + sh_name)
        if elf[strtab_off + sh_name:end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in elf[off:off + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    raise ModuleError("no .modinfo section")


class ModuleIndex:
    """The modules of one ``/lib/modules/<version>`` tree."""

    def __init__(self, modules_dir: Path):
        self.root = Path(modules_dir)
        if not self.root.is_dir():
            raise ModuleError(f"{self.root} is not a directory")
        self.paths: dict[str, Path] = {}
        for p in sorted((self.root / "kernel").rglob("*.ko*")):
            if p.name.endswith(_SUFFIXES):
                self.paths.setdefault(module_name(p), p)
        self._deps: dict[str, list[str]] = {}
        dep_file = self.root / "modules.dep"
        if dep_file.is_file():
            for line in dep_file.read_text().splitlines():
                mod, _, deps = line.partition(":")
                self._deps[module_name(mod)] = [module_name(d)
                                                for d in deps.split()]

    def path(self, name: str) -> Path:
        key = module_name(name + ".ko") if not name.endswith(_SUFFIXES) \
            else module_name(name)
        try:
            return self.paths[key]
        except KeyError:
            raise ModuleError(f"module {name!r} not found under "
                              f"{self.root}") from None

    def depends(self, name: str) -> list[str]:
        """Direct dependencies of module *name*."""
        key = module_name(self.path(name))
        if key not in self._deps:
            info = modinfo(module_bytes(self.paths[key]))
            deps = ",".join(info.get("depends", [])).split(",")
            self._deps[key] = [d.replace("-", "_") for d in deps if d]
        return self._deps[key]

    def load_order(self, names: list[str]) -> list[str]:
        """*names* plus their transitive dependencies, each dependency
        before its users (the order ``insmod`` needs)."""
        order: list[str] = []
        state: dict[str, str] = {}   # "visiting" / "done"

        def visit(n: str, chain: tuple[str, ...]) -> None:
            n = module_name(self.path(n))
            if state.get(n) == "done":
                return
            if state.get(n) == "visiting":
                raise ModuleError("dependency cycle: "
                                  + " -> ".join(chain + (n,)))
            state[n] = "visiting"
            for d in self.depends(n):
                visit(d, chain + (n,))
            state[n] = "done"
            order.append(n)

        for name in names:
            visit(name, ())
        return order
