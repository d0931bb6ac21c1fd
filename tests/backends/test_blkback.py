"""The block back-end against a frontend played from Python: the xenbus
handshake, reads/writes/flush/discard between an image file and granted
guest pages, and every kind of bad request a guest can make (each gets
an error status, the image and other memory stay untouched; a bogus ring
index loses that one device)."""
from __future__ import annotations

import os

import pytest

from fakefront import VMM_GPA, FrontRing, backend_host
from waiting import wait_for
from pyvmm.backends.blkback import BlockBackend, DiskError, DiskImage, xvd_devid
from pyvmm.xen_abi.abi import (
    BLKIF_RING_ENTRY_SIZE,
    BLKIF_RING_SIZE,
    DOMID_SELF,
    GTF_permit_access,
    GTF_readonly,
    PAGE_SIZE,
    BlkifOp,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifResponse,
    BlkifSegment,
    BlkifStatus,
    XenbusState,
)

DOMID = 1
DISK_SECTORS = 2048            # 1 MiB image


class FakeFrontend:
    """What Linux's xen-blkfront does, from Python: grant a ring page, offer
    a port, publish both, then produce requests on the shared ring."""

    RING_PFN = 0x10
    DATA_PFN = 0x100            # data pages from here
    RING_REF = 8

    def __init__(self, host, ram, devid: int, ring_ref: int = RING_REF, ring_pfn: int = RING_PFN):
        self.host, self.ram, self.devid = host, ram, devid
        self.path = f"/local/domain/{DOMID}/device/vbd/{devid}"
        self.ring = FrontRing(ram, ring_pfn, BLKIF_RING_ENTRY_SIZE, BLKIF_RING_SIZE)
        host.gnttab.write_entry(ring_ref, GTF_permit_access, 0, ring_pfn)
        self.port = host.evtchn.alloc_unbound(DOMID_SELF, 0)
        self.next_ref = 100
        store = host.store
        store.write(f"{self.path}/ring-ref", str(ring_ref))
        store.write(f"{self.path}/event-channel", str(self.port))
        store.write(f"{self.path}/protocol", "x86_64-abi")

    def state(self, s: XenbusState) -> None:
        self.host.store.write(f"{self.path}/state", str(int(s)))

    def backend_state(self) -> int:
        be = self.host.store.read_str(f"{self.path}/backend")
        return int(self.host.store.read_str(f"{be}/state"))

    def backend_key(self, key: str) -> str:
        be = self.host.store.read_str(f"{self.path}/backend")
        return self.host.store.read_str(f"{be}/{key}")

    def connect(self) -> None:
        wait_for(lambda: self.backend_state() == XenbusState.InitWait, "backend InitWait")
        self.state(XenbusState.Initialised)
        wait_for(lambda: self.backend_state() == XenbusState.Connected, "backend Connected")
        self.state(XenbusState.Connected)

    def grant(self, pfn: int, readonly: bool = False, frame: int | None = None) -> int:
        ref = self.next_ref
        self.next_ref += 1
        self.host.gnttab.write_entry(ref, GTF_permit_access | (GTF_readonly if readonly else 0), 0,
                                     pfn if frame is None else frame)
        return ref

    def push(self, req, notify: bool = True, req_prod: int | None = None) -> None:
        self.ring.put(req)
        self.ring.publish(req_prod)
        if notify:
            self.host.evtchn.send(self.port)

    def responses(self, n: int) -> list[BlkifResponse]:
        return self.ring.take_responses(n, BlkifResponse)

    def request(self, op, sector: int, segs, req_id: int = 0x1234) -> BlkifRequest:
        """segs: (gref, first_sect, last_sect)."""
        r = BlkifRequest(operation=op, nr_segments=len(segs), handle=self.devid, id=req_id,
                         sector_number=sector)
        for i, (g, f, l) in enumerate(segs):
            r.seg[i].gref, r.seg[i].first_sect, r.seg[i].last_sect = g, f, l
        return r

    def do(self, req) -> int:
        self.push(req)
        (rsp,) = self.responses(1)
        assert rsp.id == req.id and rsp.operation == req.operation
        return rsp.status


@pytest.fixture
def host():
    with backend_host() as h:
        yield h


def _image(tmp_path, name="disk.img", sectors=DISK_SECTORS) -> str:
    p = tmp_path / name
    # a recognisable pattern: each sector starts with its number
    with open(p, "wb") as f:
        for s in range(sectors):
            f.write(s.to_bytes(8, "little") * 64)
    return str(p)


def _sector(path: str, s: int, n: int = 1) -> bytes:
    with open(path, "rb") as f:
        f.seek(s * 512)
        return f.read(512 * n)


def _attach(host, path: str, index: int = 0, readonly: bool = False):
    img = DiskImage.open(path, readonly=readonly)
    be = BlockBackend(host, index, img)
    host.backends.append(be)
    fe = FakeFrontend(host, host.ram, xvd_devid(index), ring_ref=8 + index,
                      ring_pfn=FakeFrontend.RING_PFN + index)
    return img, be, fe


@pytest.fixture
def disk(host, tmp_path):
    """(image path, backend, frontend): a fresh image attached as xvda, connected."""
    path = _image(tmp_path)
    img, be, fe = _attach(host, path)
    fe.connect()
    yield path, be, fe
    img.close()


def test_handshake_nodes_and_features(host, tmp_path):
    img, be, fe = _attach(host, _image(tmp_path))
    assert xvd_devid(0) == 51712 and xvd_devid(1) == 51728
    s = host.store
    assert s.read_str(f"{fe.path}/virtual-device") == "51712"
    assert s.read_str(f"{fe.path}/backend") == "/local/domain/0/backend/vbd/1/51712"
    assert fe.backend_key("feature-flush-cache") == "1"
    assert fe.backend_key("feature-discard") == "1"
    fe.connect()
    assert fe.backend_key("sectors") == str(DISK_SECTORS)
    assert fe.backend_key("info") == "0"
    assert fe.backend_key("sector-size") == "512"
    assert be.connected
    img.close()


def test_write_then_read_back_through_granted_pages(host, disk):
    path, be, fe = disk
    ram = host.ram
    # two pages of data: page A sectors 2..7 (3 KiB), page B sectors 0..1 (1 KiB)
    a, b = FakeFrontend.DATA_PFN, FakeFrontend.DATA_PFN + 1
    payload = os.urandom(4096)
    ram.write(a * PAGE_SIZE + 1024, payload[:3072])
    ram.write(b * PAGE_SIZE, payload[3072:])
    ra, rb = fe.grant(a, readonly=True), fe.grant(b, readonly=True)
    assert fe.do(fe.request(BlkifOp.write, 100, [(ra, 2, 7), (rb, 0, 1)])) == BlkifStatus.okay
    assert _sector(path, 100, 8) == payload
    assert _sector(path, 99) == (99).to_bytes(8, "little") * 64      # neighbours untouched
    assert _sector(path, 108) == (108).to_bytes(8, "little") * 64
    # read it back into two other pages, at other offsets
    c, d = FakeFrontend.DATA_PFN + 2, FakeFrontend.DATA_PFN + 3
    ram.fill(c * PAGE_SIZE, PAGE_SIZE, 0xEE)
    ram.fill(d * PAGE_SIZE, PAGE_SIZE, 0xEE)
    rc, rd = fe.grant(c), fe.grant(d)
    assert fe.do(fe.request(BlkifOp.read, 100, [(rc, 0, 3), (rd, 4, 7)])) == BlkifStatus.okay
    assert ram.read(c * PAGE_SIZE, 2048) == payload[:2048]
    assert ram.read(c * PAGE_SIZE + 2048, 2048) == b"\xee" * 2048       # outside the segment
    assert ram.read(d * PAGE_SIZE + 2048, 2048) == payload[2048:]
    assert ram.read(d * PAGE_SIZE, 2048) == b"\xee" * 2048
    assert be.stats["bytes_written"] == 4096 and be.stats["bytes_read"] == 4096
    # the back-end notified the frontend's port, and let every grant go
    assert host.evtchn.is_pending(fe.port)
    assert host.gnttab.active_mappings() == 1          # the ring page only
    assert fe.do(fe.request(BlkifOp.flush_diskcache, 0, [])) == BlkifStatus.okay


def test_many_requests_wrap_the_ring(host, disk):
    _, _, fe = disk
    pfn = FakeFrontend.DATA_PFN
    ref = fe.grant(pfn)
    for batch in range(5):                       # 5 x 20 requests: wraps the 32-slot ring
        for i in range(20):
            fe.push(fe.request(BlkifOp.read, batch * 20 + i, [(ref, i % 8, i % 8)], req_id=i),
                    notify=(i == 19))
        rsps = fe.responses(20)
        assert [r.id for r in rsps] == list(range(20))
        assert all(r.status == BlkifStatus.okay for r in rsps)
    last = 4 * 20 + 19
    assert host.ram.read(pfn * PAGE_SIZE + 19 % 8 * 512, 8) == last.to_bytes(8, "little")


def test_bad_requests_get_errors_and_change_nothing(host, disk):
    path, be, fe = disk
    before = open(path, "rb").read()
    ram = host.ram
    pfn = FakeFrontend.DATA_PFN
    ram.fill(pfn * PAGE_SIZE, PAGE_SIZE, 0x55)
    good = fe.grant(pfn)
    E = BlkifStatus.error
    cases = {
        "wild grant reference": fe.request(BlkifOp.write, 0, [(99999, 0, 7)]),
        "unused grant entry": fe.request(BlkifOp.write, 0, [(500, 0, 7)]),
        "grant of a frame outside RAM": fe.request(BlkifOp.read, 0, [(fe.grant(0, frame=VMM_GPA >> 12), 0, 7)]),
        "read into a read-only grant": fe.request(BlkifOp.read, 0, [(fe.grant(pfn, readonly=True), 0, 7)]),
        "last_sect past the page": fe.request(BlkifOp.write, 0, [(good, 0, 8)]),
        "first_sect after last_sect": fe.request(BlkifOp.write, 0, [(good, 5, 4)]),
        "beyond the end of the disk": fe.request(BlkifOp.write, DISK_SECTORS - 4, [(good, 0, 7)]),
        "sector number near 2**64": fe.request(BlkifOp.write, (1 << 64) - 1, [(good, 0, 0)]),
        "no segments": fe.request(BlkifOp.write, 0, []),
    }
    for what, req in cases.items():
        assert fe.do(req) == E, what
    too_many = fe.request(BlkifOp.write, 0, [(good, 0, 0)])
    too_many.nr_segments = 12
    assert fe.do(too_many) == E
    # a good first segment does not get written when a later one is bad
    assert fe.do(fe.request(BlkifOp.write, 0, [(good, 0, 7), (99999, 0, 7)])) == E
    assert fe.do(fe.request(4, 0, [(good, 0, 0)])) == BlkifStatus.eopnotsupp
    assert fe.do(fe.request(200, 0, [])) == BlkifStatus.eopnotsupp
    assert open(path, "rb").read() == before
    assert be.connected and be.failed is None
    assert host.gnttab.active_mappings() == 1
    # and the device still works
    assert fe.do(fe.request(BlkifOp.read, 3, [(good, 0, 0)])) == BlkifStatus.okay
    assert ram.read(pfn * PAGE_SIZE, 8) == (3).to_bytes(8, "little")


def test_bogus_ring_index_loses_only_that_device(host, tmp_path):
    p0, p1 = _image(tmp_path, "a.img"), _image(tmp_path, "b.img")
    img0, be0, fe0 = _attach(host, p0, 0)
    img1, be1, fe1 = _attach(host, p1, 1)
    fe0.connect()
    fe1.connect()
    ref = fe0.grant(FakeFrontend.DATA_PFN)
    fe0.push(fe0.request(BlkifOp.read, 0, [(ref, 0, 0)]), req_prod=BLKIF_RING_SIZE + 5)
    wait_for(lambda: fe0.backend_state() == XenbusState.Closing, "the broken device closing")
    assert "ring overflow" in fe0.backend_key("error")
    assert be0.failed and not be0.connected
    assert host.gnttab.active_mappings() == 0 + 1     # only disk 1's ring is still mapped
    # the other disk is untouched by this
    ref1 = fe1.grant(FakeFrontend.DATA_PFN + 1)
    assert fe1.do(fe1.request(BlkifOp.read, 7, [(ref1, 0, 0)])) == BlkifStatus.okay
    # the broken frontend closes and starts over: it gets a working device again
    fe0.state(XenbusState.Closed)
    wait_for(lambda: fe0.backend_state() == XenbusState.Closed, "backend Closed")
    fe0.state(XenbusState.Initialising)
    wait_for(lambda: fe0.backend_state() == XenbusState.InitWait, "backend InitWait again")
    fe2 = FakeFrontend(host, host.ram, xvd_devid(0), ring_ref=20, ring_pfn=0x30)
    fe2.connect()
    ref2 = fe2.grant(FakeFrontend.DATA_PFN + 2)
    assert fe2.do(fe2.request(BlkifOp.read, 9, [(ref2, 0, 0)])) == BlkifStatus.okay
    assert host.ram.read((FakeFrontend.DATA_PFN + 2) * PAGE_SIZE, 8) == (9).to_bytes(8, "little")
    img0.close()
    img1.close()


def test_missing_frontend_keys_fail_the_device(host, tmp_path):
    img, be, fe = _attach(host, _image(tmp_path))
    host.store.rm(f"{fe.path}/ring-ref")
    wait_for(lambda: fe.backend_state() == XenbusState.InitWait, "InitWait")
    fe.state(XenbusState.Initialised)
    wait_for(lambda: fe.backend_state() == XenbusState.Closing, "Closing")
    assert "ring-ref" in fe.backend_key("error")
    img.close()


@pytest.mark.parametrize("port", ["0", "4095", "-1", "99999999999"])
def test_bad_event_channel_fails_the_device_as_the_guest_s_error(host, tmp_path, caplog, port):
    """Found by the xenbus fuzz harness: an event-channel key naming no
    port unbound for dom0 ended the device as an "internal error", with a
    traceback in the log as for a pyvmm bug.  It is the frontend's error,
    said so."""
    img, be, fe = _attach(host, _image(tmp_path))
    host.store.write(f"{fe.path}/event-channel", port)
    wait_for(lambda: fe.backend_state() == XenbusState.InitWait, "InitWait")
    fe.state(XenbusState.Initialised)
    wait_for(lambda: fe.backend_state() == XenbusState.Closing, "Closing")
    assert fe.backend_key("error").startswith(f"event channel {port}: ")
    assert not any(r.exc_info for r in caplog.records)
    assert host.gnttab.active_mappings() == 0          # the ring it had mapped is let go
    img.close()


def test_read_only_disk(host, tmp_path):
    path = _image(tmp_path)
    before = open(path, "rb").read()
    img, be, fe = _attach(host, path, readonly=True)
    assert fe.backend_key("mode") == "r"
    fe.connect()
    assert fe.backend_key("info") == "4"          # VDISK_READONLY
    ref = fe.grant(FakeFrontend.DATA_PFN)
    assert fe.do(fe.request(BlkifOp.write, 0, [(ref, 0, 7)])) == BlkifStatus.error
    assert fe.do(fe.request(BlkifOp.read, 1, [(ref, 0, 0)])) == BlkifStatus.okay
    assert open(path, "rb").read() == before
    img.close()


def test_discard_punches_a_hole(host, tmp_path):
    path = _image(tmp_path, sectors=4096)
    img, be, fe = _attach(host, path)
    fe.connect()
    blocks = os.stat(path).st_blocks
    d = BlkifRequestDiscard(operation=BlkifOp.discard, id=7, sector_number=1024, nr_sectors=1024)
    assert fe.do(d) == BlkifStatus.okay
    assert _sector(path, 1024, 1024) == bytes(512 * 1024)
    assert _sector(path, 1023) == (1023).to_bytes(8, "little") * 64
    assert _sector(path, 2048) == (2048).to_bytes(8, "little") * 64
    assert os.stat(path).st_blocks < blocks
    beyond = BlkifRequestDiscard(operation=BlkifOp.discard, id=8, sector_number=4000, nr_sectors=1000)
    assert fe.do(beyond) == BlkifStatus.error
    img.close()


def test_image_errors_are_one_line(tmp_path):
    with pytest.raises(DiskError, match="no such file"):
        DiskImage.open(str(tmp_path / "missing.img"))
    with pytest.raises(DiskError, match="directory"):
        DiskImage.open(str(tmp_path))
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(DiskError, match="empty"):
        DiskImage.open(str(empty))
    path = _image(tmp_path)
    first = DiskImage.open(path)
    with pytest.raises(DiskError, match="in use by another guest") as ei:
        DiskImage.open(path)
    assert "\n" not in str(ei.value)
    with pytest.raises(DiskError, match="in use"):
        DiskImage.open(path, readonly=True)
    first.close()
    DiskImage.open(path).close()                  # the lock went with it
    ro1, ro2 = DiskImage.open(path, readonly=True), DiskImage.open(path, readonly=True)
    ro1.close()
    ro2.close()


def test_indirect_requests(host, tmp_path):
    """BLKIF_OP_INDIRECT: 40 segments listed in a granted page, written then
    read back; answered with the inner operation; bad lists refused."""
    path = _image(tmp_path)
    img, be, fe = _attach(host, path)
    assert fe.backend_key("feature-max-indirect-segments") == "256"
    fe.connect()
    ram = host.ram
    seg_page = FakeFrontend.DATA_PFN + 200
    seg_ref = fe.grant(seg_page, readonly=True)
    n = 40
    data_pfns = [FakeFrontend.DATA_PFN + i for i in range(n)]
    payload = os.urandom(n * PAGE_SIZE)
    segs = bytearray()
    for i, pfn in enumerate(data_pfns):
        ram.write(pfn * PAGE_SIZE, payload[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
        segs += bytes(BlkifSegment(gref=fe.grant(pfn), first_sect=0, last_sect=7))
    ram.write(seg_page * PAGE_SIZE, bytes(segs))

    def indirect(op, sector, nseg=n, grefs=(seg_ref,)):
        r = BlkifRequestIndirect(operation=BlkifOp.indirect, indirect_op=op, nr_segments=nseg,
                                 id=0x99, sector_number=sector, handle=fe.devid)
        for i, g in enumerate(grefs):
            r.indirect_grefs[i] = g
        fe.push(r)
        (rsp,) = fe.responses(1)
        assert rsp.id == 0x99 and rsp.operation == op
        return rsp.status

    assert indirect(BlkifOp.write, 64) == BlkifStatus.okay
    assert _sector(path, 64, n * 8) == payload
    for pfn in data_pfns:
        ram.fill(pfn * PAGE_SIZE, PAGE_SIZE, 0)
    assert indirect(BlkifOp.read, 64) == BlkifStatus.okay
    assert b"".join(ram.read(pfn * PAGE_SIZE, PAGE_SIZE) for pfn in data_pfns) == payload
    before = open(path, "rb").read()
    assert indirect(BlkifOp.write, 0, nseg=257) == BlkifStatus.error             # too many
    assert indirect(BlkifOp.write, 0, nseg=0) == BlkifStatus.error
    assert indirect(BlkifOp.write, 0, grefs=(99999,)) == BlkifStatus.error      # wild list grant
    assert indirect(BlkifOp.write, DISK_SECTORS - 8) == BlkifStatus.error       # past the end
    assert indirect(BlkifOp.flush_diskcache, 0) == BlkifStatus.error           # not read/write
    assert open(path, "rb").read() == before
    assert host.gnttab.active_mappings() == 1
    img.close()


# ---- persistent grants (feature-persistent) ----
def _persistent_disk(host, tmp_path):
    path = _image(tmp_path)
    img, be, fe = _attach(host, path)
    assert fe.backend_key("feature-persistent") == "1"
    host.store.write(f"{fe.path}/feature-persistent", "1")
    fe.connect()
    assert be.persistent
    return path, img, be, fe


def _entry_flags(host, ref: int) -> int:
    e = host.gnttab.read_entry(ref)
    return e.flags | e.status        # v2 keeps reading/writing apart


def test_persistent_grants_stay_mapped_until_the_frontend_disconnects(host, tmp_path):
    """With feature-persistent on both ends, each pool page is mapped once
    (writable, GTF_reading|GTF_writing set, its frame typed writable) and
    reused by later requests in both directions; the device's disconnect
    lets every one go."""
    from pyvmm.xen_abi.abi import GTF_reading, GTF_writing
    from pyvmm.xen_abi.memory.page_types import PGT_COUNT_MASK
    path, img, be, fe = _persistent_disk(host, tmp_path)
    ram = host.ram
    pfns = [FakeFrontend.DATA_PFN + i for i in range(4)]
    refs = [fe.grant(p) for p in pfns]
    payload = os.urandom(4 * PAGE_SIZE)
    for i, p in enumerate(pfns):
        ram.write(p * PAGE_SIZE, payload[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
    segs = [(r, 0, 7) for r in refs]
    assert fe.do(fe.request(BlkifOp.write, 32, segs)) == BlkifStatus.okay
    assert _sector(path, 32, 32) == payload
    assert host.gnttab.active_mappings() == 1 + 4              # the ring and the pool pages
    for r, p in zip(refs, pfns):
        assert _entry_flags(host, r) & (GTF_reading | GTF_writing) == GTF_reading | GTF_writing
        assert host.types.page_types.word(p) & PGT_COUNT_MASK == 1
    for p in pfns:
        ram.fill(p * PAGE_SIZE, PAGE_SIZE, 0)
    assert fe.do(fe.request(BlkifOp.read, 32, segs[::-1])) == BlkifStatus.okay
    assert b"".join(ram.read(p * PAGE_SIZE, PAGE_SIZE) for p in pfns[::-1]) == payload
    assert be.stats["persistent_maps"] == 4                  # mapped once, used twice
    fe.state(XenbusState.Closing)
    wait_for(lambda: host.gnttab.active_mappings() == 0, "every mapping released")
    for r, p in zip(refs, pfns):
        assert _entry_flags(host, r) & (GTF_reading | GTF_writing) == 0
        assert host.types.page_types.word(p) & PGT_COUNT_MASK == 0
    img.close()


def test_persistent_grant_revoked_and_regranted_keeps_the_page_first_mapped(host, tmp_path):
    """Hostile frontend: it rewrites a grant entry the back-end holds mapped
    (revoked, then the same reference granted for another page).  As with
    Xen's grant maps, the mapping outlives the entry: the back-end keeps
    using the page first granted (the guest's own, still held), never the
    new one; a reference revoked before it was ever mapped is refused."""
    path, img, be, fe = _persistent_disk(host, tmp_path)
    ram = host.ram
    first, other = FakeFrontend.DATA_PFN, FakeFrontend.DATA_PFN + 50
    ref = fe.grant(first)
    ram.fill(first * PAGE_SIZE, PAGE_SIZE, 0)
    assert fe.do(fe.request(BlkifOp.read, 8, [(ref, 0, 7)])) == BlkifStatus.okay
    assert ram.read(first * PAGE_SIZE, 4096) == _sector(path, 8, 8)
    host.gnttab.write_entry(ref, 0, 0, 0)                          # revoked under the mapping
    host.gnttab.write_entry(ref, GTF_permit_access, 0, other)       # and re-granted elsewhere
    ram.fill(first * PAGE_SIZE, PAGE_SIZE, 0)
    ram.fill(other * PAGE_SIZE, PAGE_SIZE, 0xAB)
    assert fe.do(fe.request(BlkifOp.read, 16, [(ref, 0, 7)])) == BlkifStatus.okay
    assert ram.read(first * PAGE_SIZE, 4096) == _sector(path, 16, 8)
    assert ram.read(other * PAGE_SIZE, 4096) == b"\xab" * 4096      # the new page untouched
    ram.write(first * PAGE_SIZE, b"F" * 4096)
    assert fe.do(fe.request(BlkifOp.write, 24, [(ref, 0, 7)])) == BlkifStatus.okay
    assert _sector(path, 24, 8) == b"F" * 4096                       # read from the first page
    never = fe.grant(FakeFrontend.DATA_PFN + 60)
    host.gnttab.write_entry(never, 0, 0, 0)
    before = open(path, "rb").read()
    assert fe.do(fe.request(BlkifOp.write, 0, [(never, 0, 7)])) == BlkifStatus.error
    assert open(path, "rb").read() == before
    fe.state(XenbusState.Closing)
    wait_for(lambda: host.gnttab.active_mappings() == 0, "every mapping released")
    img.close()


def test_persistent_pool_is_bounded_and_read_only_grants_are_mapped_per_request(host, tmp_path, monkeypatch):
    """A frontend cannot make the back-end hold more than MAX_PERSISTENT_GRANTS
    pages: past it, segments are mapped for their request only.  A read-only
    grant (which cannot be kept writable) still serves a write."""
    from pyvmm.backends import blkback
    monkeypatch.setattr(blkback, "MAX_PERSISTENT_GRANTS", 3)
    path, img, be, fe = _persistent_disk(host, tmp_path)
    refs = [fe.grant(FakeFrontend.DATA_PFN + i) for i in range(6)]
    assert fe.do(fe.request(BlkifOp.read, 0, [(r, 0, 7) for r in refs])) == BlkifStatus.okay
    assert host.gnttab.active_mappings() == 1 + 3
    more = [fe.grant(FakeFrontend.DATA_PFN + 10 + i) for i in range(6)]
    assert fe.do(fe.request(BlkifOp.read, 0, [(r, 0, 7) for r in more])) == BlkifStatus.okay
    assert host.gnttab.active_mappings() == 1 + 3
    ro_page = FakeFrontend.DATA_PFN + 30
    host.ram.write(ro_page * PAGE_SIZE, b"R" * 4096)
    monkeypatch.setattr(blkback, "MAX_PERSISTENT_GRANTS", 10)
    ro = fe.grant(ro_page, readonly=True)
    assert fe.do(fe.request(BlkifOp.write, 40, [(ro, 0, 7)])) == BlkifStatus.okay
    assert _sector(path, 40, 8) == b"R" * 4096
    assert fe.do(fe.request(BlkifOp.read, 40, [(ro, 0, 7)])) == BlkifStatus.error
    assert host.gnttab.active_mappings() == 1 + 3
    img.close()


# ---- multiple queues (multi-queue-max-queues) ----
class MultiQueueFrontend(FakeFrontend):
    """xen-blkfront with several rings (negotiate_mq, talk_to_blkback):
    multi-queue-num-queues at the top, queue-N/ring-ref and
    queue-N/event-channel per queue, each ring its own page and port."""

    RING_PFN = 0x40
    RING_REF = 40

    def __init__(self, host, ram, devid: int, nq: int, num_queues: str | None = None):
        self.host, self.ram, self.devid = host, ram, devid
        self.path = f"/local/domain/{DOMID}/device/vbd/{devid}"
        self.rings, self.ports, self.ring_refs = [], [], []
        store = host.store
        for i in range(nq):
            self.rings.append(FrontRing(ram, self.RING_PFN + i, BLKIF_RING_ENTRY_SIZE, BLKIF_RING_SIZE))
            host.gnttab.write_entry(self.RING_REF + i, GTF_permit_access, 0, self.RING_PFN + i)
            self.ring_refs.append(self.RING_REF + i)
            self.ports.append(host.evtchn.alloc_unbound(DOMID_SELF, 0))
            store.write(f"{self.path}/queue-{i}/ring-ref", str(self.RING_REF + i))
            store.write(f"{self.path}/queue-{i}/event-channel", str(self.ports[i]))
        store.write(f"{self.path}/multi-queue-num-queues", str(nq) if num_queues is None else num_queues)
        store.write(f"{self.path}/protocol", "x86_64-abi")
        self.ring, self.port = self.rings[0], self.ports[0]
        self.next_ref = 100

    def on(self, q: int) -> "MultiQueueFrontend":
        """Requests and responses on queue q from now on."""
        self.ring, self.port = self.rings[q], self.ports[q]
        return self

    def key(self, q: int, name: str, value) -> None:
        self.host.store.write(f"{self.path}/queue-{q}/{name}", str(value))


def _mq_attach(host, path: str, nq: int, max_queues: int = 4, num_queues: str | None = None):
    img = DiskImage.open(path)
    be = BlockBackend(host, 0, img, max_queues=max_queues)
    host.backends.append(be)
    return img, be, MultiQueueFrontend(host, host.ram, xvd_devid(0), nq, num_queues)


def _queue_threads(be) -> list[str]:
    import threading
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(f"pyvmm-{be.name}-q"))


def _fails_with(fe, text: str) -> None:
    wait_for(lambda: fe.backend_state() == XenbusState.InitWait, "InitWait")
    fe.state(XenbusState.Initialised)
    wait_for(lambda: fe.backend_state() == XenbusState.Closing, "Closing")
    assert text in fe.backend_key("error"), fe.backend_key("error")


def test_max_queues_is_the_guest_s_vcpus_at_most_four(host, tmp_path):
    from pyvmm.backends.xenbus import MAX_QUEUES
    img = DiskImage.open(_image(tmp_path))
    assert MAX_QUEUES == 4
    for vcpus, want in ((1, 1), (2, 2), (4, 4), (8, 4)):
        host.nr_vcpus = vcpus
        be = BlockBackend(host, 0, img)
        assert be.backend_state() == XenbusState.InitWait
        assert host.store.read_str(f"{be.be_path}/multi-queue-max-queues") == str(want)
        be.close()
    img.close()


def test_each_queue_answers_on_its_own_ring_and_port(host, tmp_path):
    """Three queues: each has its own worker thread; a request on queue k
    is answered on ring k and notifies port k only; data written through
    one queue reads back through another."""
    path = _image(tmp_path)
    img, be, fe = _mq_attach(host, path, 3)
    assert fe.backend_key("multi-queue-max-queues") == "4"
    fe.connect()
    assert len(be.queues) == 3 and be.connected
    assert _queue_threads(be) == [f"pyvmm-vbd-xvda-q{i}" for i in range(3)]
    assert host.gnttab.active_mappings() == 3
    ram = host.ram
    for q in range(3):
        pfn = FakeFrontend.DATA_PFN + q
        payload = bytes([0x41 + q]) * PAGE_SIZE
        ram.write(pfn * PAGE_SIZE, payload)
        for p in fe.ports:
            host.evtchn.clear_pending(p)
        ref = fe.grant(pfn, readonly=True)
        assert fe.on(q).do(fe.request(BlkifOp.write, 8 * q, [(ref, 0, 7)], req_id=q)) == BlkifStatus.okay
        assert [host.evtchn.is_pending(p) for p in fe.ports] == [i == q for i in range(3)]
        assert all(r.responses_ready() == 0 for i, r in enumerate(fe.rings) if i != q)
        assert _sector(path, 8 * q, 8) == payload
    # read queue 0's sectors back through queue 2
    out = FakeFrontend.DATA_PFN + 10
    ram.fill(out * PAGE_SIZE, PAGE_SIZE, 0)
    ref = fe.grant(out)
    assert fe.on(2).do(fe.request(BlkifOp.read, 0, [(ref, 0, 7)])) == BlkifStatus.okay
    assert ram.read(out * PAGE_SIZE, PAGE_SIZE) == b"A" * PAGE_SIZE
    assert be.stats["write"] == 3 and be.stats["read"] == 1 and be.stats["bytes_written"] == 3 * PAGE_SIZE
    assert "3 queues" in be.describe() and "blk2 ring" in be.describe()
    # the frontend goes away: every worker stops, every ring is let go
    fe.state(XenbusState.Closing)
    wait_for(lambda: host.gnttab.active_mappings() == 0 and not _queue_threads(be), "queues gone")
    assert be.stats["write"] == 3              # counters outlive the connection
    img.close()


def test_queues_are_served_in_parallel(host, tmp_path, monkeypatch):
    """A request that blocks on its queue (a slow disk) holds up only that
    queue: another queue's request is answered meanwhile."""
    import threading
    path = _image(tmp_path)
    img, be, fe = _mq_attach(host, path, 2)
    fe.connect()
    gate, entered = threading.Event(), threading.Event()
    real = os.preadv

    def slow_preadv(fd, bufs, pos):
        if pos == 512 * 1000:              # queue 0's request: held until released
            entered.set()
            gate.wait(10)
        return real(fd, bufs, pos)
    monkeypatch.setattr(os, "preadv", slow_preadv)
    r0, r1 = fe.grant(FakeFrontend.DATA_PFN), fe.grant(FakeFrontend.DATA_PFN + 1)
    fe.on(0).push(fe.request(BlkifOp.read, 1000, [(r0, 0, 0)], req_id=1))
    assert entered.wait(5)
    assert fe.on(1).do(fe.request(BlkifOp.read, 7, [(r1, 0, 0)], req_id=2)) == BlkifStatus.okay
    assert fe.rings[0].responses_ready() == 0
    gate.set()
    (rsp,) = fe.on(0).responses(1)
    assert rsp.id == 1 and rsp.status == BlkifStatus.okay
    img.close()


def test_one_queue_keeps_the_top_level_keys_and_one_worker(host, tmp_path):
    """multi-queue-num-queues 1 (or absent): the keys at the top level, as
    Linux's blkfront writes them, served by the device's own worker."""
    path = _image(tmp_path)
    img = DiskImage.open(path)
    be = BlockBackend(host, 0, img, max_queues=4)
    host.backends.append(be)
    fe = FakeFrontend(host, host.ram, xvd_devid(0))
    host.store.write(f"{fe.path}/multi-queue-num-queues", "1")
    fe.connect()
    assert len(be.queues) == 1 and be.queues[0].worker is None and not _queue_threads(be)
    ref = fe.grant(FakeFrontend.DATA_PFN)
    assert fe.do(fe.request(BlkifOp.read, 5, [(ref, 0, 0)])) == BlkifStatus.okay
    assert host.ram.read(FakeFrontend.DATA_PFN * PAGE_SIZE, 8) == (5).to_bytes(8, "little")
    img.close()


@pytest.mark.parametrize("num_queues, why", [
    ("0", "valid range is 1 - 4"),
    ("5", "guest requested 5 queues"),
    ("4294967297", "valid range"),
    ("-1", "valid range"),
    ("two", "is not a number"),
    ("", "is not a number"),
])
def test_bad_number_of_queues_ends_the_device(host, tmp_path, num_queues, why):
    """As Linux's blkback (connect_ring): 0 or above the maximum is a buggy
    or malicious guest; pyvmm refuses what is not a number too."""
    img, be, fe = _mq_attach(host, _image(tmp_path), 2, num_queues=num_queues)
    _fails_with(fe, why)
    assert host.gnttab.active_mappings() == 0 and not _queue_threads(be)
    img.close()


@pytest.mark.parametrize("case", ["missing ring-ref", "bad event-channel", "event channel no port",
                                  "wild ring-ref", "ring-ref twice", "event channel twice"])
def test_bad_queue_keys_end_the_device_and_release_everything(host, tmp_path, case):
    img, be, fe = _mq_attach(host, _image(tmp_path), 3)
    if case == "missing ring-ref":
        host.store.rm(f"{fe.path}/queue-2/ring-ref")
        why = "queue-2/ring-ref' missing"
    elif case == "bad event-channel":
        fe.key(1, "event-channel", "seven")
        why = "bad queue-1/ring-ref/event-channel"
    elif case == "event channel no port":
        fe.key(2, "event-channel", 4000)
        why = "event channel 4000"
    elif case == "wild ring-ref":
        fe.key(2, "ring-ref", 99999)
        why = "99999"
    elif case == "ring-ref twice":
        fe.key(2, "ring-ref", fe.ring_refs[0])
        why = f"ring-ref {fe.ring_refs[0]} named twice"
    else:
        fe.key(1, "event-channel", fe.ports[0])
        why = f"event-channel {fe.ports[0]} named twice"
    _fails_with(fe, why)
    # nothing of the queues set up before the bad one is left behind
    assert host.gnttab.active_mappings() == 0 and not _queue_threads(be)
    for p in fe.ports:                        # every port back to unbound, for a fresh start
        be2 = host.evtchn.backend_bind(p, lambda: None)
        be2.close()
    img.close()


def test_bogus_index_on_one_queue_ends_the_device_then_it_starts_over(host, tmp_path):
    """A ring overflow on queue 1 ends the whole device (Linux's blkback
    halts only that ring and leaves its requests unanswered): every queue's
    worker stops, every ring is let go; the frontend starts over and gets a
    working device."""
    img, be, fe = _mq_attach(host, _image(tmp_path), 2)
    fe.connect()
    ref = fe.grant(FakeFrontend.DATA_PFN)
    fe.on(1).push(fe.request(BlkifOp.read, 0, [(ref, 0, 0)]), req_prod=BLKIF_RING_SIZE + 5)
    wait_for(lambda: fe.backend_state() == XenbusState.Closing, "the device closing")
    assert fe.backend_key("error").startswith("queue 1: ring overflow")
    wait_for(lambda: not _queue_threads(be), "the queue workers stop")
    assert host.gnttab.active_mappings() == 0 and not be.connected
    fe.state(XenbusState.Closed)
    wait_for(lambda: fe.backend_state() == XenbusState.Closed, "backend Closed")
    fe.state(XenbusState.Initialising)
    wait_for(lambda: fe.backend_state() == XenbusState.InitWait, "InitWait again")
    MultiQueueFrontend.RING_PFN, MultiQueueFrontend.RING_REF = 0x50, 60
    try:
        fe2 = MultiQueueFrontend(host, host.ram, xvd_devid(0), 2)
    finally:
        MultiQueueFrontend.RING_PFN, MultiQueueFrontend.RING_REF = 0x40, 40
    fe2.connect()
    ref2 = fe2.grant(FakeFrontend.DATA_PFN + 2)
    assert fe2.on(1).do(fe2.request(BlkifOp.read, 9, [(ref2, 0, 0)])) == BlkifStatus.okay
    assert host.ram.read((FakeFrontend.DATA_PFN + 2) * PAGE_SIZE, 8) == (9).to_bytes(8, "little")
    img.close()


def test_persistent_pools_are_per_queue_and_bounded(host, tmp_path, monkeypatch):
    """Each queue keeps its own pool (Linux's blkback: per ring), each
    bounded by MAX_PERSISTENT_GRANTS; a grant used on two queues is mapped
    once per queue; disconnect lets all of them go."""
    from pyvmm.backends import blkback
    monkeypatch.setattr(blkback, "MAX_PERSISTENT_GRANTS", 3)
    img, be, fe = _mq_attach(host, _image(tmp_path), 2)
    host.store.write(f"{fe.path}/feature-persistent", "1")
    fe.connect()
    assert be.persistent
    refs = [fe.grant(FakeFrontend.DATA_PFN + i) for i in range(8)]
    for q in (0, 1):
        assert fe.on(q).do(fe.request(BlkifOp.read, 0, [(r, 0, 7) for r in refs[:6]])) == BlkifStatus.okay
        assert fe.on(q).do(fe.request(BlkifOp.read, 0, [(r, 0, 7) for r in refs[2:]])) == BlkifStatus.okay
    assert [len(q.persistent) for q in be.queues] == [3, 3]
    assert host.gnttab.active_mappings() == 2 + 2 * 3
    assert be.stats["persistent_maps"] == 6
    fe.state(XenbusState.Closing)
    wait_for(lambda: host.gnttab.active_mappings() == 0, "every mapping released")
    img.close()
