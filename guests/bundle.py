"""Debian programs with every shared library they load, for a guest image.

``bundle_programs({"fio": ["usr/bin/fio"]})`` fetches the packages
(:func:`pyvmm.guests.debian.fetch_deb`, cached), reads each program's ELF
``PT_INTERP`` and ``DT_NEEDED`` entries and resolves the libraries, then
theirs, until none is missing.  A library is taken from the packages
fetched so far, else from the host (``ldconfig -p``; the guest kernels are
the host's Debian release, so the host's glibc and friends fit); when some
are still missing, ``lib*`` packages already unpacked in the cache that have
them are used (no apt needed: the faithful lane's L1 has none), else the
``lib*`` dependencies of the packages fetched so far that the host has not
installed are fetched, one level at a time.

The result maps paths inside the image to host files: programs where their
package puts them, every library as a regular file under
``usr/lib/x86_64-linux-gnu/<soname>`` (a directory the dynamic loader
searches without ``ld.so.cache``), and the loader at its ``PT_INTERP``
path.  :attr:`Bundle.library_path` runs the same programs on the host
(``LD_LIBRARY_PATH``) with the same libraries.
"""
from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from . import debian
from .debian import DebianError, say

__all__ = ["Bundle", "ElfInfo", "bundle_programs", "elf_info", "host_libraries", "IMAGE_LIB_DIR"]

IMAGE_LIB_DIR = "usr/lib/x86_64-linux-gnu"
#: Where libraries sit in an unpacked Debian package (multiarch first).
PACKAGE_LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib", "lib")
#: How many rounds of dependencies are fetched before giving up.
MAX_DEPTH = 6

_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ = 0, 1, 5, 10


@dataclass(frozen=True)
class ElfInfo:
    interpreter: str | None      # PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2
    needed: tuple[str, ...]      # DT_NEEDED sonames, in order


def elf_info(path: Path) -> ElfInfo:
    """PT_INTERP and DT_NEEDED of a little-endian ELF64 file."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise DebianError(f"{path} is not a little-endian 64-bit ELF file")
    try:
        phoff, = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        phdrs = [struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
        interp, dyn, loads = None, None, []
        for p_type, _flags, off, vaddr, _paddr, filesz, _memsz, _align in phdrs:
            if p_type == _PT_INTERP:
                interp = data[off:off + filesz].split(b"\0")[0].decode()
            elif p_type == _PT_DYNAMIC:
                dyn = (off, filesz)
            elif p_type == _PT_LOAD:
                loads.append((vaddr, off, filesz))
        if dyn is None:
            return ElfInfo(interp, ())
        entries = [struct.unpack_from("<qQ", data, dyn[0] + i) for i in range(0, dyn[1], 16)]
        strtab = next((v for t, v in entries if t == _DT_STRTAB), None)
        if strtab is None:
            raise DebianError(f"{path}: dynamic section without DT_STRTAB")
        base = next((off + strtab - vaddr for vaddr, off, size in loads
                     if vaddr <= strtab < vaddr + size), None)
        if base is None:
            raise DebianError(f"{path}: DT_STRTAB outside every PT_LOAD")
        needed = []
        for tag, val in entries:
            if tag == _DT_NULL:
                break
            if tag == _DT_NEEDED:
                needed.append(data[base + val:data.index(b"\0", base + val)].decode())
        return ElfInfo(interp, tuple(needed))
    except (struct.error, ValueError, IndexError, OverflowError, UnicodeDecodeError):
        raise DebianError(f"{path}: malformed ELF headers") from None


def host_libraries() -> dict[str, Path]:
    """soname -> file of the host's x86-64 libraries (``ldconfig -p``)."""
    try:
        r = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=60)
    except OSError:
        try:
            r = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True, timeout=60)
        except OSError:
            raise DebianError("ldconfig not found: cannot list the host's shared libraries") from None
    out: dict[str, Path] = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
        if m and "x86-64" in m.group(2):
            out.setdefault(m.group(1), Path(m.group(3)))
    return out


def _package_libraries(root: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for rel in PACKAGE_LIB_DIRS:
        d = root / rel
        if d.is_dir():
            # subdirectories too: librados2 keeps libceph-common.so.2 in ceph/ (its RUNPATH)
            for f in sorted(d.rglob("*.so*"), key=lambda f: (len(f.parts), f)):
                if f.exists():          # a dangling link (to a -dev file) is no library
                    out.setdefault(f.name, f)
    return out


def _unpacked_packages() -> list[str]:
    """Packages unpacked completely in the cache whose names say library."""
    base = debian.debian_cache()
    if not base.is_dir():
        return []
    return sorted(d.name for d in base.iterdir()
                  if d.name.startswith("lib") and (d / debian._COMPLETE_MARKER).is_file())


def _lib_dependencies(packages: list[str]) -> list[str]:
    """The ``lib*`` packages *packages* depend on (first of each alternative)."""
    r = subprocess.run(["apt-cache", "depends", "--no-recommends", "--no-suggests",
                        "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *packages],
                       capture_output=True, text=True)
    out = []
    for line in r.stdout.splitlines():
        m = re.match(r"\s+(?:Pre)?Depends:\s*(\S+)", line)      # "|Depends:" alternatives skipped
        if m and m.group(1).startswith("lib") and not m.group(1).startswith("<"):
            out.append(m.group(1).split(":")[0])
    return list(dict.fromkeys(out))


def _installed_on_host(packages: list[str]) -> set[str]:
    if not packages:
        return set()
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *packages],
                       capture_output=True, text=True)
    return {line.split()[0] for line in r.stdout.splitlines() if line.split()[1:2] == ["ii"]}


@dataclass
class Bundle:
    files: dict[str, Path] = field(default_factory=dict)      # image path -> host file
    programs: dict[str, str] = field(default_factory=dict)     # program name -> image path
    host_programs: dict[str, Path] = field(default_factory=dict)   # program name -> host file
    library_dirs: list[Path] = field(default_factory=list)     # fetched libraries' directories
    packages: dict[str, str] = field(default_factory=dict)      # fetched package -> version

    @property
    def library_path(self) -> str:
        """LD_LIBRARY_PATH that runs :attr:`host_programs` with the fetched libraries."""
        return ":".join(str(d) for d in self.library_dirs)


def bundle_programs(programs: dict[str, list[str]], progress: bool = True) -> Bundle:
    """Fetch each package of *programs* (package -> program paths inside it)
    and resolve the programs' libraries as the module says."""
    roots: dict[str, Path] = {}

    def fetch(package: str) -> None:
        roots[package] = root = debian.fetch_deb(package, progress)
        b.packages[package] = debian.debian_cache().joinpath(package, debian._COMPLETE_MARKER) \
            .read_text().split()[-1]
        for soname, path in _package_libraries(root).items():
            fetched.setdefault(soname, path)

    b = Bundle()
    fetched: dict[str, Path] = {}
    for package, paths in programs.items():
        fetch(package)
        for rel in paths:
            host = roots[package] / rel
            if not host.is_file():
                raise DebianError(f"package {package} has no {rel}")
            b.files[rel] = host
            b.programs[Path(rel).name] = "/" + rel
            b.host_programs[Path(rel).name] = host
    host = host_libraries()
    tried: set[str] = set(roots)

    depth = 0
    while True:
        missing, libs, interp = _resolve([b.files[p.lstrip("/")] for p in b.programs.values()],
                                         fetched, host)
        if not missing:
            break
        # Packages an earlier run unpacked need no apt (the faithful lane's
        # L1 has none: it shares the host's cache).
        cached = [p for p in _unpacked_packages() if p not in roots
                  and missing & set(_package_libraries(debian.debian_cache() / p))]
        if cached:
            for p in cached:
                fetch(p)
            continue
        depth += 1
        candidates = [p for p in _lib_dependencies(sorted(roots)) if p not in tried]
        tried.update(candidates)
        candidates = [p for p in candidates if p not in _installed_on_host(candidates)]
        if not candidates or depth > MAX_DEPTH:
            raise DebianError(f"no package found for {', '.join(sorted(missing))} "
                              f"(needed by {', '.join(b.programs)})")
        say(f"{len(missing)} libraries missing ({', '.join(sorted(missing)[:4])}"
            f"{' ...' if len(missing) > 4 else ''}): fetching {len(candidates)} dependencies", progress)
        for p in candidates:
            fetch(p)
    for soname, path in libs.items():
        b.files[f"{IMAGE_LIB_DIR}/{soname}"] = path
        if path in fetched.values() and path.parent not in b.library_dirs:
            b.library_dirs.append(path.parent)
    if interp is not None:
        b.files[interp.lstrip("/")] = Path(interp)
    return b


def _resolve(elves: list[Path], fetched: dict[str, Path], host: dict[str, Path]):
    """The libraries *elves* load (soname -> file), transitively, and the
    sonames nobody provides."""
    libs: dict[str, Path] = {}
    missing: set[str] = set()
    interp = None
    todo = list(elves)
    seen: set[Path] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        info = elf_info(f)
        interp = interp or info.interpreter
        for soname in info.needed:
            if soname in libs or soname in missing:
                continue
            path = fetched.get(soname) or host.get(soname)
            if path is None:
                missing.add(soname)
            else:
                libs[soname] = path
                todo.append(path.resolve())
    if interp is not None:
        # the loader is the host's; its soname (ld-linux-x86-64.so.2) needs no copy in the lib dir
        libs.pop(Path(interp).name, None)
    return missing, libs, interp
