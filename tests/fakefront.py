"""A guest's side of split drivers, played from Python for back-end tests:
a BackendHost over real guest memory (RAM + a VMM region with shared_info
and the grant table, page-type words), and the frontend's end of a shared ring."""
from __future__ import annotations

import contextlib

from waiting import DEFAULT_TIMEOUT_S, wait_for
from pyvmm.backends.xenbus import BackendHost
from pyvmm.vmm.memory import GuestMemory
from pyvmm.xen_abi.abi import PAGE_SIZE, SRING_HEADER_SIZE, SharedRingHeader
from pyvmm.xen_abi.hypervisor.evtchn import EventChannels
from pyvmm.xen_abi.hypervisor.grant_table import GrantTable
from pyvmm.xen_abi.memory.physmem import PhysicalMemory
from pyvmm.xen_abi.xenstore.store import XenstoreStore
from typewords import TypeWords

DOMID = 1
RAM = 4 << 20
VMM_GPA = 0x1000_0000          # shared_info + grant frames, outside RAM


GRANT_VERSION = 1     # the table's version (tests/backends/conftest.py runs both)


@contextlib.contextmanager
def backend_host():
    """A BackendHost for domain 1; .ram is its RAM, .types its frames' type
    words (typewords.py), .backends are closed at the end; its grant table
    is of version GRANT_VERSION (the back-ends work with either)."""
    ram = GuestMemory(RAM, name="ram")
    vmm = GuestMemory(64 * PAGE_SIZE, name="vmm")
    types = TypeWords(RAM // PAGE_SIZE)
    phys = PhysicalMemory([(0, ram), (VMM_GPA, vmm)])
    h = BackendHost(domid=DOMID, store=XenstoreStore(),
                    evtchn=EventChannels(phys, VMM_GPA, 1, domid=DOMID),
                    gnttab=GrantTable(phys, VMM_GPA + PAGE_SIZE, max_frames=8, initial_frames=8, domid=DOMID,
                                      page_types=types.page_types))
    assert h.gnttab.set_version(GRANT_VERSION) == 0
    h.ram = ram
    h.types = types
    h.backends = []
    try:
        yield h
    finally:
        for b in h.backends:
            b.close()
        ram.close()
        vmm.close()
        types.close()


class FrontRing:
    """The frontend's end of one shared ring page in guest RAM (FRONT_RING)."""

    def __init__(self, ram: GuestMemory, pfn: int, entry_size: int, size: int):
        self.page = ram.view(pfn * PAGE_SIZE, PAGE_SIZE)
        self.page[:] = bytes(PAGE_SIZE)
        hdr = SharedRingHeader()
        hdr.req_event = hdr.rsp_event = 1            # SHARED_RING_INIT
        self.page[:SRING_HEADER_SIZE] = bytes(hdr)
        self.entry_size, self.size = entry_size, size
        self.req_prod = 0
        self.rsp_cons = 0

    def header(self) -> SharedRingHeader:
        return SharedRingHeader.from_buffer_copy(self.page[:SRING_HEADER_SIZE])

    def _set_header(self, hdr: SharedRingHeader) -> None:
        self.page[:SRING_HEADER_SIZE] = bytes(hdr)

    def _slot(self, index: int) -> int:
        return SRING_HEADER_SIZE + (index % self.size) * self.entry_size

    def put(self, req) -> None:
        """Write a request into the next slot (not yet published)."""
        raw = bytes(req)
        off = self._slot(self.req_prod)
        self.page[off:off + len(raw)] = raw
        self.req_prod += 1

    def publish(self, req_prod: int | None = None) -> None:
        hdr = self.header()
        hdr.req_prod = (self.req_prod if req_prod is None else req_prod) & 0xFFFFFFFF
        self._set_header(hdr)

    def responses_ready(self) -> int:
        return (self.header().rsp_prod - self.rsp_cons) & 0xFFFFFFFF

    def take_responses(self, n: int, rsp_type, timeout: float = DEFAULT_TIMEOUT_S) -> list:
        wait_for(lambda: self.responses_ready() >= n, f"{n} responses", timeout)
        out = []
        for _ in range(n):
            off = self._slot(self.rsp_cons)
            out.append(rsp_type.from_buffer_copy(self.page[off:off + self.entry_size]))
            self.rsp_cons += 1
        hdr = self.header()
        hdr.rsp_event = self.rsp_cons + 1
        self._set_header(hdr)
        return out
