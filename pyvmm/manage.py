"""`pyvmm list | console NAME | shutdown NAME | reboot NAME | destroy NAME |
pause NAME | unpause NAME | mem-set NAME SIZE | vcpu-set NAME N | top | xenstore NAME ... |
completion bash`: the running guests, through their control sockets
(pyvmm/control.py), as `xl` manages domains."""
from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

from pyvmm import top, xenstore_access
from pyvmm.control import GuestNotFound, list_guests, request
from pyvmm.errors import ExitStatus, UserError, print_error
from pyvmm.terminal import Terminal, parse_escape

COMMANDS = ("list", "console", "shutdown", "reboot", "destroy", "pause", "unpause", "mem-set", "vcpu-set", "top",
            "xenstore", "completion")
DEFAULT_SHUTDOWN_WAIT_S = 60.0
DESTROY_WAIT_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvmm", description="Manage running pyvmm guests.")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="the running guests")
    fmt = ls.add_mutually_exclusive_group()
    fmt.add_argument("--json", "-l", "--long", action="store_true",
                     help="one JSON array, an object per guest: what its control socket reports, "
                          "its settings (and config file) included, as xl list -l")
    fmt.add_argument("--names", action="store_true", help="only the names, one per line (for scripts)")
    c = sub.add_parser("console", help="attach to a guest's console (Ctrl-] leaves it running)")
    c.add_argument("name")
    c.add_argument("--escape", metavar="KEY", default="^]", help="key that leaves the console (default ^])")
    s = sub.add_parser("shutdown", help="ask a guest to power off (or reboot), as xl shutdown does")
    s.add_argument("name")
    s.add_argument("--reboot", "-r", action="store_true", help="ask it to reboot instead")
    s.add_argument("--wait", "-w", type=float, nargs="?", const=DEFAULT_SHUTDOWN_WAIT_S, default=None,
                   metavar="SECONDS", help=f"wait until it is gone (default {DEFAULT_SHUTDOWN_WAIT_S:.0f} s)")
    r = sub.add_parser("reboot", help="ask a guest to reboot, as xl reboot does")
    r.add_argument("name")
    d = sub.add_parser("destroy", help="stop a guest at once (no shutdown inside it)")
    d.add_argument("name")
    for verb, what in (("pause", "stop a guest's vCPU and its clock; it keeps its memory and devices"),
                       ("unpause", "let a paused guest run again")):
        sub.add_parser(verb, help=what).add_argument("name")
    m = sub.add_parser("mem-set", help="set a guest's balloon target, as xl mem-set does")
    m.add_argument("name")
    m.add_argument("size", help="e.g. 128M or 1G (plain numbers are MiB)")
    v = sub.add_parser("vcpu-set", help="set how many vCPUs a guest has online, as xl vcpu-set does")
    v.add_argument("name")
    v.add_argument("count", type=int, help="vCPUs to keep online: 1 up to the guest's maximum")
    top.add_parser(sub)
    xenstore_access.add_parser(sub)
    sub.add_parser("completion", help="print a shell completion script: "
                                      "eval \"$(pyvmm completion bash)\"").add_argument("shell", choices=["bash"])
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"list": _list, "console": _console, "shutdown": _shutdown, "reboot": _reboot,
                "destroy": _destroy, "pause": _pause, "unpause": _pause, "mem-set": _mem_set, "vcpu-set": _vcpu_set,
                "top": top.main,
                "xenstore": xenstore_access.main, "completion": _completion}[args.command](args)
    except GuestNotFound as e:
        print_error(f"no guest named {e} is running ('pyvmm list' shows those that are)")
        return ExitStatus.USAGE
    except UserError as e:
        print_error(str(e))
        return ExitStatus.USAGE


def _list(args) -> int:
    guests = list_guests()
    if args.json:
        print(json.dumps(guests, indent=1, sort_keys=True))
        return 0
    if args.names:
        for g in guests:
            print(g["name"])
        return 0
    rows = [("NAME", "PID", "MEM(MiB)", "VCPUS", "STATE", "UPTIME", "BOOTS", "CONSOLES", "DEVICES")]
    # MEM: what the guest holds now, and its balloon target when that differs
    for g in guests:
        devices = ", ".join([f"disk {d}" for d in g.get("disks", [])] + [f"net {n}" for n in g.get("nets", [])])
        mem = str(g.get("memory_current_mib", g.get("memory_mib", "?")))
        if g.get("memory_target_mib") not in (None, g.get("memory_current_mib")):
            mem += f"->{g['memory_target_mib']}"
        vcpus = str(len(g["vcpus_online"])) if "vcpus_online" in g else str(g.get("vcpus", "?"))
        rows.append((g["name"], str(g["pid"]), mem, vcpus, g.get("state", "?"),
                     _duration(g.get("uptime_s", 0)),
                     str(g.get("boots", "?")), str(g.get("console_clients", 0)), devices or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _gone(name: str) -> bool:
    try:
        _, s = request(name, "info")
    except GuestNotFound:
        return True
    except (OSError, ValueError):
        return False
    s.close()
    return False


def _wait_gone(name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _check(reply: dict) -> None:
    if not reply.get("ok"):
        raise UserError(reply.get("error", "the guest's pyvmm refused"))


def _shutdown(args) -> int:
    reason = "reboot" if args.reboot else "poweroff"
    reply, s = request(args.name, "shutdown", reason=reason)
    s.close()
    _check(reply)
    if args.wait is None or args.reboot:
        print(f"pyvmm: asked {args.name} to {reason}", file=sys.stderr)
        return 0
    print(f"pyvmm: asked {args.name} to power off; waiting up to {args.wait:.0f} s", file=sys.stderr)
    if _wait_gone(args.name, args.wait):
        print(f"pyvmm: {args.name} is off", file=sys.stderr)
        return 0
    print(f"pyvmm: {args.name} is still running after {args.wait:.0f} s (its kernel may not handle "
          f"xenstore shutdown requests); 'pyvmm destroy {args.name}' stops it at once", file=sys.stderr)
    return ExitStatus.CRASH


def _completion(args) -> int:
    from pyvmm.completion import bash_script

    print(bash_script(), end="")
    return 0


def _reboot(args) -> int:
    args.reboot, args.wait = True, None
    return _shutdown(args)


def _pause(args) -> int:
    reply, s = request(args.name, args.command)
    s.close()
    _check(reply)
    print(f"pyvmm: {args.name} {'paused' if args.command == 'pause' else 'runs again'}", file=sys.stderr)
    return 0


def _mem_set(args) -> int:
    from pyvmm.cli import parse_size

    size = parse_size(args.size)
    reply, s = request(args.name, "mem_set", bytes=size)
    s.close()
    _check(reply)
    print(f"pyvmm: asked {args.name} to use {size >> 20} MiB (its balloon driver gives back or takes "
          f"the difference; 'pyvmm list' shows what it holds)", file=sys.stderr)
    return 0


def _vcpu_set(args) -> int:
    reply, s = request(args.name, "vcpu_set", count=args.count)
    s.close()
    _check(reply)
    print(f"pyvmm: asked {args.name} to run {args.count} vCPU(s) (its hotplug watcher takes the "
          f"others down or brings them up; 'pyvmm list -l' shows them)", file=sys.stderr)
    return 0


def _destroy(args) -> int:
    reply, s = request(args.name, "destroy")
    s.close()
    _check(reply)
    if not _wait_gone(args.name, DESTROY_WAIT_S):
        print(f"pyvmm: {args.name} did not stop within {DESTROY_WAIT_S:.0f} s", file=sys.stderr)
        return ExitStatus.CRASH
    print(f"pyvmm: {args.name} destroyed", file=sys.stderr)
    return 0


def _console(args) -> int:
    escape = parse_escape(args.escape)
    reply, sock = request(args.name, "console")
    _check(reply)
    sock.settimeout(None)
    print(f"pyvmm: attached to {args.name}'s console; {args.escape} leaves it running", file=sys.stderr)
    with sock, Terminal(escape=escape) as term:

        def guest_to_terminal():
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    term.stop()
                    return
                term.write(data)

        reader = threading.Thread(target=guest_to_terminal, name="console-output", daemon=True)
        reader.start()
        how = term.run(sock.sendall)
        if how == "eof":               # input ended (a pipe): keep showing output until the guest ends
            reader.join()
            how = "closed"
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    if how == "escape":
        print(f"\r\npyvmm: left {args.name}'s console; it keeps running", file=sys.stderr)
    else:
        print(f"\r\npyvmm: {args.name}'s console closed (the guest ended)", file=sys.stderr)
    return 0
