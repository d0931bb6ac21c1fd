"""Fuzzing the block back-end over a real ring: random operations, segment
counts, grant references and entries, sector ranges, indirect pages, bogus
ring indices, and grant entries rewritten while the back-end uses them.

The device is the real BlockBackend with its worker thread, on a small
image file and 64 pages of canary-filled guest RAM.  Oracles:
* every request gets exactly one response, in order, with its id and
  operation; a bogus index ends the device with its error in xenstore;
* without races, a model of blkif (what Xen's blkback accepts, and what a
  read or write does to the granted pages and the image) predicts every
  status and the exact final RAM and image;
* with races: frames never granted writable keep their canary, the image
  changes only inside the sectors of writes/discards that were answered
  okay;
* no grant mapping is left behind, no GTF_reading/GTF_writing left set.
"""
from __future__ import annotations

import ctypes
import os
import tempfile

import pytest

from hypothesis import given
from hypothesis import strategies as st

from fuzzhost import NR_REFS, RAM_PAGES, FuzzHost, handshake, track_busy, wait, wait_idle
from fuzzlib import Finding, Input, Oracle, ci_settings
from pyvmm.backends.blkback import MAX_INDIRECT_SEGMENTS, BlockBackend, DiskImage
from pyvmm.xen_abi.abi import (
    BLKIF_RING_ENTRY_SIZE,
    BLKIF_RING_SIZE,
    DOMID_SELF,
    GTF_permit_access,
    GTF_readonly,
    PAGE_SIZE,
    SRING_HEADER_SIZE,
    BlkifOp,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifResponse,
    BlkifSegment,
    BlkifStatus,
    SharedRingHeader,
    XenbusState,
)

SECTORS = 128
SECTOR = 512
RING_PFN, RING_REF = 0, 2
IND_PFNS = (1, 2)
DATA_PFNS = tuple(range(3, 24))
FRAMES = DATA_PFNS * 3 + IND_PFNS + (30, 50, RAM_PAGES - 1, RAM_PAGES, 0xFFFFFFFF, 0x10001)
REFS = tuple(range(8, 40))
IND_REFS = (40, 41)
DISK_PATTERN = bytes((i * 7 + (i >> 9) * 13) & 0xFF for i in range(SECTORS * SECTOR))
OPS = (BlkifOp.read, BlkifOp.write, BlkifOp.read, BlkifOp.write, BlkifOp.indirect, BlkifOp.indirect,
       BlkifOp.flush_diskcache, BlkifOp.discard, BlkifOp.write_barrier, 4, 7, 255)


def _not_ring(ref: int) -> int:
    """Requests naming the ring's own grant would have the ring page
    overwritten with disk data: only the guest's loss, and it would blind
    the response checks."""
    return ref + 1 if ref == RING_REF else ref


class Harness:
    MAX_SIZE = 3000

    def __init__(self):
        self.fh = FuzzHost()
        self.fh.pinned_refs = {RING_REF}
        self.dir = tempfile.mkdtemp(prefix="pyvmm-fuzz-blk-")
        self.path = os.path.join(self.dir, "disk.img")
        with open(self.path, "wb") as f:
            f.write(DISK_PATTERN)
        self.image = DiskImage.open(self.path)
        self.be = None
        self.devices = 0

    def close(self):
        if self.be:
            self.be.close()
        self.image.close()
        os.unlink(self.path)
        os.rmdir(self.dir)
        self.fh.close()

    def reset(self):
        """Drop the device (after a finding: its state is unknown)."""
        if self.be:
            self.be.close()
            self.fh.gnttab.race = None
            self.be = None
            self.fh.host.evtchn.close(self.port)    # the frontend's port goes with its device

    # -- the device --------------------------------------------------------

    def _new_device(self):
        self.reset()
        fh = self.fh
        self.devices += 1
        fh.clear_grants(set())
        fh.grant(RING_REF, GTF_permit_access, 0, RING_PFN)
        ring = fh.page(RING_PFN)
        ring[:] = bytes(PAGE_SIZE)
        hdr = SharedRingHeader(req_event=1, rsp_event=1)
        ring[:SRING_HEADER_SIZE] = bytes(hdr)
        self.req_prod = self.rsp_cons = 0
        port = self.port = fh.host.evtchn.alloc_unbound(DOMID_SELF, 0)
        self.be = BlockBackend(fh.host, self.devices % 16, self.image)
        track_busy(self.be)
        handshake(fh.host.store, self.be, self.be.fe_path,
                  {"ring-ref": RING_REF, "event-channel": port, "protocol": "x86_64-abi"})

    def _header(self):
        return SharedRingHeader.from_buffer_copy(self.fh.page(RING_PFN)[:SRING_HEADER_SIZE])

    # -- one input ---------------------------------------------------------

    def one(self, data: bytes) -> None:
        inp = Input(data)
        fh = self.fh
        if self.be is None or self.be.failed or not self.be.connected:
            self._new_device()
        fh.writable = set()
        fh.fill_canary({RING_PFN})
        os.pwrite(self.image.fd, DISK_PATTERN, 0)
        fh.clear_grants({RING_REF})
        for ref in REFS:
            k = inp.u8()
            flags = GTF_permit_access | (GTF_readonly if k & 7 == 0 else 0)
            if k >= 240:
                flags = inp.u16() & ~0x18          # junk type/flags (not the busy bits)
            fh.grant(ref, flags, 0 if k < 250 else inp.u16(), inp.choice(FRAMES))
        self.ind_counts = []
        for pfn, ref in zip(IND_PFNS, IND_REFS):    # indirect segment lists, as the guest writes them
            n = inp.below(inp.choice((4, 16, MAX_INDIRECT_SEGMENTS + 2)))
            segs = (BlkifSegment * n)(*[self._segment(inp) for _ in range(n)])
            fh.guest_write(pfn * PAGE_SIZE, bytes(segs))
            fh.grant(ref, GTF_permit_access | GTF_readonly, 0, pfn)
            self.ind_counts.append(n)
        ram0 = bytes(fh.mv)
        reqs = [self._request(inp) for _ in range(1 + inp.below(BLKIF_RING_SIZE))]
        self.raced = False
        racy = inp.chance(64)
        fh.gnttab.race = (lambda ref: self._race(inp, ref)) if racy else None
        bogus = inp.chance(8)

        ring = fh.page(RING_PFN)
        for r in reqs:
            off = SRING_HEADER_SIZE + (self.req_prod % BLKIF_RING_SIZE) * BLKIF_RING_ENTRY_SIZE
            raw = bytes(r)
            ring[off:off + len(raw)] = raw
            self.req_prod += 1
        hdr = self._header()
        # bogus: more requests than the ring has slots (33 .. 2**32 - 64 ahead)
        hdr.req_prod = (self.req_prod + (33 + inp.interesting(32) % (2**32 - 97) if bogus else 0)) & 0xFFFFFFFF
        ring[:SRING_HEADER_SIZE] = bytes(hdr)
        self.be.kick()
        target = self.req_prod & 0xFFFFFFFF
        wait(lambda: self._header().rsp_prod == target
             or (self.be.failed and self.be.backend_state() == XenbusState.Closing), "responses")
        fh.gnttab.race = None
        wait_idle(self.be)

        if bogus:
            if not self.be.failed:
                raise Finding(f"req_prod {hdr.req_prod:#x} beyond the ring did not end the device")
            err = fh.host.store.read_str(f"{self.be.be_path}/error", "")
            if not err:
                raise Finding("failed device without its error in xenstore")
            # what it answered before failing still obeys the oracles below
        elif self.be.failed:
            raise Finding(f"device failed on honest indices: {self.be.failed}")
        rsps = self._responses()
        fh.check_released(keep_mapped=0 if self.be.failed else 1)
        if len(rsps) > len(reqs) or (not bogus and len(rsps) != len(reqs)):
            raise Finding(f"{len(rsps)} responses to {len(reqs)} requests")
        for req, rsp in zip(reqs, rsps):
            op = req.operation
            if op == BlkifOp.indirect:
                op = BlkifRequestIndirect.from_buffer_copy(req).indirect_op
            if rsp.id != req.id or rsp.operation != op or rsp.status not in (0, -1, -2):
                raise Finding(f"response id {rsp.id:#x} op {rsp.operation} status {rsp.status} "
                              f"to request id {req.id:#x} op {op}")
        if self.raced or bogus:
            self._check_loosely(reqs, rsps)
        else:
            self._check_model(reqs, rsps, ram0)

    def _responses(self):
        page = self.fh.page(RING_PFN)
        hdr = self._header()
        out = []
        while self.rsp_cons != hdr.rsp_prod:
            off = SRING_HEADER_SIZE + (self.rsp_cons % BLKIF_RING_SIZE) * BLKIF_RING_ENTRY_SIZE
            out.append(BlkifResponse.from_buffer_copy(page[off:off + ctypes.sizeof(BlkifResponse)]))
            self.rsp_cons = (self.rsp_cons + 1) & 0xFFFFFFFF
        hdr.rsp_event = self.rsp_cons + 1
        page[:SRING_HEADER_SIZE] = bytes(hdr)
        return out

    # -- what the guest writes -----------------------------------------------

    @staticmethod
    def _segment(inp: Input) -> BlkifSegment:
        gref = inp.choice(REFS) if inp.chance(230) else _not_ring(inp.interesting(32))
        first = inp.below(8) if inp.chance(230) else inp.u8()
        last = first + inp.below(8 - first) if first < 8 and inp.chance(220) else inp.u8()
        return BlkifSegment(gref=gref, first_sect=first, last_sect=last)

    @staticmethod
    def _sector(inp: Input) -> int:
        return inp.below(SECTORS + 8) if inp.chance(220) else inp.interesting(64)

    def _request(self, inp: Input):
        op = inp.choice(OPS)
        rid = inp.u64()
        if op == BlkifOp.indirect:
            which = inp.below(2)
            k = inp.u8()
            n = (1 + inp.below(max(self.ind_counts[which], 1)) if k < 200
                 else inp.below(MAX_INDIRECT_SEGMENTS + 2) if k < 240 else inp.u16())
            r = BlkifRequestIndirect(operation=op, indirect_op=inp.choice((0, 1, 0, 1, 3, 6, 9)),
                                     nr_segments=n, id=rid, sector_number=self._sector(inp))
            for i in range(8):
                r.indirect_grefs[i] = inp.choice(REFS) if inp.chance(30) else _not_ring(inp.interesting(32))
            if inp.chance(220):
                r.indirect_grefs[0] = IND_REFS[which]
            return BlkifRequest.from_buffer_copy(bytes(r).ljust(ctypes.sizeof(BlkifRequest), b"\0"))
        if op == BlkifOp.discard:
            r = BlkifRequestDiscard(operation=op, flag=inp.u8() & 1, id=rid, sector_number=self._sector(inp),
                                    nr_sectors=inp.below(SECTORS + 4) if inp.chance(220) else inp.interesting(64))
            return BlkifRequest.from_buffer_copy(bytes(r).ljust(ctypes.sizeof(BlkifRequest), b"\0"))
        r = BlkifRequest(operation=op, nr_segments=1 + inp.below(inp.choice((2, 4, 11))) if inp.chance(230) else inp.u8(),
                         id=rid, sector_number=self._sector(inp))
        for i in range(min(r.nr_segments, 11)):
            r.seg[i] = self._segment(inp)
        return r

    def _race(self, inp: Input, ref: int) -> None:
        """The guest rewrites a grant entry just as the back-end takes it."""
        if not inp.chance(40):
            return
        self.raced = True
        target = ref if inp.chance(160) or not 0 <= ref < NR_REFS else inp.choice(REFS)
        if target == RING_REF or not 0 <= target < NR_REFS:
            return
        k = inp.u8() % 4
        flags = (0, GTF_permit_access, GTF_permit_access | GTF_readonly, inp.u16() & ~0x18)[k]
        self.fh.grant(target, flags, 0, inp.choice(FRAMES))

    # -- oracles -------------------------------------------------------------

    def _check_loosely(self, reqs, rsps) -> None:
        self.fh.check_untouched({RING_PFN})
        allowed = bytearray(SECTORS)
        for req, rsp in zip(reqs, rsps):
            if rsp.status != BlkifStatus.okay:
                continue
            op, sector = req.operation, req.sector_number
            if op == BlkifOp.indirect:
                ind = BlkifRequestIndirect.from_buffer_copy(req)
                op, n = ind.indirect_op, ind.nr_segments * 8
            elif op == BlkifOp.discard:
                n = BlkifRequestDiscard.from_buffer_copy(req).nr_sectors
            else:
                n = req.nr_segments * 8
            if op in (BlkifOp.write, BlkifOp.discard):
                for s in range(sector, min(sector + n, SECTORS)):
                    allowed[s] = 1
        disk = os.pread(self.image.fd, SECTORS * SECTOR, 0)
        for s in range(SECTORS):
            lo = s * SECTOR
            if not allowed[s] and disk[lo:lo + SECTOR] != DISK_PATTERN[lo:lo + SECTOR]:
                raise Finding(f"sector {s} changed outside every okay write/discard")

    def _check_model(self, reqs, rsps, ram0: bytes) -> None:
        ram = bytearray(ram0)
        disk = bytearray(DISK_PATTERN)
        gnttab = self.fh.gnttab
        for i, (req, rsp) in enumerate(zip(reqs, rsps)):
            want = model_request(req, ram, disk, gnttab)
            if rsp.status != want:
                raise Finding(f"request {i} ({req.operation}, {req.nr_segments} segs, sector "
                              f"{req.sector_number:#x}): status {rsp.status}, the model says {want}")
        ring = slice(RING_PFN * PAGE_SIZE, (RING_PFN + 1) * PAGE_SIZE)
        ram[ring] = self.fh.mv[ring]
        if self.fh.mv != ram:
            bad = next(i for i in range(len(ram)) if ram[i] != self.fh.mv[i])
            raise Finding(f"guest RAM differs from the model at {bad:#x}")
        if os.pread(self.image.fd, SECTORS * SECTOR, 0) != disk:
            raise Finding("the image differs from the model")


def _frame(gnttab, ref: int, writable: bool):
    """The frame a dom0 mapping of `ref` gets, or None if Xen would refuse it."""
    if not 0 <= ref < NR_REFS:
        return None
    e = gnttab.read_entry(ref)
    if e.flags & 3 != GTF_permit_access or e.domid != 0:
        return None
    if writable and e.flags & GTF_readonly:
        return None
    return e.frame if e.frame < RAM_PAGES else None


def model_request(req, ram: bytearray, disk: bytearray, gnttab) -> int:
    """blkif as Xen's blkback serves it: the status, and the effect on the model."""
    op = req.operation
    if op == BlkifOp.flush_diskcache:
        return BlkifStatus.okay
    if op == BlkifOp.discard:
        d = BlkifRequestDiscard.from_buffer_copy(req)
        if d.sector_number + d.nr_sectors > SECTORS or d.nr_sectors == 0:
            return BlkifStatus.error        # Linux refuses an empty discard too (EINVAL)
        disk[d.sector_number * SECTOR:(d.sector_number + d.nr_sectors) * SECTOR] = \
            bytes(d.nr_sectors * SECTOR)
        return BlkifStatus.okay
    if op == BlkifOp.indirect:
        ind = BlkifRequestIndirect.from_buffer_copy(req)
        op, n = ind.indirect_op, ind.nr_segments
        if op not in (BlkifOp.read, BlkifOp.write) or not 1 <= n <= MAX_INDIRECT_SEGMENTS:
            return BlkifStatus.error
        frame = _frame(gnttab, ind.indirect_grefs[0], writable=False)
        if frame is None:
            return BlkifStatus.error
        segs = list((BlkifSegment * n).from_buffer_copy(ram, frame * PAGE_SIZE))
        sector = ind.sector_number
    elif op in (BlkifOp.read, BlkifOp.write):
        if not 1 <= req.nr_segments <= 11:
            return BlkifStatus.error
        segs, sector = list(req.seg)[:req.nr_segments], req.sector_number
    else:
        return BlkifStatus.eopnotsupp
    spans = []
    for s in segs:
        if not s.first_sect <= s.last_sect < 8:
            return BlkifStatus.error
        frame = _frame(gnttab, s.gref, writable=op == BlkifOp.read)
        if frame is None:
            return BlkifStatus.error
        spans.append((frame * PAGE_SIZE + s.first_sect * SECTOR, (s.last_sect - s.first_sect + 1) * SECTOR))
    total = sum(n for _, n in spans)
    if sector + total // SECTOR > SECTORS:
        return BlkifStatus.error
    pos = sector * SECTOR
    if op == BlkifOp.read:
        for at, n in spans:
            ram[at:at + n] = disk[pos:pos + n]
            pos += n
    else:
        # pwritev gathers every span before writing: a span written by an
        # earlier one of the same request is read as it was
        data = b"".join(bytes(ram[at:at + n]) for at, n in spans)
        disk[pos:pos + len(data)] = data
    return BlkifStatus.okay


@ci_settings(400)
@given(st.binary(max_size=Harness.MAX_SIZE))
def test_fuzz_blkif(harness, data):
    with Oracle() as oracle:
        oracle.run_or_reset(harness, data)



@pytest.fixture(scope="module")
def harness():
    h = Harness()
    yield h
    h.close()
