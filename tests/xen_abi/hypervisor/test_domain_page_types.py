"""A built domain's page types: the frames pyvmm writes for the guest's whole
life (the xenstore and console rings) are held writable before it runs, and
every writer of pyvmm's shares the domain's PageTypes."""
from __future__ import annotations

from pyvmm.guests.testguests import build_testguest
from pyvmm.xen_abi.hypervisor.domain import Domain
from pyvmm.xen_abi.memory.page_types import PGT_TYPE_SHIFT, PGT_WRITABLE


def test_the_ring_pages_are_held_writable_from_the_build_on():
    with Domain(str(build_testguest("hello"))) as dom:
        pt = dom.page_types
        for pfn in (dom.layout.xenstore_pfn, dom.layout.console_pfn):
            assert pt.word(pfn) == PGT_WRITABLE << PGT_TYPE_SHIFT | 1, f"ring page {pfn:#x}"
        assert dom.gnttab.page_types is pt
