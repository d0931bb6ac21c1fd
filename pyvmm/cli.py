"""The `pyvmm` command.

    pyvmm --xen-pv KERNEL [--initrd FILE] [--cmdline STR] [--memory SIZE] [--name NAME]
          [--disk IMAGE[,ro][,rate=SIZE][,iops=N]]... [--net tap=NAME|bridge=BR[,mac=MAC][,rate=SIZE]]...
          [--cpu-weight N] [--cpu-cap PERCENT] [--memory-limit SIZE]
    pyvmm --default-guest          fetch and build the Debian guest, then boot it
    pyvmm ... --detach             boot it in the background
    pyvmm create FILE [KEY=VALUE]... [-c]   a guest from an xl config file (pyvmm/xlcfg.py)
    pyvmm list | console | shutdown | reboot | destroy | pause | unpause | mem-set | top |
          xenstore | completion ...      (pyvmm/manage.py)

Every user mistake ends in one line on stderr saying what is wrong and what to
do, and exit status ExitStatus.USAGE (pyvmm/errors.py); the guest's own fate
maps to the exit status as documented in `ExitStatus`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from pyvmm import manage
from pyvmm.errors import ExitStatus, UserError, print_error

DEFAULT_MEMORY = 256 << 20
# noreplace-smp: see guests/default.py (halves a one-vCPU boot on kvm_pvm);
# so is the blkfront option (1 MiB disk requests: -24% CPL0 work per MiB)
# and the options that keep an idle guest asleep (IDLE_CMDLINE there)
DEFAULT_CMDLINE = ("console=hvc0 noreplace-smp xen_blkfront.max_indirect_segments=256 "
                   "tsc=nowatchdog sysctl.vm.compaction_proactiveness=0 psi=0 nowatchdog")
MIN_MEMORY = 16 << 20
MAX_MEMORY = 64 << 30
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_VCPUS = 8          # the VMM region's per-vCPU areas (xen_abi/memory/vmm_region.py)


def parse_size(text: str) -> int:
    """'256M', '1G', '1048576K', or plain MiB ('512')."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGkmg]?)(i?[Bb])?\s*", text)
    if not m:
        raise UserError(f"cannot read memory size {text!r}: use a number with K, M or G, e.g. 256M")
    value = int(m.group(1))
    unit = m.group(2).upper() or "M"
    return value << {"K": 10, "M": 20, "G": 30}[unit]


def parse_vcpus(text: str) -> tuple[int, int]:
    """'2' or '2,max=4': (vCPUs online at boot, the most the guest may have)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:,\s*max\s*=\s*(\d+)\s*)?", text)
    if not m:
        raise UserError(f"--vcpus {text!r}: give a number of vCPUs, e.g. --vcpus 2 or --vcpus 2,max=4")
    online = int(m.group(1))
    most = int(m.group(2)) if m.group(2) else online
    if not 1 <= online <= MAX_VCPUS or not 1 <= most <= MAX_VCPUS:
        raise UserError(f"--vcpus {text!r}: pyvmm gives a guest 1 to {MAX_VCPUS} vCPUs")
    if most < online:
        raise UserError(f"--vcpus {text!r}: max={most} is less than the {online} vCPUs to start with; "
                        f"give max={online} or more")
    return online, most


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyvmm",
        description="Run a stock Xen PV guest on KVM, without Xen.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--xen-pv", metavar="KERNEL", help="Xen PV kernel (bzImage or ELF vmlinux)")
    src.add_argument(
        "--default-guest",
        action="store_true",
        help="fetch Debian's cloud kernel and busybox, build an initramfs, boot it",
    )
    p.add_argument("--initrd", metavar="FILE", help="initial ramdisk")
    p.add_argument("--cmdline", metavar="STR", help=f"kernel command line (default {DEFAULT_CMDLINE!r})")
    p.add_argument("--memory", "-m", metavar="SIZE", default=None, help="guest RAM, e.g. 256M or 1G (default 256M)")
    p.add_argument("--name", metavar="NAME", default=None, help="guest name (default: from the kernel file)")
    p.add_argument("--vcpus", metavar="N[,max=M]", default=None,
                   help=f"virtual CPUs (default 1, at most {MAX_VCPUS}); max=M leaves room to add "
                        "more later with 'pyvmm vcpu-set' (xl's maxvcpus)")
    p.add_argument("--disk", metavar="IMAGE[,ro][,rate=SIZE][,iops=N]", action="append", default=[],
                   help="a raw disk image or block device for the guest: xvda, xvdb, ... in order; "
                        "',ro' attaches it read-only (repeat for more disks)")
    p.add_argument("--net", metavar="tap=NAME|bridge=BR[,mac=MAC][,rate=SIZE]", action="append", default=[],
                   help="a network interface (eth0, eth1, ... in order) on the host TAP device NAME "
                        "(created if missing; configure its address on the host), or on a TAP added "
                        "to the host bridge BR (both may be given); MAC defaults to a stable "
                        "00:16:3e address from the guest name")
    p.add_argument("--escape", metavar="KEY", default="^]", help="console escape key, ^X notation (default ^])")
    lim = p.add_argument_group("limits (a cgroup of the guest's own, pyvmm/limits.py)")
    lim.add_argument("--cpu-weight", type=int, metavar="N",
                     help="CPU share against other guests, as xl's cpu_weight (256 = as any other guest)")
    lim.add_argument("--cpu-cap", type=int, metavar="PERCENT",
                     help="at most this much CPU time, in percent of one CPU, as xl's cap (0: no cap)")
    lim.add_argument("--memory-limit", metavar="SIZE",
                     help="host memory the whole guest process may use (its RAM and pyvmm's own), e.g. 400M")
    p.add_argument(
        "--on-reboot",
        choices=("restart", "exit"),
        default="restart",
        help="when the guest reboots: rebuild and boot it again, or exit with status 3",
    )
    p.add_argument("--detach", "-d", action="store_true",
                   help="run the guest in the background once it has started; 'pyvmm console NAME' "
                        "attaches, 'pyvmm list' shows it (its log: <runtime dir>/NAME.log)")
    p.add_argument("--verbose", "-v", action="count", default=0, help="log hypercalls and exits (repeat for more)")
    return p


def _check_readable(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {path!r} does not exist: check the path")
    if p.is_dir():
        raise UserError(f"{what} {path!r} is a directory: give the file itself")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} {path!r} is not readable: check its permissions")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in manage.COMMANDS:
        return manage.main(argv)
    try:
        if argv and argv[0] == "create":
            return _create(argv[1:])
        return _run(build_parser().parse_args(argv))
    except UserError as e:
        print_error(str(e))
        return ExitStatus.USAGE
    except KeyboardInterrupt:
        print("pyvmm: interrupted", file=sys.stderr)
        return ExitStatus.DETACHED


def _run(args: argparse.Namespace) -> int:
    memory = parse_size(args.memory) if args.memory else DEFAULT_MEMORY
    if memory < MIN_MEMORY:
        raise UserError(f"--memory {args.memory} is too small: a PV guest needs at least {MIN_MEMORY >> 20}M")
    if memory > MAX_MEMORY:
        raise UserError(f"--memory {args.memory} is more than pyvmm supports ({MAX_MEMORY >> 30}G)")
    vcpus = parse_vcpus(args.vcpus) if args.vcpus else (1, 1)

    cmdline = args.cmdline
    if args.default_guest:
        from pyvmm.guests.default import build_default_guest

        guest = build_default_guest(progress=True)
        kernel_path, initrd_path = Path(guest.kernel), Path(guest.initrd)
        if cmdline is None:
            cmdline = guest.cmdline
        name = args.name or "debian"
    else:
        kernel_path = _check_readable(args.xen_pv, "kernel")
        initrd_path = _check_readable(args.initrd, "initrd") if args.initrd else None
        name = args.name or re.sub(r"[^A-Za-z0-9_.-]", "-", kernel_path.name)[:64] or "guest"
    if cmdline is None:
        cmdline = DEFAULT_CMDLINE
    if len(cmdline.encode()) > 1023:
        raise UserError("--cmdline is longer than the 1023 bytes a PV start_info can carry")
    if not NAME_RE.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    disks = [_parse_disk(spec) for spec in args.disk]
    from pyvmm.limits import Limits

    limits = Limits(cpu_weight=args.cpu_weight, cpu_cap=args.cpu_cap,
                    memory_max=parse_size(args.memory_limit) if args.memory_limit else None)
    return _boot(kernel_path=kernel_path, initrd_path=initrd_path, cmdline=cmdline, memory=memory, name=name,
                 disks=disks, nets=args.net, escape=args.escape, on_reboot=args.on_reboot,
                 verbose=args.verbose, detach=args.detach, limits=limits, vcpus=vcpus)


def build_create_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvmm create",
                                description="Start a guest from an xl config file, as xl create does.")
    p.add_argument("config", metavar="FILE", help="an xl domain config file (see xl-config.md)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="settings applied after the file, in its syntax (memory=512, 'extra=\"quiet\"')")
    p.add_argument("-c", dest="console", action="store_true", help="attach the console once it has started")
    p.add_argument("--escape", metavar="KEY", default="^]", help="console escape key for -c (default ^])")
    p.add_argument("--verbose", "-v", action="count", default=0, help="log hypercalls and exits")
    return p


def _create(argv: list[str]) -> int:
    """`pyvmm create FILE [KEY=VALUE ...] [-c]`, as `xl create`: the guest an
    xl config file describes (pyvmm/xlcfg.py), started in the background;
    -c then attaches its console (Ctrl-] leaves it running)."""
    from pyvmm import xlcfg
    from pyvmm.limits import Limits

    args = build_create_parser().parse_args(argv)
    cfg = xlcfg.load(args.config, args.overrides)
    for warning in cfg.warnings:
        print(f"pyvmm: warning: {warning}", file=sys.stderr)
    rc = _boot(kernel_path=cfg.kernel, initrd_path=cfg.ramdisk, cmdline=cfg.cmdline or DEFAULT_CMDLINE,
               memory=cfg.memory_bytes, name=cfg.name,
               disks=[{"path": str(d.path), "readonly": d.readonly, "rate": None, "iops": None} for d in cfg.disks],
               # xl's vif rate limits what the guest sends (netback's credit), not what it receives
               nets=[{"tap": v.vifname, "bridge": v.bridge, "mac": v.mac, "tx_rate": v.rate} for v in cfg.vifs],
               escape=args.escape, on_reboot=cfg.on_reboot_flag, verbose=args.verbose, detach=True,
               uuid=cfg.uuid, memory_hint=f"'memory' in {args.config}", config=str(cfg.source_path.resolve()),
               limits=Limits(cpu_weight=cfg.cpu_weight, cpu_cap=cfg.cap), vcpus=(cfg.vcpus, cfg.maxvcpus))
    if rc == 0 and args.console:
        return manage.main(["console", cfg.name, "--escape", args.escape])
    return rc


def _boot(*, kernel_path: Path, initrd_path: Path | None, cmdline: str, memory: int, name: str, disks: list,
          nets: list, escape: str, on_reboot: str, verbose: int, detach: bool, uuid: str | None = None,
          memory_hint: str = "--memory", config: str | None = None, limits=None,
          vcpus: tuple[int, int] = (1, 1)) -> int:
    """Check the kernel, open the disks and networks, then run the guest
    here or in the background."""
    if limits is not None:
        limits.check(memory)
    from pyvmm.control import GuestNotFound, request
    from pyvmm.xen_abi.boot.loader import LoaderError, load_kernel

    try:                # before the disks: theirs would be the confusing error (locked)
        _, sock = request(name, "info")
        sock.close()
        raise UserError(f"a guest named {name!r} is already running (pyvmm list): pick another name, "
                        f"or stop it with 'pyvmm shutdown {name}'")
    except (GuestNotFound, OSError, ValueError):
        pass
    try:
        # checked here, before anything starts; the first boot takes it from
        # the box, so no frame holds the image (tens of MiB) while it runs
        kernel_box = [load_kernel(kernel_path)]
    except LoaderError as e:
        raise UserError(f"{kernel_path}: {e}") from None
    initrd = initrd_path.read_bytes() if initrd_path else None

    net_specs = _net_specs(nets)
    # the rate limits go with each device to its back-end (launch.py)
    rates = {"disks": [(d["rate"], d["iops"]) for d in disks],
             "nets": [(n.get("tx_rate"), n.get("rx_rate")) for n in net_specs]}
    disks = _open_disks(disks)
    try:
        nets = _open_nets(net_specs, name)
    except BaseException:
        for d in disks:
            d.close()
        raise
    from pyvmm.launch import launch, run_detached

    def start(ready=None) -> int:
        return launch(kernel_box=kernel_box, kernel_path=kernel_path, initrd=initrd, cmdline=cmdline,
                      memory=memory, name=name, disks=disks, nets=nets, escape=escape, on_reboot=on_reboot,
                      verbose=verbose, ready=ready, uuid=uuid, memory_hint=memory_hint, config=config,
                      limits=limits, rates=rates, vcpus=vcpus)

    try:
        return run_detached(name, start) if detach else start()
    finally:
        for d in disks:
            d.close()
        for link, _mac in nets:
            link.close()


MAX_DISKS = 16
MAX_NICS = 8


def _parse_disk(spec: str) -> dict:
    """--disk IMAGE[,ro|,rw][,rate=SIZE][,iops=N] -> {path, readonly, rate, iops}."""
    path, *opts = spec.split(",")
    if not path:
        raise UserError(f"--disk {spec!r}: give the image's path")
    out = {"path": path, "readonly": False, "rate": None, "iops": None}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq and key in ("ro", "rw"):
            out["readonly"] = key == "ro"
        elif eq and key in ("rate", "iops") and value:
            out[key] = _rate(f"--disk {spec!r}", key, value)
        else:
            raise UserError(f"--disk {spec!r}: the options are ',ro', ',rw', ',rate=SIZE' (bytes per second, "
                            f"e.g. 20M) and ',iops=N'")
    return out


def _rate(where: str, key: str, value: str) -> int:
    """rate=SIZE (bytes per second: 20M) or iops=N, checked."""
    try:
        n = parse_size(value) if key == "rate" else int(value)
        if n <= 0:
            raise ValueError
    except (UserError, ValueError):
        raise UserError(f"{where}: {key}={value} is not a positive " +
                        ("size per second, e.g. rate=20M" if key == "rate" else "number of operations per second")) \
            from None
    return n


def _open_disks(specs: list[dict]) -> list:
    """Open (and lock) each disk spec (path, readonly); one line for any that cannot be used."""
    from pyvmm.backends.blkback import DiskError, DiskImage

    if len(specs) > MAX_DISKS:
        raise UserError(f"{len(specs)} disks: pyvmm attaches at most {MAX_DISKS} (xvda..xvdp)")
    disks = []
    try:
        for spec in specs:
            try:
                disks.append(DiskImage.open(spec["path"], readonly=spec["readonly"]))
            except DiskError as e:
                raise UserError(str(e)) from None
    except BaseException:
        for d in disks:
            d.close()
        raise
    return disks


def _parse_net(spec: str) -> dict:
    opts = {}
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in ("tap", "mac", "bridge", "rate") or key in opts:
            raise UserError(f"--net {spec!r}: use tap=NAME and/or bridge=BRIDGE, with optional ,mac=MAC "
                            f"and ,rate=SIZE (bytes per second each way, e.g. 10M)")
        opts[key] = value
    if "rate" in opts:
        opts["tx_rate"] = opts["rx_rate"] = _rate(f"--net {spec!r}", "rate", opts.pop("rate"))
    if not opts.keys() & {"tap", "bridge"}:
        raise UserError(f"--net {spec!r}: name the host TAP device or a bridge, e.g. --net tap=pyvmm0 "
                        f"or --net bridge=br0")
    return opts


def _net_specs(specs: list[str | dict]) -> list[dict]:
    return [_parse_net(s) if isinstance(s, str) else s for s in specs]


def _open_nets(specs: list[dict], guest_name: str) -> list:
    """Open each net spec (tap, bridge, mac: --net's options): [(link,
    mac)]; one line for any that cannot be used.  With a
    bridge and no TAP name the TAP is vif<pid>.<index> (xl's vif<domid>.<devid>,
    the pid standing for the domid: unique on the host), gone with pyvmm."""
    from pyvmm.backends.netback import NetError, TapDevice, default_mac, parse_mac

    if len(specs) > MAX_NICS:
        raise UserError(f"{len(specs)} network interfaces: pyvmm attaches at most {MAX_NICS}")
    nets = []
    try:
        for index, spec in enumerate(specs):
            opts = spec
            try:
                mac = parse_mac(opts["mac"]) if opts.get("mac") else default_mac(guest_name, index)
                if opts.get("bridge"):
                    TapDevice.check_bridge(opts["bridge"])      # before a TAP is made for it
                tap = TapDevice(opts.get("tap") or f"vif{os.getpid()}.{index}")
                nets.append((tap, mac))
                if opts.get("bridge"):
                    tap.join_bridge(opts["bridge"])
            except NetError as e:
                raise UserError(str(e)) from None
    except BaseException:
        for link, _mac in nets:
            link.close()
        raise
    return nets
