"""Tracing and post-mortem for PV guests: where a guest died and why.

    sym = Symbolizer.from_file(system_map)   # the kernel's System.map, found by the caller
    tr = Tracer(dom, symbols=sym, log_slow=True)   # attach before dom.run()
    result = dom.run(timeout=60)
    print(tr.report(result))        # last console lines, registers, stack, events

What it records, without touching the shim's hot paths:
  * every slow hypercall (the ones that exit to Python): number, sub-op,
    arguments, result and the guest RIP that issued it (symbolized);
  * KVM exits by reason;
  * the last N of all that in a ring (``Tracer.events``).
On a crash the guest's register state is read from the frame the shim
saved on its own stack (the one it was handling when it gave up), and the
guest kernel stack is scanned for kernel text addresses (Debian kernels
use the ORC unwinder, not frame pointers, so like Linux's own "? sym"
lines this is a scan, not an unwind).

For Debian's kernels, guests/debian.py's ``find_system_map`` finds the real
System.map (their packages ship a stub).
"""
from __future__ import annotations

import bisect
import collections
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.xen_abi import abi
from pyvmm.xen_abi.memory import vmm_region as R
from pyvmm.xen_abi.shim.layout import FRAME, HC_FRAME, MAILBOX, VEC_HYPERCALL, VEC_SYSCALL, CrashKind

# How many stack words a crash report scans for return addresses.
STACK_SCAN_WORDS = 256
CRASH_TEXT = {CrashKind.NO_HANDLER_VEC: "no handler for vector",
              CrashKind.BOUNCE_UNWRITABLE_VEC: "bounce frame unwritable for vector",
              CrashKind.IRET_FRAME_UNREADABLE: "HYPERVISOR_iret frame unreadable",
              CrashKind.IRET_TO_USER_WITHOUT_L4: "iret to user without user L4",
              CrashKind.BOOT_TABLES_INVALID: "initial page tables failed validation",
              CrashKind.BAD_IRET_FRAME_VEC: "bad iret frame, fault vector"}
VECTOR_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
                8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                17: "#AC", 18: "#MC", 19: "#XM", 0x1000: "event upcall",
                VEC_SYSCALL: "syscall from user mode", VEC_HYPERCALL: "hypercall"}


def describe_crash(why: int) -> str:
    if why in CRASH_TEXT:
        return CRASH_TEXT[why]
    kind = CRASH_TEXT.get(why & ~0xFF)
    if kind is None:
        return f"crash code {why:#x}"
    vec = why & 0xFF
    return f"{kind} {vec} ({VECTOR_NAMES.get(vec, '?')})"


# ---------------------------------------------------------------- symbols
class Symbolizer:
    """Address -> "symbol+0xoff" from a System.map (text symbols only)."""

    TEXT_TYPES = frozenset("tTwW")

    def __init__(self, entries: list[tuple[int, str]]):
        entries = sorted(set(entries))
        self.addrs = [a for a, _ in entries]
        self.names = [n for _, n in entries]
        self.by_name = {n: a for a, n in entries}
        first, last = (self.addrs[0], self.addrs[-1] + 1) if self.addrs else (0, 0)
        # kernel text, plus init text (freed later, but where early boot runs)
        self.ranges = [(self.by_name.get("_stext", first), self.by_name.get("_etext", last))]
        if "_sinittext" in self.by_name and "_einittext" in self.by_name:
            self.ranges.append((self.by_name["_sinittext"], self.by_name["_einittext"]))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Symbolizer":
        data = Path(path).read_bytes()
        entries = []
        for line in data.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in cls.TEXT_TYPES:
                try:
                    entries.append((int(parts[0], 16), parts[2]))
                except ValueError:
                    continue
        if not entries:
            raise ValueError(f"{path}: no text symbols (a stub System.map?)")
        return cls(entries)

    def is_text(self, addr: int) -> bool:
        return any(lo <= addr < hi for lo, hi in self.ranges)

    def lookup(self, addr: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0 or not self.is_text(addr):
            return None
        return self.names[i], addr - self.addrs[i]

    def __call__(self, addr: int) -> str:
        hit = self.lookup(addr)
        if hit is None:
            return f"{addr:#x}"
        name, off = hit
        return f"{name}+{off:#x}" if off else name


# ---------------------------------------------------------------- tracing
@dataclass
class TraceEvent:
    t: float
    kind: str          # "hcall" | "exit" | "crash"
    text: str


def _hc_name(nr: int) -> str:
    try:
        return abi.Hypercall(nr).name
    except ValueError:
        return f"hypercall#{nr}"


@dataclass
class Tracer:
    """Attach to a Domain before run(): slow hypercalls, exits, crash dump.
    Listens through the domain's on_vcpu_exit and on_hypercall (listeners.py)."""
    domain: object
    symbols: Symbolizer | None = None
    log_slow: bool = False
    last_n: int = 64
    out: object = None                      # file for log_slow lines (stderr)
    events: collections.deque = field(init=False)
    exit_counts: collections.Counter = field(default_factory=collections.Counter)
    hcall_counts: collections.Counter = field(default_factory=collections.Counter)

    def __post_init__(self):
        self.events = collections.deque(maxlen=self.last_n)
        self.t0 = time.monotonic()
        self.domain.on_vcpu_exit.add(self._on_vcpu_exit)
        self.domain.on_hypercall.add(self._on_hypercall)

    def sym(self, addr: int) -> str:
        return self.symbols(addr) if self.symbols else f"{addr:#x}"

    def _emit(self, kind: str, text: str):
        ev = TraceEvent(time.monotonic() - self.t0, kind, text)
        self.events.append(ev)
        if self.log_slow and kind == "hcall":
            print(f"[{ev.t:9.4f}] {text}", file=self.out or sys.stderr, flush=True)

    def _on_vcpu_exit(self, ex) -> None:
        try:
            name = ex.reason.name
        except AttributeError:
            name = str(ex.reason)
        self.exit_counts[name] += 1

    def _on_hypercall(self, call) -> None:
        name = _hc_name(call.nr)
        sub = call.args[0] & 0xFFFFFFFF if call.args else None
        self.hcall_counts[(name, sub)] += 1
        if call.error is not None:
            outcome = f"{type(call.error).__name__}: {call.error}"
        else:
            outcome = call.result - (1 << 64) if call.result >= 1 << 63 else call.result
        self._emit("hcall", f"{name}({', '.join(hex(a) for a in call.args[:4])}) "
                            f"from {self.sym(call.rip)} -> {outcome}")

    # ---- post-mortem ----
    def guest_frame(self, vcpu: int = 0) -> dict:
        """The guest state the shim saved when it last entered from the guest."""
        return guest_frame(self.domain, vcpu)

    def report(self, result=None, console_lines: int = 25) -> str:
        return crash_report(self.domain, result, symbols=self.symbols, tracer=self,
                            console_lines=console_lines)

    def shim_counters(self, vcpu: int = 0) -> dict[str, int]:
        """What the shim handled without leaving the guest (shim/priv.c)."""
        return shim_counters(self.domain, vcpu)

    def summary(self) -> str:
        ex = ", ".join(f"{k}={v}" for k, v in self.exit_counts.most_common())
        hc = ", ".join(f"{n}/{s}={c}" for (n, s), c in self.hcall_counts.most_common())
        try:
            sc = ", ".join(f"{k}={v}" for k, v in sorted(self.shim_counters().items(), key=lambda kv: -kv[1]))
        except Exception as e:     # a shim without counters
            sc = f"unavailable ({e})"
        return f"KVM exits: {ex}\nslow hypercalls (name/sub-op=count): {hc}\nshim events: {sc}"


def shim_counters(domain, vcpu: int = 0) -> dict[str, int]:
    from pyvmm.xen_abi.shim import priv
    return priv.read_counters(domain.region.mem, domain.region.vcpus[vcpu].percpu_off)


HC_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


def guest_frame(domain, vcpu: int = 0) -> dict:
    """The registers of the shim's latest entry from the guest.  A hypercall
    from guest kernel mode saves only some (layout.HC_FRAME); the others are
    None then, and err is 0."""
    mem, top = domain.region.mem, domain.region.vcpus[vcpu].stack_block_off + R.STACK_TOP
    f = {name: FRAME.read(mem, top - FRAME.size, name) for name in FRAME.fields}
    if f["vec"] != VEC_HYPERCALL:
        return f
    base = top - HC_FRAME.size
    lean = {name: None for name in FRAME.fields}
    lean.update({name: HC_FRAME.read(mem, base, name)
                 for name in ("r11", "rcx", "vec", "rax", "rip", "cs", "rflags", "rsp", "ss")})
    lean.update({reg: HC_FRAME.read(mem, base, "args", i) for i, reg in enumerate(HC_ARG_REGS)})
    lean["err"] = 0
    return lean


def _stack_scan(domain, frame: dict, symbols: Symbolizer | None, words: int) -> list[str]:
    from pyvmm.xen_abi.memory.guest_va import GuestVirtualMemory
    mb = domain.region.mailbox_gpa(0)
    cr3 = MAILBOX.read(domain.phys, mb, "cr3") or getattr(domain.layout, "l4_pfn", 0) << 12
    vm = GuestVirtualMemory(domain.phys, cr3)
    out = []
    sp = frame["rsp"]
    for i in range(words):
        try:
            w = int.from_bytes(vm.read(sp + 8 * i, 8), "little")
        except Exception:
            break
        if symbols is not None and symbols.is_text(w):
            out.append(f"  [{sp + 8 * i:#x}] ? {symbols(w)}")
    return out


def status_report(domain, *, symbols: Symbolizer | None = None) -> str:
    """A live guest's state for a human asking "is it alive?": exits to
    Python so far, what the shim handled (counts that keep rising mean the
    guest is running), the pending/mask bits and where the guest last
    entered the shim.  Reads guest memory only; safe while the vCPU runs."""
    lines = [f"exits to Python: {domain.slow_exits} slow hypercalls; "
             + ", ".join(f"{k}={v}" for k, v in domain.exit_counts.most_common(8))]
    try:
        sc = shim_counters(domain)
        lines.append("shim events: " + ", ".join(
            f"{k}={v}" for k, v in sorted(sc.items(), key=lambda kv: -kv[1])[:10]))
    except Exception as e:     # a shim without counters
        lines.append(f"shim events: unavailable ({e})")
    try:
        lines.append(domain.channels.console_server.describe())
    except Exception as e:
        lines.append(f"console ring: no state ({e})")
    lines += crash_report(domain, symbols=symbols, console_lines=0).splitlines()
    for be in getattr(domain, "backends", []):
        try:
            lines.append("device " + be.describe())
        except Exception as e:      # a report must not fail on one device
            lines.append(f"device {getattr(be, 'name', be)}: no state ({e})")
    return "\n".join(lines)


def crash_report(domain, result=None, *, symbols: Symbolizer | None = None, tracer=None,
                 console_lines: int = 25) -> str:
    """Text for a human: last console lines, where the guest died, its
    registers, a symbolized stack scan and the last traced events."""
    sym = symbols or (lambda a: f"{a:#x}")
    lines = []
    if console_lines > 0:
        con = bytes(getattr(result, "console", None) or domain.console).decode(errors="replace")
        lines.append(f"--- last {console_lines} console lines ---")
        lines += con.splitlines()[-console_lines:]
    if result is not None:
        lines.append(f"--- result: {getattr(result.reason, 'name', result.reason)} "
                     f"after {result.elapsed:.2f} s, {result.slow_exits} slow exits ---")
        ci = result.crash_info
        if ci:
            lines.append(f"shim: {describe_crash(ci['info'])} at {sym(ci['rip'])} "
                         f"(rip {ci['rip']:#x}, err/info2 {ci['info2']:#x})")
    for v in range(len(getattr(domain.region, "vcpus", [None]))):
        lines += _vcpu_state(domain, v, symbols, sym)
    if tracer is not None:
        lines.append(f"--- last {len(tracer.events)} traced events ---")
        lines += [f"[{e.t:9.4f}] {e.kind}: {e.text}" for e in tracer.events]
        lines.append(tracer.summary())
    return "\n".join(lines)


def _vcpu_state(domain, v: int, symbols, sym) -> list[str]:
    """Where vCPU v last entered the shim, its registers, its vcpu_info
    bits, its SMP state (several vCPUs) and a stack scan."""
    lines = []
    try:
        f = guest_frame(domain, v)
    except Exception as e:       # region gone: report what we have
        return [f"(vCPU {v}: no register state: {e})"]
    many = len(domain.region.vcpus) > 1
    lines.append(f"--- {'vCPU %d: ' % v if many else ''}guest state at last shim entry (vector {f['vec']:#x} "
                 f"{VECTOR_NAMES.get(f['vec'], '')}) ---")
    lines.append(f"RIP {f['cs']:04x}:{f['rip']:#018x} {sym(f['rip'])}")
    lines.append(f"RSP {f['ss']:04x}:{f['rsp']:#018x} RFLAGS {f['rflags']:#x} ERR {f['err']:#x}")
    regs = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15"]
    for i in range(0, len(regs), 3):
        lines.append("  ".join(f"{r.upper():>3} " + (f"{f[r]:#018x}" if f[r] is not None
                                                         else "(not saved)".ljust(18))
                               for r in regs[i:i + 3]))
    gpa = domain.evtchn.vcpu_info_gpa(v) if hasattr(domain, "evtchn") else None
    if gpa is None:
        gpa = domain.region.shared_info_gpa + v * 64
    vi = domain.phys.read(gpa, 24)
    lines.append(f"vcpu_info: pending {vi[0]} mask {vi[1]} cr2 {int.from_bytes(vi[16:24], 'little'):#x}")
    if many:
        from pyvmm.xen_abi.shim.layout import EVENTS
        ev = {k: EVENTS.read(domain.region.mem, domain.region.vcpus[v].events_off, k)
              for k in ("online", "in_exit", "flush_req", "flush_done", "flushes", "polls", "ipi_sends")}
        lines.append("smp: " + ", ".join(f"{k} {val}" for k, val in ev.items()))
    if symbols is not None:
        lines.append("--- stack scan (text addresses) ---")
        lines += _stack_scan(domain, f, symbols, STACK_SCAN_WORDS)[:40]
    return lines
