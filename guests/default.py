"""The default guest: Debian 12's cloud kernel and a busybox initramfs.

``build_default_guest()`` returns the kernel as Debian ships it (a bzImage
with an LZ4 payload), a gzip initramfs and a command line.  The initramfs
holds busybox-static with all its applet links, the xen-blkfront and
xen-netfront modules with their dependencies (decompressed, so busybox's
``insmod`` can load them) and an ``/init`` script that mounts the pseudo
file systems, loads the modules, prints :data:`BANNER` and runs an
interactive shell on the console.

Images are cached under ``<cache>/guests/`` keyed by a hash of every input
(package versions, recipe version, init script), so a second call costs a
few local ``apt-cache`` look-ups and no building.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import debian
from .debian import DebianError, say
from .initramfs import Initramfs
from .kmod import ModuleIndex, module_bytes

__all__ = ["DefaultGuest", "build_default_guest", "default_init_script",
           "BANNER", "DEFAULT_CMDLINE", "DEFAULT_MODULES", "IDLE_CMDLINE"]

# hvc_xen is built into the cloud kernel, so the console is hvc0 from the
# start; earlyprintk=xen prints through console_io before hvc0 exists.
# noreplace-smp: a kernel that sees one CPU rewrites each of its ~17,000
# LOCK prefixes through text_poke (a page-table update and two base-pointer
# switches each: ~50,000 hypercalls, half the boot's CPL0 work on kvm_pvm,
# bench/README.md); the prefixes are harmless on one CPU, and kept they
# are what a second vCPU needs.
# xen_blkfront.max_indirect_segments=256: requests of up to 1 MiB (the
# frontend's default is 32 segments, 128 KiB) in the indirect segments the
# back-end offers; each request costs the guest the same shim entries
# whatever its size, so a sequential read takes 24% fewer CPL0 instructions
# per MiB (bench/README.md).  /init passes it to insmod, as modprobe would.
# The rest keeps an idle guest asleep (issue 8; bench/README.md, idle.py:
# ~10 timer interrupts a second before, one per ~4.3 s after, the longest
# one-shot Linux's Xen clockevent asks for).  Each is a periodic timer that
# wakes an idle CPU of this kernel:
#   tsc=nowatchdog  the clocksource watchdog checks the TSC against the Xen
#                   clocksource every 0.5 s (the TSC is registered, though
#                   the Xen clocksource is the one in use);
#   sysctl.vm.compaction_proactiveness=0  kcompactd's proactive compaction
#                   check every 0.5 s;
#   psi=0           pressure-stall averaging every 2 s;
#   nowatchdog      the soft-lockup detector's 4 s hrtimer and the stopper
#                   thread it wakes (false alarms anyway when the host
#                   deschedules the vCPU; the NMI one is off under Xen).
IDLE_CMDLINE = "tsc=nowatchdog sysctl.vm.compaction_proactiveness=0 psi=0 nowatchdog"
DEFAULT_CMDLINE = ("console=hvc0 earlyprintk=xen noreplace-smp xen_blkfront.max_indirect_segments=256 "
                   + IDLE_CMDLINE)
# Front-ends the cloud kernel builds as modules (in load order requested;
# dependencies are added before them).
DEFAULT_MODULES = ("xen-blkfront", "xen-netfront")
# The line /init prints once the modules are loaded; boot tests wait for it.
BANNER = "pyvmm default guest ready"
# Kernel parameter that makes /init power off right after the banner (for
# unattended boot tests).
POWEROFF_PARAM = "pyvmm.poweroff"
# Bump when the image layout or init script changes: it is part of the key.
RECIPE_VERSION = 4       # 4: module parameters from the kernel command line, without forks
_INIT_MODE = 0o755


@dataclass(frozen=True)
class DefaultGuest:
    kernel: Path          # bzImage
    initrd: Path          # gzip newc initramfs
    cmdline: str
    kernel_version: str = ""
    modules: tuple[str, ...] = ()   # module names in insmod order


def default_init_script(kernel_version: str,
                        module_paths: list[str]) -> str:
    """The /init shell script; *module_paths* are absolute paths inside the
    image, in load order."""
    loads = "\n".join(
        f'load {p}' for p in module_paths) or ":"
    return f"""#!/bin/sh
# pyvmm default guest /init (generated; recipe {RECIPE_VERSION})
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp /run
mount -t devpts devpts /dev/pts
hostname pyvmm
ifconfig lo 127.0.0.1 up 2>/dev/null

loaded=""
failed=""
# shell builtins only below: every fork and exec is dear where ring 0 is
# interpreted (kvm_pvm)
read -r cmdline < /proc/cmdline
# as modprobe does: NAME.PARAM=VALUE on the kernel command line (NAME with
# '_' for '-') is a parameter of module NAME
load() {{
    name=${{1##*/}}; name=${{name%.ko}}
    prefix=${{name//-/_}}.
    params=""
    for arg in $cmdline; do
        case "$arg" in "$prefix"*=*) params="$params ${{arg#"$prefix"}}" ;; esac
    done
    if insmod "$1" $params; then
        loaded="$loaded $name"
    else
        failed="$failed $name"
        echo "pyvmm-init: insmod $name failed"
    fi
}}
{loads}

echo "{BANNER}: Linux $(uname -r) (built for {kernel_version}); modules:${{loaded:- none}}${{failed:+; FAILED:$failed}}"

case " $cmdline " in
    *" {POWEROFF_PARAM} "*) echo "pyvmm-init: powering off"; poweroff -f ;;
esac

# `pyvmm shutdown` (xenstore control/shutdown) makes the kernel run
# /sbin/poweroff (or reboot), which signals PID 1 as busybox init expects:
# USR2 poweroff, TERM reboot, USR1 halt.
trap 'echo "pyvmm-init: powering off"; sync; poweroff -f' USR2
trap 'echo "pyvmm-init: rebooting"; sync; reboot -f' TERM
trap 'echo "pyvmm-init: halting"; sync; poweroff -f' USR1

# PID 1 must never exit (that panics the kernel): respawn the shell.  It
# runs in the background so that `wait` (unlike a foreground command) lets
# the traps above run as soon as a signal arrives.
while true; do
    setsid cttyhack sh -l </dev/console >/dev/console 2>&1 &
    wait $!
    echo "pyvmm-init: shell exited, restarting (poweroff -f to stop)"
done
"""


def _busybox_applets(busybox: Path) -> list[str]:
    """Install paths of all applets (``bin/sh``, ``sbin/insmod`` ...)."""
    try:
        r = subprocess.run([str(busybox), "--list-full"], capture_output=True,
                           text=True, timeout=30)
    except OSError as e:
        raise DebianError(f"cannot run {busybox}: {e.strerror}") from None
    if r.returncode != 0 or not r.stdout.strip():
        raise DebianError(f"{busybox} --list-full failed")
    return sorted(set(r.stdout.split()))


def _marker(root: Path) -> str:
    """The "<package> <version>" stamp fetch_deb left in an unpacked root."""
    return (root / debian._COMPLETE_MARKER).read_text().strip()


def _package_root(path: Path) -> Path:
    """The unpacked package directory containing *path*."""
    for parent in path.parents:
        if (parent / debian._COMPLETE_MARKER).is_file():
            return parent
    raise DebianError(f"{path} is not inside an unpacked package")


def _newest_cached_guest(cmdline: str) -> DefaultGuest | None:
    """The most recently built default guest of this recipe in the cache
    whose kernel package is still unpacked there, or None."""
    dirs = sorted((debian.cache_root() / "guests").glob("default-*"),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs:
        try:
            inputs = json.loads((d / "inputs.json").read_text())
            if inputs.get("recipe") != RECIPE_VERSION or not (d / "initrd.img").is_file():
                continue
            package = inputs["kernel"].split()[0]
            kernels = sorted((debian.debian_cache() / package / "boot").glob("vmlinuz-*"))
        except (OSError, ValueError, KeyError, IndexError):
            continue
        if kernels:
            return DefaultGuest(kernel=kernels[-1], initrd=d / "initrd.img", cmdline=cmdline,
                                kernel_version=kernels[-1].name[len("vmlinuz-"):],
                                modules=tuple(inputs.get("modules", ())))
    return None


def build_default_guest(progress: bool = True,
                        cmdline: str = DEFAULT_CMDLINE,
                        extra_files: Mapping[str, Path] | None = None) -> DefaultGuest:
    """Fetch (cached) the cloud kernel and busybox and build (cached) the
    initramfs; return the kernel, initrd and command line.

    *extra_files* (path inside the image -> host file, mode kept) go into a
    second newc archive appended to the default one (the kernel unpacks
    concatenated archives in order), cached by content: a guest with
    extra programs (bench/tools.py's fio and iperf3) shares the default
    image and its cache entry.

    Without a usable apt (no package lists, no network: e.g. inside the
    faithful lane's L1, which shares the cache), the newest default guest
    already built in the cache is used instead."""
    base = _build_default_guest(progress, cmdline)
    if not extra_files:
        return base
    return dataclasses.replace(base, initrd=_with_layer(base.initrd, extra_files, progress))


def _with_layer(base_initrd: Path, extra_files: Mapping[str, Path], progress: bool) -> Path:
    """*base_initrd* followed by a gzip newc archive of *extra_files* (cached)."""
    digest = hashlib.sha256(base_initrd.read_bytes())
    for path in sorted(extra_files):
        src = Path(extra_files[path])
        try:
            st = src.stat()
            digest.update(f"{path}\0{st.st_mode & 0o7777:o}\0".encode())
            digest.update(hashlib.sha256(src.read_bytes()).digest())
        except OSError as e:
            raise DebianError(f"extra file for the initramfs {src}: {e.strerror}") from None
    out_dir = debian.cache_root() / "guests" / f"layered-{digest.hexdigest()[:16]}"
    initrd = out_dir / "initrd.img"
    if initrd.is_file():
        return initrd
    total = sum(Path(p).stat().st_size for p in extra_files.values())
    say(f"building an initramfs layer of {len(extra_files)} extra files "
        f"({total / 1e6:.1f} MB) ...", progress)
    t0 = time.monotonic()
    layer = Initramfs()
    for path, src in sorted(extra_files.items()):
        layer.add_file(path, Path(src), mode=Path(src).stat().st_mode)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = initrd.with_name("initrd.img.tmp")
    tmp.write_bytes(base_initrd.read_bytes() + layer.to_bytes(compress=True))
    tmp.replace(initrd)
    (out_dir / "inputs.json").write_text(json.dumps(
        {"base": str(base_initrd), "extra_files": {k: str(v) for k, v in sorted(extra_files.items())}},
        indent=1))
    say(f"initramfs {initrd} ({initrd.stat().st_size // 1024} KiB) done in "
        f"{time.monotonic() - t0:.1f} s", progress)
    return initrd


def _build_default_guest(progress: bool, cmdline: str) -> DefaultGuest:
    try:
        kernel = debian.cloud_kernel(progress)
        busybox = debian.busybox_static(progress)
    except DebianError:
        cached = _newest_cached_guest(cmdline)
        if cached is None:
            raise
        say(f"Debian's package index is not available: using the default guest "
            f"built before ({cached.initrd})", progress)
        return cached

    index = ModuleIndex(kernel.modules_dir)
    order = index.load_order(list(DEFAULT_MODULES))
    # Inside the image every module is a plain .ko at its usual place.
    image_mod_dir = f"lib/modules/{kernel.version}"
    rel_paths = {}
    for name in order:
        rel = index.path(name).relative_to(kernel.modules_dir).as_posix()
        rel_paths[name] = rel[: rel.index(".ko") + len(".ko")]
    init = default_init_script(
        kernel.version, [f"/{image_mod_dir}/{rel_paths[n]}" for n in order])

    inputs = {
        "recipe": RECIPE_VERSION,
        "kernel": _marker(_package_root(kernel.vmlinuz)),
        "busybox": _marker(_package_root(busybox)),
        "modules": order,
        "init": init,
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()) \
        .hexdigest()[:16]
    out_dir = debian.cache_root() / "guests" / f"default-{key}"
    initrd = out_dir / "initrd.img"
    result = DefaultGuest(kernel=kernel.vmlinuz, initrd=initrd,
                          cmdline=cmdline, kernel_version=kernel.version,
                          modules=tuple(order))
    if initrd.is_file():
        return result

    say(f"building initramfs for {kernel.version} "
        f"(busybox, modules: {', '.join(order)}) ...", progress)
    t0 = time.monotonic()
    img = Initramfs()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "tmp",
              "run", "root", "etc", "mnt"):
        img.add_dir(d)
    img.add_basic_devices()
    img.add_file("bin/busybox", busybox, mode=0o755)
    for applet in _busybox_applets(busybox):
        if applet != "bin/busybox":
            img.add_symlink(applet, "/bin/busybox")
    dep_lines = []
    for name in order:
        rel = rel_paths[name]
        img.add_file(f"{image_mod_dir}/{rel}", module_bytes(index.path(name)))
        deps = [f"{rel_paths[d]}" for d in index.depends(name)]
        dep_lines.append(f"{rel}: {' '.join(deps)}".rstrip())
    # A modules.dep for the included modules lets busybox modprobe work too.
    img.add_file(f"{image_mod_dir}/modules.dep",
                 ("\n".join(dep_lines) + "\n").encode())
    img.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    img.add_file("etc/group", b"root:x:0:\n")
    img.add_file("etc/profile",
                 b"export PATH=/sbin:/bin:/usr/sbin:/usr/bin\n"
                 b"export PS1='pyvmm:\\w# '\n")
    img.add_file("init", init.encode(), mode=_INIT_MODE)

    out_dir.mkdir(parents=True, exist_ok=True)
    img.write(initrd, compress=True)
    (out_dir / "inputs.json").write_text(json.dumps(inputs, indent=1))
    say(f"initramfs {initrd} ({initrd.stat().st_size // 1024} KiB) done in "
        f"{time.monotonic() - t0:.1f} s", progress)
    return result
