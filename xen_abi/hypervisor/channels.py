"""The two channels a PV domain starts with (start_info's store and console
pages and ports), served by Python: the guest ports pre-allocated and bound
to back-ends (XenstoreRingServer, ConsoleRingServer), the grant entries
Xen reserves for them, and the domain's xenstore tree.  The two ring pages
are held writable (page_types.py) for the domain's life, as xenstored and
xenconsoled keep them mapped: the guest can never make them page tables.

    channels = DomainChannels(evtchn, gnttab, ram, layout, page_types, domid=1, name="domU",
                              nr_vcpus=1, console_write=...)   # before the guest runs
"""
from __future__ import annotations

from typing import Callable

from pyvmm.xen_abi import abi
from pyvmm.xen_abi.abi import DOMID_SELF
from pyvmm.xen_abi.hypervisor.console_ring import ConsoleRingServer
from pyvmm.xen_abi.hypervisor.evtchn import BACKEND_DOMID
from pyvmm.xen_abi.memory.page_types import type_name
from pyvmm.xen_abi.xenstore.ring import XenstoreRingServer
from pyvmm.xen_abi.xenstore.store import XenstoreStore
from pyvmm.xen_abi.xenstore.toolstack import populate_domain

__all__ = ["DomainChannels"]


class DomainChannels:
    """store: the domain's xenstore; dom_path: its /local/domain/<id>;
    xenstore_server, console_server: the ring back-ends."""

    def __init__(self, evtchn, gnttab, ram, layout, page_types, *, domid: int, name: str, nr_vcpus: int,
                 console_write: Callable[[bytes], None], uuid: str | None = None,
                 vcpus_online: int | None = None):
        ports = {}
        for what, want in (("store", layout.store_evtchn), ("console", layout.console_evtchn)):
            p = evtchn.alloc_unbound(DOMID_SELF, BACKEND_DOMID)
            if p != want:
                raise RuntimeError(f"{what} event channel: got port {p}, start_info says {want}")
            ports[what] = p
        self.store = XenstoreStore()
        self.dom_path = populate_domain(
            self.store, domid, name, memory_kib=ram.size // 1024, vcpus=nr_vcpus, uuid=uuid,
            vcpus_online=vcpus_online,
            console={"ring-ref": layout.console_pfn, "port": ports["console"]})
        self.store.write(f"{self.dom_path}/store/ring-ref", str(layout.xenstore_pfn))
        self.store.write(f"{self.dom_path}/store/port", str(ports["store"]))
        gnttab.seed_reserved(layout.console_pfn, layout.xenstore_pfn, BACKEND_DOMID)
        # the back-end callbacks look the servers up when the guest first notifies
        self.xenstore_server = None
        self.console_server = None
        be_store = evtchn.backend_bind(ports["store"], lambda: self.xenstore_server.process())
        self.xenstore_server = XenstoreRingServer(_ring_page(ram, page_types, layout.xenstore_pfn),
                                                  be_store.notify, self.store, domid)
        be_cons = evtchn.backend_bind(ports["console"], lambda: self.console_server.process())
        self.console_server = ConsoleRingServer(_ring_page(ram, page_types, layout.console_pfn),
                                                be_cons.notify, console_write)

    def send_console_input(self, data: bytes) -> int:
        """Queue input for the guest's console ring (raises its console port)."""
        return self.console_server.send_input(bytes(data))


def _ring_page(ram, page_types, pfn: int) -> memoryview:
    """A ring page, held writable from now on (never given back: the domain
    ends with it)."""
    if not page_types.take_writable(pfn):     # the builder's frames: untyped before the guest runs
        raise RuntimeError(f"ring page {pfn:#x} is already typed: {type_name(page_types.word(pfn))}")
    return ram.view(pfn << abi.PAGE_SHIFT, abi.PAGE_SIZE)
