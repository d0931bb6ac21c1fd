"""Block back-end (Xen's blkback protocol, io/blkif.h) over a host file or device.

Requests are served straight between the disk image and the guest pages
the frontend granted: one preadv/pwritev per request, the iovecs being
views of guest memory, so no data is copied in Python.

Advertised: read, write, flush (feature-flush-cache -> fdatasync),
discard (feature-discard -> FALLOC_FL_PUNCH_HOLE, regular files only),
indirect segments (feature-max-indirect-segments: up to 256 segments, 1 MiB,
per request, listed in granted pages), persistent grants (feature-persistent,
below), read-only disks (mode "r": VDISK_READONLY, writes and discards
refused), multiple queues (below).  Not (yet): multi-page rings; the
frontend falls back to one page per ring.

Multiple queues: multi-queue-max-queues is the guest's vCPU count, at most
MAX_QUEUES (Linux's blkfront uses at most 4 by default, and each queue
here is a Python thread: past the host's few cores more only contend for
the GIL).  A frontend that asks for N > 1 (multi-queue-num-queues) gives
queue-K/ring-ref and queue-K/event-channel per queue; each queue gets its
own ring, port, persistent-grant pool and worker thread, and its
responses go on its own ring and port.  The workers run in parallel where
it counts: preadv/pwritev and fdatasync release the GIL, so one queue's
disk I/O overlaps another's Python.  Queues share only the image's fd
(pread/pwrite at explicit offsets need no lock; the kernel orders
overlapping requests no worse than two in flight on one queue) and the
rate limiter (locked).  Refused, ending the device: num-queues 0, above
the maximum or not a number (as Linux's blkback), a queue's key missing
or not a number, one ring-ref or event channel named for two queues (Xen
refuses the second bind of a port; a ring page shared by two queues Linux
would map twice, pyvmm refuses), a bogus ring index on any queue (Linux's
blkback halts only that ring and leaves the guest's requests on it
unanswered; pyvmm ends the device as it does with one queue).

Persistent grants: when both ends offer feature-persistent, the frontend
keeps a pool of granted pages and copies data through them, and this
back-end keeps each pool page it meets mapped (writable, as Linux's blkback
maps them) until the device disconnects, so a request costs a dictionary
look-up per segment instead of a grant map and unmap (~20-60 us each in
Python: 5-15 ms per MiB).  At most MAX_PERSISTENT_GRANTS stay mapped per
queue (what a full ring of the largest requests uses; per ring as in Linux:
each queue's frontend ring has its own pool); past that, and for a grant
that cannot be mapped writable, segments are mapped for the one request.  As with Xen, a
mapping outlives what the guest later writes into the grant entry: a
frontend that rewrites or revokes a reference it left mapped keeps reading
and writing the page it first granted (its own RAM, held typed writable, so
never a page table and never given back to the host while mapped).  An optional rate limit (ratelimit.py: bytes and
requests per second) holds requests on the ring while over it.

Every request is checked before any I/O: operation, segment count, sector
bounds within a page and within the disk, the grants themselves.  A bad
request gets BLKIF_RSP_ERROR and touches neither the image nor guest
memory outside the granted pages; a bogus ring index ends the device.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import collections
import logging
import os
import stat
from dataclasses import dataclass

from pyvmm.xen_abi.abi import (
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_SEGMENTS_PER_INDIRECT_PAGE,
    BLKIF_RING_ENTRY_SIZE,
    BLKIF_RING_SIZE,
    BLKIF_SEGMENT_STRUCT,
    BLKIF_SECTOR_SIZE,
    BLKIF_SECTORS_PER_PAGE,
    VDISK_READONLY,
    XVD_MAJOR,
    BlkifOp,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifResponse,
    BlkifSegment,
    BlkifStatus,
)
from pyvmm.xen_abi.hypervisor.evtchn import BACKEND_DOMID
from pyvmm.xen_abi.hypervisor.grant_table import GrantError

from .xenbus import (MAX_QUEUES, BackendQueue, BackRing, ProtocolError, XenbusBackend, check_distinct,
                     default_max_queues, queue_dir, read_num_queues)

log = logging.getLogger(__name__)

__all__ = ["BlockBackend", "DiskImage", "DiskError", "xvd_devid", "xvd_name", "MAX_QUEUES"]

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
#: Segments per indirect request we accept (Linux's blkback offers the same).
MAX_INDIRECT_SEGMENTS = 256
#: Grants kept mapped per queue with feature-persistent: every grant a full
#: ring of the largest requests uses (data pages and indirect pages), so a
#: frontend keeping its ring full of 1 MiB requests is served from the pool.
#: Linux blkback's 1,056 held ~half of fio's eight 1 MiB requests in
#: flight; the rest were mapped per request, 12x slower in the faithful
#: lane (bench/README.md).  Bounds what a frontend can make us hold:
#: ~400 bytes of Python per mapping (it, its view, three dictionary slots),
#: 3.2 MiB per queue, MAX_QUEUES times that at most.
MAX_PERSISTENT_GRANTS = BLKIF_RING_SIZE * (MAX_INDIRECT_SEGMENTS + -(-MAX_INDIRECT_SEGMENTS
                                                                   // BLKIF_SEGMENTS_PER_INDIRECT_PAGE))
_SEGMENT_SIZE = ctypes.sizeof(BlkifSegment)
_PAGE = BLKIF_SECTORS_PER_PAGE * BLKIF_SECTOR_SIZE


def xvd_devid(index: int) -> int:
    """virtual-device number of the index-th disk (xvda = 51712)."""
    return (XVD_MAJOR << 8) | (index << 4)


def xvd_name(index: int) -> str:
    return "xvd" + "abcdefghijklmnopqrstuvwxyz"[index]


class DiskError(Exception):
    """A disk image that cannot be used; str() is one line for the user."""


@dataclass
class DiskImage:
    """An open, locked disk image (raw)."""
    path: str
    fd: int
    size: int           # bytes
    readonly: bool
    is_file: bool       # a regular file (discard by punching holes)

    @classmethod
    def open(cls, path: str, readonly: bool = False) -> "DiskImage":
        try:
            fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DiskError(f"disk image {path}: no such file; create one, e.g. "
                            f"truncate -s 1G {path}") from None
        except IsADirectoryError:
            raise DiskError(f"disk image {path} is a directory; give a file or block device") from None
        except PermissionError:
            raise DiskError(f"disk image {path}: permission denied"
                            + ("" if readonly else "; add ,ro to attach it read-only")) from None
        except OSError as e:
            raise DiskError(f"disk image {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise DiskError(f"disk image {path} is not a regular file or block device")
            try:
                # one writer per image, as xl refuses a disk another domain uses
                fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DiskError(f"disk image {path} is in use by another guest (locked); "
                                f"stop that guest or attach a copy") from None
            size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
            if size < BLKIF_SECTOR_SIZE:
                raise DiskError(f"disk image {path} is empty ({size} bytes); give it a size, "
                                f"e.g. truncate -s 1G {path}")
            return cls(path, fd, size, readonly, stat.S_ISREG(st.st_mode))
        except BaseException:
            os.close(fd)
            raise

    @property
    def sectors(self) -> int:
        return self.size // BLKIF_SECTOR_SIZE

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)           # drops the lock too
            self.fd = -1


_libc = None


def _punch_hole(fd: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class _BadRequest(Exception):
    """This one request is refused (BLKIF_RSP_ERROR); the device goes on."""


class _BlkQueue(BackendQueue):
    """One ring of a disk: the ring, and the persistent grants met on it
    (gref -> GrantMapping, until disconnect).  Only its worker touches it."""

    def __init__(self, index: int, ring: BackRing):
        super().__init__(index)
        self.ring = ring
        self.persistent: dict[int, object] = {}
        self.persistent_views: dict[int, memoryview] = {}   # gref -> its page, for the iovecs


class BlockBackend(XenbusBackend):
    """Disk `index` (xvda, xvdb, ...) of a guest, served from `image`
    (which the caller opened and closes).  `max_queues`: what
    multi-queue-max-queues offers (default: the guest's vCPUs, at most
    MAX_QUEUES)."""

    kind = "vbd"

    def __init__(self, host, index: int, image: DiskImage, limiter=None, max_queues: int | None = None):
        self.image = image
        self.index = index
        self.limiter = limiter               # ratelimit.RateLimiter or None
        self.limiters = {"requests": limiter} if limiter is not None else {}
        self.max_queues = default_max_queues(host) if max_queues is None else max(1, int(max_queues))
        self.persistent = False              # both ends offered feature-persistent
        self._device_stats = collections.Counter(
            {"read": 0, "write": 0, "flush": 0, "discard": 0, "error": 0, "bytes_read": 0, "bytes_written": 0})
        devid = xvd_devid(index)
        super().__init__(host, devid, name=f"vbd-{xvd_name(index)}",
                         frontend={"virtual-device": devid, "device-type": "disk"})

    # ---- handshake ----
    def features(self) -> dict:
        f = {"params": self.image.path, "mode": "r" if self.image.readonly else "w",
             "type": "file", "dev": xvd_name(self.index), "removable": 0,
             "feature-flush-cache": 1, "feature-barrier": 0, "feature-persistent": 1,
             "feature-max-indirect-segments": MAX_INDIRECT_SEGMENTS, "max-ring-page-order": 0,
             "multi-queue-max-queues": self.max_queues}
        if self.image.is_file and not self.image.readonly:
            f.update({"feature-discard": 1, "discard-granularity": _PAGE,
                      "discard-alignment": 0, "discard-secure": 0})
        return f

    def connect(self, read) -> dict:
        protocol = self._optional(read, "protocol", "x86_64-abi")
        if protocol != "x86_64-abi":
            raise ProtocolError(f"unsupported ring protocol {protocol!r}")
        if self._optional(read, "ring-page-order", "0") != "0":
            raise ProtocolError("multi-page rings were not offered")
        n = read_num_queues(read, self.max_queues)
        # every queue's keys first: nothing is mapped for a frontend whose
        # later queue is bad, and no page or port serves two queues
        keys = []
        for i in range(n):
            d = queue_dir(i, n)
            try:
                keys.append((int(read(f"{d}ring-ref")), int(read(f"{d}event-channel"))))
            except ValueError as e:
                raise ProtocolError(f"bad {d}ring-ref/event-channel: {e}") from None
        check_distinct({"ring-ref": [k[0] for k in keys], "event-channel": [k[1] for k in keys]})
        self.persistent = self._optional(read, "feature-persistent", "0") == "1"
        queues = []
        for i, (ref, port) in enumerate(keys):
            q = _BlkQueue(i, BackRing(self.map_grant(ref), BLKIF_RING_ENTRY_SIZE, BlkifRequest, BlkifResponse))
            self.bind_queue(q, port, lambda q=q: self._serve_queue(q), several=n > 1)
            queues.append(q)
        self.queues = queues
        return {"sectors": self.image.sectors, "info": VDISK_READONLY if self.image.readonly else 0,
                "sector-size": BLKIF_SECTOR_SIZE, "physical-sector-size": BLKIF_SECTOR_SIZE}

    @staticmethod
    def _optional(read, key: str, default: str) -> str:
        try:
            return read(key)
        except ProtocolError:
            return default

    def disconnect(self) -> None:
        # the queue workers are stopped (xenbus.py's teardown): nothing
        # uses these mappings any more
        self.persistent = False
        for q in self.queues:
            maps, q.persistent, q.persistent_views = q.persistent, {}, {}
            for m in maps.values():
                try:
                    self.host.gnttab.unmap(m)
                except GrantError:
                    pass

    @property
    def ring(self) -> BackRing | None:
        """The first queue's ring (the only one with one queue)."""
        queues = self.queues
        return queues[0].ring if queues else None

    def rings(self) -> dict:
        queues = list(self.queues)
        if len(queues) == 1:
            return {"blk": queues[0].ring}
        return {f"blk{q.index}": q.ring for q in queues}

    # ---- the rings ----
    def process(self) -> None:
        """The device's worker: serves the ring when there is one queue
        (with several, each queue's worker runs _serve_queue)."""
        queues = self.queues
        if len(queues) == 1:
            self._serve_queue(queues[0])

    def _serve_queue(self, q: _BlkQueue) -> None:
        """Answer what is on one queue's ring, on that ring and its port
        (the one thread serving this queue)."""
        ring = q.ring
        while True:
            while ring.unconsumed():
                wait = self.limiter.wait() if self.limiter is not None else 0
                if wait:                     # over the rate: what is done goes out, the rest waits
                    if ring.push_responses():
                        q.notify()
                    self.retry_queue_later(q, wait)
                    return
                if q.worker is not None and q.worker.stopping:
                    break                    # teardown: leave the rest on the ring
                req = ring.take_request()
                status = self._serve(q, req)
                # an indirect request is answered with the operation it carried
                op = req.operation
                if op == BlkifOp.indirect:
                    op = BlkifRequestIndirect.from_buffer_copy(req).indirect_op
                ring.put_response(BlkifResponse(id=req.id, operation=op, status=status))
            if ring.push_responses():
                q.notify()
            if (q.worker is not None and q.worker.stopping) or not ring.final_check():
                return

    def _serve(self, q: _BlkQueue, req: BlkifRequest) -> int:
        op = req.operation
        stats = q.stats
        try:
            if op in (BlkifOp.read, BlkifOp.write):
                self._rw(q, req.sector_number, self._direct_segments(req), write=op == BlkifOp.write)
            elif op == BlkifOp.indirect:
                ind = BlkifRequestIndirect.from_buffer_copy(req)
                if ind.indirect_op not in (BlkifOp.read, BlkifOp.write):
                    raise _BadRequest(f"indirect operation {ind.indirect_op}")
                self._rw(q, ind.sector_number, self._indirect_segments(q, ind),
                         write=ind.indirect_op == BlkifOp.write)
            elif op == BlkifOp.flush_diskcache:
                self._flush(q, req)
            elif op == BlkifOp.discard:
                self._discard(q, BlkifRequestDiscard.from_buffer_copy(req))
            else:
                stats["error"] += 1
                return BlkifStatus.eopnotsupp
        except (_BadRequest, GrantError) as e:
            log.info("%s of domain %d: request %#x refused: %s", self.name, self.domid, req.id, e)
            stats["error"] += 1
            return BlkifStatus.error
        except OSError as e:
            log.warning("%s of domain %d: I/O error on %s: %s", self.name, self.domid,
                        self.image.path, e.strerror)
            stats["error"] += 1
            return BlkifStatus.error
        return BlkifStatus.okay

    def _check_range(self, sector: int, count: int) -> None:
        if sector + count > self.image.sectors:
            raise _BadRequest(f"sectors [{sector}, +{count}) beyond the disk's {self.image.sectors}")

    @staticmethod
    def _direct_segments(req: BlkifRequest) -> list:
        """(gref, first_sect, last_sect, pad) of each segment in the request."""
        n = req.nr_segments
        if not 1 <= n <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise _BadRequest(f"{n} segments")
        return [(s.gref, s.first_sect, s.last_sect, 0) for s in req.seg[:n]]

    def _indirect_segments(self, q: _BlkQueue, req: BlkifRequestIndirect) -> list:
        """The segment list from the request's indirect pages (copied out:
        the guest may rewrite them while we work)."""
        n = req.nr_segments
        if not 1 <= n <= MAX_INDIRECT_SEGMENTS:
            raise _BadRequest(f"{n} indirect segments (at most {MAX_INDIRECT_SEGMENTS})")
        pages = -(-n // BLKIF_SEGMENTS_PER_INDIRECT_PAGE)
        assert pages <= BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
        raw = bytearray()
        for i in range(pages):
            count = min(n - i * BLKIF_SEGMENTS_PER_INDIRECT_PAGE, BLKIF_SEGMENTS_PER_INDIRECT_PAGE)
            gref = req.indirect_grefs[i]
            m = self._persistent_map(q, gref) if self.persistent else None
            if m is not None:
                raw += m.view[:count * _SEGMENT_SIZE]
            else:
                raw += self.host.gnttab.copy_from_guest(gref, 0, count * _SEGMENT_SIZE, BACKEND_DOMID)
        return list(BLKIF_SEGMENT_STRUCT.iter_unpack(raw))

    @staticmethod
    def _persistent_iov(q: _BlkQueue, segments: list) -> list | None:
        """The iovec list when every segment's grant is already mapped
        persistently on this queue (a frontend's steady state: one dictionary
        look-up and a slice per segment, ~1/4 of the general path's Python);
        else None."""
        views, sector = q.persistent_views, BLKIF_SECTOR_SIZE
        try:
            return [views[g][f * sector:(last + 1) * sector] for g, f, last, _ in segments]
        except KeyError:
            return None

    def _persistent_map(self, q: _BlkQueue, gref: int):
        """The connection-lifetime writable mapping of gref on this queue,
        made on first use; None when the queue's pool is full or the grant
        cannot be mapped writable (the caller maps it for this request,
        which reports any error)."""
        pool = q.persistent
        m = pool.get(gref)
        if m is None and len(pool) < MAX_PERSISTENT_GRANTS:
            try:
                m = self.host.gnttab.map(gref, BACKEND_DOMID, readonly=False)
            except GrantError:
                return None
            pool[gref] = m
            q.persistent_views[gref] = m.view
            q.stats["persistent_maps"] += 1
        return m

    def _rw(self, q: _BlkQueue, sector_number: int, segments: list, write: bool) -> None:
        """segments: (gref, first_sect, last_sect, pad) tuples."""
        if write and self.image.readonly:
            raise _BadRequest("write to a read-only disk")
        per_page = BLKIF_SECTORS_PER_PAGE
        if not all(first <= last < per_page for _, first, last, _ in segments):
            i, (_, first, last, _) = next((i, s) for i, s in enumerate(segments) if not s[1] <= s[2] < per_page)
            raise _BadRequest(f"segment {i}: sectors {first}..{last} of a page")
        sectors = sum(last - first for _, first, last, _ in segments) + len(segments)
        self._check_range(sector_number, sectors)
        total = sectors * BLKIF_SECTOR_SIZE
        gnttab = self.host.gnttab
        # a read fills guest pages: map them writable; a write only reads them
        maps, iov = [], []          # maps: this request's own, unmapped at its end
        try:
            iov = self._persistent_iov(q, segments) if self.persistent else None
            if iov is None:
                iov = []
                for gref, first, last, _ in segments:
                    m = self._persistent_map(q, gref) if self.persistent else None
                    if m is None:
                        m = gnttab.map(gref, BACKEND_DOMID, readonly=write)
                        maps.append(m)
                    iov.append(m.view[first * BLKIF_SECTOR_SIZE:(last + 1) * BLKIF_SECTOR_SIZE])
            pos = sector_number * BLKIF_SECTOR_SIZE
            done = 0
            while done < total:       # short transfers: go on from where it stopped
                part = _skip(iov, done)
                got = (os.pwritev if write else os.preadv)(self.image.fd, part, pos + done)
                if got == 0:
                    raise OSError(errno.EIO, "unexpected end of the image")
                done += got
        finally:
            for v in iov:
                v.release()
            for m in maps:
                gnttab.unmap(m)
        q.stats["write" if write else "read"] += 1
        q.stats["bytes_written" if write else "bytes_read"] += total
        if self.limiter is not None:
            self.limiter.consume(total)

    def _flush(self, q: _BlkQueue, req: BlkifRequest) -> None:
        os.fdatasync(self.image.fd)
        q.stats["flush"] += 1
        if self.limiter is not None:
            self.limiter.consume(0)          # an operation, no bytes

    def _discard(self, q: _BlkQueue, req: BlkifRequestDiscard) -> None:
        if self.image.readonly:
            raise _BadRequest("discard on a read-only disk")
        self._check_range(req.sector_number, req.nr_sectors)
        if not self.image.is_file:
            return                  # a block device: discard is only a hint
        _punch_hole(self.image.fd, req.sector_number * BLKIF_SECTOR_SIZE,
                    req.nr_sectors * BLKIF_SECTOR_SIZE)
        q.stats["discard"] += 1


def _skip(iov: list[memoryview], n: int) -> list[memoryview]:
    """The iovec list with its first n bytes dropped."""
    if n == 0:
        return iov
    out = []
    for v in iov:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out
