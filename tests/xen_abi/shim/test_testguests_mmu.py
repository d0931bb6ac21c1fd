"""Page tables and descriptor tables in the shim (xen_abi/shim/mmu.c),
exercised by tiny PV test guests: each ends with "TESTGUEST <name>: PASS"
or "...: FAIL <why>" and powers off; the guests also time the operations
with rdtsc ("<op>_cycles=N")."""
from __future__ import annotations

import re

import pytest

from pyvmm.guests.testguests import build_testguest
from pyvmm.xen_abi import abi
from pyvmm.xen_abi.hypervisor.domain import Domain


pytestmark = pytest.mark.faithful


def run_guest(name: str, timeout: float = 30.0, m2p_pfn_re: str | None = None):
    """Run test guest `name`; with m2p_pfn_re, also return the M2P entry of
    the frame the guest names in its output (read on the host)."""
    with Domain(str(build_testguest(name))) as dom:
        res = dom.run(timeout=timeout)
        tsc_khz = dom.vcpu.get_tsc_khz()
        m2p = None
        if m2p_pfn_re and (m := re.search(m2p_pfn_re, res.text)):
            m2p = dom.region.mem.read_u64(dom.region.m2p_off + 8 * int(m.group(1)))
    return res, tsc_khz, m2p


def assert_pass(name, res):
    lines = res.text.strip().splitlines()
    assert res.reason == abi.ShutdownReason.poweroff, (res.reason, res.crash_info, res.text)
    assert lines and lines[-1] == f"TESTGUEST {name}: PASS", res.text


def timings(res, khz, expect, capsys, label):
    m = {k: int(v) for k, v in re.findall(r"(\w+)_cycles=(\d+)", res.text)}
    assert set(m) == set(expect), res.text
    us = {k: v / (khz / 1000) for k, v in m.items()}
    with capsys.disabled():
        print(f"\n  {label} (us/op): " + ", ".join(f"{k} {v:.1f}" for k, v in us.items()))
    return m


def test_mmu_hypercalls(capsys):
    res, khz, m2p_entry = run_guest("mmu", m2p_pfn_re=r"m2p_pfn=(\d+)")
    assert_pass("mmu", res)
    m = timings(res, khz, {"null_hypercall", "mmu_update", "update_va_mapping", "mmuext_tlb_flush"}, capsys,
                "mmu hypercalls")
    assert all(v > 0 for v in m.values())
    # MACHPHYS_UPDATE reached the M2P
    assert m2p_entry == 0x12345, m2p_entry


def test_m2p_readable_by_guest_kernel():
    res, _, _ = run_guest("mmu_m2p")
    assert_pass("mmu_m2p", res)


def test_writable_page_tables(capsys):
    res, khz, _ = run_guest("ptwr")
    assert_pass("ptwr", res)
    timings(res, khz, {"ptwr_mov", "ptwr_xchg"}, capsys, "ptwr emulation")


def test_gdt_and_descriptors(capsys):
    res, khz, _ = run_guest("gdt")
    assert_pass("gdt", res)
    timings(res, khz, {"update_descriptor", "set_gdt"}, capsys, "descriptor tables")


def test_page_types_hostile_guest():
    """Xen's counted page types against a hostile guest (issue 11): forged
    tables, writable mappings of tables, pins, base pointers, counts."""
    res, _, _ = run_guest("pgtypes")
    assert_pass("pgtypes", res)


def test_stale_translations_across_type_changes():
    """A change of page type flushes stale translations (issue 11): a frame
    unmapped without a flush and then pinned cannot be written through its
    old mapping, and a released L1 made writable is not walked through."""
    res, _, _ = run_guest("stalepte")
    assert_pass("stalepte", res)
