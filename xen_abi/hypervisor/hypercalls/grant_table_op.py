"""grant_table_op on the domain's own table (grant_table.GrantTable), as
Xen 4.17's common/grant_table.c and arch/x86/pv/grant_table.c answer a
64-bit PV guest on a host where it is the only domain (domain 0's
back-ends are pyvmm's, and grant nothing to it).

setup_table, query_size, set_version (1 and 2), get_status_frames,
get_version: the table itself.

map_grant_ref / unmap_grant_ref / unmap_and_replace: a domain mapping its
own grants, as a loopback back-end would. `dom` must be the domain's id:
Xen looks the granting domain up by id only (rcu_lock_domain_by_id), so
DOMID_SELF is GNTST_bad_domain there, and so here. The grant side is
Python's; a host map's PTE is the shim's (shim/mmu.c mmu_grant_pte),
asked for mid-hypercall through a ShimRequest (see dispatch.py): the PTE
is a page-table entry of the guest's, changed under the shim's lock with
its type reference, and only the shim can flush the other vCPUs.

copy: either side a grant ref (of DOMID_SELF or the domain's id) or, for
DOMID_SELF, a frame of the guest's RAM. swap_grant_ref, cache_flush
as Xen does them; dump_table is -ENOSYS, as in Xen 4.17 (it has no
handler); transfer stays -ENOSYS (README: why).
"""
from __future__ import annotations

from pyvmm.xen_abi.abi import (
    DOMID_SELF,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTMAP_application_map,
    GNTMAP_contains_pte,
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_bad_dev_addr,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_virt_addr,
    GNTST_general_error,
    GNTST_okay,
    GNTST_permission_denied,
    GNTTAB_CACHE_CLEAN,
    GNTTAB_CACHE_INVAL,
    GNTTABOP_CMD_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    GnttabCacheFlush,
    GnttabCopy,
    GnttabGetStatusFrames,
    GnttabGetVersion,
    GnttabMapGrantRef,
    GnttabOp,
    GnttabQuerySize,
    GnttabSetupTable,
    GnttabSetVersion,
    GnttabSwapGrantRef,
    GnttabUnmapAndReplace,
    GnttabUnmapGrantRef,
    Hypercall,
    XenErrno,
)
from pyvmm.xen_abi.hypervisor.grant_table import GrantError
from pyvmm.xen_abi.hypervisor.hypercalls.context import (
    U32,
    ShimRequest,
    addr_ok,
    fail,
    is_self,
    other_domain_errno,
)
from pyvmm.xen_abi.memory.guest_va import GuestPageFault
from pyvmm.xen_abi.shim.layout import GrantPte, MailboxOp

SINGLE_ARGUMENT_OPS = frozenset({GnttabOp.setup_table, GnttabOp.query_size, GnttabOp.get_status_frames})
BATCH_OPS = {GnttabOp.map_grant_ref: GnttabMapGrantRef, GnttabOp.unmap_grant_ref: GnttabUnmapGrantRef,
             GnttabOp.unmap_and_replace: GnttabUnmapAndReplace, GnttabOp.copy: GnttabCopy,
             GnttabOp.swap_grant_ref: GnttabSwapGrantRef, GnttabOp.cache_flush: GnttabCacheFlush}

# the PTE of a grant host map (Xen's grant_to_pte_flags; RAM frames only, so
# no cache attributes): present, accessed, dirty, NX, RW unless read-only,
# user with GNTMAP_application_map, GNTMAP_guest_avail bits in PTE bits 9-11
_PTE_P, _PTE_RW, _PTE_US, _PTE_A, _PTE_D = 0x1, 0x2, 0x4, 0x20, 0x40
_PTE_NX = 1 << 63
_GNTMAP_GUEST_AVAIL0 = 16


def grant_pte(frame: int, flags: int) -> int:
    pte = (frame << PAGE_SHIFT) | _PTE_P | _PTE_A | _PTE_D | _PTE_NX
    if flags & GNTMAP_application_map:
        pte |= _PTE_US
    if not flags & GNTMAP_readonly:
        pte |= _PTE_RW
    return pte | ((flags >> _GNTMAP_GUEST_AVAIL0) & 7) << 9


def _pte_request(kind: GrantPte, addr: int, flags: int, a3: int = 0, a4: int = 0, a5: int = 0):
    return ShimRequest(MailboxOp.GRANT_PTE, (int(kind), addr, flags, a3, a4, a5))


def grant_table_op(dispatcher, ctx, cmd, uop, count, *_):
    cmd &= U32
    count &= U32
    if count >> 31:
        fail(XenErrno.EINVAL, "negative count")
    op, opaque = cmd & GNTTABOP_CMD_MASK, cmd & ~GNTTABOP_CMD_MASK
    if op != GnttabOp.cache_flush and opaque:
        fail(XenErrno.EINVAL, "continuation bits on a grant op without them")
    d = dispatcher.domain
    if op in SINGLE_ARGUMENT_OPS and count != 1:
        fail(XenErrno.EINVAL, "this grant op takes exactly one argument")
    if op in BATCH_OPS:
        size = BATCH_OPS[op].sizeof()
        if count and not (addr_ok(uop) and addr_ok(uop + count * size - 1)):
            fail(XenErrno.EFAULT, "the array leaves the guest's half")    # guest_handle_okay
    if op == GnttabOp.setup_table:
        return _setup_table(d, ctx.vm, uop)
    if op == GnttabOp.query_size:
        return _query_size(d, ctx.vm, uop)
    if op == GnttabOp.set_version:
        o = ctx.vm.read_struct(GnttabSetVersion, uop)
        rc = d.gnttab.set_version(o.version)
        ctx.vm.write_struct(GnttabSetVersion, uop, {"version": d.gnttab.version})
        return rc
    if op == GnttabOp.get_status_frames:
        return _get_status_frames(d, ctx.vm, uop)
    if op == GnttabOp.get_version:
        o = ctx.vm.read_struct(GnttabGetVersion, uop)
        if not is_self(d, o.dom):
            fail(other_domain_errno(o.dom), f"domain {o.dom}")
        ctx.vm.write_struct(GnttabGetVersion, uop, dict(o, version=d.gnttab.version))
        return 0
    if op == GnttabOp.map_grant_ref:
        return _map_grant_ref(d, ctx.vm, uop, count)
    if op in (GnttabOp.unmap_grant_ref, GnttabOp.unmap_and_replace):
        return _unmap(d, ctx.vm, uop, count, replace=op == GnttabOp.unmap_and_replace)
    if op == GnttabOp.copy:
        return _copy(d, ctx.vm, uop, count)
    if op == GnttabOp.swap_grant_ref:
        return _swap(d, ctx.vm, uop, count)
    if op == GnttabOp.cache_flush:
        return _cache_flush(d, ctx.vm, uop, count, opaque)
    # transfer: see the README (a page handed to itself: not done); dump_table:
    # Xen 4.17 has no handler for it (removed in 2005), -ENOSYS there too
    return dispatcher.unsupported(Hypercall.grant_table_op, op)


def _other_domain_status(domid: int) -> int:
    """Xen's status for a domain that is not the caller: domain 0 exists
    (and XSM refuses), any other does not."""
    return GNTST_permission_denied if domid == 0 else GNTST_bad_domain


def _frame_list_op(d, vm, uop, struct, frames_of):
    """setup_table and get_status_frames: the same argument (dom, nr_frames,
    status, frame_list), the frames that frames_of(nr) gives written out."""
    o = vm.read_struct(struct, uop)
    if o.nr_frames and not (addr_ok(o.frame_list) and addr_ok(o.frame_list + 8 * o.nr_frames - 1)):
        fail(XenErrno.EFAULT, "frame_list leaves the guest's half")
    status = GNTST_okay
    if not is_self(d, o.dom):
        status = _other_domain_status(o.dom)
    else:
        try:
            frames = frames_of(o.nr_frames)
        except GrantError as e:
            status = e.status
        else:
            try:
                vm.write(o.frame_list, b"".join(f.to_bytes(8, "little") for f in frames))
            except GuestPageFault:
                status = GNTST_bad_virt_addr
    vm.write_struct(struct, uop, dict(o, status=status))
    return 0


def _setup_table(d, vm, uop):
    return _frame_list_op(d, vm, uop, GnttabSetupTable, d.gnttab.setup_table)


def _query_size(d, vm, uop):
    o = vm.read_struct(GnttabQuerySize, uop)
    if is_self(d, o.dom):
        nr, mx = d.gnttab.query_size()
        out = dict(o, nr_frames=nr, max_nr_frames=mx, status=GNTST_okay)
    else:
        out = dict(o, status=_other_domain_status(o.dom))
    vm.write_struct(GnttabQuerySize, uop, out)
    return 0


def _get_status_frames(d, vm, uop):
    return _frame_list_op(d, vm, uop, GnttabGetStatusFrames, d.gnttab.get_status_frames)


# ---- map / unmap (generators: a host map asks the shim for its PTE) ----

def _map_grant_ref(d, vm, uop, count):
    gt = d.gnttab
    size = GnttabMapGrantRef.sizeof()
    for i in range(count):
        va = uop + i * size
        o = vm.read_struct(GnttabMapGrantRef, va)
        out = dict(o, status=GNTST_okay, handle=0, dev_bus_addr=0)
        flags = o.flags
        if not flags & (GNTMAP_device_map | GNTMAP_host_map):
            out["status"] = GNTST_bad_gntref        # Xen: "Bad flags in grant map op"
        elif o.dom != d.domid:
            # DOMID_SELF too: Xen looks the granter up by id; domain 0
            # exists (XSM's hook lets the map through) but grants nothing
            out["status"] = GNTST_general_error if o.dom == 0 else GNTST_bad_domain
        else:
            try:
                m = gt.own_map_begin(o.ref, flags)
            except GrantError as e:
                out["status"] = e.status
            else:
                ok = True
                if flags & GNTMAP_host_map:
                    status = yield _pte_request(GrantPte.INSTALL, o.host_addr, flags,
                                                grant_pte(m.frame, flags))
                    ok = status == GNTST_okay
                gt.own_map_end(m, ok, o.host_addr)
                if ok:
                    out.update(handle=m.handle, dev_bus_addr=m.frame << PAGE_SHIFT)
                else:
                    out["status"] = GNTST_general_error
        vm.write_struct(GnttabMapGrantRef, va, out)
    return 0


def _unmap(d, vm, uop, count, replace: bool):
    gt = d.gnttab
    struct = GnttabUnmapAndReplace if replace else GnttabUnmapGrantRef
    size = struct.sizeof()
    for i in range(count):
        va = uop + i * size
        o = vm.read_struct(struct, va)
        status = GNTST_okay
        try:
            m = gt.own_lookup(o.handle)
        except GrantError as e:
            status = e.status
        else:
            # Xen's unmap_common: with replace the flags are GNTMAP_host_map
            # and there is no dev_bus_addr; each part goes only when named
            dev_bus_addr = 0 if replace else o.dev_bus_addr
            kinds = 0
            if dev_bus_addr and m.flags & GNTMAP_device_map:
                if dev_bus_addr != m.frame << PAGE_SHIFT:
                    status = GNTST_bad_dev_addr
            if status == GNTST_okay and o.host_addr and m.flags & GNTMAP_host_map:
                pte_rw = _PTE_P | (0 if m.readonly else _PTE_RW)
                new_addr = o.new_addr if replace else 0
                status = yield _pte_request(GrantPte.REMOVE, o.host_addr, m.flags & GNTMAP_contains_pte,
                                            m.frame, pte_rw, new_addr)
                if status == GNTST_okay:
                    kinds |= GNTMAP_host_map
            if status == GNTST_okay and dev_bus_addr and m.flags & GNTMAP_device_map:
                kinds |= GNTMAP_device_map
            if kinds:
                gt.own_unmap(m, kinds)
        vm.write_struct(struct, va, dict(o, status=status))
    return 0


# ---- copy, swap, cache_flush ----

def _copy_side(d, ptr, is_gref: bool):
    """Xen's gnttab_copy_lock_domain: a frame only from DOMID_SELF; a grant
    ref of the domain itself (domain 0 exists but grants nothing here)."""
    if ptr.domid != DOMID_SELF and not is_gref:
        raise GrantError(GNTST_permission_denied, "a frame of another domain")
    if ptr.domid not in (DOMID_SELF, d.domid):
        raise GrantError(GNTST_general_error if ptr.domid == 0 else GNTST_bad_domain,
                         f"domain {ptr.domid}")
    return is_gref, ptr.u if not is_gref else ptr.u & U32, ptr.offset


def _copy(d, vm, uop, count):
    size = GnttabCopy.sizeof()
    for i in range(count):
        va = uop + i * size
        o = vm.read_struct(GnttabCopy, va)
        try:
            src = _copy_side(d, o.source, bool(o.flags & GNTCOPY_source_gref))
            dst = _copy_side(d, o.dest, bool(o.flags & GNTCOPY_dest_gref))
            d.gnttab.copy_own(src, dst, o.len)
            status = GNTST_okay
        except GrantError as e:
            status = e.status
        vm.write_struct(GnttabCopy, va, dict(o, status=status))
    return 0


def _swap(d, vm, uop, count):
    size = GnttabSwapGrantRef.sizeof()
    for i in range(count):
        va = uop + i * size
        o = vm.read_struct(GnttabSwapGrantRef, va)
        try:
            d.gnttab.swap(o.ref_a, o.ref_b)
            status = GNTST_okay
        except GrantError as e:
            status = e.status
        vm.write_struct(GnttabSwapGrantRef, va, dict(o, status=status))
    return 0


def _cache_flush(d, vm, uop, count, opaque):
    """Xen's gnttab_cache_flush on x86, for the domain's own pages: a clean
    is a (here unobservable) cache flush, an invalidate alone is
    -EOPNOTSUPP (GNTTAB_CACHE_SOURCE_GREF is refused with the other
    unknown bits, -EINVAL, before Xen's "unimplemented"); a page that is not the guest's RAM is -EINVAL (no page)
    or -EPERM (a page whose owner has no grant table: the VMM region's)."""
    size = GnttabCacheFlush.sizeof()
    for i in range(count):
        o = vm.read_struct(GnttabCacheFlush, uop + i * size)
        if o.offset >= PAGE_SIZE or o.length > PAGE_SIZE or o.offset + o.length > PAGE_SIZE \
                or o.op & ~(GNTTAB_CACHE_INVAL | GNTTAB_CACHE_CLEAN):
            return -XenErrno.EINVAL
        if o.length == 0 or o.op == 0:
            if opaque:
                return -XenErrno.EILSEQ
            continue
        mfn = o.a >> PAGE_SHIFT
        if not d.gnttab.page_types.is_ram(mfn):
            return -XenErrno.EPERM if d.phys.contains(mfn << PAGE_SHIFT, PAGE_SIZE) else -XenErrno.EINVAL
        if o.op == GNTTAB_CACHE_INVAL:
            return -XenErrno.EOPNOTSUPP
        opaque = 0
    return 0
