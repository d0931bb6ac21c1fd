"""Sample where a guest's shim entries come from, while it runs.

    sampler = EntrySampler(dom, interval_ms=0.5)     # symbols from the kernel's System.map
    sampler.label = "disk_read"                      # what the samples are filed under
    sampler.start(); ...; sampler.stop()
    print(sampler.table("disk_read"))

A thread reads the frame the shim saved for the vCPU's latest entry from the
guest (vector, hypercall number, guest rip, the kernel-text return addresses
on the guest stack) every interval.  Each distinct entry seen counts once, so
the shares are shares of *entries*, not of time; the shim's own counters give
the exact totals by kind, bench/cpl0_costs.py and bench/shim_costs.py the
price of each kind.  A sample taken after the shim already answered shows
the hypercall's result in rax, so a few entries are filed as "hypercall
(returning)" or under hypercall 0: read the callers column for those.

Used by bench/boot_profile.py (labels: boot phases) and bench/devices.py
--profile (labels: transfers).
"""
from __future__ import annotations

import collections
import struct
import threading

VECTOR_NAMES = {3: "#BP", 6: "#UD", 13: "#GP", 14: "#PF", 0xf0: "timer irq",
                0xf1: "event-check irq", 0x1000: "upcall"}
TOP_SHARE = 0.02        # rows below 2% of a label's samples are left out
STACK_WORDS = 16


def entry_kind(frame: dict) -> str:
    from pyvmm.xen_abi import abi
    from pyvmm.xen_abi.shim import layout
    vec = frame["vec"]
    if vec == layout.VEC_HYPERCALL:        # trace.guest_frame: rax is the number until it returns
        try:
            return "hypercall " + abi.Hypercall(frame["rax"]).name
        except ValueError:
            return "hypercall (returning)"
    if vec == layout.VEC_SYSCALL:
        return "syscall from user mode"
    return VECTOR_NAMES.get(vec, f"vector {vec:#x}")


def kernel_symbols(kernel_name: str, say=lambda msg: None):
    """Symbolizer for a Debian kernel image named vmlinuz-VERSION, or None."""
    from pyvmm.guests import debian
    from pyvmm.xen_abi.hypervisor import trace
    version = kernel_name.split("vmlinuz-", 1)[-1]
    say(f"symbols for {version}")
    system_map = debian.find_system_map(version=version)
    if system_map is None:
        say("no System.map: call sites stay unsymbolized")
        return None
    return trace.Symbolizer.from_file(system_map)


class EntrySampler:
    def __init__(self, dom, symbols=None, interval_ms: float = 0.5, vcpu: int = 0):
        self.dom, self.vcpu, self.interval = dom, vcpu, interval_ms / 1000
        self.name = (lambda a: symbols(a).split("+")[0]) if symbols else (lambda a: f"{a:#x}")
        self.is_text = symbols.is_text if symbols else (lambda a: False)
        self.label = ""
        self.sites: collections.Counter = collections.Counter()     # (label, kind, rip symbol)
        self.callers: collections.Counter = collections.Counter()   # (label, kind, return chain)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._done.clear()
        self._thread = threading.Thread(target=self._run, name="entry-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        from pyvmm.xen_abi.hypervisor import trace
        from pyvmm.xen_abi.memory.guest_va import GuestVirtualMemory
        from pyvmm.xen_abi.shim import layout
        dom = self.dom
        percpu = dom.region.vcpus[self.vcpu].percpu_off
        last = None
        while not self._done.wait(self.interval):
            label = self.label
            if label is None:           # not sampling now
                continue
            f = trace.guest_frame(dom, self.vcpu)
            key = (f["vec"], f["rip"], f["rsp"], f["r15"], f["rbx"])
            if key == last:
                continue
            last = key
            kind = entry_kind(f)
            self.sites[(label, kind, self.name(f["rip"]))] += 1
            cr3 = layout.PERCPU.read(dom.region.mem, percpu, "cr3_kernel")
            try:
                words = struct.unpack(f"<{STACK_WORDS}Q",
                                      GuestVirtualMemory(dom.phys, cr3).read(f["rsp"], 8 * STACK_WORDS))
                chain = " < ".join([self.name(w) for w in words if self.is_text(w)][:3]) or "?"
            except Exception:       # the stack moved or is not mapped in this view
                chain = "?"
            self.callers[(label, kind, chain)] += 1

    def total(self, label: str) -> int:
        return sum(n for (lb, *_), n in self.sites.items() if lb == label)

    def table(self, label: str) -> str:
        """The label's entry sites and their callers, shares of its samples."""
        total, out = self.total(label), []
        for title, counts in (("at", self.sites), ("called from", self.callers)):
            for (lb, kind, where), n in counts.most_common():
                if lb == label and total and n >= TOP_SHARE * total:
                    out.append(f"  {100 * n / total:5.1f}%  {kind:28s} {title} {where}")
        return "\n".join(out)
