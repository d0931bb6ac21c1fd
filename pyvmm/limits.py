"""A guest's CPU and memory limits: a cgroup of its own for its pyvmm
process (every vCPU and back-end thread of the guest), made at start-up,
removed when the guest ends.

    limits = Limits(cpu_weight=512, cpu_cap=50, memory_max=384 << 20)
    group = GuestCgroup.create("web", limits)      # UserError: one line
    ...                                             # the guest runs
    group.remove()

The settings are xl's: `cpu_weight` the credit scheduler's weight (1 to
65535, 256 for an ordinary guest), `cap` a percentage of one CPU (0: no
cap); and a host memory limit for the whole process (guest RAM and
pyvmm's own memory).  Each controller is taken from the cgroup v2
hierarchy when it offers it there, else from its v1 hierarchy (a hybrid
host, such as this project's development machine, has cpu and memory in
v1 and an empty v2).  The cgroup is made beside nothing: under the one
pyvmm was started in, named pyvmm-NAME-PID; one left by a pyvmm that died
is removed by the next one.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import UserError

__all__ = ["Limits", "GuestCgroup", "XL_DEFAULT_WEIGHT"]

XL_DEFAULT_WEIGHT = 256         # xl's credit scheduler default weight
MAX_WEIGHT = 65535
CFS_PERIOD_US = 100_000
#: what pyvmm's own process needs above the guest's RAM (bench/density.py
#: measures ~20 MiB); a lower memory limit would have the host kill it
MIN_OVERHEAD = 48 << 20


@dataclass(frozen=True)
class Limits:
    cpu_weight: int | None = None    # xl weight (256: as any other guest)
    cpu_cap: int | None = None       # % of one CPU; 0 or None: no cap
    memory_max: int | None = None    # bytes, the whole process

    def wanted(self) -> set[str]:
        out = set()
        if self.cpu_weight is not None or self.cpu_cap:
            out.add("cpu")
        if self.memory_max is not None:
            out.add("memory")
        return out

    def check(self, guest_ram: int) -> None:
        """One line for a setting no host could apply."""
        if self.cpu_weight is not None and not 1 <= self.cpu_weight <= MAX_WEIGHT:
            raise UserError(f"cpu weight {self.cpu_weight}: give 1 to {MAX_WEIGHT} (xl's default is "
                            f"{XL_DEFAULT_WEIGHT})")
        ncpu = os.cpu_count() or 1
        if self.cpu_cap is not None and not 0 <= self.cpu_cap <= 100 * ncpu:
            raise UserError(f"cpu cap {self.cpu_cap}%: give 0 (no cap) to {100 * ncpu} "
                            f"(100 per CPU of this host)")
        if self.memory_max is not None and self.memory_max < guest_ram + MIN_OVERHEAD:
            raise UserError(f"memory limit {self.memory_max >> 20} MiB: the guest's {guest_ram >> 20} MiB "
                            f"and pyvmm's own memory need at least {(guest_ram + MIN_OVERHEAD) >> 20} MiB")


@dataclass(frozen=True)
class _Hierarchy:
    version: int          # 1 or 2
    path: Path            # where pyvmm's own cgroup of it is, on this host


def hierarchies(mountinfo: str, own: str) -> dict[str, _Hierarchy]:
    """controller -> where to make the guest's cgroup for it, from
    /proc/self/mountinfo and /proc/self/cgroup.  v2 first for each
    controller it offers in pyvmm's own cgroup."""
    own_paths: dict[str, str] = {}           # "cpu" / "memory" / "" (v2) -> path in its hierarchy
    for line in own.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            own_paths[c] = path
    found: dict[str, _Hierarchy] = {}
    v2 = None
    for line in mountinfo.splitlines():
        if " - " not in line:
            continue
        pre, post = (part.split() for part in line.split(" - ", 1))
        root, mount, fstype, options = pre[3].rstrip("/"), pre[4], post[0], post[2]

        def at(path: str) -> Path | None:
            """Where the cgroup at `path` of this hierarchy is, if this mount shows it."""
            if not (path + "/").startswith(root + "/"):
                return None
            return Path(mount, path[len(root):].lstrip("/"))

        if fstype == "cgroup2" and "" in own_paths:
            v2 = at(own_paths[""])
        elif fstype == "cgroup":
            for c in options.split(","):
                if c in ("cpu", "memory") and c in own_paths and c not in found and at(own_paths[c]):
                    found[c] = _Hierarchy(1, at(own_paths[c]))
    if v2 is not None:
        try:
            offered = (v2 / "cgroup.controllers").read_text().split()
        except OSError:
            offered = []
        for c in ("cpu", "memory"):
            if c in offered:
                found[c] = _Hierarchy(2, v2)
    return found


def _write(path: Path, value: str) -> None:
    path.write_text(value)


class GuestCgroup:
    """The guest's cgroup(s): one per hierarchy its controllers live in."""

    def __init__(self, dirs: list[Path], settings: dict[Path, str]):
        self.dirs = dirs
        self.settings = settings           # file -> value written (for list -l)

    @classmethod
    def create(cls, name: str, limits: Limits, *, pid: int | None = None,
               mountinfo: str | None = None, own: str | None = None) -> "GuestCgroup | None":
        """Make and enter the guest's cgroup; None when no limit is asked for."""
        wanted = limits.wanted()
        if not wanted:
            return None
        pid = os.getpid() if pid is None else pid
        mountinfo = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
        own = Path("/proc/self/cgroup").read_text() if own is None else own
        found = hierarchies(mountinfo, own)
        for c in sorted(wanted):
            if c not in found:
                raise UserError(f"this host has no {c} cgroup controller pyvmm can use (neither cgroup v2 "
                                f"nor v1 offers it here): run without the {c} limit")
        per_dir: dict[Path, list[str]] = {}
        for c in sorted(wanted):
            h = found[c]
            per_dir.setdefault(h.path, []).append(c)
        dirs, settings = [], {}
        try:
            for parent, controllers in per_dir.items():
                version = found[controllers[0]].version
                _reap(parent)
                d = parent / f"pyvmm-{name}-{pid}"
                if version == 2:
                    _enable_v2(parent, controllers)
                d.mkdir(exist_ok=True)
                dirs.append(d)
                for file, value in _settings(version, controllers, limits).items():
                    _write(d / file, value)
                    settings[d / file] = value
                _write(d / "cgroup.procs", str(pid))     # the whole process, every thread
        except PermissionError as e:
            cls(dirs, settings).remove()
            raise UserError(f"cannot set the guest's limits: {e.filename}: permission denied "
                            f"(cgroups need root, or a cgroup delegated to you)") from None
        except OSError as e:
            cls(dirs, settings).remove()
            raise UserError(f"cannot set the guest's limits: {e.filename or ''}: {e.strerror}") from None
        return cls(dirs, settings)

    def remove(self) -> None:
        """Leave the cgroup(s) and remove them (the process may go on).  A
        v2 parent with controllers handed down takes no process back; its
        child is then removed by the next pyvmm once this one is gone."""
        for d in reversed(self.dirs):
            try:
                for pid in (d / "cgroup.procs").read_text().split():
                    _write(d.parent / "cgroup.procs", pid)
                d.rmdir()
            except OSError:
                pass
        self.dirs = []

    def describe(self) -> dict:
        return {str(f): v for f, v in self.settings.items()}


def _settings(version: int, controllers: list[str], limits: Limits) -> dict[str, str]:
    out = {}
    if "cpu" in controllers:
        if limits.cpu_weight is not None:
            if version == 1:
                out["cpu.shares"] = str(max(2, limits.cpu_weight * 1024 // XL_DEFAULT_WEIGHT))
            else:
                out["cpu.weight"] = str(min(10000, max(1, round(limits.cpu_weight * 100 / XL_DEFAULT_WEIGHT))))
        if limits.cpu_cap:
            quota = limits.cpu_cap * CFS_PERIOD_US // 100
            if version == 1:
                out["cpu.cfs_period_us"] = str(CFS_PERIOD_US)
                out["cpu.cfs_quota_us"] = str(quota)
            else:
                out["cpu.max"] = f"{quota} {CFS_PERIOD_US}"
    if "memory" in controllers and limits.memory_max is not None:
        out["memory.limit_in_bytes" if version == 1 else "memory.max"] = str(limits.memory_max)
    return out


def _enable_v2(parent: Path, controllers: list[str]) -> None:
    """cgroup v2 hands a controller to children only through the parent's
    subtree_control, which the kernel refuses while the parent itself holds
    processes (pyvmm's own cgroup usually does)."""
    try:
        _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise UserError(f"cgroup v2: {parent} holds processes, so it cannot hand "
                            f"{'/'.join(controllers)} to a child; start pyvmm in a cgroup of its own "
                            f"(e.g. systemd-run --scope -p Delegate=yes pyvmm ...)") from None
        raise


_LEFT = re.compile(r"^pyvmm-.+-(\d+)$")


def _reap(parent: Path) -> None:
    """Remove cgroups a pyvmm that died left behind (empty, its pid gone)."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for d in entries:
        m = _LEFT.match(d.name)
        if not m or not d.is_dir() or Path(f"/proc/{m.group(1)}").exists():
            continue
        try:
            d.rmdir()
        except OSError:
            pass
