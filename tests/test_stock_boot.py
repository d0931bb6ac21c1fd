"""Boot Debian's stock 6.1 cloud kernel (Xen PV, no hypercall page, LZ4
bzImage) under pyvmm and check how far it gets, milestone by milestone.

MILESTONES lists console lines of a healthy Xen PV boot in the order they
appear.  REQUIRED is how many of them this tree must reach; raise it as
the boot gets further, never lower it.  Each milestone must appear after
the previous one in the console output.

The boot is slow on kvm_pvm (every shim instruction is interpreted: the
~100 000 emulated `in`s of quick_pit_calibrate alone cost ~35 s), hence
the generous timeout (the guest is then judged by its console).  Run alone with:
    python -m pytest -q -m slow tests/test_stock_boot.py
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyvmm.xen_abi import priv, trace

CMDLINE = "earlyprintk=xen console=hvc0 loglevel=8"
RAM_MB = 256
# kvm_pvm reaches the root-mount panic after ~50 s alone (x2-3 under load)
BOOT_TIMEOUT_PVM, BOOT_TIMEOUT_FAITHFUL = 300.0, 900.0

# (name, regex) in boot order
MILESTONES = [
    ("xen_start_kernel", r"Linux version 6\.1\.\S+"),
    ("xen detected", r"Hypervisor detected: Xen PV"),
    ("start_kernel", r"Kernel command line: .*earlyprintk=xen"),
    ("event channels", r"xen:events: Using 2-level ABI"),
    ("hvc0", r"printk: console \[hvc0\] enabled"),
    ("xen clocksource", r"clocksource: xen: mask"),
    ("xen timer", r"installing Xen timer for CPU 0"),
    ("grant tables", r"xen:grant_table: Grant tables using version 1 layout"),
    ("balloon", r"xen:balloon: Initialising balloon driver"),
    # without an initrd the kernel then tries (and fails) to mount a root fs
    ("root mount", r"VFS: Cannot open root device|Run /init as init process"),
    ("init", r"Run /init as init process"),
]
REQUIRED = 10    # through "root mount" (no initrd yet: ends in the VFS panic)


def _milestones_in_order(text: str) -> list[str]:
    """Names of the milestones reached, each after the previous one."""
    reached, pos = [], 0
    for name, rx in MILESTONES:
        m = re.compile(rx, re.M).search(text, pos)
        if m is None:
            break
        reached.append(name)
        pos = m.end()
    return reached


def test_milestone_order_checker():
    """The checker itself: order matters and gaps stop the count."""
    ok = ("Linux version 6.1.0-x\nHypervisor detected: Xen PV\n"
          "Kernel command line: earlyprintk=xen console=hvc0\n")
    assert _milestones_in_order(ok) == ["xen_start_kernel", "xen detected", "start_kernel"]
    swapped = ("Hypervisor detected: Xen PV\nLinux version 6.1.0-x\n"
               "Kernel command line: earlyprintk=xen\n")
    assert _milestones_in_order(swapped) == ["xen_start_kernel"]
    assert _milestones_in_order("nothing") == []


def test_priv_header_matches():
    """xen_abi/priv.py mirrors shim/priv.h."""
    hdr = (Path(priv.__file__).parent / "shim" / "priv.h").read_text()
    defs = {m.group(1): int(m.group(2), 0)
            for m in re.finditer(r"#define (PRIV_\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", hdr)}
    assert defs, "no PRIV_* numbers in priv.h"
    for name, value in defs.items():
        assert getattr(priv, name) == value, name
    for name in ("PRIV_CNT_N",):
        assert getattr(priv, name) == priv.PRIV_CNT_HCALL + priv.PRIV_CNT_NR_HCALL


def test_symbolizer_on_a_small_map(tmp_path):
    m = tmp_path / "System.map"
    m.write_text("ffffffff81000000 T _stext\nffffffff81000100 T foo\nffffffff81000200 t bar\n"
                 "ffffffff81000300 T _etext\nffffffff82000000 D some_data\n")
    s = trace.Symbolizer.from_file(m)
    assert s(0xffffffff81000104) == "foo+0x4"
    assert s(0xffffffff81000200) == "bar"
    assert s(0xffffffff82000010) == "0xffffffff82000010"   # data, not text
    stub = tmp_path / "stub.map"
    stub.write_text("ffffffffffffffff B The real System.map is in the linux-image-x-dbg package\n")
    with pytest.raises(ValueError):
        trace.Symbolizer.from_file(stub)


@pytest.mark.slow
@pytest.mark.faithful
def test_debian_cloud_kernel_boots():
    from pyvmm.guests.debian import cloud_kernel
    from pyvmm.xen_abi.domain import Domain, DomainTimeout, is_kvm_pvm

    k = cloud_kernel(progress=False)
    smap = trace.find_system_map(k, fetch=False)
    sym = trace.Symbolizer.from_file(smap) if smap else None
    with Domain(str(k.vmlinuz), ram_size=RAM_MB << 20, cmdline=CMDLINE) as dom:
        tr = trace.Tracer(dom, symbols=sym, last_n=40)
        result = None
        try:
            result = dom.run(timeout=BOOT_TIMEOUT_PVM if is_kvm_pvm() else BOOT_TIMEOUT_FAITHFUL)
        except DomainTimeout:
            pass   # a guest still running at the deadline is judged by its console
        text = dom.console.decode(errors="replace")
        reached = _milestones_in_order(text)
        report = tr.report(result)
    print(f"milestones reached: {reached}")
    print(report)
    need = [n for n, _ in MILESTONES[:REQUIRED]]
    assert reached[:REQUIRED] == need, (
        f"stopped after {reached[-1] if reached else 'nothing'}; "
        f"expected through {need[-1]}\n{report}")
