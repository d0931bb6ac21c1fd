"""Compose a guest for the command line: domain + terminal + lifecycle.

The CLI has checked its arguments and loaded the kernel; this module builds
the domain, connects the user's terminal to the guest console, reports
progress on stderr (so a user never stares at a silent terminal), and turns
the guest's end into pyvmm's exit status.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import time

from pyvmm.errors import ExitStatus, UserError, print_error
from pyvmm.terminal import Terminal, parse_escape

#: `kill -USR2 <pyvmm pid>` prints the guest's state on stderr (the README's
#: "is it alive?" answer); the signal reaches the main thread, which runs the
#: vCPU, so KVM_RUN returns and the handler runs at once.
STATUS_SIGNAL = signal.SIGUSR2

# A detached guest's log (stdout and stderr): past LOG_LIMIT bytes NAME.log
# becomes NAME.log.1 (the one before is let go) and a new NAME.log starts.
LOG_LIMIT = 8 << 20
PAUSE_WAIT_S = 10.0     # for `pyvmm pause` to see the vCPU stopped
LOG_DRAIN_S = 5.0       # at exit, for the log pump to write what is left

# Console lines that mark boot milestones; the first sight of each is
# reported with the time since start.
MILESTONES = (
    (b"Linux version ", "kernel started"),
    (b"Run /init as init process", "init started"),
)


def _say(msg: str) -> None:
    print(f"pyvmm: {msg}", file=sys.stderr, flush=True)


class _MilestoneWatch:
    """Scans console output for the MILESTONES, across chunk boundaries."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.tail = b""
        self.pending = list(MILESTONES)
        self.seen: dict[str, float] = {}

    def feed(self, data: bytes) -> list[tuple[str, float]]:
        text = self.tail + data
        hits = []
        for marker, label in list(self.pending):
            if marker in text:
                t = time.monotonic() - self.t0
                self.seen[label] = t
                hits.append((label, t))
                self.pending.remove((marker, label))
        self.tail = text[-64:]
        return hits


class _GuestControl:
    """What `pyvmm list|shutdown|destroy|console` reach through the control
    socket (pyvmm/control.py): the current boot's domain."""

    def __init__(self, name, memory, kernel_path, disks, nets, **settings):
        self.dom = None
        self.boots = 0
        self.destroy_requested = False
        self._static = {**settings, "memory_mib": memory >> 20, "kernel": str(kernel_path),
                        "disks": [d.path + (",ro" if d.readonly else "") for d in disks],
                        "nets": [f"{link.name} {mac}" + (f" bridge {link.bridge}" if getattr(link, "bridge", None)
                                                          else "") for link, mac in nets]}

    def info(self) -> dict:
        dom = self.dom
        state = "starting" if dom is None else "paused" if dom.paused else "running"
        info = dict(self._static, boots=self.boots, state=state)
        # the guest's process, every thread (vCPUs and back-ends), to the
        # nanosecond: os.times() counts 10 ms ticks, which an idle guest's
        # few wake-ups a second seldom reach
        info["cpu_s"] = round(time.process_time(), 6)
        if dom is not None:
            io = {"disk_read_bytes": 0, "disk_write_bytes": 0, "net_rx_bytes": 0, "net_tx_bytes": 0}
            for be in dom.backends:
                st = be.stats
                if be.kind == "vbd":
                    io["disk_read_bytes"] += st["bytes_read"]
                    io["disk_write_bytes"] += st["bytes_written"]
                elif be.kind == "vif":           # rx: to the guest, tx: from it (netback's view)
                    io["net_rx_bytes"] += st["rx_bytes"]
                    io["net_tx_bytes"] += st["tx_bytes"]
            info["io"] = io
            info["vcpus_online"] = dom.online_vcpus()
            # the balloon: what the guest was asked to hold, what it holds,
            # and what its RAM takes on the host now
            target = dom.store.read_str(f"{dom.channels.dom_path}/memory/target", "0")
            info.update(memory_target_mib=int(target) >> 10 if target.isdigit() else None,
                        memory_current_mib=dom.nr_pages >> 8,
                        memory_host_mib=dom.ram.allocated_bytes() >> 20)
        return info

    def mem_set(self, size: int) -> str | None:
        """As `xl mem-set`: the new balloon target in xenstore; None, or why not."""
        from pyvmm.cli import MIN_MEMORY

        if self.dom is None:
            return "the guest is being built; try again in a moment"
        top = self.dom.max_pages << 12
        if size > top:
            return f"{size >> 20} MiB is above the guest's maximum of {top >> 20} MiB"
        if size < MIN_MEMORY:
            return f"{size >> 20} MiB is below the {MIN_MEMORY >> 20} MiB a PV guest needs"
        self.dom.store.write(f"{self.dom.channels.dom_path}/memory/target", str(size >> 10))
        return None

    def vcpu_set(self, count: int) -> str | None:
        """As `xl vcpu-set`: cpu/N/availability "online" for the first
        `count` vCPUs, "offline" for the rest; the guest's hotplug watcher
        acts on it.  None, or why not."""
        if self.dom is None:
            return "the guest is being built; try again in a moment"
        most = self.dom.nr_vcpus
        if not 1 <= count <= most:
            return (f"{count} vCPUs: this guest can have 1 to {most} (start it with --vcpus N,max=M "
                    f"or maxvcpus= for more)")
        with self.dom.store.transaction() as t:
            for n in range(most):
                self.dom.store.write(f"{self.dom.channels.dom_path}/cpu/{n}/availability",
                                     "online" if n < count else "offline", t)
        return None

    def set_limits(self, limits, group) -> None:
        self._static["limits"] = {"cpu_weight": limits.cpu_weight, "cpu_cap": limits.cpu_cap,
                                  "memory_limit_mib": None if limits.memory_max is None
                                  else limits.memory_max >> 20}
        self._static["cgroup"] = group.describe()

    def pause(self) -> str | None:
        """As `xl pause`; None, or why not."""
        if self.dom is None:
            return "the guest is being built; try again in a moment"
        if not self.dom.pause(wait=PAUSE_WAIT_S):
            return f"the guest's vCPU did not stop within {PAUSE_WAIT_S:.0f} s"
        return None

    def unpause(self) -> str | None:
        if self.dom is None:
            return "the guest is being built; try again in a moment"
        self.dom.unpause()
        return None

    def shutdown(self, reason: str) -> None:
        # what `xl shutdown` does: the guest's xenbus watches control/shutdown
        dom = self.dom
        if dom is not None:
            dom.store.write(f"{dom.channels.dom_path}/control/shutdown", reason)

    def destroy(self) -> None:
        self.destroy_requested = True
        if self.dom is not None:
            self.dom.stop()

    def send_console_input(self, data: bytes) -> None:
        if self.dom is not None:
            self.dom.send_console_input(data)


def launch(*, name, memory, kernel_path, disks=(), nets=(), ready=None, config=None, limits=None,
           **kw) -> int:
    """Boot the guest under a control socket named after it; `ready(None)`
    is called once the first boot has started (`ready(message)` if it
    could not), for --detach to release the waiting parent.  `config`:
    the xl config file it came from, for `pyvmm list`."""
    import uuid

    from pyvmm.control import ControlServer, NameInUse

    kw["uuid"] = kw.get("uuid") or str(uuid.uuid4())     # kept across reboots, as xl keeps it
    vcpus = kw.get("vcpus", (1, 1))
    guest = _GuestControl(name, memory, kernel_path, disks, nets, config=config, cmdline=kw.get("cmdline"),
                          on_reboot=kw.get("on_reboot"), uuid=kw.get("uuid"), vcpus=vcpus[0],
                          maxvcpus=vcpus[1])
    try:
        control = ControlServer(name, guest)
    except NameInUse:
        raise UserError(f"a guest named {name!r} is already running (pyvmm list): pick another "
                        f"--name, or stop it with 'pyvmm shutdown {name}'") from None
    group = None
    try:
        if limits is not None:
            from pyvmm.limits import GuestCgroup

            group = GuestCgroup.create(name, limits)     # this process: every thread of the guest
            if group is not None:
                guest.set_limits(limits, group)
        return _boot_loop(name=name, memory=memory, kernel_path=kernel_path, disks=disks, nets=nets,
                          guest=guest, control=control, ready=ready, **kw)
    finally:
        control.close()
        if group is not None:
            group.remove()


def _boot_loop(*, kernel_box, kernel_path, initrd, cmdline, memory, name, escape, on_reboot, verbose,
               disks, nets, guest, control, ready, uuid=None, memory_hint="--memory", rates=None,
               vcpus=(1, 1)) -> int:
    from pyvmm.backends.blkback import BlockBackend, xvd_name
    from pyvmm.backends.netback import NetBackend
    from pyvmm.toolchain import ToolchainError
    from pyvmm.vmm.kvm import KvmUnavailable
    from pyvmm.vmm.memory import release_free_heap
    from pyvmm.xen_abi.abi import ShutdownReason
    from pyvmm.xen_abi.boot.builder import BuildError
    from pyvmm.xen_abi.boot.loader import LoaderError, load_kernel
    from pyvmm.xen_abi.hypervisor.domain import Domain

    from pyvmm.vmm.kvm import Kvm

    logging.basicConfig(format="pyvmm: %(name)s: %(message)s",
                        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)])
    escape_byte = parse_escape(escape)
    try:
        kvm = Kvm(os.environ.get("PYVMM_KVM_DEVICE", "/dev/kvm"))
    except KvmUnavailable as e:
        _say(f"error: {e}")
        if ready is not None:
            ready(str(e))
        return ExitStatus.HOST_ERROR
    boots = 0
    while True:
        boots += 1
        guest.boots = boots
        t0 = time.monotonic()
        watch = _MilestoneWatch(t0)

        def show_console(data: bytes) -> None:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            control.console_output(data)
            for label, t in watch.feed(data):
                _say(f"{label} after {t:.2f} s")

        try:
            # the CLI's checked image for the first boot; a reboot reads
            # the file again, as xl does
            kernel = kernel_box.pop() if kernel_box else load_kernel(kernel_path)
            dom = Domain(kernel, ram_size=memory, cmdline=cmdline, initrd=initrd, kvm=kvm, name=name,
                         uuid=uuid, nr_vcpus=vcpus[1], vcpus_online=vcpus[0])
        except LoaderError as e:
            raise UserError(f"{kernel_path}: {e}") from None
        except BuildError as e:
            raise UserError(f"{kernel_path}: {e}; give more with {memory_hint}") from None
        except ToolchainError as e:           # no gcc and no prebuilt shim: the host's setup
            _say(f"error: {e}")
            if ready is not None:
                ready(str(e))
            return ExitStatus.HOST_ERROR
        # the loaded image (tens of MiB) is in guest RAM now: hold no copy of
        # it while the guest runs, and give the build's buffers back
        kernel = None
        release_free_heap()
        dom.on_console_output.add(show_console)
        rates = rates or {}
        disk_rates = rates.get("disks") or [(None, None)] * len(disks)
        net_rates = rates.get("nets") or [(None, None)] * len(nets)
        for index, image in enumerate(disks):
            dom.attach(BlockBackend(dom, index, image, limiter=_limiter(*disk_rates[index])))
        for index, (link, mac) in enumerate(nets):
            tx, rx = net_rates[index]
            dom.attach(NetBackend(dom, index, link, mac, tx_limiter=_limiter(tx), rx_limiter=_limiter(rx)))
        _say(f"booting {name}: {kernel_path} ({memory >> 20} MiB, cmdline {cmdline!r})"
             + "".join(f", {xvd_name(i)}={d.path}{' (ro)' if d.readonly else ''}"
                       for i, d in enumerate(disks))
             + "".join(f", eth{i}={link.name} ({mac})" for i, (link, mac) in enumerate(nets))
             + (f", boot #{boots}" if boots > 1 else ""))

        guest.dom = dom
        if guest.destroy_requested:            # asked for while the domain was being built
            dom.stop()
        if ready is not None and boots == 1:
            ready(None)
        detached = threading.Event()
        term = Terminal(escape=escape_byte)

        def pump_input() -> None:
            how = term.run(dom.send_console_input)
            if how == "escape":
                detached.set()
                dom.stop()

        with dom, term:
            feeder = threading.Thread(target=pump_input, name="console-input", daemon=True)
            feeder.start()
            previous = signal.signal(STATUS_SIGNAL, lambda *_: _status(dom, t0))
            try:
                result = dom.run(timeout=None)
            finally:
                signal.signal(STATUS_SIGNAL, previous)
                term.stop()
                guest.dom = None
        if detached.is_set():
            _say("left the console (escape key); guest destroyed")
            return ExitStatus.DETACHED
        if guest.destroy_requested:
            _say("guest destroyed (pyvmm destroy)")
            return ExitStatus.DETACHED

        elapsed = time.monotonic() - t0
        if result.reason == ShutdownReason.poweroff:
            _say(f"guest powered off after {elapsed:.1f} s")
            return ExitStatus.POWEROFF
        if result.reason == ShutdownReason.reboot:
            if on_reboot == "exit":
                _say(f"guest rebooted after {elapsed:.1f} s (--on-reboot=exit)")
                return ExitStatus.REBOOT
            _say("guest rebooted: building it again")
            continue
        _say(f"guest ended with {result.reason.name} after {elapsed:.1f} s")
        if result.crash_info:
            _say(f"crash details: {result.crash_info}")
        last = result.text.splitlines()[-10:]
        if last:
            _say("last console lines:")
            for line in last:
                print(f"    {line}", file=sys.stderr)
        return ExitStatus.CRASH


def _limiter(bytes_per_s=None, ops_per_s=None):
    """A fresh RateLimiter for one device queue (each boot), or None."""
    if not bytes_per_s and not ops_per_s:
        return None
    from pyvmm.backends.ratelimit import RateLimiter

    return RateLimiter(bytes_per_s, ops_per_s)


def _status(dom, t0: float) -> None:
    from pyvmm.xen_abi.hypervisor import trace
    try:
        text = trace.status_report(dom)
    except Exception as e:             # never let a status request hurt the guest
        text = f"(no status: {e})"
    _say(f"status after {time.monotonic() - t0:.1f} s ({STATUS_SIGNAL.name}):")
    print(text, file=sys.stderr, flush=True)


def _open_log(path) -> int:
    """The log for appending, never through a symbolic link left in its place."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link: remove it (pyvmm writes its log there)") from None
        raise UserError(f"cannot open the log {path}: {e.strerror}") from None


def _pump_log(source: int, path, out: int | None, limit: int = LOG_LIMIT) -> None:
    """Copy what comes through the pipe `source` (the detached guest's
    stdout and stderr) into the log until it closes, rotating the log at
    `limit` bytes.  A log that cannot be written loses lines rather than
    stop the pump: the guest's console output waits on this pipe."""
    size = os.fstat(out).st_size if out is not None else 0
    while data := os.read(source, 65536):
        if size + len(data) > limit:
            if out is not None:
                os.close(out)
            with contextlib.suppress(OSError):
                os.replace(path, f"{path}.1")
            try:
                out = _open_log(path)
            except UserError:
                out = None
            size = 0
        size += len(data)
        view = memoryview(data)
        try:
            while view and out is not None:
                view = view[os.write(out, view):]
        except OSError:
            pass


def run_detached(name: str, start) -> int:
    """Run start() in a background process (its own session, stdio into a
    log file kept under LOG_LIMIT); return once the guest has started, or
    with its one-line error."""
    from pyvmm.control import runtime_dir

    log = runtime_dir() / f"{name}.log"
    log_fd = _open_log(log)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        os.close(log_fd)
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode(errors="replace").strip()
        if msg == "ok":
            print(f"pyvmm: guest {name} started in the background (pid {pid}); "
                  f"'pyvmm console {name}' attaches, 'pyvmm shutdown {name}' stops it; log: {log}",
                  file=sys.stderr)
            return 0
        print_error(msg or f"the guest did not start; see {log}")
        return ExitStatus.USAGE
    # the child: no terminal, stdio through a pipe into the log, its own session
    os.close(r)
    rc = ExitStatus.HOST_ERROR
    pump = None
    try:
        os.setsid()
        pipe_out, pipe_in = os.pipe()
        pump = threading.Thread(target=_pump_log, args=(pipe_out, log, log_fd), name="pyvmm-log", daemon=True)
        pump.start()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(pipe_in, 1)
        os.dup2(pipe_in, 2)
        os.close(null)
        os.close(pipe_in)
        answered = False

        def ready(error: str | None) -> None:
            nonlocal answered
            if not answered:
                answered = True
                os.write(w, b"ok" if error is None else error.encode())
                os.close(w)

        try:
            rc = start(ready)
        except UserError as e:
            ready(str(e))
            print_error(str(e))
            rc = ExitStatus.USAGE
        except BaseException:
            import traceback
            traceback.print_exc()
            raise
        ready("the guest ended before it started")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if pump is not None:
            # stdio off the pipe: its last writer gone, the pump writes the rest and ends
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            pump.join(LOG_DRAIN_S)
        os._exit(int(rc))
