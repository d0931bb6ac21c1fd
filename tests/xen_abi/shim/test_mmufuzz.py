"""The shim's counted page types under generated hypercall sequences
(issue 11): the mmufuzz test guest, checked by tests/mmufuzz.py's oracle
(I1-I4, recounted from scratch in an exit while the guest waits).

The CI slice: a few fixed seeds, a few hundred ops each.  Long runs:
bench/fuzz.py --surface shim-mmu.  A failing seed is minimised with
    python3 tests/mmufuzz.py --seed S --ops N --minimise [CLASS]
"""
from __future__ import annotations

import threading

import pytest

from mmufuzz import MARKER, check, run_seed
from pyvmm.guests.testguests import build_testguest
from pyvmm.xen_abi import abi
from pyvmm.xen_abi.hypervisor.domain import Domain

SEEDS = (1, 2, 3, 4, 5)
OPS = 600



@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_slice(seed):
    r = run_seed(seed, OPS, check_every=10)
    assert r.reason == abi.ShutdownReason.poweroff, r.summary()
    assert r.tail.rstrip().endswith("TESTGUEST mmufuzz: PASS"), r.summary()
    assert not r.violations, r.summary()
    assert r.ops_run == OPS and r.checks == OPS // 10 + 1, r.summary()
    # the sequence built tables and used them (a generator that only made
    # refused requests would check nothing)
    for kind in ("pt_update", "pin", "unpin", "new_baseptr", "new_user_baseptr", "update_va_mapping",
                 "copy_page", "clear_page"):
        assert r.stats[kind][0] > 0, (kind, r.stats)


def test_oracle_sees_wrong_counts():
    """The oracle runs on the vCPU's thread while the guest waits, and
    finds a table count and a writable count that are off by one."""
    found = []
    with Domain(str(build_testguest("mmufuzz")), cmdline="seed=1 ops=0") as dom:
        def on_output(data: bytes) -> None:
            if not data.startswith(MARKER):
                return
            found.append(("thread", threading.get_native_id() == dom.vcpu_tids[0]))
            found.append(("clean", check(dom)))
            l4 = dom.layout.l4_pfn
            word = dom.page_types.word(l4)
            dom.region.mem.write_u32(dom.region.page_type_off + 4 * l4, word + 1)
            free = dom.region.ram_pages - 1       # past the builder's mapping: untouched
            dom.page_types.take_writable(free)
            found.append(("tampered", {cls for cls, _ in check(dom)}))
            dom.region.mem.write_u32(dom.region.page_type_off + 4 * l4, word)
            dom.page_types.drop_writable(free)

        dom.on_console_output.add(on_output)
        res = dom.run(timeout=60)
    assert res.reason == abi.ShutdownReason.poweroff, res.text
    assert found[:3] == [("thread", True), ("clean", []),
                         ("tampered", {"I1 table count wrong", "I2 writable count wrong"})], found


def reproduce(seed: int, ops: int, only: str, op: int, answer: str) -> None:
    """A minimised case of a hole the fuzzer found (fixed since): the run
    is clean, and the op that opened the hole got `answer` (so that the
    case still reaches it: a changed generator makes this a plain failure,
    to be re-minimised)."""
    r = run_seed(seed, ops, check_every=1, only=only, trace=True)
    assert r.ok, r.summary()
    lines = [t for t in r.trace if t.startswith(f"op {op} ") and " rc=" in t]
    assert lines and lines[-1].endswith(answer), (lines, r.summary())


def test_superpage_bit_added_to_a_present_entry():
    """mmu.c entry_update took no new reference when the new entry named
    the frame the old one did, and so did not check it: PS set on a
    present L2 entry was accepted (a writable user 2 MiB mapping of the
    frames around the table, page tables included).  Seed 1, op 184's
    batch starts with kernel L2[501] = the same frame |PS: -EINVAL now."""
    reproduce(1, 185, "95,184", 184, "rc=-22 done=0")


def test_xen_slots_forged_before_validation():
    """mmu.c install_hv_slots rewrote Xen's L4 slots 256..271 only when 256
    or 257 was wrong: COPY_PAGE of the live L4 (op 10), slot 258 (the
    shim's directmap) forged without RW (op 12), NEW_BASEPTR to it (op 15)
    was accepted with the forged slot, and the shim's next write faulted.
    Now the promotion writes all sixteen: op 15 succeeds, and the oracle
    finds the slots the shim's."""
    reproduce(29, 17, "10,12,15-16", 15, "rc=0")
