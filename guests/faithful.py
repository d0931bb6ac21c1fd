"""The faithful test lane: run a command under a correct KVM.

The development machines expose ``/dev/kvm`` through ``kvm_pvm``, which
gets several x86 behaviours wrong (see ARCHITECTURE.md).  A faithful KVM is
available on the same machine one level down: QEMU in pure TCG emulating an
AMD CPU with SVM boots Debian's generic kernel (the "L1"), which loads
``kvm_amd``.  The L1 sees the host's ``/usr``, ``/etc``, the Python prefix
and the repository over virtio-9p at the same paths as on the host, so the
host's programs - pytest, ``pyvmm`` itself - run there unchanged.

One L1 boot runs one command.  The host writes the command as a small shell
script into a per-run work directory (a 9p share), the L1's ``/init`` runs
it with stdout/stderr redirected into files of that share (which the host
tails, so output streams), writes the exit status beside them and powers
off.  Progress of ``/init`` itself is reported on the serial console with
``MARK`` lines the host parses, so every way the L1 can fail ends in one
clear line (:class:`FaithfulLaneError`) instead of a pass that never ran.

    python -m pyvmm.guests.faithful [--timeout S] [--smp N] -- CMD ARGS...
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .debian import OFFLINE_ENV

# --- constants ---------------------------------------------------------------

#: Modules the L1 loads, in this order (kvm_amd, then virtio-pci and 9p).
L1_MODULES: tuple[str, ...] = (
    "irqbypass", "ccp", "kvm", "kvm-amd",
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
    "virtio_pci", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p",
    "tun",      # TAP devices: bench/tools.py's netback and QEMU peer
)

#: Environment variable /init sets for the command it runs.
LANE_ENV = "PYVMM_LANE"
LANE_NAME = "faithful"

#: Prefix of the progress lines /init prints on the serial console.
MARK = "PYVMM-FAITHFUL:"

#: Where the per-run work share is mounted inside the L1, and its 9p tag.
WORK_MOUNT = "/run/pyvmm-faithful"
WORK_TAG = "pyvmmwork"

#: Exit code of the CLI when the lane itself fails (not the command).
LANE_FAILURE_EXIT = 125

#: 9p message size: the 8 KiB default makes every Python import crawl.
NINEP_MSIZE = 512 * 1024

#: Guest memory and vCPUs of the L1 (the host has 2 cores).
DEFAULT_MEMORY = "4G"
DEFAULT_SMP = 2   # two L1 vCPUs, so that SMP guests run on two CPUs here too.  Under
                  # multi-threaded TCG such an L1 wedged now and then (both vCPUs in
                  # the int3 code-patching path, see TCG_THREAD_SMP), so it runs
                  # single-threaded.  A test that timed out once in 8 stress rounds
                  # before the shim's hlt fix (events.c halt) fits the lost wake-up
                  # that fix removed; after it the whole lane passed 2 of 2 times with
                  # two vCPUs (74 tests, 452-467 s, as fast as with one).
SMP_ENV = "PYVMM_FAITHFUL_SMP"   # overrides DEFAULT_SMP (the CLI's --smp overrides both)

#: TCG threading of an L1 with more than one vCPU.  With "multi" (a host
#: thread per vCPU) an -smp 2 L1 wedged: both vCPUs cycling through the L1's
#: int3 handler (exc_int3, IF=0, the LAPIC timer pending on both) at the
#: jump-label site of preempt_notifier_key in __schedule, i.e. in the middle
#: of the INT3-based code patching (text_poke_bp) that KVM sets off each time
#: the L1's first VM is created or its last one destroyed - cross-modifying
#: code between vCPU threads.  "single" runs all vCPUs round-robin on one
#: host thread, so one vCPU's code write and the other's execution never
#: overlap.  One vCPU is the same either way.
TCG_THREAD_SMP = "single"
TCG_THREAD_ENV = "PYVMM_FAITHFUL_TCG_THREAD"   # "multi" or "single": overrides the above


def tcg_thread(smp: int) -> str:
    """QEMU's ``-accel tcg,thread=`` for an L1 with ``smp`` vCPUs."""
    value = os.environ.get(TCG_THREAD_ENV, "").strip()
    if value:
        if value not in ("multi", "single"):
            raise FaithfulLaneError(f"faithful lane: ${TCG_THREAD_ENV} must be multi or single, "
                                    f"got {value!r}")
        return value
    return TCG_THREAD_SMP if smp > 1 else "multi"


#: AMD model with SVM and NPT: QEMU 7.2's TCG has no VMX.
DEFAULT_CPU = "max"

#: Seconds from QEMU start until /init must report /dev/kvm ready.
DEFAULT_BOOT_TIMEOUT = 180.0

#: Free space the cache needs for the kernel package, modules and initramfs.
MIN_FREE_BYTES = 600 * 1024 * 1024

#: How often the host polls the console log and the output files.
POLL_INTERVAL = 0.05

#: L1 kernel command line: serial console for the MARK lines, kernel
#: messages kept short, and a panic ends QEMU (with -no-reboot) at once.
#: tsc=reliable: TCG's TSC is one counter for all vCPUs (host TSC plus one
#: offset), but the CPU model has no invariant-TSC bit, and Linux marks the
#: TSC of a non-Intel machine with more than one CPU unstable ("TSCs
#: unsynchronized").  Then the L1 keeps time with the HPET (an MMIO exit per
#: clock read) and its KVM turns on TSC catch-up: an L2's TSC stops while
#: its vCPU thread is off the CPU, against pyvmm's constant-TSC pvclock
#: (seen with -smp 2: "pvclock vs rdtsc" failed in the timer test guest).
KERNEL_CMDLINE = "console=ttyS0 loglevel=3 panic=-1 rdinit=/init tsc=reliable"
#: more L1 kernel parameters, for bisecting the L1's own behaviour (e.g.
#: its freezes under nested I/O, bench/README.md) without editing this file
CMDLINE_ENV = "PYVMM_FAITHFUL_APPEND"


def kernel_cmdline() -> str:
    extra = os.environ.get(CMDLINE_ENV, "").strip()
    return f"{KERNEL_CMDLINE} {extra}" if extra else KERNEL_CMDLINE

QEMU_PACKAGE = "qemu-system-x86"
QEMU_ENV = "PYVMM_FAITHFUL_QEMU"   # overrides the QEMU binary
QEMU_DEFAULT_PATH = Path("/usr/bin/qemu-system-x86_64")


#: vCPUs of the L1 the benchmarks run pyvmm and their QEMU peer on (a
#: native kernel under QEMU, same KVM): one.  In an L1 of two
#: (single-threaded TCG, see TCG_THREAD_SMP) that native kernel stopped
#: after its first printk in every try (bench/boot.py at 3.2 s,
#: bench/tools.py, session 9's microvm runs) while pyvmm's guest booted; in
#: an L1 of one it powers off in ~20 s.
PEER_SMP = 1


def default_smp(default: int = DEFAULT_SMP) -> int:
    """The L1's vCPU count: ``$PYVMM_FAITHFUL_SMP`` if set, else *default*
    (:data:`DEFAULT_SMP`; the benchmarks pass :data:`PEER_SMP` when QEMU
    runs in the L1)."""
    value = os.environ.get(SMP_ENV, "").strip()
    if not value:
        return default
    try:
        smp = int(value)
    except ValueError:
        smp = 0
    if smp < 1:
        raise FaithfulLaneError(f"faithful lane: ${SMP_ENV} must be a positive integer, got {value!r}")
    return smp


def cache_dir() -> Path:
    """``~/.cache/pyvmm/faithful`` (or under ``$PYVMM_CACHE``), beside the
    Debian packages that :mod:`pyvmm.guests.debian` caches."""
    from pyvmm.guests.debian import cache_root

    return cache_root() / "faithful"


class FaithfulLaneError(RuntimeError):
    """The L1 could not run the command; str() is one line saying why."""

    def __init__(self, message: str, console_tail: str = "", command_started: bool = False) -> None:
        super().__init__(message)
        self.console_tail = console_tail
        self.command_started = command_started     # the L1 came up and ran the command


@dataclasses.dataclass
class FaithfulResult:
    """What a command run in the L1 gave (shaped like CompletedProcess)."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    console: str          # the L1's serial console (kernel + /init lines)
    wall_time: float      # seconds from QEMU start to QEMU exit
    boot_time: float      # seconds from QEMU start to /dev/kvm ready

    def check_returncode(self) -> None:
        if self.returncode:
            raise subprocess.CalledProcessError(
                self.returncode, self.args, self.stdout, self.stderr)


def _say(progress: Callable[[str], None] | None, line: str) -> None:
    if progress is not None:
        progress(line)


def _stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- L1 ingredients ------------------------------------------------------------

def find_qemu(qemu: str | os.PathLike | None = None,
              progress: Callable[[str], None] | None = None) -> Path:
    """The QEMU binary; install Debian's when none is given nor found.

    An explicit path (argument, or ``$PYVMM_FAITHFUL_QEMU``) is taken as is,
    never replaced by an install, so a caller can point at a QEMU of its own -
    or at a bogus one to test this.
    """
    if qemu is None:
        qemu = os.environ.get(QEMU_ENV) or None
    if qemu is not None:
        path = Path(qemu)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FaithfulLaneError(f"faithful lane: QEMU missing: {path} is not an executable file")
        return path
    found = shutil.which("qemu-system-x86_64")
    if found:
        return Path(found)
    if QEMU_DEFAULT_PATH.is_file():
        return QEMU_DEFAULT_PATH
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise FaithfulLaneError(
            "faithful lane: QEMU missing (no qemu-system-x86_64) and cannot be installed "
            "(needs root and apt-get)")
    _say(progress, f"faithful lane: installing {QEMU_PACKAGE} with apt-get…")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", QEMU_PACKAGE]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        # A machine fresh from its image may have no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not QEMU_DEFAULT_PATH.is_file():
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FaithfulLaneError(f"faithful lane: QEMU missing and apt-get install {QEMU_PACKAGE} failed: {why}")
    return QEMU_DEFAULT_PATH


def _check_disk_space(where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if free < MIN_FREE_BYTES:
        raise FaithfulLaneError(
            f"faithful lane: no disk space: {free // 2**20} MiB free in {where}, "
            f"need about {MIN_FREE_BYTES // 2**20} MiB")


def _builtin_modules(modules_dir: Path) -> set[str]:
    from pyvmm.guests.kmod import module_name

    builtin = modules_dir / "modules.builtin"
    if not builtin.is_file():
        return set()
    return {module_name(line) for line in builtin.read_text().splitlines() if line}


# /init of the L1.  Static: everything that differs per run lives in the
# work share (mounts.sh, run.sh) so the initramfs is built once per kernel.
INIT_SCRIPT = r"""#!/busybox/sh
# pyvmm faithful lane L1 /init: load kvm_amd and 9p, mount the host's trees,
# run the host's command, report, power off.
export PATH=/busybox
mark() { echo "@MARK@ $*" > /dev/console; }
die() { mark "FAIL $*"; sync; poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mark "init"
for m in $(cat /modules/order); do
    out=$(insmod /modules/$m.ko 2>&1) || die "insmod $m: $(echo $out)"
done
[ -d /sys/module/kvm_amd ] || die "kvm_amd not loaded"
i=0
while [ ! -c /dev/kvm ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
[ -c /dev/kvm ] || die "/dev/kvm absent"
chmod 666 /dev/kvm
mkdir -p @WORK@
mount -t 9p -o trans=virtio,version=9p2000.L,msize=@MSIZE@,cache=none @TAG@ @WORK@ \
    || die "mount 9p work share failed"
mark "KVM-READY"
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
ln -sf /proc/self/fd /dev/fd 2>/dev/null
ln -sf /proc/self/fd/0 /dev/stdin; ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
. @WORK@/mounts.sh || die "mounting host trees failed"
[ -x /usr/bin/env ] || die "host /usr not mounted"
mark "RUN"
/busybox/sh @WORK@/run.sh > @WORK@/stdout 2> @WORK@/stderr < /dev/null
echo $? > @WORK@/status.tmp
mv @WORK@/status.tmp @WORK@/status
sync
mark "DONE"
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
"""


def _init_script() -> str:
    return (INIT_SCRIPT.replace("@MARK@", MARK)
            .replace("@WORK@", WORK_MOUNT).replace("@TAG@", WORK_TAG)
            .replace("@MSIZE@", str(NINEP_MSIZE)))


#: Minimal /etc for the time before the host's /etc is mounted over it.
_ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
}

#: Directories symlinked into /usr as on a merged-/usr Debian.
_USR_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


def build_initramfs(kernel, busybox: Path, out: Path) -> Path:
    """Write the L1's initramfs (gzip'd newc cpio) to ``out``."""
    from pyvmm.guests import initramfs, kmod

    modules_dir = Path(kernel.modules_dir)
    builtin = _builtin_modules(modules_dir)
    index = kmod.ModuleIndex(modules_dir)
    wanted = [kmod.module_name(m + ".ko") for m in L1_MODULES]
    try:
        # The listed order, with any dependency it misses put before its user.
        order = index.load_order([m for m in wanted if m not in builtin])
    except kmod.ModuleError as exc:
        raise FaithfulLaneError(f"faithful lane: kernel {kernel.version}: {exc}") from None
    archive = initramfs.Initramfs()
    for d in ("busybox", "modules", "proc", "sys", "dev", "run", "tmp", "etc", "root", "mnt"):
        archive.add_dir(d)
    archive.add_basic_devices()
    archive.add_file("busybox/busybox", Path(busybox).read_bytes(), mode=0o755)
    for applet in ("sh", "mount", "insmod", "mkdir", "sleep", "echo", "cat", "chmod",
                   "ln", "mv", "sync", "poweroff"):
        archive.add_symlink(f"busybox/{applet}", "busybox")
    for name in order:
        archive.add_file(f"modules/{name}.ko", kmod.module_bytes(index.path(name)), mode=0o644)
    archive.add_file("modules/order", ("\n".join(order) + "\n").encode())
    for path, text in _ETC_FILES.items():
        archive.add_file(path, text.encode(), mode=0o644)
    for link, target in _USR_LINKS.items():
        archive.add_symlink(link, target)
    archive.add_file("init", _init_script().encode(), mode=0o755)
    out.parent.mkdir(parents=True, exist_ok=True)
    return archive.write(out, compress=True)


@dataclasses.dataclass
class L1Image:
    vmlinuz: Path
    initrd: Path
    version: str


def prepare_l1(progress: Callable[[str], None] | None = None) -> L1Image:
    """Fetch the generic kernel and busybox and build the initramfs (cached)."""
    cache = cache_dir()
    _check_disk_space(cache)
    from pyvmm.guests import debian

    try:
        kernel = debian.generic_kernel(progress=progress is not None)
        busybox = debian.busybox_static(progress=progress is not None)
    except FaithfulLaneError:
        raise
    except Exception as exc:  # network, apt, unpack: say which in one line
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise FaithfulLaneError(f"faithful lane: download of the L1 kernel/busybox impossible: {msg}") from exc
    # The initramfs depends on the kernel's modules, the ones it loads, busybox and /init.
    key = hashlib.sha256()
    key.update(str(kernel.version).encode())
    key.update(_init_script().encode())
    key.update(" ".join(L1_MODULES).encode())
    key.update(Path(busybox).read_bytes())
    initrd = cache / f"initrd-{kernel.version}-{key.hexdigest()[:12]}.cpio.gz"
    if not initrd.is_file():
        _say(progress, f"faithful lane: building the L1 initramfs for {kernel.version}…")
        build_initramfs(kernel, Path(busybox), initrd)
    return L1Image(Path(kernel.vmlinuz), initrd, str(kernel.version))


# --- what the L1 sees ------------------------------------------------------------

def repo_root() -> Path:
    """The checkout this module is imported from (editable installs point here)."""
    return Path(__file__).resolve().parent.parent


def _python_prefixes() -> list[Path]:
    out = []
    for p in {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}:
        if not _under(p, Path("/usr")):
            out.append(p)
    return sorted(out)


def _under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def default_shares(cwd: Path) -> list[tuple[Path, bool]]:
    """(host path, read-only) shares mounted in the L1 at the same paths:
    the host's programs, the repository, and pyvmm's cache (the guests and
    tools built on the host, where apt works; the L1 has no network)."""
    from pyvmm.cache import cache_root
    shares: list[tuple[Path, bool]] = [(Path("/usr"), True), (Path("/etc"), True)]
    shares += [(p, True) for p in _python_prefixes()]
    shares.append((repo_root(), False))
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    shares.append((cache, False))
    if not any(_under(cwd, p) for p, _ in shares):
        shares.append((cwd, False))
    return _dedupe(shares)


def _dedupe(shares: list[tuple[Path, bool]]) -> list[tuple[Path, bool]]:
    out: list[tuple[Path, bool]] = []
    for path, ro in sorted(shares, key=lambda s: len(s[0].parts)):
        path = path.resolve()
        parent = next((p for p, _ in out if _under(path, p)), None)
        if parent is not None and path == parent:
            continue
        out.append((path, ro))
    return out


def _base_env() -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {
        "PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin",
        "HOME": str(Path.home()),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "TMPDIR": "/tmp",
        "PYTHONUNBUFFERED": "1",
        OFFLINE_ENV: "1",          # the L1 has no network: no apt-get update there
    }


def _write_run_files(work: Path, argv: Sequence[str], cwd: Path, env: Mapping[str, str],
                     shares: list[tuple[Path, bool]]) -> None:
    lines = []
    for i, (path, ro) in enumerate(shares):
        opts = f"trans=virtio,version=9p2000.L,msize={NINEP_MSIZE},cache=loose"
        if ro:
            opts += ",ro"
        lines.append(f"mkdir -p {shlex.quote(str(path))}")
        lines.append(f"mount -t 9p -o {opts} share{i} {shlex.quote(str(path))} || "
                     f"die {shlex.quote(f'mount 9p {path} failed')}")
    (work / "mounts.sh").write_text("\n".join(lines) + "\n")
    run = ["# generated by pyvmm.guests.faithful", "set -e"]
    run.append(f"cd {shlex.quote(str(cwd))}")
    for k, v in env.items():
        run.append(f"export {k}={shlex.quote(v)}")
    run.append("set +e")
    run.append("exec " + " ".join(shlex.quote(a) for a in argv))
    (work / "run.sh").write_text("\n".join(run) + "\n")


def qemu_command(qemu: Path, image: L1Image, work: Path, console: Path,
                 shares: list[tuple[Path, bool]], memory: str = DEFAULT_MEMORY,
                 smp: int = DEFAULT_SMP, cpu: str = DEFAULT_CPU) -> list[str]:
    cmd = [str(qemu), "-accel", f"tcg,thread={tcg_thread(smp)}", "-cpu", cpu, "-m", memory,
           "-smp", str(smp), "-nographic", "-nodefaults", "-no-reboot",
           "-monitor", "none", "-serial", f"file:{console}", "-net", "none",
           "-kernel", str(image.vmlinuz), "-initrd", str(image.initrd),
           "-append", kernel_cmdline(),
           "-virtfs", f"local,path={work},mount_tag={WORK_TAG},security_model=none"]
    for i, (path, ro) in enumerate(shares):
        spec = f"local,path={path},mount_tag=share{i},security_model=none"
        if ro:
            spec += ",readonly=on"
        cmd += ["-virtfs", spec]
    return cmd


# --- running -------------------------------------------------------------------

class _Tail:
    """Reads what has been appended to a file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.data = bytearray()

    def poll(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except FileNotFoundError:
            return b""
        self.pos += len(chunk)
        self.data += chunk
        return chunk


def _marks(console: str) -> list[str]:
    return [line.split(MARK, 1)[1].strip() for line in console.splitlines() if MARK in line]


def _describe_init_failure(what: str) -> str:
    """Turn /init's FAIL mark into the lane's one line."""
    if what.startswith("insmod "):
        module, _, why = what[len("insmod "):].partition(": ")
        why = why.replace(f"insmod: can't insert '/modules/{module}.ko': ", "")
        if module == "kvm_amd":
            return f"kvm_amd failed to load in the L1 ({why}; does the -cpu model have SVM?)"
        return f"module {module} failed to load in the L1 ({why})"
    return f"L1 /init: {what}"


def _tail_lines(text: str, n: int = 15) -> str:
    return "\n".join(text.splitlines()[-n:])


def run_in_faithful_lane(
    argv: Sequence[str],
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    *,
    qemu: str | os.PathLike | None = None,
    kernel: str | os.PathLike | None = None,
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    memory: str = DEFAULT_MEMORY,
    smp: int | None = None,
    cpu: str = DEFAULT_CPU,
    shares: Sequence[tuple[str | os.PathLike, bool]] = (),
    progress: Callable[[str], None] | None = _stderr_progress,
    on_output: Callable[[str, bytes], None] | None = None,
) -> FaithfulResult:
    """Boot the L1, run ``argv`` in ``cwd`` with ``env`` added, return its result.

    ``timeout`` bounds the whole run (boot included); ``boot_timeout`` the time
    until /dev/kvm is ready.  ``qemu``/``kernel`` override the QEMU binary and
    the L1 vmlinuz.  ``smp`` is the L1's vCPU count (default
    :func:`default_smp`: ``$PYVMM_FAITHFUL_SMP`` or :data:`DEFAULT_SMP`).
    ``shares`` adds (host path, read-only) 9p shares.
    ``on_output(stream, chunk)`` receives the command's output as it comes
    ("stdout"/"stderr").  Raises :class:`FaithfulLaneError` (one line) when
    the L1 cannot run the command; a command's own failure is a returncode.
    """
    argv = [str(a) for a in argv]
    if not argv:
        raise ValueError("empty command")
    cwd_path = Path(cwd if cwd is not None else os.getcwd()).resolve()
    if smp is None:
        smp = default_smp()
    elif smp < 1:
        raise ValueError(f"smp must be >= 1, got {smp}")
    qemu_path = find_qemu(qemu, progress)
    image = prepare_l1(progress)
    if kernel is not None:
        image = dataclasses.replace(image, vmlinuz=Path(kernel))
    all_shares = _dedupe(default_shares(cwd_path) + [(Path(p), bool(ro)) for p, ro in shares])
    full_env = _base_env()
    full_env.update(env or {})
    full_env[LANE_ENV] = LANE_NAME

    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=runs) as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        console_path = Path(tmp) / "console.log"
        console_path.touch()
        _write_run_files(work, argv, cwd_path, full_env, all_shares)
        cmd = qemu_command(qemu_path, image, work, console_path, all_shares, memory, smp, cpu)
        return _supervise(cmd, argv, work, console_path, timeout, boot_timeout,
                          progress, on_output)


def _supervise(cmd, argv, work: Path, console_path: Path, timeout, boot_timeout,
               progress, on_output) -> FaithfulResult:
    _say(progress, "faithful lane: booting L1 (kvm_amd under TCG)…")
    start = time.monotonic()
    qemu_err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qemu_err,
                            stderr=subprocess.STDOUT, start_new_session=True)
    console = _Tail(console_path)
    outs = {"stdout": _Tail(work / "stdout"), "stderr": _Tail(work / "stderr")}
    boot_time: float | None = None
    failure: str | None = None

    def pump() -> None:
        for name, tail in outs.items():
            chunk = tail.poll()
            if chunk and on_output is not None:
                on_output(name, chunk)

    try:
        while True:
            exited = proc.poll() is not None
            console.poll()
            text = console.data.decode(errors="replace")
            marks = _marks(text)
            fails = [m for m in marks if m.startswith("FAIL ")]
            if fails:
                failure = _describe_init_failure(fails[0][len("FAIL "):])
            if boot_time is None and "KVM-READY" in marks:
                boot_time = time.monotonic() - start
                _say(progress, f"faithful lane: L1 up in {boot_time:.1f} s")
                _say(progress, "faithful lane: running: " + shlex.join(argv))
            if boot_time is not None:
                pump()
            if exited:
                break
            now = time.monotonic() - start
            if failure is not None:
                # /init powers off after a FAIL; give it a moment, then stop it.
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                break
            if boot_time is None and now > boot_timeout:
                why = ("L1 kernel did not reach /init" if "init" not in marks
                       else "L1 /init did not get /dev/kvm ready")
                failure = f"{why} within {boot_timeout:.0f} s"
                break
            if timeout is not None and now > timeout:
                failure = f"timed out after {timeout:.0f} s (command still running)"
                break
            time.sleep(POLL_INTERVAL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.monotonic() - start
    console.poll()
    if boot_time is not None:
        pump()
    console_text = console.data.decode(errors="replace")
    qemu_err.seek(0)
    qemu_out = qemu_err.read().decode(errors="replace").strip()
    qemu_err.close()

    status_file = work / "status"
    if failure is None and boot_time is not None and status_file.is_file():
        try:
            rc = int(status_file.read_text().strip())
        except ValueError:
            failure = f"L1 wrote a bad exit status {status_file.read_text()!r}"
        else:
            return FaithfulResult(
                args=list(argv), returncode=rc,
                stdout=outs["stdout"].data.decode(errors="replace"),
                stderr=outs["stderr"].data.decode(errors="replace"),
                console=console_text, wall_time=wall, boot_time=boot_time)
    if failure is None:
        if boot_time is None and qemu_out:
            failure = f"QEMU exited with status {proc.returncode} before the L1 came up: " \
                      + qemu_out.splitlines()[-1]
        elif boot_time is None:
            marks = _marks(console_text)
            failure = ("L1 kernel did not reach /init (QEMU exited, kernel unbootable?)"
                       if "init" not in marks else "L1 stopped before /dev/kvm was ready")
        else:
            failure = "L1 stopped before the command reported an exit status"
    raise FaithfulLaneError(f"faithful lane: {failure}",
                            console_tail=_tail_lines(console_text + ("\n" + qemu_out if qemu_out else "")),
                            command_started=boot_time is not None)


# --- CLI -----------------------------------------------------------------------

def _write_stream(name: str, chunk: bytes) -> None:
    stream = sys.stdout if name == "stdout" else sys.stderr
    stream.buffer.write(chunk)
    stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyvmm.guests.faithful",
        description="Run a command inside the faithful lane: KVM (kvm_amd) inside QEMU/TCG, "
                    "with the host's /usr, /etc, Python and this repository mounted.")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--boot-timeout", type=float, default=DEFAULT_BOOT_TIMEOUT)
    parser.add_argument("--qemu", default=None, help="QEMU binary (default: found or installed)")
    parser.add_argument("--kernel", default=None, help="L1 vmlinuz instead of Debian's generic one")
    parser.add_argument("--cpu", default=DEFAULT_CPU, help=f"QEMU -cpu model (default {DEFAULT_CPU})")
    parser.add_argument("--smp", type=int, default=None, metavar="N",
                        help=f"L1 vCPUs (default ${SMP_ENV} or {DEFAULT_SMP})")
    parser.add_argument("--cwd", default=None, help="working directory in the L1 (default: here)")
    parser.add_argument("-e", "--env", action="append", default=[], metavar="VAR=VALUE")
    parser.add_argument("--show-console", action="store_true",
                        help="print the L1's console log afterwards")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.smp is not None and args.smp < 1:
        parser.error(f"--smp needs a positive integer, got {args.smp}")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (use: -- CMD ARGS...)")
    env = {}
    for item in args.env:
        k, sep, v = item.partition("=")
        if not sep:
            parser.error(f"--env needs VAR=VALUE, got {item!r}")
        env[k] = v
    try:
        result = run_in_faithful_lane(command, cwd=args.cwd, env=env, timeout=args.timeout,
                                      qemu=args.qemu, kernel=args.kernel, cpu=args.cpu, smp=args.smp,
                                      boot_timeout=args.boot_timeout, on_output=_write_stream)
    except FaithfulLaneError as exc:
        print(str(exc), file=sys.stderr, flush=True)
        if args.show_console and exc.console_tail:
            print(exc.console_tail, file=sys.stderr)
        return LANE_FAILURE_EXIT
    if args.show_console:
        print(result.console, file=sys.stderr)
    print(f"faithful lane: exit status {result.returncode}, wall {result.wall_time:.1f} s "
          f"(L1 up in {result.boot_time:.1f} s)", file=sys.stderr, flush=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
