"""Fetch and unpack Debian packages (kernels, busybox) for guest images.

Packages are downloaded with the host's own ``apt-get download`` (so the
host's configured mirrors and keys are used) and unpacked with
``dpkg-deb -x`` into one directory per package under the cache
(``$PYVMM_CACHE/debian`` or ``~/.cache/pyvmm/debian``).  Once a package is
unpacked, later calls return the directory without touching apt at all.

Every step that can take time prints a ``pyvmm: ...`` line to stderr, and
every failure is a :class:`DebianError` with a one-line message.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pyvmm.cache import cache_root

log = logging.getLogger(__name__)

__all__ = [
    "DebianError",
    "KernelFiles",
    "cache_root",
    "debian_cache",
    "fetch_deb",
    "resolve_package",
    "package_version",
    "cloud_kernel",
    "generic_kernel",
    "busybox_static",
    "find_system_map",
]

# Metapackages that always depend on the newest kernel ABI of their flavour.
CLOUD_KERNEL_META = "linux-image-cloud-amd64"
GENERIC_KERNEL_META = "linux-image-amd64"
BUSYBOX_STATIC = "busybox-static"

# Marker written last into an unpacked package directory: its presence
# means the extraction completed (an interrupted one leaves no marker).
_COMPLETE_MARKER = ".pyvmm-complete"
# Unpacked size is typically 2-4x the .deb; refuse early rather than fail
# half-way through dpkg-deb.
_SPACE_FACTOR = 5
# How often the download watcher reports progress.
_PROGRESS_INTERVAL_S = 2.0
# Running apt as root: without this, apt drops to the _apt user which may
# be unable to write into the cache directory, and warns about it.
_APT_ROOT_OPTS = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []


class DebianError(RuntimeError):
    """A Debian package could not be resolved, fetched or unpacked."""


@dataclass(frozen=True)
class KernelFiles:
    """The files of an unpacked ``linux-image-*`` package."""

    vmlinuz: Path      # the bzImage as shipped in /boot
    modules_dir: Path  # /lib/modules/<version> (contains modules.dep)
    version: str       # e.g. "6.1.0-56-cloud-amd64"
    config: Path       # /boot/config-<version>


def say(msg: str, progress: bool = True) -> None:
    """Print one progress line to stderr (never stdout: it may be piped)."""
    if progress:
        print(f"pyvmm: {msg}", file=sys.stderr, flush=True)


def debian_cache() -> Path:
    return cache_root() / "debian"


# --------------------------------------------------------------------------
# apt helpers

_updated = False  # apt-get update runs at most once per process
#: Set (to anything but "" or "0") where there is no network, e.g. in the
#: faithful lane's L1: apt-get update is not tried, only the local apt lists.
OFFLINE_ENV = "PYVMM_OFFLINE"
APT_UPDATE_TIMEOUT_S = 600


# Debian policy: lower case letters, digits, "+", "-", "."; at least two
# characters, starting with an alphanumeric.  Checked before any name
# reaches a command line.
_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")


def _check_name(package: str) -> None:
    if not isinstance(package, str) or not _PACKAGE_NAME.fullmatch(package):
        raise DebianError(f"invalid Debian package name {package!r}")


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise DebianError(
            f"{tool} not found: fetching Debian packages needs a Debian-based "
            f"host with apt and dpkg installed")
    return path


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _apt_update(progress: bool) -> None:
    global _updated
    if _updated:
        return
    _updated = True
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise DebianError(f"${OFFLINE_ENV} is set: not running apt-get update")
    _require("apt-get")
    say("running apt-get update (package unknown to the local apt lists) ...",
        progress)
    t0 = time.monotonic()
    try:
        r = _run(["apt-get", "update", "-q"] + _APT_ROOT_OPTS, timeout=APT_UPDATE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DebianError(f"apt-get update did not finish in {APT_UPDATE_TIMEOUT_S} s; "
                          "check the network and /etc/apt/sources.list") from None
    if r.returncode != 0:
        hint = " (apt-get update needs root)" if os.geteuid() != 0 else ""
        raise DebianError(
            f"apt-get update failed{hint}: {_last_line(r.stderr or r.stdout)}")
    say(f"apt-get update done in {time.monotonic() - t0:.1f} s", progress)


def _apt_show(package: str, progress: bool) -> dict[str, str]:
    """The candidate version's control fields, updating apt lists once if
    the package is unknown."""
    _check_name(package)
    _require("apt-cache")
    for attempt in range(2):
        r = _run(["apt-cache", "show", "--no-all-versions", package])
        if r.returncode == 0 and r.stdout.strip():
            fields: dict[str, str] = {}
            for line in r.stdout.splitlines():
                m = re.match(r"([A-Za-z0-9-]+):\s?(.*)", line)
                if m and m.group(1) not in fields:
                    fields[m.group(1)] = m.group(2)
            if "Version" in fields:
                return fields
        if attempt == 0:
            _apt_update(progress)
    raise DebianError(
        f"Debian package {package!r} is unknown to apt (even after "
        f"apt-get update); check the name and /etc/apt/sources.list")


def package_version(package: str, progress: bool = True) -> str:
    """The version apt would download for *package* (local lookup)."""
    return _apt_show(package, progress)["Version"]


def resolve_package(meta: str, progress: bool = True) -> str:
    """Resolve a kernel metapackage to the concrete package it depends on,
    e.g. ``linux-image-cloud-amd64`` -> ``linux-image-6.1.0-56-cloud-amd64``.

    A package that is not a ``linux-image-*`` metapackage resolves to the
    first of its ``Depends`` that starts with ``linux-image-``; a package
    with no such dependency resolves to itself.
    """
    _check_name(meta)
    _require("apt-cache")
    # One apt-cache call (each costs ~0.5 s); unknown names fail with
    # "No packages found", then the lists are updated once and retried.
    r = _run(["apt-cache", "depends", meta])
    if r.returncode != 0 or not r.stdout.strip():
        _apt_show(meta, progress)   # updates lists or raises "unknown"
        r = _run(["apt-cache", "depends", meta])
        if r.returncode != 0:
            raise DebianError(f"apt-cache depends {meta} failed: "
                              f"{_last_line(r.stderr)}")
    for line in r.stdout.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(\S+)", line)
        if m and m.group(1).startswith("linux-image-") and m.group(1) != meta:
            return m.group(1)
    return meta


# --------------------------------------------------------------------------
# download and unpack

def _fmt_mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _watch_download(directory: Path, total: int, done: threading.Event,
                    progress: bool) -> None:
    """Report the growing size of files in *directory* until *done*."""
    while not done.wait(_PROGRESS_INTERVAL_S):
        size = 0
        for root, _dirs, files in os.walk(directory):
            for f in files:
                try:
                    size += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        if total:
            pct = min(100, 100 * size // total)
            say(f"  {_fmt_mb(size)} / {_fmt_mb(total)} ({pct}%)", progress)
        else:
            say(f"  {_fmt_mb(size)}", progress)


def _check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DebianError(
            f"no disk space: {directory} has {_fmt_mb(free)} free, about "
            f"{_fmt_mb(needed)} is needed (set $PYVMM_CACHE elsewhere)")


def _download(package: str, workdir: Path, size: int, progress: bool) -> Path:
    _require("apt-get")
    done = threading.Event()
    watcher = threading.Thread(target=_watch_download,
                               args=(workdir, size, done, progress),
                               daemon=True)
    watcher.start()
    try:
        r = _run(["apt-get", "download", "-q"] + _APT_ROOT_OPTS + [package],
                 cwd=workdir)
    finally:
        done.set()
        watcher.join()
    debs = sorted(workdir.glob("*.deb"))
    if r.returncode != 0 or not debs:
        msg = _last_line(r.stderr or r.stdout)
        if "No space left" in (r.stderr + r.stdout):
            raise DebianError(f"no disk space while downloading {package} "
                              f"into {workdir}")
        raise DebianError(f"download of {package} failed: {msg}")
    return debs[0]


def _extract(deb: Path, dest: Path) -> None:
    _require("dpkg-deb")
    r = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    if r.returncode != 0:
        if "No space left" in r.stderr:
            raise DebianError(f"no disk space while unpacking {deb.name} "
                              f"into {dest}")
        raise DebianError(f"dpkg-deb -x {deb.name} failed: "
                          f"{_last_line(r.stderr)}")


def fetch_deb(package: str, progress: bool = True) -> Path:
    """Download *package* (the apt candidate version) and unpack it.

    Returns the unpacked root (``<cache>/debian/<package>``), which mirrors
    the filesystem layout of the package (``boot/``, ``lib/``, ``bin/`` ...).
    A completed unpack is reused without any apt or network work.
    """
    _check_name(package)
    base = debian_cache()
    dest = base / package
    if (dest / _COMPLETE_MARKER).is_file():
        return dest
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DebianError(f"cannot create cache directory {base}: "
                          f"{e.strerror}") from None
    # One fetch per package at a time, also across processes.
    with open(base / f".{package}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / _COMPLETE_MARKER).is_file():   # another process did it
            return dest
        fields = _apt_show(package, progress)
        size = int(fields.get("Size", "0") or 0)
        version = fields["Version"]
        _check_space(base, size * _SPACE_FACTOR)
        say(f"fetching {package} {version}"
            + (f" ({_fmt_mb(size)})" if size else "") + " ...", progress)
        t0 = time.monotonic()
        try:
            with tempfile.TemporaryDirectory(prefix=f".{package}.",
                                             dir=base) as tmp:
                tmp = Path(tmp)
                dl = tmp / "download"
                dl.mkdir()
                try:
                    deb = _download(package, dl, size, progress)
                except DebianError as e:
                    # Stale apt lists name files the mirror no longer has
                    # (404): refresh them once and retry.
                    if _updated or "disk space" in str(e):
                        raise
                    say(f"{e}; retrying after apt-get update", progress)
                    _apt_update(progress)
                    shutil.rmtree(dl)
                    dl.mkdir()
                    deb = _download(package, dl, size, progress)
                say(f"unpacking {deb.name} ...", progress)
                root = tmp / "root"
                _extract(deb, root)
                (root / _COMPLETE_MARKER).write_text(
                    f"{package} {version}\n")
                if dest.exists():      # stale, incomplete earlier attempt
                    shutil.rmtree(dest)
                os.rename(root, dest)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DebianError(f"no disk space in {base} while fetching "
                                  f"{package}") from None
            raise DebianError(f"fetching {package} failed: {e}") from None
        say(f"{package} done in {time.monotonic() - t0:.1f} s", progress)
    return dest


# --------------------------------------------------------------------------
# recipes

def _kernel_files(meta: str, progress: bool) -> KernelFiles:
    package = resolve_package(meta, progress)
    root = fetch_deb(package, progress)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise DebianError(f"{package} contains no boot/vmlinuz-*")
    vmlinuz = kernels[-1]
    version = vmlinuz.name[len("vmlinuz-"):]
    modules_dir = root / "lib" / "modules" / version
    if not modules_dir.is_dir():
        # Debian 13+ ships modules under usr/lib.
        modules_dir = root / "usr" / "lib" / "modules" / version
    config = root / "boot" / f"config-{version}"
    for p in (modules_dir, config):
        if not p.exists():
            raise DebianError(f"{package} lacks {p.relative_to(root)}")
    return KernelFiles(vmlinuz=vmlinuz, modules_dir=modules_dir,
                       version=version, config=config)


def cloud_kernel(progress: bool = True) -> KernelFiles:
    """Debian's cloud kernel (``linux-image-cloud-amd64``): Xen PV capable,
    hvc_xen built in, xen-blkfront/xen-netfront as modules, no 9p."""
    return _kernel_files(CLOUD_KERNEL_META, progress)


def generic_kernel(progress: bool = True) -> KernelFiles:
    """Debian's generic kernel (``linux-image-amd64``)."""
    return _kernel_files(GENERIC_KERNEL_META, progress)


def busybox_static(progress: bool = True) -> Path:
    """The statically linked busybox binary from ``busybox-static``."""
    root = fetch_deb(BUSYBOX_STATIC, progress)
    for rel in ("bin/busybox", "usr/bin/busybox", "sbin/busybox"):
        if (root / rel).is_file():
            return root / rel
    raise DebianError(f"{BUSYBOX_STATIC} contains no busybox binary")


# --------------------------------------------------------------------------
# symbols (for xen_abi/hypervisor/trace.py's Symbolizer)

#: Debian's linux-image-* packages ship a stub boot/System.map-* holding this
#: line; the real map is in the matching -dbg package.
SYSTEM_MAP_STUB = b"The real System.map is in"


def _is_stub(path: Path) -> bool:
    return SYSTEM_MAP_STUB in path.read_bytes()[:4096]


def find_system_map(kernel: KernelFiles | None = None, *, version: str | None = None,
                    fetch: bool = True, progress: bool = True) -> Path | None:
    """The real System.map of a Debian kernel, or None if there is none.

    kernel: the unpacked package (or None with version=...).  Uses the
    package's own map unless it is the stub; then the -dbg package's,
    extracted once into the cache (fetch=False: only look there)."""
    if kernel is not None:
        version = kernel.version
        own = kernel.vmlinuz.parent / f"System.map-{version}"
        if own.exists() and not _is_stub(own):
            return own
    if not version:
        return None
    base = debian_cache()
    dest = base / f"System.map-{version}"
    if dest.exists():
        return dest
    if not fetch:
        return None
    package = f"linux-image-{version}-dbg"
    member = f"./usr/lib/debug/boot/System.map-{version}"
    try:
        _check_name(package)
        base.mkdir(parents=True, exist_ok=True)
        say(f"fetching {package} for its System.map", progress)
        with tempfile.TemporaryDirectory(prefix=f".{package}.", dir=base) as tmp:
            tmp = Path(tmp)
            deb = _download(package, tmp, 0, progress)
            # only the one member: the package unpacks to ~1.7 GB
            tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
            subprocess.run(["tar", "-x", "-C", str(tmp), member], stdin=tar.stdout, check=True)
            tar.wait()
            os.replace(tmp / member, dest)
    except (DebianError, subprocess.CalledProcessError, OSError) as e:
        log.warning("could not get the real System.map for %s: %s", version, e)
        return None
    return dest
