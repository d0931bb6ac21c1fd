"""The mailbox protocol of a hypercall that asks the shim for a grant PTE
(MBOP_GRANT_PTE): an answer nobody asked for, or a new hypercall while one
waits on the shim, can only come from a subverted shim and ends the guest."""
from __future__ import annotations

import pytest

from pyvmm.guests.testguests import build_testguest
from pyvmm.xen_abi.abi import GNTMAP_host_map, GnttabMapGrantRef, GnttabOp, GTF_permit_access, Hypercall
from pyvmm.xen_abi.hypervisor.domain import Domain, ShimPanic
from pyvmm.xen_abi.memory.guest_va import GuestVirtualMemory
from pyvmm.xen_abi.shim.layout import MAILBOX, GrantPte, MailboxOp


def _mailbox(dom, **values):
    mb = dom.region.mailbox_gpa(0)
    MAILBOX.write(dom.phys, mb, **values)
    return mb


def test_an_answer_nobody_asked_for_ends_the_guest():
    with Domain(str(build_testguest("hello"))) as dom:
        _mailbox(dom, op=MailboxOp.GRANT_PTE, info=0)
        with pytest.raises(ShimPanic):
            dom._handle_shim_exit(0)


def test_a_request_round_trip_and_a_hypercall_while_one_waits():
    with Domain(str(build_testguest("hello"))) as dom:
        lay = dom.layout
        dom.gnttab.write_entry(9, GTF_permit_access, dom.domid, lay.bootstack_pfn)
        vm_va = lay.virt_base + (lay.bootstack_pfn << 12)      # the op in the boot stack page
        cr3 = lay.l4_pfn << 12
        vm = GuestVirtualMemory(dom.phys, cr3, page_types=dom.page_types)
        vm.write_struct(GnttabMapGrantRef, vm_va, dict(host_addr=0x1000, flags=GNTMAP_host_map, ref=9,
                                                        dom=dom.domid, status=99, handle=0, dev_bus_addr=0))
        mb = _mailbox(dom, op=MailboxOp.HYPERCALL, nr=Hypercall.grant_table_op, cr3=cr3, kmode=1, rip=0)
        for i, v in enumerate((GnttabOp.map_grant_ref, vm_va, 1, 0, 0, 0)):
            dom.phys.write_u64(mb + MAILBOX.offset("args", i), v)
        dom._handle_shim_exit(0)
        assert MAILBOX.read(dom.phys, mb, "op") == MailboxOp.GRANT_PTE
        assert MAILBOX.read(dom.phys, mb, "args", 0) == GrantPte.INSTALL
        assert MAILBOX.read(dom.phys, mb, "args", 1) == 0x1000
        MAILBOX.write(dom.phys, mb, op=MailboxOp.HYPERCALL)      # a forged new hypercall meanwhile
        with pytest.raises(ShimPanic):
            dom._handle_shim_exit(0)
