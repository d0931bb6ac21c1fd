"""Grant tables v1 and v2: VMM-owned frames, seeding, back-end map/unmap/copy checks,
and the writable page-type references a back-end holds while it may write."""
from __future__ import annotations

import logging

import pytest

from pvfake import GNTTAB_GPA, GNTTAB_MAX_FRAMES, RAM_SIZE, FakeDomain
from pyvmm.xen_abi.abi import (
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_eagain,
    GNTST_no_space,
    GTF_accept_transfer,
    GTF_sub_page,
    GTF_transitive,
    GrantTransitiveV2,
    XenErrno as E,
    GNTST_bad_copy_arg,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_general_error,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    PAGE_SIZE,
)
from pyvmm.xen_abi.hypervisor import grant_table
from pyvmm.xen_abi.hypervisor.grant_table import GrantError, GrantTable
from pyvmm.xen_abi.memory.page_types import PGT_L1, PGT_TYPE_SHIFT, PGT_WRITABLE

FRAME = 0x300  # a guest RAM frame used as granted page
WRITABLE = PGT_WRITABLE << PGT_TYPE_SHIFT
L1_TABLE = PGT_L1 << PGT_TYPE_SHIFT | 1   # a validated L1, referenced once


@pytest.fixture
def dom():
    d = FakeDomain()
    yield d
    d.close()


def flags(gt, ref):
    return gt.read_entry(ref).flags


def test_setup_table_frames_are_stable_and_bounded(dom):
    gt = dom.gnttab
    base = GNTTAB_GPA >> 12
    assert gt.query_size() == (1, GNTTAB_MAX_FRAMES)
    assert gt.setup_table(1) == [base]
    assert gt.setup_table(4) == [base, base + 1, base + 2, base + 3]
    assert gt.query_size()[0] == 4
    assert gt.setup_table(2) == [base, base + 1], "asking for fewer does not move or shrink"
    assert gt.nr_frames == 4
    with pytest.raises(GrantError) as e:
        gt.setup_table(GNTTAB_MAX_FRAMES + 1)
    assert e.value.status == GNTST_general_error
    # the frames are in the VMM region, i.e. outside guest RAM
    assert all(f << 12 >= RAM_SIZE for f in gt.frame_gfns())


def test_seed_reserved_entries(dom):
    gt = dom.gnttab
    gt.seed_reserved(console_gfn=0x123, xenstore_gfn=0x456)
    c, x = gt.read_entry(0), gt.read_entry(1)
    assert (c.flags, c.domid, c.frame) == (GTF_permit_access, 0, 0x123)
    assert (x.flags, x.domid, x.frame) == (GTF_permit_access, 0, 0x456)
    # entries live in guest-visible memory at the first grant frame
    assert dom.phys.read(GNTTAB_GPA + 8, 8) == bytes([1, 0, 0, 0, 0x56, 0x04, 0, 0])


def test_map_write_and_flag_bookkeeping(dom):
    gt = dom.gnttab
    gt.write_entry(10, GTF_permit_access, 0, FRAME)
    m1 = gt.map(10, domid=0)
    assert flags(gt, 10) == GTF_permit_access | GTF_reading | GTF_writing
    m1.view[0:4] = b"ring"
    assert dom.ram.read(FRAME * PAGE_SIZE, 4) == b"ring", "zero-copy view of guest memory"
    m2 = gt.map(10, domid=0, readonly=True)
    assert m2.view.readonly and bytes(m2.view[0:4]) == b"ring"
    gt.unmap(m1)
    assert flags(gt, 10) == GTF_permit_access | GTF_reading, "writer gone, reader left"
    gt.unmap(m2.handle)
    assert flags(gt, 10) == GTF_permit_access
    with pytest.raises(GrantError) as e:
        gt.unmap(m2)
    assert e.value.status == GNTST_bad_handle
    assert gt.active_mappings() == 0


def test_map_refusals(dom):
    gt = dom.gnttab
    gt.write_entry(11, GTF_permit_access | GTF_readonly, 0, FRAME)
    with pytest.raises(GrantError) as e:
        gt.map(11, domid=0)  # writable map of a read-only grant
    assert e.value.status == GNTST_general_error
    assert flags(gt, 11) == GTF_permit_access | GTF_readonly, "a refusal leaves no flags behind"
    m = gt.map(11, domid=0, readonly=True)
    with pytest.raises(TypeError):
        m.view[0] = 1
    gt.unmap(m)
    gt.write_entry(12, GTF_permit_access, 5, FRAME)  # granted to domain 5, not us
    with pytest.raises(GrantError):
        gt.map(12, domid=0)
    gt.write_entry(13, 0, 0, FRAME)  # not granted at all
    with pytest.raises(GrantError):
        gt.map(13, domid=0)
    gt.write_entry(14, GTF_permit_access, 0, RAM_SIZE // PAGE_SIZE + 5)  # frame beyond RAM
    with pytest.raises(GrantError) as e:
        gt.map(14, domid=0)
    assert e.value.status == GNTST_bad_page
    assert flags(gt, 14) == GTF_permit_access
    gt.write_entry(15, GTF_permit_access, 0, GNTTAB_GPA >> 12)  # the grant table itself
    with pytest.raises(GrantError) as e:
        gt.map(15, domid=0)
    assert e.value.status == GNTST_bad_page


@pytest.mark.parametrize("ref", [-1, 512, 1 << 20, (1 << 32) - 1])
def test_wild_refs(dom, ref):
    gt = dom.gnttab  # one frame = 512 entries
    with pytest.raises(GrantError) as e:
        gt.map(ref, domid=0)
    assert e.value.status == GNTST_bad_gntref
    with pytest.raises(GrantError):
        gt.copy_from_guest(ref, 0, 8)


def test_refs_beyond_first_frame_after_growth(dom):
    gt = dom.gnttab
    with pytest.raises(GrantError):
        gt.map(600, domid=0)
    gt.setup_table(2)
    gt.write_entry(600, GTF_permit_access, 0, FRAME)
    assert dom.phys.read_u32(GNTTAB_GPA + 600 * 8 + 4) == FRAME
    gt.unmap(gt.map(600, domid=0))


def test_copy_helpers(dom):
    gt = dom.gnttab
    gt.write_entry(20, GTF_permit_access, 0, FRAME)
    gt.write_entry(21, GTF_permit_access | GTF_readonly, 0, FRAME + 1)
    gt.copy_to_guest(20, 100, b"payload")
    assert dom.ram.read(FRAME * PAGE_SIZE + 100, 7) == b"payload"
    assert gt.copy_from_guest(20, 100, 7) == b"payload"
    assert flags(gt, 20) == GTF_permit_access, "copies release their flags"
    with pytest.raises(GrantError) as e:
        gt.copy_to_guest(21, 0, b"x")
    assert e.value.status == GNTST_general_error
    dom.ram.write((FRAME + 1) * PAGE_SIZE, b"ro-data")
    assert gt.copy_from_guest(21, 0, 7) == b"ro-data"
    for off, n in ((PAGE_SIZE - 2, 4), (-1, 1), (0, PAGE_SIZE + 1)):
        with pytest.raises(GrantError) as e:
            gt.copy_from_guest(20, off, n)
        assert e.value.status == GNTST_bad_copy_arg


def test_guest_revocation_races_map(dom):
    """The guest ends access with cmpxchg(flags, GTF_permit_access -> 0); once it
    has, maps fail; while mapped, the flags carry GTF_reading so the guest's
    cmpxchg fails (that is how it knows the back-end still uses the page)."""
    gt = dom.gnttab
    gt.write_entry(30, GTF_permit_access, 0, FRAME)
    m = gt.map(30, domid=0, readonly=True)
    ok, seen = dom.phys.cmpxchg_u16(gt.entry_gpa(30), GTF_permit_access, 0)
    assert not ok and seen == GTF_permit_access | GTF_reading
    gt.unmap(m)
    ok, _ = dom.phys.cmpxchg_u16(gt.entry_gpa(30), GTF_permit_access, 0)
    assert ok
    with pytest.raises(GrantError):
        gt.map(30, domid=0)


def test_constructor_checks(dom):
    with pytest.raises(ValueError):
        GrantTable(dom.phys, GNTTAB_GPA + 1, page_types=dom.page_types)
    with pytest.raises(ValueError):
        GrantTable(dom.phys, GNTTAB_GPA, max_frames=100000, page_types=dom.page_types)


# ---- page types: a back-end never writes into a page table ----

def test_a_writable_map_holds_a_writable_reference_until_unmap(dom):
    gt, pt = dom.gnttab, dom.page_types
    gt.write_entry(40, GTF_permit_access, 0, FRAME)
    m1 = gt.map(40, domid=0)
    assert pt.word(FRAME) == WRITABLE | 1
    m2 = gt.map(40, domid=0)
    assert pt.word(FRAME) == WRITABLE | 2
    gt.unmap(m1)
    assert pt.word(FRAME) == WRITABLE | 1
    gt.unmap(m2)
    assert pt.word(FRAME) == WRITABLE, "nothing held; the type stays for the shim"


def test_read_only_maps_and_copies_take_no_reference(dom):
    gt, pt = dom.gnttab, dom.page_types
    gt.write_entry(41, GTF_permit_access, 0, FRAME)
    m = gt.map(41, domid=0, readonly=True)
    assert pt.word(FRAME) == 0
    gt.copy_from_guest(41, 0, 8)
    assert pt.word(FRAME) == 0
    gt.unmap(m)
    dom.types.set(FRAME, L1_TABLE)
    gt.unmap(gt.map(41, domid=0, readonly=True))      # reading a page table is fine
    assert pt.word(FRAME) == L1_TABLE


def test_a_page_table_is_not_mapped_writable(dom):
    gt, pt = dom.gnttab, dom.page_types
    gt.write_entry(42, GTF_permit_access, 0, FRAME)
    dom.types.set(FRAME, L1_TABLE)
    with pytest.raises(GrantError) as e:
        gt.map(42, domid=0)
    assert e.value.status == GNTST_general_error
    assert pt.word(FRAME) == L1_TABLE, "the word is left as it was"
    assert flags(gt, 42) == GTF_permit_access, "a refusal leaves no flags behind"
    assert gt.active_mappings() == 0


def test_a_copy_into_a_page_table_is_refused(dom):
    gt, pt = dom.gnttab, dom.page_types
    gt.write_entry(43, GTF_permit_access, 0, FRAME)
    gt.copy_to_guest(43, 0, b"data")
    assert pt.word(FRAME) == WRITABLE, "a copy holds the frame only while it writes"
    dom.types.set(FRAME, L1_TABLE)
    dom.ram.write(FRAME * PAGE_SIZE, bytes(8))
    with pytest.raises(GrantError) as e:
        gt.copy_to_guest(43, 0, b"forged PTE")
    assert e.value.status == GNTST_general_error
    assert dom.ram.read(FRAME * PAGE_SIZE, 8) == bytes(8)
    assert pt.word(FRAME) == L1_TABLE
    assert flags(gt, 43) == GTF_permit_access


def test_an_unmap_that_finds_its_reference_gone_logs_and_finishes(dom, caplog):
    """Only a guest that subverted the shim can rewrite the word under a
    mapping: one line, and the mapping is gone all the same."""
    gt, pt = dom.gnttab, dom.page_types
    gt.write_entry(44, GTF_permit_access, 0, FRAME)
    m = gt.map(44, domid=0)
    dom.types.set(FRAME, L1_TABLE)
    with caplog.at_level(logging.ERROR):
        gt.unmap(m)
    assert len(caplog.records) == 1 and f"{FRAME:#x}" in caplog.records[0].getMessage()
    assert pt.word(FRAME) == L1_TABLE
    assert flags(gt, 44) == GTF_permit_access and gt.active_mappings() == 0


# ---- version 2 ----

def to_v2(gt):
    assert gt.set_version(2) == 0 and gt.version == 2


def test_v2_geometry_and_status_frames(dom):
    gt = dom.gnttab
    assert gt.get_status_frames(0) == []
    with pytest.raises(GrantError) as e:
        gt.get_status_frames(1)          # none under v1
    assert e.value.status == GNTST_general_error
    to_v2(gt)
    assert (gt.entry_size, gt.entries_per_frame, gt.nr_entries) == (16, 256, 256)
    assert gt.nr_status_frames == 1
    status_base = (GNTTAB_GPA >> 12) + GNTTAB_MAX_FRAMES     # right after the shared frames
    assert gt.get_status_frames(1) == [status_base]
    with pytest.raises(GrantError):
        gt.get_status_frames(2)
    gt.setup_table(9)                    # 9 frames of 256 entries: 2 status frames
    assert gt.nr_status_frames == 2 and gt.get_status_frames(2) == [status_base, status_base + 1]
    assert gt.max_status_frames == 4     # Xen's grant_to_status_frames(32)
    with pytest.raises(GrantError) as e:
        gt.map(9 * 256, domid=0)
    assert e.value.status == GNTST_bad_gntref


def test_v2_backend_map_sets_the_status_word_not_the_entry(dom):
    gt = dom.gnttab
    to_v2(gt)
    gt.write_entry(10, GTF_permit_access, 0, FRAME)
    assert dom.phys.read_u64(gt.entry_gpa(10) + 8) == FRAME, "full_page.frame: 64 bits at offset 8"
    m = gt.map(10, domid=0)
    e = gt.read_entry(10)
    assert e.flags == GTF_permit_access and e.status == GTF_reading | GTF_writing
    assert dom.phys.read(gt.status_gpa(10), 2) == bytes([GTF_reading | GTF_writing, 0])
    m.view[0:2] = b"v2"
    assert dom.ram.read(FRAME * PAGE_SIZE, 2) == b"v2"
    gt.unmap(m)
    assert gt.read_entry(10).status == 0
    gt.copy_to_guest(10, 8, b"copy")
    assert gt.copy_from_guest(10, 8, 4) == b"copy"
    gt.write_entry(11, GTF_permit_access | GTF_readonly, 0, FRAME)
    with pytest.raises(GrantError):
        gt.map(11, domid=0)
    assert gt.read_entry(11).status == 0, "a refused writable pin leaves no status bits"


def test_v2_frames_are_64_bit(dom):
    gt = dom.gnttab
    to_v2(gt)
    gt.write_entry(12, GTF_permit_access, 0, (1 << 32) | FRAME)   # v1 could not say it: not RAM
    with pytest.raises(GrantError) as e:
        gt.map(12, domid=0)
    assert e.value.status == GNTST_bad_page


def test_v2_sub_page_copies_within_its_range_and_never_maps(dom):
    gt = dom.gnttab
    to_v2(gt)
    gt.write_entry(20, GTF_permit_access | GTF_sub_page, 0, FRAME, page_off=512, length=64)
    with pytest.raises(GrantError) as e:
        gt.map(20, domid=0)
    assert e.value.status == GNTST_general_error
    gt.copy_to_guest(20, 512, b"x" * 64)
    assert dom.ram.read(FRAME * PAGE_SIZE + 512, 64) == b"x" * 64
    for off, n in ((511, 1), (540, 40), (0, 8)):
        with pytest.raises(GrantError) as e:
            gt.copy_from_guest(20, off, n)
        assert e.value.status == GNTST_general_error
    assert gt.read_entry(20).status == 0


def test_v2_transitive_entries_are_refused(dom):
    gt = dom.gnttab
    to_v2(gt)
    gpa = gt.entry_gpa(21)
    dom.phys.write(gpa, GrantTransitiveV2.build(dict(flags=GTF_transitive, domid=0, trans_domid=1, gref=5)))
    for op in (lambda: gt.map(21, domid=0), lambda: gt.copy_from_guest(21, 0, 8)):
        with pytest.raises(GrantError) as e:
            op()
        assert e.value.status == GNTST_general_error
    assert gt.read_entry(21).status == 0


def test_set_version_refused_while_a_grant_past_the_reserved_ones_is_in_use(dom):
    gt = dom.gnttab
    gt.write_entry(3, GTF_permit_access, 0, FRAME)
    gt.write_entry(8, GTF_permit_access, 0, FRAME + 1)
    m3 = gt.map(3, domid=0)
    assert gt.set_version(2) == 0, "the first 8 may stay in use (xenstore / console keep them mapped)"
    assert gt.set_version(1) == 0
    gt.write_entry(8, GTF_permit_access, 0, FRAME + 1)
    m8 = gt.map(8, domid=0)
    assert gt.set_version(2) == -E.EBUSY and gt.version == 1
    gt.unmap(m8)
    assert gt.set_version(2) == 0
    assert gt.read_entry(3).status == GTF_reading | GTF_writing, "the reserved entry's bits moved along"
    gt.unmap(m3)
    assert gt.read_entry(3).status == 0 and gt.read_entry(3).flags == GTF_permit_access
    assert gt.set_version(7) == -E.EINVAL and gt.set_version(2) == 0


def test_set_version_carries_the_reserved_entries_and_clears_the_rest(dom):
    gt = dom.gnttab
    gt.seed_reserved(console_gfn=0x123, xenstore_gfn=0x456)
    gt.write_entry(7, GTF_permit_access | GTF_readonly, 3, 0x789)
    gt.write_entry(9, GTF_permit_access, 0, FRAME)
    gt.write_entry(511, GTF_permit_access, 0, FRAME)
    to_v2(gt)
    got = [gt.read_entry(r) for r in (0, 1, 7, 9, 255)]
    assert [(e.flags, e.domid, e.frame) for e in got] == [
        (GTF_permit_access, 0, 0x123), (GTF_permit_access, 0, 0x456),
        (GTF_permit_access | GTF_readonly, 3, 0x789), (0, 0, 0), (0, 0, 0)]
    assert dom.phys.read(GNTTAB_GPA + 16, 16) == bytes([1, 0, 0, 0, 0, 0, 0, 0, 0x56, 0x04, 0, 0, 0, 0, 0, 0])
    gt.write_entry(2, GTF_accept_transfer, 0, 0x99)       # not permit_access: dropped going back
    gt.write_entry(4, GTF_permit_access, 0, 1 << 32)       # not expressible in v1
    assert gt.set_version(1) == -E.ERANGE and gt.version == 2
    gt.write_entry(4, GTF_permit_access, 0, 0x44)
    dom.phys.write(gt.entry_gpa(5), GrantTransitiveV2.build(dict(flags=GTF_transitive, domid=0,
                                                                trans_domid=1, gref=5)))
    assert gt.set_version(1) == -E.ERANGE
    gt.write_entry(5, 0, 0, 0)
    assert gt.set_version(1) == 0
    assert [(gt.read_entry(r).flags, gt.read_entry(r).frame) for r in (0, 1, 2, 4, 7)] == [
        (GTF_permit_access, 0x123), (GTF_permit_access, 0x456), (0, 0), (GTF_permit_access, 0x44),
        (GTF_permit_access | GTF_readonly, 0x789)]
    assert dom.phys.read(gt.status_base_gpa, PAGE_SIZE) == bytes(PAGE_SIZE), "status frames cleared"


def test_swap_exchanges_entries_and_status_and_refuses_busy_refs(dom):
    gt = dom.gnttab
    for version in (1, 2):
        assert gt.set_version(version) == 0
        gt.write_entry(30, GTF_permit_access, 0, FRAME)
        gt.write_entry(31, GTF_permit_access | GTF_readonly, 2, FRAME + 1)
        gt.swap(30, 31)
        assert (gt.read_entry(30).frame, gt.read_entry(31).frame) == (FRAME + 1, FRAME)
        assert gt.read_entry(30).flags == GTF_permit_access | GTF_readonly
        gt.swap(30, 30)
        m = gt.map(31, domid=0)
        with pytest.raises(GrantError) as e:
            gt.swap(30, 31)
        assert e.value.status == GNTST_eagain
        gt.unmap(m)
        with pytest.raises(GrantError) as e:
            gt.swap(30, 1 << 20)
        assert e.value.status == GNTST_bad_gntref


# ---- the domain's own maps ----

def test_own_maps_have_their_own_handles_and_a_bound(dom, monkeypatch):
    gt = dom.gnttab
    gt.write_entry(40, GTF_permit_access, 1, FRAME)          # granted to ourselves (domain 1)
    backend = gt.write_entry(41, GTF_permit_access, 0, FRAME) or gt.map(41, domid=0)
    with pytest.raises(GrantError) as e:
        gt.own_lookup(backend.handle)                        # a back-end's handle is not ours
    assert e.value.status == GNTST_bad_handle
    monkeypatch.setattr(grant_table, "MAX_MAPTRACK_HANDLES", 3)
    maps = [gt.own_map_begin(40, GNTMAP_device_map | GNTMAP_readonly) for _ in range(3)]
    with pytest.raises(GrantError) as e:
        gt.own_map_begin(40, GNTMAP_device_map | GNTMAP_readonly)
    assert e.value.status == GNTST_no_space
    with pytest.raises(GrantError) as e:
        gt.own_lookup(maps[0].handle)                        # still pending
    assert e.value.status == GNTST_bad_handle
    for m in maps:
        gt.own_map_end(m, True)
    gt.own_unmap(gt.own_lookup(maps[1].handle), GNTMAP_device_map)
    again = gt.own_map_begin(40, GNTMAP_device_map | GNTMAP_readonly)
    assert again.handle == maps[1].handle, "a handle given back is reused: the table never grows"
    assert gt.own_mappings() == 3
    gt.own_map_end(again, False)
    assert gt.own_mappings() == 2
    for h in (maps[0].handle, maps[2].handle):
        gt.own_unmap(gt.own_lookup(h), GNTMAP_device_map)
    assert gt.own_mappings() == 0 and gt.read_entry(40).status == 0
    gt.unmap(backend)


def test_own_pins_are_per_domain_and_bounded(dom):
    gt = dom.gnttab
    gt.write_entry(42, GTF_permit_access, 0, FRAME)
    m = gt.map(42, domid=0)
    with pytest.raises(GrantError) as e:          # pinned by domain 0: not ours to map
        gt.own_map_begin(42, GNTMAP_device_map)
    assert e.value.status == GNTST_general_error
    gt.unmap(m)
    gt.write_entry(43, GTF_permit_access, 1, FRAME)
    held = [gt.own_map_begin(43, GNTMAP_device_map | GNTMAP_readonly) for _ in range(128)]
    with pytest.raises(GrantError) as e:          # Xen's 8-bit pin counters
        gt.own_map_begin(43, GNTMAP_device_map | GNTMAP_readonly)
    assert e.value.status == GNTST_general_error
    for h in held:
        gt.own_map_end(h, False)
    assert not gt.pinned(43)


def test_own_writable_device_map_holds_the_frame_writable(dom):
    gt, pt = dom.gnttab, dom.page_types
    gt.write_entry(44, GTF_permit_access, 1, FRAME)
    m = gt.own_map_begin(44, GNTMAP_device_map)
    gt.own_map_end(m, True)
    assert pt.word(FRAME) == WRITABLE | 1
    gt.own_unmap(m, GNTMAP_device_map)
    assert pt.word(FRAME) == WRITABLE
    dom.types.set(FRAME, L1_TABLE)
    with pytest.raises(GrantError) as e:
        gt.own_map_begin(44, GNTMAP_device_map)
    assert e.value.status == GNTST_general_error and not gt.pinned(44)
    m = gt.own_map_begin(44, GNTMAP_host_map)      # a host map's reference is its PTE's (the shim's)
    assert pt.word(FRAME) == L1_TABLE
    gt.own_map_end(m, False)


def test_copy_own(dom):
    gt = dom.gnttab
    gt.write_entry(50, GTF_permit_access, 1, FRAME)
    gt.write_entry(51, GTF_permit_access | GTF_readonly, 1, FRAME + 1)
    dom.ram.write(FRAME * PAGE_SIZE, b"source")
    gt.copy_own((True, 50, 0), (False, FRAME + 2, 100), 6)
    assert dom.ram.read((FRAME + 2) * PAGE_SIZE + 100, 6) == b"source"
    gt.copy_own((False, FRAME + 2, 100), (True, 50, 10), 6)
    assert dom.ram.read(FRAME * PAGE_SIZE + 10, 6) == b"source"
    cases = [((True, 51, 0), (True, 51, 0), 1, GNTST_general_error),       # into a read-only grant
             ((True, 50, 4090), (False, FRAME, 0), 8, GNTST_bad_copy_arg),
             ((False, RAM_SIZE // PAGE_SIZE, 0), (False, FRAME, 0), 8, GNTST_bad_page),
             ((False, FRAME, 0), (True, 1 << 20, 0), 8, GNTST_bad_gntref)]
    for src, dst, n, status in cases:
        with pytest.raises(GrantError) as e:
            gt.copy_own(src, dst, n)
        assert e.value.status == status
    dom.types.set(FRAME + 3, L1_TABLE)
    with pytest.raises(GrantError) as e:
        gt.copy_own((False, FRAME, 0), (False, FRAME + 3, 0), 8)
    assert e.value.status == GNTST_general_error
    assert dom.page_types.word(FRAME + 3) == L1_TABLE
    assert not gt.pinned(50) and not gt.pinned(51)
    assert dom.page_types.word(FRAME) == WRITABLE, "the destination's reference given back"


def test_flat_struct_reads_the_entry_layouts_as_construct_does():
    """read_entry parses grant entries with abi.flat_struct (struct's speed)
    from the construct declarations: the same fields from the same bytes,
    and a layout it cannot flatten is refused rather than misread."""
    import os

    from construct import CString, Struct

    from pyvmm.xen_abi.abi import GrantEntryV1, GrantEntryV2, flat_struct
    for layout in (GrantEntryV1, GrantEntryV2, GrantTransitiveV2):
        packed = flat_struct(layout)
        assert packed.size == layout.sizeof()
        names = [f.name for f in layout.subcons if f.name]
        for _ in range(50):
            raw = os.urandom(layout.sizeof())
            parsed = layout.parse(raw)
            assert list(packed.unpack(raw)) == [parsed[n] for n in names]
    with pytest.raises(TypeError, match="not a little-endian integer"):
        flat_struct(Struct("name" / CString("ascii")))
