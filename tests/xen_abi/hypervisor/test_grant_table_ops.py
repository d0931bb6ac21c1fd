"""grant_table_op's handlers for a domain using its own grants, on the fake
domain (pvfake.py answers the handlers' PTE requests as the shim does;
the shim's own side runs in the grants test guest)."""
from __future__ import annotations

import pytest

from pvfake import KBASE, RAM_SIZE, SCRATCH, VMM_GPA, FakeDomain
from pyvmm.vmm import x86
from pyvmm.xen_abi.abi import (
    DOMID_SELF,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTMAP_contains_pte,
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_bad_copy_arg,
    GNTST_bad_dev_addr,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_bad_virt_addr,
    GNTST_general_error,
    GNTST_okay,
    GNTST_permission_denied,
    GNTTAB_CACHE_CLEAN,
    GNTTAB_CACHE_INVAL,
    GTF_permit_access,
    GTF_reading,
    GTF_writing,
    PAGE_SIZE,
    GnttabCacheFlush,
    GnttabCopy,
    GnttabSetupTable,
    GnttabGetStatusFrames,
    GnttabMapGrantRef,
    GnttabOp,
    GnttabSetVersion,
    GnttabUnmapAndReplace,
    GnttabUnmapGrantRef,
    Hypercall,
    XenErrno as E,
)
from pyvmm.xen_abi.hypervisor.hypercalls.grant_table_op import grant_pte
from pyvmm.xen_abi.memory.page_types import PGT_TYPE_SHIFT, PGT_WRITABLE

ARG = SCRATCH
BUF = SCRATCH + 0x1000
HOST_VA = KBASE + 0x300000          # in the fake's 4 KiB-mapped kernel range
FRAME = 0x280                        # the granted page
ME = 1                               # the fake's domid
WRITABLE = PGT_WRITABLE << PGT_TYPE_SHIFT
GT = Hypercall.grant_table_op


@pytest.fixture
def dom():
    d = FakeDomain()
    for va in (HOST_VA, HOST_VA + PAGE_SIZE):
        d.pt.set_entry(va, 1, 0)     # empty slots of a (fake-validated) L1
    d.gnttab.write_entry(10, GTF_permit_access, ME, FRAME)
    yield d
    d.close()


def put(d, struct, va, value):
    d.ctx().vm.write_struct(struct, va, value)


def get(d, struct, va):
    return d.ctx().vm.read_struct(struct, va)


def map_one(d, ref=10, flags=GNTMAP_host_map, dom=ME, host_addr=HOST_VA):
    put(d, GnttabMapGrantRef, ARG, dict(host_addr=host_addr, flags=flags, ref=ref, dom=dom, status=99,
                                        handle=0xdead, dev_bus_addr=7))
    assert d.call(GT, GnttabOp.map_grant_ref, ARG, 1) == 0
    return get(d, GnttabMapGrantRef, ARG)


def unmap_one(d, handle, host_addr=HOST_VA, dev_bus_addr=0):
    put(d, GnttabUnmapGrantRef, ARG, dict(host_addr=host_addr, dev_bus_addr=dev_bus_addr, handle=handle,
                                          status=99))
    assert d.call(GT, GnttabOp.unmap_grant_ref, ARG, 1) == 0
    return get(d, GnttabUnmapGrantRef, ARG).status


def pte_at(d, va):
    return d.phys.read_u64(d.pt.slot(va, 1))


def test_host_map_and_unmap(dom):
    m = map_one(dom)
    assert m.status == GNTST_okay and m.dev_bus_addr == FRAME << 12
    assert pte_at(dom, HOST_VA) == grant_pte(FRAME, GNTMAP_host_map)
    assert grant_pte(FRAME, GNTMAP_host_map) == (FRAME << 12) | 0x63 | 1 << 63
    assert dom.page_types.word(FRAME) == WRITABLE | 1, "the PTE holds the frame writable"
    assert dom.gnttab.read_entry(10).status == GTF_reading | GTF_writing
    assert dom.ctx().vm.read(HOST_VA, 1) is not None
    assert unmap_one(dom, m.handle, host_addr=HOST_VA + PAGE_SIZE) == GNTST_general_error
    assert unmap_one(dom, m.handle + 1) == GNTST_bad_handle
    assert unmap_one(dom, m.handle, host_addr=0) == GNTST_okay, "naming nothing unmaps nothing"
    assert dom.gnttab.own_mappings() == 1
    assert unmap_one(dom, m.handle) == GNTST_okay
    assert pte_at(dom, HOST_VA) == 0 and dom.page_types.word(FRAME) == WRITABLE
    assert dom.gnttab.read_entry(10).status == 0 and dom.gnttab.own_mappings() == 0
    assert unmap_one(dom, m.handle) == GNTST_bad_handle


def test_readonly_application_and_avail_bits_in_the_pte(dom):
    flags = GNTMAP_host_map | GNTMAP_readonly | 8 | (5 << 16)    # application_map, guest_avail 5
    m = map_one(dom, flags=flags)
    assert m.status == GNTST_okay
    assert pte_at(dom, HOST_VA) == (FRAME << 12) | 0x65 | (5 << 9) | 1 << 63
    assert dom.page_types.word(FRAME) == 0, "a read-only PTE takes no reference"
    assert dom.gnttab.read_entry(10).status == GTF_reading
    assert unmap_one(dom, m.handle) == GNTST_okay


def test_contains_pte(dom):
    slot = dom.pt.slot(HOST_VA, 1)
    m = map_one(dom, flags=GNTMAP_host_map | GNTMAP_contains_pte, host_addr=slot)
    assert m.status == GNTST_okay and pte_at(dom, HOST_VA) & x86.PTE_ADDR_MASK == FRAME << 12
    req = dom.shim_requests[-1]
    assert req.args[1] == slot and req.args[2] & GNTMAP_contains_pte
    assert unmap_one(dom, m.handle, host_addr=slot) == GNTST_okay
    assert map_one(dom, flags=GNTMAP_host_map | GNTMAP_contains_pte, host_addr=slot + 4).status \
        == GNTST_general_error


@pytest.mark.parametrize("dom_id, status", [(DOMID_SELF, GNTST_bad_domain), (0, GNTST_general_error),
                                            (4242, GNTST_bad_domain)])
def test_map_names_the_granter_by_id(dom, dom_id, status):
    assert map_one(dom, dom=dom_id).status == status
    assert not dom.shim_requests and dom.gnttab.own_mappings() == 0


def test_map_refusals_leave_nothing_behind(dom):
    assert map_one(dom, flags=GNTMAP_readonly).status == GNTST_bad_gntref
    assert map_one(dom, ref=1 << 20).status == GNTST_bad_gntref
    assert map_one(dom, ref=11).status == GNTST_general_error            # grants nothing
    for va in (KBASE + (64 << 20), 1 << 47, 0xFFFF_8000_0000_1000):
        assert map_one(dom, host_addr=va).status == GNTST_general_error  # no L1 (fake shim)
    assert dom.gnttab.read_entry(10).status == 0 and dom.gnttab.own_mappings() == 0
    assert dom.page_types.word(FRAME) == 0


def test_device_map_and_unmap_by_bus_address(dom):
    m = map_one(dom, flags=GNTMAP_device_map, host_addr=0)
    assert m.status == GNTST_okay and m.dev_bus_addr == FRAME << 12 and not dom.shim_requests
    assert dom.page_types.word(FRAME) == WRITABLE | 1
    assert unmap_one(dom, m.handle, host_addr=0, dev_bus_addr=(FRAME + 1) << 12) == GNTST_bad_dev_addr
    assert unmap_one(dom, m.handle, host_addr=0, dev_bus_addr=FRAME << 12) == GNTST_okay
    assert dom.page_types.word(FRAME) == WRITABLE and dom.gnttab.own_mappings() == 0


def test_unmap_and_replace_moves_the_other_pte(dom):
    other = HOST_VA + PAGE_SIZE
    dom.phys.write_u64(dom.pt.slot(other, 1), (0x290 << 12) | 0x23)   # read-only: no reference
    m = map_one(dom)
    put(dom, GnttabUnmapAndReplace, ARG, dict(host_addr=HOST_VA, new_addr=other, handle=m.handle, status=9))
    assert dom.call(GT, GnttabOp.unmap_and_replace, ARG, 1) == 0
    assert get(dom, GnttabUnmapAndReplace, ARG).status == GNTST_okay
    assert pte_at(dom, HOST_VA) == (0x290 << 12) | 0x23 and pte_at(dom, other) == 0
    assert dom.gnttab.own_mappings() == 0 and dom.page_types.word(FRAME) == WRITABLE


def test_a_batch_with_an_unreachable_array_or_bad_cmd(dom):
    assert dom.call(GT, GnttabOp.map_grant_ref, 0xFFFF_8000_0000_0000, 1) == -E.EFAULT
    assert dom.call(GT, GnttabOp.map_grant_ref, ARG, 1 << 31) == -E.EINVAL
    assert dom.call(GT, GnttabOp.map_grant_ref | 1 << 12, ARG, 1) == -E.EINVAL
    assert dom.call(GT, GnttabOp.map_grant_ref, ARG, 0) == 0
    assert dom.call(GT, GnttabOp.transfer, ARG, 1) == -E.ENOSYS


def test_copy_statuses(dom):
    def copy(src, sdom, dst, ddom, flags, n=8, soff=0, doff=0):
        put(dom, GnttabCopy, ARG, dict(source=dict(u=src, domid=sdom, offset=soff),
                                       dest=dict(u=dst, domid=ddom, offset=doff), len=n, flags=flags,
                                       status=99))
        assert dom.call(GT, GnttabOp.copy, ARG, 1) == 0
        return get(dom, GnttabCopy, ARG).status
    dom.ram.write(FRAME * PAGE_SIZE, b"granted!")
    assert copy(10, DOMID_SELF, 0x281, DOMID_SELF, GNTCOPY_source_gref) == GNTST_okay
    assert dom.ram.read(0x281 * PAGE_SIZE, 8) == b"granted!"
    assert copy(0x281, DOMID_SELF, 10, ME, GNTCOPY_dest_gref, doff=8) == GNTST_okay
    assert copy(0x281, ME, 0x282, DOMID_SELF, 0) == GNTST_permission_denied
    assert copy(10, 4242, 0x282, DOMID_SELF, GNTCOPY_source_gref) == GNTST_bad_domain
    assert copy(10, 0, 0x282, DOMID_SELF, GNTCOPY_source_gref) == GNTST_general_error
    assert copy(0x281, DOMID_SELF, 0x282, DOMID_SELF, 0, soff=4095, n=2) == GNTST_bad_copy_arg
    assert copy(RAM_SIZE >> 12, DOMID_SELF, 0x282, DOMID_SELF, 0) == GNTST_bad_page


def test_cache_flush_dump_table_and_status_frames(dom):
    def flush(a, off, n, op, cmd=GnttabOp.cache_flush):
        put(dom, GnttabCacheFlush, ARG, dict(a=a, offset=off, length=n, op=op))
        return dom.call(GT, cmd, ARG, 1)
    assert flush(FRAME << 12, 0, 64, GNTTAB_CACHE_CLEAN) == 0
    assert flush(FRAME << 12, 0, 64, GNTTAB_CACHE_CLEAN | GNTTAB_CACHE_INVAL) == 0
    assert flush(FRAME << 12, 0, 64, GNTTAB_CACHE_INVAL) == -E.EOPNOTSUPP
    assert flush(FRAME << 12, 0, 64, 1 << 31) == -E.EINVAL
    assert flush(FRAME << 12, 4000, 200, GNTTAB_CACHE_CLEAN) == -E.EINVAL
    assert flush(VMM_GPA, 0, 64, GNTTAB_CACHE_CLEAN) == -E.EPERM            # the VMM region's frame
    assert flush(0x7_0000_0000, 0, 64, GNTTAB_CACHE_CLEAN) == -E.EINVAL      # no page at all
    assert flush(FRAME << 12, 0, 0, GNTTAB_CACHE_CLEAN, GnttabOp.cache_flush | 5 << 12) == -E.EILSEQ
    put(dom, GnttabSetupTable, ARG, dict(dom=DOMID_SELF, nr_frames=1, status=99, frame_list=BUF))
    assert dom.call(GT, GnttabOp.dump_table, ARG, 1) == -E.ENOSYS, "Xen 4.17 has no dump_table"
    put(dom, GnttabSetVersion, ARG, dict(version=2))
    assert dom.call(GT, GnttabOp.set_version, ARG, 1) == 0
    put(dom, GnttabGetStatusFrames, ARG, dict(nr_frames=1, dom=DOMID_SELF, status=9, frame_list=BUF))
    assert dom.call(GT, GnttabOp.get_status_frames, ARG, 1) == 0
    assert get(dom, GnttabGetStatusFrames, ARG).status == GNTST_okay
    assert dom.ctx().vm.read_u64(BUF) == dom.gnttab.status_base_gpa >> 12
    put(dom, GnttabGetStatusFrames, ARG, dict(nr_frames=1, dom=DOMID_SELF, status=9,
                                              frame_list=0x1234_5678_0000))
    dom.call(GT, GnttabOp.get_status_frames, ARG, 1)
    assert get(dom, GnttabGetStatusFrames, ARG).status == GNTST_bad_virt_addr
    put(dom, GnttabGetStatusFrames, ARG, dict(nr_frames=1, dom=DOMID_SELF, status=9,
                                              frame_list=0xFFFF_8000_0000_0000))
    assert dom.call(GT, GnttabOp.get_status_frames, ARG, 1) == -E.EFAULT
    assert dom.call(GT, GnttabOp.get_status_frames, ARG, 2) == -E.EINVAL


def test_a_host_map_is_refused_while_set_version_would_drop_it(dom):
    m = map_one(dom)
    put(dom, GnttabSetVersion, ARG, dict(version=2))
    assert dom.call(GT, GnttabOp.set_version, ARG, 1) == -E.EBUSY
    assert get(dom, GnttabSetVersion, ARG).version == 1
    assert unmap_one(dom, m.handle) == GNTST_okay
    put(dom, GnttabSetVersion, ARG, dict(version=2))
    assert dom.call(GT, GnttabOp.set_version, ARG, 1) == 0


def test_the_shim_answer_must_be_awaited(dom):
    with pytest.raises(RuntimeError):
        dom.dispatcher.resume(dom.ctx(), 0)
    put(dom, GnttabMapGrantRef, ARG, dict(host_addr=HOST_VA, flags=GNTMAP_host_map, ref=10, dom=ME,
                                          status=99, handle=0, dev_bus_addr=0))
    req = dom.dispatcher.dispatch(dom.ctx(), GT, (GnttabOp.map_grant_ref, ARG, 1))
    assert req.args[0] == 1 and req.args[1] == HOST_VA        # GrantPte.INSTALL
    assert dom.dispatcher.resume(dom.ctx(), GNTST_general_error) == 0   # the shim refused the PTE
    assert get(dom, GnttabMapGrantRef, ARG).status == GNTST_general_error
    assert dom.gnttab.own_mappings() == 0 and dom.gnttab.read_entry(10).status == 0
    assert dom.page_types.word(FRAME) == 0
