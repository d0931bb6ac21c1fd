"""Build freestanding code with the system gcc and binutils, cached by content.

    built = build("shim", [dir / "shim.c", dir / "entry.S"], cflags=[...],
                  include_dirs=[dir], link=Link(script=dir / "shim.ld"),
                  flat=["-R", ".bss"])
    built.flat, built.symbols["shim_end"], built.elf

Each source is compiled with gcc (-c), the objects are linked with ld
(a linker script, or a text address), optionally copied to a flat binary
with objcopy, and the symbols are read with nm.  The result lives in
cache_root()/<name>-<hash>, the hash covering everything that can change
the output: source texts, the headers in the include directories, the
generated headers, flags, defines, the link and objcopy settings and the
gcc version.  A build happens in a private directory next to it and is
published with one rename, so concurrent builders never see half a result
(the first rename wins, the others use it).

An installed wheel carries prebuilt results (PREBUILT_DIR, filled at wheel
build time through exporting()), and build() looks there first, under a
key computed without gcc; then in the cache; then it builds.  A source
checkout or an editable install has no PREBUILT_DIR and builds as ever.

A leaf module like cache.py: it knows nothing of what it builds.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from pyvmm.cache import cache_root

TOOLS = ("gcc", "ld", "objcopy", "nm")
ELF_NAME = "out.elf"
FLAT_NAME = "out.bin"
SYMBOLS_NAME = "symbols.json"
BUILT_WITH_NAME = "gcc-version"     # in a prebuilt result: which gcc made it
STDERR_LIMIT = 4000
#: Results shipped in a wheel, as <name>-<source key>/; absent in a checkout.
PREBUILT_DIR = Path(__file__).resolve().parent / "prebuilt"

_export_dirs: list[Path] = []       # exporting(): where results are copied too


class ToolchainError(RuntimeError):
    """A tool is missing or failed; the message names it and has its stderr."""


@dataclass(frozen=True)
class Source:
    """A source given as text (no file of its own), e.g. a generated one."""
    name: str
    text: str


@dataclass(frozen=True)
class Link:
    script: Path | None = None          # ld -T
    address: int | None = None          # ld -Ttext, when there is no script
    entry: str | None = None            # ld -e
    flags: tuple[str, ...] = ()         # anything else (--defsym=...)


@dataclass
class Built:
    dir: Path
    symbols: dict[str, int] = field(default_factory=dict)

    @property
    def elf(self) -> Path:
        return self.dir / ELF_NAME

    @property
    def flat(self) -> bytes:
        return (self.dir / FLAT_NAME).read_bytes()


def build(name: str, sources: Sequence[Path | Source], *, cflags: Sequence[str] = (),
          defines: Mapping[str, int | str] | None = None, include_dirs: Sequence[Path] = (),
          generated_headers: Mapping[str, str] | None = None, link: Link = Link(),
          flat: Sequence[str] | None = None) -> Built:
    """Compile, link and (with `flat`, the objcopy options) flatten `sources`.

    defines: -D NAME=VALUE (ints in hex).  generated_headers: {file name:
    text} written into the build directory, which is searched first."""
    defines = dict(defines or {})
    generated_headers = dict(generated_headers or {})
    # by file name, not path: another checkout of the same sources shares the result
    texts = [(s.name, s.read_text() if isinstance(s, Path) else s.text) for s in sources]
    headers = [(h.name, h.read_text()) for d in include_dirs for h in sorted(Path(d).glob("*.h"))]
    key_input = {
        "sources": texts, "headers": headers, "generated": sorted(generated_headers.items()),
        "cflags": list(cflags), "defines": sorted((k, str(v)) for k, v in defines.items()),
        "link": [link.script and link.script.read_text(), link.address, link.entry, list(link.flags)],
        "flat": None if flat is None else list(flat),
    }
    # The prebuilt key leaves gcc's version out: the lookup must work where
    # there is no gcc to ask, and a wheel's binaries are whatever its build's
    # gcc made (recorded beside them), like any binary wheel.  The cache key
    # keeps the version, so a local gcc upgrade still rebuilds local results.
    source_key = _digest(key_input)
    shipped = PREBUILT_DIR / f"{name}-{source_key}"
    if (shipped / SYMBOLS_NAME).exists() and not _export_dirs:
        return Built(shipped, json.loads((shipped / SYMBOLS_NAME).read_text()))
    if shutil.which("gcc") is None:
        raise ToolchainError(_missing(name, "gcc"))
    out = cache_root() / f"{name}-{_digest({**key_input, 'gcc': gcc_version()})}"
    if not (out / SYMBOLS_NAME).exists():
        _build_into(out, name, sources, cflags, defines, include_dirs, generated_headers, link, flat)
    for dest in _export_dirs:
        _export(out, dest / f"{name}-{source_key}")
    return Built(out, json.loads((out / SYMBOLS_NAME).read_text()))


@contextlib.contextmanager
def exporting(dest: Path):
    """Meanwhile, build() ignores PREBUILT_DIR and also copies each result
    into dest/<name>-<source key>: the layout of PREBUILT_DIR (how the
    wheel build makes it)."""
    _export_dirs.append(Path(dest))
    try:
        yield
    finally:
        _export_dirs.pop()


def _export(out: Path, to: Path) -> None:
    to.mkdir(parents=True, exist_ok=True)
    for file in (ELF_NAME, FLAT_NAME, SYMBOLS_NAME):      # not the generated headers
        if (out / file).exists():
            shutil.copyfile(out / file, to / file)
    (to / BUILT_WITH_NAME).write_text(gcc_version() + "\n")


def _digest(key_input: dict) -> str:
    return hashlib.sha256(json.dumps(key_input).encode()).hexdigest()[:20]


def _missing(what: str, tool: str) -> str:
    # an installed wheel has nothing but its prebuilt results; a checkout's
    # user may install the wheel instead
    wheel = "" if PREBUILT_DIR.is_dir() else ", or install pyvmm from a wheel (shim and test guests prebuilt)"
    return (f"building {what} needs {tool!r} on PATH and this pyvmm has no prebuilt copy of it: "
            f"install gcc and binutils (Debian: apt-get install gcc){wheel}")


@functools.lru_cache(maxsize=None)
def gcc_version() -> str:
    return _run("gcc", ["--version"], "gcc").splitlines()[0]


def _build_into(out: Path, name, sources, cflags, defines, include_dirs, generated_headers,
                link: Link, flat) -> None:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            raise ToolchainError(_missing(name, tool))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for header, text in generated_headers.items():
            (work / header).write_text(text)
        dflags = [f"-D{k}={v:#x}" if isinstance(v, int) else f"-D{k}={v}" for k, v in defines.items()]
        iflags = [f"-I{d}" for d in (work, *include_dirs)]
        objs = []
        for i, src in enumerate(sources):
            if isinstance(src, Source):
                path = work / src.name
                path.write_text(src.text)
            else:
                path = src
            obj = work / f"{i}-{path.name}.o"
            _run("gcc", [*cflags, *dflags, *iflags, "-c", path, "-o", obj], name)
            objs.append(obj)
        ld = ["-static", "-nostdlib", "--no-warn-rwx-segments", *link.flags]
        if link.script is not None:
            ld += ["-T", link.script]
        if link.address is not None:
            ld += ["-Ttext", hex(link.address)]
        if link.entry is not None:
            ld += ["-e", link.entry]
        _run("ld", [*ld, "-o", work / ELF_NAME, *objs], name)
        if flat is not None:
            _run("objcopy", ["-O", "binary", *flat, work / ELF_NAME, work / FLAT_NAME], name)
        for obj in objs:
            obj.unlink()      # the generated headers stay: what the build saw
        (work / SYMBOLS_NAME).write_text(json.dumps(read_symbols(work / ELF_NAME, name)))
        try:
            os.rename(work, out)
        except OSError:
            if not (out / SYMBOLS_NAME).exists():
                raise
            # a concurrent build published first: use its (identical) result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_symbols(elf: Path, what: str) -> dict[str, int]:
    """{name: address} of an ELF's symbols (nm)."""
    syms = {}
    for line in _run("nm", [elf], what).splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms[parts[2]] = int(parts[0], 16)
    return syms


def _run(tool: str, args, what: str) -> str:
    try:
        p = subprocess.run([tool, *map(str, args)], capture_output=True, text=True)
    except FileNotFoundError:
        raise ToolchainError(_missing(what, tool)) from None
    if p.returncode:
        raise ToolchainError(f"{tool} failed building {what} (exit status {p.returncode}):\n"
                             f"{p.stderr.strip()[:STDERR_LIMIT]}")
    return p.stdout
