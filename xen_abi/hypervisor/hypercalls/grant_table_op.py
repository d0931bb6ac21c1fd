"""grant_table_op: setup_table, query_size, set_version, get_version of the
domain's own table (version 1 only); the table is grant_table.GrantTable."""
from __future__ import annotations

from pyvmm.xen_abi.abi import (
    GNTST_bad_domain,
    GNTST_bad_virt_addr,
    GNTST_okay,
    GNTST_permission_denied,
    GnttabGetVersion,
    GnttabOp,
    GnttabQuerySize,
    GnttabSetupTable,
    GnttabSetVersion,
    Hypercall,
    XenErrno,
)
from pyvmm.xen_abi.hypervisor.grant_table import GrantError
from pyvmm.xen_abi.hypervisor.hypercalls.context import U32, fail, is_self, other_domain_errno
from pyvmm.xen_abi.memory.guest_va import GuestPageFault

GRANT_TABLE_VERSION = 1  # the only one offered
SINGLE_ARGUMENT_OPS = frozenset({GnttabOp.setup_table, GnttabOp.query_size, GnttabOp.set_version,
                                 GnttabOp.get_version})


def grant_table_op(dispatcher, ctx, cmd, uop, count, *_):
    cmd &= U32
    count &= U32
    d = dispatcher.domain
    gt = d.gnttab
    vm = ctx.vm
    if count >> 31:
        fail(XenErrno.EINVAL, "negative count")
    if cmd in SINGLE_ARGUMENT_OPS and count != 1:
        fail(XenErrno.EINVAL, "this grant op takes exactly one argument")
    if cmd == GnttabOp.setup_table:
        op = vm.read_struct(GnttabSetupTable, uop)
        status = GNTST_okay
        if not is_self(d, op.dom):
            status = GNTST_permission_denied if op.dom == 0 else GNTST_bad_domain
        else:
            try:
                frames = gt.setup_table(op.nr_frames)
            except GrantError as e:
                status = e.status
            else:
                try:
                    vm.write(op.frame_list, b"".join(f.to_bytes(8, "little") for f in frames))
                except GuestPageFault:
                    status = GNTST_bad_virt_addr
        vm.write_struct(GnttabSetupTable, uop, dict(op, status=status))
        return 0
    if cmd == GnttabOp.query_size:
        op = vm.read_struct(GnttabQuerySize, uop)
        if is_self(d, op.dom):
            nr, mx = gt.query_size()
            out = dict(op, nr_frames=nr, max_nr_frames=mx, status=GNTST_okay)
        else:
            out = dict(op, status=GNTST_permission_denied if op.dom == 0 else GNTST_bad_domain)
        vm.write_struct(GnttabQuerySize, uop, out)
        return 0
    if cmd == GnttabOp.set_version:
        op = vm.read_struct(GnttabSetVersion, uop)
        if op.version == GRANT_TABLE_VERSION:
            rc = 0
        elif op.version == 2:
            rc = -XenErrno.EOPNOTSUPP  # v2 not offered (and CPUID keeps Linux from asking)
        else:
            rc = -XenErrno.EINVAL
        vm.write_struct(GnttabSetVersion, uop, {"version": GRANT_TABLE_VERSION})
        return rc
    if cmd == GnttabOp.get_version:
        op = vm.read_struct(GnttabGetVersion, uop)
        if not is_self(d, op.dom):
            fail(other_domain_errno(op.dom), f"domain {op.dom}")
        vm.write_struct(GnttabGetVersion, uop, dict(op, version=GRANT_TABLE_VERSION))
        return 0
    # map/unmap/copy/transfer from the guest: there is no other domain to grant to it.
    return dispatcher.unsupported(Hypercall.grant_table_op, cmd)
