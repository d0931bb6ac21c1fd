"""Where a boot's shim entries come from: the cost model behind boot time.

    python bench/boot_profile.py [--memory 256M] [--interval-ms 0.5]

Boots the default guest once, in this process, and meanwhile samples the
frame the shim saved for its latest entry from the guest (vector, hypercall
number, guest rip and the kernel-text return addresses on the guest stack,
symbolized with the kernel's System.map from Debian's -dbg package).  Each
distinct entry seen counts once, so the shares are shares of *entries*, not
of time; the shim's own counters (exact, by kind) are printed beside them,
and bench/cpl0_costs.py gives the price of each kind on this machine.
The boot is cut into phases at console lines (early, alternatives, init,
late, userspace), because each phase has its own dominant cause.

A sample taken after the shim already answered shows the hypercall's
result in rax, so a few entries are attributed to hypercall 0
(set_trap_table, "returned 0"); read the callers column for those.
Figures, not pass/fail; progress on stderr, the tables on stdout.
"""
from __future__ import annotations

import argparse
import collections
import struct
import sys
import threading
import time

#: console text that starts each phase, in boot order
PHASES = (
    ("early", None),
    ("alternatives", b"x86/fpu: Enabled xstate"),      # then SMP alternatives patching
    ("init", b"Freeing SMP alternatives"),
    ("late", b"Freeing unused decrypted memory"),
    ("userspace", b"Run /init"),
)
VECTOR_NAMES = {3: "#BP", 6: "#UD", 13: "#GP", 14: "#PF", 0xf0: "timer irq",
                0xf1: "event-check irq", 0x1000: "upcall"}
TOP_SHARE = 0.02        # rows below 2% of a phase are left out
STACK_WORDS = 16


def say(msg: str) -> None:
    print(f"boot_profile: {msg}", file=sys.stderr, flush=True)


def entry_kind(frame: dict, abi, layout) -> str:
    vec = frame["vec"]
    if vec == layout.VEC_HYPERCALL:        # trace.guest_frame: rax is the number until it returns
        try:
            return "hypercall " + abi.Hypercall(frame["rax"]).name
        except ValueError:
            return "hypercall (returning)"
    if vec == layout.VEC_SYSCALL:
        return "syscall from user mode"
    return VECTOR_NAMES.get(vec, f"vector {vec:#x}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory", default="256M")
    p.add_argument("--interval-ms", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=1200.0)
    args = p.parse_args(argv)

    from pyvmm.cli import parse_size
    from pyvmm.guests import debian
    from pyvmm.guests.default import POWEROFF_PARAM, build_default_guest
    from pyvmm.xen_abi import abi
    from pyvmm.xen_abi.hypervisor import trace
    from pyvmm.xen_abi.hypervisor.domain import Domain
    from pyvmm.xen_abi.memory.guest_va import GuestVirtualMemory
    from pyvmm.xen_abi.shim import layout, priv

    guest = build_default_guest()
    version = guest.kernel.name.split("vmlinuz-", 1)[-1]
    say(f"symbols for {version}")
    system_map = debian.find_system_map(version=version)
    if system_map is None:
        say("no System.map: call sites stay unsymbolized")
    symbols = trace.Symbolizer.from_file(system_map) if system_map else None
    name = (lambda a: symbols(a).split("+")[0]) if symbols else (lambda a: f"{a:#x}")
    is_text = symbols.is_text if symbols else (lambda a: False)

    dom = Domain(guest.kernel.read_bytes(), ram_size=parse_size(args.memory),
                 cmdline=f"{guest.cmdline} {POWEROFF_PARAM}", initrd=guest.initrd.read_bytes())
    percpu = dom.region.vcpus[0].percpu_off
    phase = [0]
    sites: collections.Counter = collections.Counter()
    callers: collections.Counter = collections.Counter()
    counters_at: list[dict] = []
    done = threading.Event()

    recent = bytearray()        # the console's last few KiB: markers may span two writes

    def on_console(data: bytes) -> None:
        recent.extend(data)
        del recent[:-4096]
        nxt = phase[0] + 1
        if nxt < len(PHASES) and PHASES[nxt][1] in recent:
            counters_at.append(priv.read_counters(dom.region.mem, percpu))
            phase[0] = nxt
            say(f"phase {PHASES[nxt][0]}")

    def sample() -> None:
        last = None
        while not done.wait(args.interval_ms / 1000):
            f = trace.guest_frame(dom)
            key = (f["vec"], f["rip"], f["rsp"], f["r15"], f["rbx"])
            if key == last:
                continue
            last = key
            ph, kind = PHASES[phase[0]][0], entry_kind(f, abi, layout)
            sites[(ph, kind, name(f["rip"]))] += 1
            cr3 = layout.PERCPU.read(dom.region.mem, percpu, "cr3_kernel")
            try:
                words = struct.unpack(f"<{STACK_WORDS}Q",
                                      GuestVirtualMemory(dom.phys, cr3).read(f["rsp"], 8 * STACK_WORDS))
                chain = " < ".join([name(w) for w in words if is_text(w)][:3]) or "?"
            except Exception:       # the stack moved or is not mapped in this view
                chain = "?"
            callers[(ph, kind, chain)] += 1

    dom.on_console_output.add(on_console)
    sampler = threading.Thread(target=sample, name="boot-profile", daemon=True)
    t0 = time.monotonic()
    say("booting the default guest (a minute or more on kvm_pvm)")
    sampler.start()
    try:
        dom.run(timeout=args.timeout)
    finally:
        done.set()
        sampler.join()
        counters_at.append(priv.read_counters(dom.region.mem, percpu))
        dom.close()
    print(f"boot to poweroff {time.monotonic() - t0:.1f} s, {sum(sites.values())} entries sampled")

    prev: dict = {}
    for i, (ph, _marker) in enumerate(PHASES[:len(counters_at)]):
        exact = {k: n - prev.get(k, 0) for k, n in counters_at[i].items() if n - prev.get(k, 0)}
        prev = counters_at[i]
        total = sum(n for (p_, *_), n in sites.items() if p_ == ph)
        print(f"\n== {ph}: {total} entries sampled; shim counters: "
              + ", ".join(f"{k} {n}" for k, n in sorted(exact.items(), key=lambda kv: -kv[1])[:8]))
        for title, table in (("at", sites), ("called from", callers)):
            for (p_, kind, where), n in table.most_common():
                if p_ == ph and total and n >= TOP_SHARE * total:
                    print(f"  {100 * n / total:5.1f}%  {kind:28s} {title} {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
