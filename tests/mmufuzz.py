"""Fuzzing the shim's counted page types (xen_abi/shim/mmu.c, issue 11)
through the mmufuzz test guest (guests/testguests/mmufuzz.c), which issues
a generated sequence of page-table hypercalls from a seed and stops every
few ops with a console_io write "MMUFUZZ CHECK op=N".  That write reaches
`Domain.on_console_output` on the vCPU thread, inside the exit (the guest
waits for it), so the frames and their type words are still: `check`
recounts every reference from scratch there and compares it with the
words the shim keeps (memory/page_types.py):

  I1  a validated table (L1..L4, count > 0) has count == pinned + the
      vCPUs' base pointers naming it + the present entries of validated
      tables of the level above that point at it;
  I2  a frame's present writable mappings in validated L1s, plus the
      writable references pyvmm holds (`held_writable`), equal its count
      when it is writable; a page table (count > 0) has none; a frame of
      no type or of a table type at count 0 has no mapping and no count;
  I3  a present entry of a validated L1 maps guest RAM or the region's
      guest frames; one of a validated L2..L4 points at a validated table
      of the level below, without PS; a validated L4's slots 256..271 hold
      the shim's own entries; a base pointer names a validated L4;
  I4  pinned implies a table type and count >= 1; count 0 not pinned.

    res = run_seed(seed=7, ops=300)      # a MmuFuzzRun: .violations, .stats, ...
    python3 tests/mmufuzz.py --seed 7 --ops 300 [--check 1] [--trace] [--minimise]

bench/fuzz.py's surface "shim-mmu" runs this with seeds from its engine
(`Harness`).
"""
from __future__ import annotations

import sys
from array import array
from collections import Counter
from dataclasses import dataclass, field

from guestfuzz import GuestFuzzRun, GuestHarness, arg_parser, cmdline, ddmin, ranges
from pyvmm.guests.testguests import build_testguest
from pyvmm.xen_abi import abi
from pyvmm.xen_abi.hypervisor.domain import Domain, ShimPanic
from pyvmm.xen_abi.memory import vmm_region as R
from pyvmm.xen_abi.memory.page_types import (PGT_COUNT_MASK, PGT_L1, PGT_L4, PGT_NONE, PGT_PINNED,
                                             PGT_TYPE_MASK, PGT_TYPE_SHIFT, PGT_WRITABLE, type_name)
from pyvmm.xen_abi.shim.layout import PERCPU

PTE_P, PTE_RW, PTE_PS = 0x1, 0x2, 0x80
PTE_ADDR = 0x000F_FFFF_FFFF_F000
HV_SLOTS = range(abi.HYPERVISOR_L4_FIRST_SLOT, abi.HYPERVISOR_L4_LAST_SLOT + 1)
GUEST_REGION_FRAMES = R.GUEST_MAPPABLE_END // R.PAGE
MARKER = b"MMUFUZZ CHECK op="


def held_writable(dom: Domain) -> Counter:
    """The writable references pyvmm itself holds while the guest waits in
    an exit: the console and xenstore rings (for the domain's life), and
    the frames of registered vcpu_info and time areas (no back-end is
    attached: no grant maps)."""
    held = Counter([dom.layout.console_pfn, dom.layout.xenstore_pfn])
    for st in dom.dispatcher.vcpus:
        if st.vcpu_info_registered:
            held[st.vcpu_info_gpa >> abi.PAGE_SHIFT] += 1
        held.update(st.time_area_frames)
    return held


def check(dom: Domain) -> list[tuple[str, str]]:
    """I1-I4 over the whole of the domain's RAM: what is wrong, as (class,
    frame by frame) pairs; empty when all hold."""
    reg = dom.region
    n = reg.ram_pages
    words = array("I", reg.mem.read(reg.page_type_off, 4 * n))
    ram = dom.ram.u64
    region_first = reg.gpa >> abi.PAGE_SHIFT
    hv_entries = reg.hypervisor_l4_entries()
    bad: list[tuple[str, str]] = []   # (class, what)

    def level(mfn: int) -> int:
        """The table level of a validated table, else 0."""
        w = words[mfn] if 0 <= mfn < n else 0
        t = (w & PGT_TYPE_MASK) >> PGT_TYPE_SHIFT
        return t if w & PGT_COUNT_MASK and PGT_L1 <= t <= PGT_L4 else 0

    refs = Counter()       # references each frame should hold as a table
    rw = Counter()         # writable mappings of each frame in validated L1s
    for mfn in range(n):
        w = words[mfn]
        t, count = (w & PGT_TYPE_MASK) >> PGT_TYPE_SHIFT, w & PGT_COUNT_MASK
        if w & PGT_PINNED:
            refs[mfn] += 1
            if not (PGT_L1 <= t <= PGT_L4 and count):
                bad.append(("I4 pinned, not a referenced table", f"frame {mfn:#x} pinned but {type_name(w)}"))
        if t > PGT_WRITABLE or (t == PGT_NONE and count):
            bad.append(("I4 impossible word", f"frame {mfn:#x} has word {w:#010x} ({type_name(w)})"))
        lvl = level(mfn)
        if not lvl:
            continue
        base = mfn * 512
        for i in range(512):
            e = ram[base + i]
            if not e & PTE_P:
                continue
            if lvl == PGT_L4 and i in HV_SLOTS:
                continue
            target = (e & PTE_ADDR) >> abi.PAGE_SHIFT
            where = f"L{lvl} {mfn:#x}[{i}] = {e:#x}"
            if lvl == PGT_L1:
                if not (target < n or region_first <= target < region_first + GUEST_REGION_FRAMES):
                    bad.append(("I3 L1 maps what is not the guest's", f"{where} maps a frame that is neither RAM nor the guest's region frames"))
                elif e & PTE_RW and target < n:
                    rw[target] += 1
                continue
            if e & PTE_PS:
                bad.append((f"I3 PS in a validated L{lvl}", f"{where} has PS (a superpage)"))
            if level(target) != lvl - 1:
                word = type_name(words[target]) if target < n else "not RAM"
                bad.append((f"I3 L{lvl} entry names no validated L{lvl - 1}", f"{where} points at a frame that is not a validated L{lvl - 1} ({word})"))
            else:
                refs[target] += 1
        if lvl == PGT_L4:
            for slot in HV_SLOTS:
                want = hv_entries.get(slot, 0)
                if ram[base + slot] != want:
                    bad.append(("I3 Xen slot of a validated L4 not the shim's", f"L4 {mfn:#x}[{slot}] = {ram[base + slot]:#x}, not the shim's {want:#x}"))
    for v in reg.vcpus:
        for name in ("cr3_kernel", "cr3_user"):
            cr3 = PERCPU.read(reg.mem, v.percpu_off, name)
            if not cr3:
                continue
            mfn = cr3 >> abi.PAGE_SHIFT
            refs[mfn] += 1
            if level(mfn) != PGT_L4:
                word = type_name(words[mfn]) if mfn < n else "not RAM"
                bad.append(("I3 base pointer names no validated L4", f"vCPU {v.index} {name} {cr3:#x} is not a validated L4 ({word})"))
    held = held_writable(dom)
    for mfn in range(n):
        w = words[mfn]
        t, count = (w & PGT_TYPE_MASK) >> PGT_TYPE_SHIFT, w & PGT_COUNT_MASK
        if level(mfn):
            if count != refs[mfn]:
                bad.append(("I1 table count wrong", f"L{t} {mfn:#x} count {count}, but {refs[mfn]} references "
                                                    f"(pinned {int(bool(w & PGT_PINNED))})"))
            if rw[mfn] or held[mfn]:
                bad.append(("I2 page table mapped writable", f"L{t} {mfn:#x} ({type_name(w)}) has {rw[mfn]} "
                                                            f"writable mappings, {held[mfn]} pyvmm writers"))
        elif t == PGT_WRITABLE:
            if count != rw[mfn] + held[mfn]:
                bad.append(("I2 writable count wrong", f"frame {mfn:#x} writable x{count}, but {rw[mfn]} writable "
                                                      f"mappings + {held[mfn]} pyvmm writers"))
        elif rw[mfn] or held[mfn] or count:
            bad.append(("I2 mapped writable, not typed writable", f"frame {mfn:#x} ({type_name(w)}) has {rw[mfn]} "
                                                                     f"writable mappings, {held[mfn]} pyvmm writers"))
        if refs[mfn] and not level(mfn):
            bad.append(("I1 referenced as a table, not one", f"frame {mfn:#x} ({type_name(w)}) is named by "
                                                               f"{refs[mfn]} references as a table"))
    return bad


@dataclass
class MmuFuzzRun(GuestFuzzRun):
    checks: int = 0
    # each class of violation seen: (the op count at the check that first saw it, what)
    violations: dict[str, tuple[int, str]] = field(default_factory=dict)
    frames: str = ""                      # the guest's "MMUFUZZ FRAMES" line

    @property
    def ok(self) -> bool:
        return (self.reason == abi.ShutdownReason.poweroff and not self.violations
                and self.tail.rstrip().endswith("TESTGUEST mmufuzz: PASS"))

    @property
    def first_bad_op(self) -> int | None:
        return min((op for op, _ in self.violations.values()), default=None)

    def finding(self) -> str:
        """One line that names the kind of failure (the classes), for
        grouping many runs' findings."""
        if self.violations:
            return "; ".join(sorted(self.violations))
        if self.reason == abi.ShutdownReason.poweroff:
            return "guest did not finish: " + self.tail.strip().splitlines()[-1][:120]
        return f"guest ended: {self.reason.name if self.reason is not None else '?'}"

    def summary(self) -> str:
        head = f"seed {self.seed}: {self.ops_run} ops, {self.checks} checks, {self.elapsed:.1f} s: "
        if self.ok:
            return head + "ok"
        lines = [head + self.finding()]
        for cls, (op, what) in sorted(self.violations.items(), key=lambda kv: kv[1][0]):
            lines.append(f"  after op {op}: {cls}: {what}")
        if not self.violations:
            lines.append(f"  crash {self.crash_info}; console: ...{self.tail[-300:]}")
        return "\n".join(lines)


def run_seed(seed: int, ops: int, check_every: int = 20, *, trace: bool = False, only: str | None = None,
             stop_at: str | None = None, timeout: float = 600.0) -> MmuFuzzRun:
    """One guest run: `ops` ops from `seed` (those named by `only`,
    "A-B,C"), checked every `check_every` ops and at the end; stopped at
    the first violation of class `stop_at` ("": any)."""
    out = MmuFuzzRun(seed, ops)
    last = [0]      # the op count at the last check
    with Domain(str(build_testguest("mmufuzz")), cmdline=cmdline(seed, ops, trace, only, check=check_every)) as dom:
        def on_output(data: bytes) -> None:
            if data.startswith(MARKER):
                out.checks += 1
                op = last[0] = int(data[len(MARKER):].split()[0])
                for cls, what in check(dom):
                    out.violations.setdefault(cls, (op, what))
                if stop_at is not None and any(stop_at in cls for cls in out.violations):
                    dom.stop()
            elif data.startswith(b"MMUFUZZ STATS"):
                out.take_stats(data)
            elif data.startswith(b"MMUFUZZ FRAMES"):
                out.frames = data.decode().strip()
            elif trace and data.startswith(b"op "):
                out.trace.append(data.decode().rstrip("\n"))

        dom.on_console_output.add(on_output)
        try:
            res = dom.run(timeout=timeout)
        except ShimPanic as e:      # the shim faulted in CPL0: what its tables let it reach broke
            out.violations.setdefault("shim fault", (last[0] + 1, str(e)))
            out.tail = dom.console.decode(errors="replace")[-2000:]
            return out
    out.reason, out.crash_info, out.elapsed = res.reason, res.crash_info, res.elapsed
    out.tail = res.text[-2000:]
    return out


def minimise(seed: int, ops: int, cls: str = "", log=print) -> tuple[int, str]:
    """The shortest prefix of the seed's ops that breaks an invariant of
    class `cls` ("": any; checked after every op), then ops dropped while
    it still does (ddmin).  Returns (ops, only)."""
    first = run_seed(seed, ops, 1, stop_at=cls)
    hits = [op for c, (op, _) in first.violations.items() if cls in c]
    if not hits:
        raise ValueError(f"seed {seed}, {ops} ops: no violation of {cls!r} to minimise\n{first.summary()}")
    n = min(hits)
    keep = list(range(n))
    log(f"prefix: {n} ops")

    def fails(subset: list[int]) -> bool:
        r = run_seed(seed, n, 1, only=ranges(subset), stop_at=cls)
        return any(cls in c for c in r.violations)

    return n, ranges(ddmin(keep, fails, log))


class InvariantViolation(AssertionError):
    """The page-type words disagree with the tables (or the guest died)."""


class Harness(GuestHarness):
    """bench/fuzz.py's surface "shim-mmu" (guestfuzz.GuestHarness)."""
    CHECK_EVERY = 25
    Failure = InvariantViolation

    def run(self, seed: int, ops: int) -> MmuFuzzRun:
        return run_seed(seed, ops, self.CHECK_EVERY)


def main(argv=None) -> int:
    ap = arg_parser("mmufuzz")
    ap.add_argument("--check", type=int, default=20, help="check every N ops")
    ap.add_argument("--minimise", metavar="CLASS", nargs="?", const="",
                    help="minimise the seed's first violation (of a class containing CLASS)")
    args = ap.parse_args(argv)
    if args.minimise is not None:
        n, only = minimise(args.seed, args.ops, args.minimise)
        args.ops, args.only, args.check, args.trace = n, only, 1, True
        print(f"minimal: --seed {args.seed} --ops {n} --only {only} --check 1 --trace")
    r = run_seed(args.seed, args.ops, args.check, trace=args.trace, only=args.only)
    print(r.frames)
    print("\n".join(r.trace))
    print(r.summary())
    print(r.stats_line())
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
