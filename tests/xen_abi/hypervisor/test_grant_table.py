"""Grant table v1: VMM-owned frames, seeding, back-end map/unmap/copy checks,
and the writable page-type references a back-end holds while it may write."""
from __future__ import annotations

import logging

import pytest

from pvfake import GNTTAB_GPA, GNTTAB_MAX_FRAMES, RAM_SIZE, FakeDomain
from pyvmm.xen_abi.abi import (
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
