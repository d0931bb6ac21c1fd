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
import sys
import threading
import time

from entry_sampler import EntrySampler, kernel_symbols

#: console text that starts each phase, in boot order
PHASES = (
    ("early", None),
    ("alternatives", b"x86/fpu: Enabled xstate"),      # then SMP alternatives patching
    ("init", b"Freeing SMP alternatives"),
    ("late", b"Freeing unused decrypted memory"),
    ("userspace", b"Run /init"),
)


def say(msg: str) -> None:
    print(f"boot_profile: {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory", default="256M")
    p.add_argument("--interval-ms", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=1200.0)
    args = p.parse_args(argv)

    from pyvmm.cli import parse_size
    from pyvmm.guests.default import POWEROFF_PARAM, build_default_guest
    from pyvmm.xen_abi.hypervisor.domain import Domain
    from pyvmm.xen_abi.shim import priv

    guest = build_default_guest()
    symbols = kernel_symbols(guest.kernel.name, say)
    dom = Domain(guest.kernel.read_bytes(), ram_size=parse_size(args.memory),
                 cmdline=f"{guest.cmdline} {POWEROFF_PARAM}", initrd=guest.initrd.read_bytes())
    percpu = dom.region.vcpus[0].percpu_off
    sampler = EntrySampler(dom, symbols, args.interval_ms)
    sampler.label = PHASES[0][0]
    phase = [0]
    counters_at: list[dict] = []
    recent = bytearray()        # the console's last few KiB: markers may span two writes
    lock = threading.Lock()

    def on_console(data: bytes) -> None:
        with lock:
            recent.extend(data)
            del recent[:-4096]
            nxt = phase[0] + 1
            if nxt < len(PHASES) and PHASES[nxt][1] in recent:
                counters_at.append(priv.read_counters(dom.region.mem, percpu))
                phase[0] = nxt
                sampler.label = PHASES[nxt][0]
                say(f"phase {PHASES[nxt][0]}")

    dom.on_console_output.add(on_console)
    t0 = time.monotonic()
    say("booting the default guest (a minute or more on kvm_pvm)")
    sampler.start()
    try:
        dom.run(timeout=args.timeout)
    finally:
        sampler.stop()
        counters_at.append(priv.read_counters(dom.region.mem, percpu))
        dom.close()
    print(f"boot to poweroff {time.monotonic() - t0:.1f} s, {sum(sampler.sites.values())} entries sampled")

    prev: dict = {}
    for i, (ph, _marker) in enumerate(PHASES[:len(counters_at)]):
        exact = {k: n - prev.get(k, 0) for k, n in counters_at[i].items() if n - prev.get(k, 0)}
        prev = counters_at[i]
        print(f"\n== {ph}: {sampler.total(ph)} entries sampled; shim counters: "
              + ", ".join(f"{k} {n}" for k, n in sorted(exact.items(), key=lambda kv: -kv[1])[:8]))
        print(sampler.table(ph))
    return 0


if __name__ == "__main__":
    sys.exit(main())
