"""A pure-Python writer (and small reader) for Linux initramfs images.

The kernel unpacks an initramfs in the cpio "newc" format (magic
``070701``), uncompressed or compressed with any decompressor built into
the kernel; gzip is the one every kernel has.  Output here is
deterministic: entries are sorted by path, inode numbers are assigned in
that order and every timestamp is the same fixed value, so the same
inputs give byte-identical images (and stable cache keys).
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = ["CpioEntry", "Initramfs", "parse_newc", "NEWC_MAGIC", "TRAILER"]

NEWC_MAGIC = b"070701"      # "new ASCII" format without checksums
TRAILER = "TRAILER!!!"      # name of the entry that ends the archive
_HEADER_FIELDS = 13          # 8-hex-digit fields after the magic
_HEADER_LEN = len(NEWC_MAGIC) + 8 * _HEADER_FIELDS   # 110 bytes
_ALIGN = 4                   # header+name and file data are 4-byte aligned
# The fixed timestamp of every entry (the epoch; the kernel does not care).
DEFAULT_MTIME = 0
# Well-known character devices an early userspace needs before devtmpfs.
DEV_CONSOLE = (5, 1)
DEV_NULL = (1, 3)
DEV_HVC0 = (229, 0)          # Xen's hvc console (drivers/tty/hvc/hvc_xen)


@dataclass(frozen=True)
class CpioEntry:
    """One archive member.  ``mode`` includes the file-type bits."""

    name: str            # relative path without leading "/", e.g. "bin/sh"
    mode: int
    data: bytes = b""    # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)   # (major, minor) for device nodes
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime: int = DEFAULT_MTIME
    ino: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def _norm(path: str | PurePosixPath) -> str:
    """Archive names are relative to the initramfs root, without "." parts."""
    parts = [p for p in PurePosixPath(str(path)).parts if p not in ("/", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad initramfs path {path!r}")
    return "/".join(parts)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % _ALIGN)


class Initramfs:
    """Collects entries and writes a newc cpio archive.

    Parent directories are created implicitly (mode 0755).  Adding the same
    path twice replaces the earlier entry.
    """

    def __init__(self, mtime: int = DEFAULT_MTIME):
        self.mtime = mtime
        self._entries: dict[str, CpioEntry] = {}

    # -- building -----------------------------------------------------------
    def _add(self, name: str, mode: int, data: bytes = b"",
             rdev: tuple[int, int] = (0, 0)) -> None:
        parent = PurePosixPath(name).parent
        while str(parent) != ".":
            key = str(parent)
            existing = self._entries.get(key)
            if existing is None:
                self._entries[key] = CpioEntry(key, stat.S_IFDIR | 0o755,
                                               nlink=2, mtime=self.mtime)
            elif not existing.is_dir:
                raise ValueError(f"{name!r}: parent {key!r} is not a directory")
            parent = parent.parent
        self._entries[name] = CpioEntry(
            name, mode, data, rdev,
            nlink=2 if stat.S_ISDIR(mode) else 1, mtime=self.mtime)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._add(_norm(path), stat.S_IFDIR | (mode & 0o7777))

    def add_file(self, path: str, data: bytes | Path, mode: int = 0o644) -> None:
        """Add a regular file from bytes or from a host file."""
        if isinstance(data, Path):
            data = data.read_bytes()
        self._add(_norm(path), stat.S_IFREG | (mode & 0o7777), bytes(data))

    def add_symlink(self, path: str, target: str) -> None:
        if not target:
            raise ValueError("empty symlink target")
        self._add(_norm(path), stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, path: str, kind: str, major: int, minor: int,
                   mode: int = 0o600) -> None:
        """Add a device node; *kind* is ``"c"`` (character) or ``"b"``."""
        type_bits = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}.get(kind)
        if type_bits is None:
            raise ValueError(f"device kind must be 'c' or 'b', not {kind!r}")
        self._add(_norm(path), type_bits | (mode & 0o7777), b"",
                  (major, minor))

    def add_basic_devices(self) -> None:
        """/dev/console, /dev/null and /dev/hvc0: enough for the kernel to
        open the initial console before devtmpfs is mounted."""
        self.add_dir("dev")
        self.add_device("dev/console", "c", *DEV_CONSOLE, mode=0o600)
        self.add_device("dev/null", "c", *DEV_NULL, mode=0o666)
        self.add_device("dev/hvc0", "c", *DEV_HVC0, mode=0o620)

    def entries(self) -> list[CpioEntry]:
        """Entries in archive order (sorted; parents precede children)."""
        return [self._entries[k] for k in sorted(self._entries)]

    def __contains__(self, path: str) -> bool:
        return _norm(path) in self._entries

    # -- writing ------------------------------------------------------------
    @staticmethod
    def _header(e: CpioEntry, ino: int, namesize: int) -> bytes:
        fields = (ino, e.mode, e.uid, e.gid, e.nlink, e.mtime, len(e.data),
                  0, 0,                  # devmajor/devminor of the file system
                  e.rdev[0], e.rdev[1], namesize,
                  0)                     # check: unused by newc
        return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)

    @classmethod
    def _member(cls, e: CpioEntry, ino: int) -> bytes:
        name = e.name.encode() + b"\0"
        head = cls._header(e, ino, len(name)) + name
        return head + _pad(len(head)) + e.data + _pad(len(e.data))

    def to_bytes(self, compress: bool = False) -> bytes:
        """The archive, gzip-compressed (deterministically) if *compress*."""
        parts = [self._member(e, ino)
                 for ino, e in enumerate(self.entries(), start=1)]
        parts.append(self._member(
            CpioEntry(TRAILER, 0, mtime=self.mtime), 0))
        raw = b"".join(parts)
        if compress:
            # mtime=0 keeps the gzip header free of the build time.
            return gzip.compress(raw, compresslevel=9, mtime=0)
        return raw

    def write(self, path: Path, compress: bool = True) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes(compress))
        tmp.replace(path)
        return path


def parse_newc(blob: bytes) -> list[CpioEntry]:
    """Parse a (possibly gzip-compressed) newc archive up to its trailer.

    Raises ValueError on malformed input.
    """
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    out: list[CpioEntry] = []
    pos = 0
    while True:
        head = blob[pos:pos + _HEADER_LEN]
        if len(head) < _HEADER_LEN or head[:6] != NEWC_MAGIC:
            raise ValueError(f"bad newc header at offset {pos}")
        try:
            f = [int(head[6 + 8 * i:14 + 8 * i], 16)
                 for i in range(_HEADER_FIELDS)]
        except ValueError:
            raise ValueError(f"bad newc header at offset {pos}") from None
        ino, mode, uid, gid, nlink, mtime, filesize = f[:7]
        rdev = (f[9], f[10])
        namesize = f[11]
        name_end = pos + _HEADER_LEN + namesize
        if namesize == 0 or name_end > len(blob):
            raise ValueError(f"truncated newc name at offset {pos}")
        name = blob[pos + _HEADER_LEN:name_end - 1].decode()
        data_start = name_end + (-name_end % _ALIGN)
        data_end = data_start + filesize
        if data_end > len(blob):
            raise ValueError(f"truncated newc data for {name!r}")
        if name == TRAILER:
            return out
        out.append(CpioEntry(name, mode, blob[data_start:data_end], rdev,
                             uid, gid, nlink, mtime, ino))
        pos = data_end + (-data_end % _ALIGN)
