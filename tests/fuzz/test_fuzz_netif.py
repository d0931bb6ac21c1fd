"""Fuzzing the network back-end over real rings: transmit packets of random
slots (flags, sizes, offsets, fragments, extra-info chains, grant refs),
receive buffers of random grants for frames of random sizes, bogus ring
indices, and grant entries rewritten while the back-end uses them.

The device is the real NetBackend with its worker thread, on one end of a
socket pair (the peer reads what the guest transmits; received frames are
queued as the link reader queues them), once without vnet headers (blank
checksums filled in, GSO refused) and once with them (blank checksums and
GSO passed in a virtio_net_hdr, the packet written from mapped grants).
Oracles:
* every transmit slot and every used receive buffer gets one response, in
  order, with its id; slots that run past the producer, a packet over 18
  slots or a bogus index end the device with its error in xenstore;
* without races, a model of netif predicts every status, each frame on the
  link, each received byte in guest RAM, and the final RAM;
* with races: frames never granted writable keep their canary;
* no grant mapping left behind, no GTF_reading/GTF_writing left set.
"""
from __future__ import annotations

import ctypes
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzhost import NR_REFS, RAM_PAGES, FuzzHost, handshake, track_busy, wait, wait_idle
from fuzzlib import Finding, Input, Oracle, ci_settings
from pyvmm.backends.netback import MAX_PACKET, MAX_RX_SLOTS, MAX_TX_EXTRAS, MAX_TX_SLOTS, TX_HEAD_COPY, \
    VNET_READ_SIZE, BadHeaders, NetBackend, SocketLink, fill_blank_checksum, locate_checksum
from pyvmm.xen_abi.abi import (
    DOMID_SELF,
    GTF_permit_access,
    GTF_readonly,
    NET_RX_RING_SIZE,
    NET_TX_RING_SIZE,
    NETIF_RX_ENTRY_SIZE,
    NETIF_TX_ENTRY_SIZE,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_more_data,
    PAGE_SIZE,
    SRING_HEADER_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_MAX,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
    NetifExtraGso,
    NetifExtraInfo,
    NetifRxRequest,
    NetifRxResponse,
    NetifStatus,
    NetifTxRequest,
    NetifTxResponse,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    SharedRingHeader,
    VirtioNetHdr,
    XenbusState,
)

TX_PFN, RX_PFN, TX_REF, RX_REF = 0, 1, 2, 3
DATA_PFNS = tuple(range(4, 32))
FRAMES = DATA_PFNS * 4 + (40, RAM_PAGES - 1, RAM_PAGES, 0xFFFFFFFF)
REFS = tuple(range(8, 48))
# packets the checksum offload can parse: Ethernet + IPv4 + TCP, 802.1Q + IPv6 + UDP
_TCP4 = (b"\x00\x16\x3e\x00\x00\x01" * 2 + b"\x08\x00" + b"\x45\x00\x00\x28" + bytes(5) + b"\x06"
         + bytes(10) + bytes(12) + b"\x50" + bytes(7))
_UDP6 = (b"\x00\x16\x3e\x00\x00\x01" * 2 + b"\x81\x00\x00\x01\x86\xdd" + b"\x60" + bytes(5) + b"\x11\x40"
         + bytes(32) + bytes(8))


def _not_ring(ref: int) -> int:
    """The rings' own grants as buffers: only the guest's loss, and it would
    blind the response checks."""
    return ref + 2 if ref in (TX_REF, RX_REF) else ref


class Harness:
    MAX_SIZE = 3000

    def __init__(self, vnet: bool = False):
        self.vnet = vnet
        self.fh = FuzzHost()
        self.fh.pinned_refs = {TX_REF, RX_REF}
        self.be = None
        self.devices = 0

    def close(self):
        self.reset()
        self.fh.close()

    def reset(self):
        if self.be:
            self.be.close()
            self.link.close()
            self.peer.close()
            self.fh.gnttab.race = None
            self.be = None
            self.fh.host.evtchn.close(self.port)    # the frontend's port goes with its device

    def _new_device(self):
        self.reset()
        fh = self.fh
        self.devices += 1
        fh.clear_grants(set())
        for ref, pfn in ((TX_REF, TX_PFN), (RX_REF, RX_PFN)):
            fh.grant(ref, GTF_permit_access, 0, pfn)
            page = fh.page(pfn)
            page[:] = bytes(PAGE_SIZE)
            page[:SRING_HEADER_SIZE] = bytes(SharedRingHeader(req_event=1, rsp_event=1))
        self.tx_prod = self.tx_cons = self.rx_prod = self.rx_cons = 0
        self.rx_left = []
        self.link, self.peer = SocketLink.pair(vnet_hdr=self.vnet)
        self.peer.setblocking(False)
        port = self.port = fh.host.evtchn.alloc_unbound(DOMID_SELF, 0)
        self.be = NetBackend(fh.host, self.devices % 16, self.link, "00:16:3e:00:00:02")
        track_busy(self.be)
        handshake(fh.host.store, self.be, self.be.fe_path,
                  {"tx-ring-ref": TX_REF, "rx-ring-ref": RX_REF, "event-channel": port,
                   "request-rx-copy": 1})

    def _hdr(self, pfn):
        return SharedRingHeader.from_buffer_copy(self.fh.page(pfn)[:SRING_HEADER_SIZE])

    def _put(self, pfn, index, size, entry_size, req) -> None:
        off = SRING_HEADER_SIZE + (index % size) * entry_size
        raw = bytes(req)
        self.fh.page(pfn)[off:off + len(raw)] = raw

    def _publish(self, pfn, prod) -> None:
        h = self._hdr(pfn)
        h.req_prod = prod & 0xFFFFFFFF
        self.fh.page(pfn)[:SRING_HEADER_SIZE] = bytes(h)

    def _take(self, pfn, cons_attr, size, entry_size, rtype) -> list:
        out = []
        h = self._hdr(pfn)
        cons = getattr(self, cons_attr)
        while cons != h.rsp_prod:
            off = SRING_HEADER_SIZE + (cons % size) * entry_size
            out.append(rtype.from_buffer_copy(self.fh.page(pfn)[off:off + ctypes.sizeof(rtype)]))
            cons = (cons + 1) & 0xFFFFFFFF
        setattr(self, cons_attr, cons)
        h.rsp_event = cons + 1
        self.fh.page(pfn)[:SRING_HEADER_SIZE] = bytes(h)
        return out

    # -- one input ---------------------------------------------------------

    def one(self, data: bytes) -> None:
        inp = Input(data)
        fh = self.fh
        if self.be is None or self.be.failed or not self.be.connected:
            self._new_device()
        be = self.be
        fh.writable = set()
        fh.fill_canary({TX_PFN, RX_PFN})
        fh.clear_grants({TX_REF, RX_REF})
        for ref in REFS:
            k = inp.u8()
            flags = GTF_permit_access | (GTF_readonly if k & 3 == 0 else 0)
            if k >= 240:
                flags = inp.u16() & ~0x18
            fh.grant(ref, flags, 0 if k < 250 else inp.u16(), inp.choice(FRAMES))
        fh.guest_write(DATA_PFNS[0] * PAGE_SIZE, _TCP4)
        fh.guest_write(DATA_PFNS[1] * PAGE_SIZE, _UDP6)
        fh.guest_write(DATA_PFNS[2] * PAGE_SIZE, inp.blob(200))
        ram0 = bytes(fh.mv)

        tx = self._tx_requests(inp)
        rx = [NetifRxRequest(id=inp.u16(), gref=inp.choice(REFS) if inp.chance(240)
                             else _not_ring(inp.interesting(32)))
              for _ in range(inp.below(24) if len(self.rx_left) < 200 else 0)]
        frames = [(bytes(10) if self.vnet else b"") + inp.choice((b"", b"\xaa" * 60, bytes(range(256)) * 6, b"\x55" * PAGE_SIZE,
                              b"\x66" * (PAGE_SIZE + 1), b"\x77" * (3 * PAGE_SIZE - 5),
                              b"\x88" * (MAX_RX_SLOTS * PAGE_SIZE + 1), inp.blob(100)))
                  for _ in range(inp.below(6))]
        self.raced = False
        racy = inp.chance(64)
        bogus = inp.chance(6)
        fh.gnttab.race = (lambda ref: self._race(inp, ref)) if racy else None

        for r in tx:
            self._put(TX_PFN, self.tx_prod, NET_TX_RING_SIZE, NETIF_TX_ENTRY_SIZE, r)
            self.tx_prod += 1
        for r in rx:
            self._put(RX_PFN, self.rx_prod, NET_RX_RING_SIZE, NETIF_RX_ENTRY_SIZE, r)
            self.rx_prod += 1
        tx_prod = self.tx_prod + (33 + inp.interesting(32) % (2**32 - 600) + NET_TX_RING_SIZE
                                  if bogus else 0)
        self._publish(TX_PFN, tx_prod)
        self._publish(RX_PFN, self.rx_prod)
        be.queue_frames(frames)
        be.kick()
        # the model, run first, says how many responses to wait for
        ram = bytearray(ram0)
        want_tx, want_frames, tx_fatal = model_tx(tx, ram, fh.gnttab, self.vnet)
        # buffers posted earlier and still unused come first
        posted = self.rx_left + rx
        # a vnet link's frames lose their (all-zero) header; runts are dropped
        rx_frames = [f[10:] for f in frames if len(f) >= 24] if self.vnet else frames
        want_rx, used = model_rx(rx_frames, posted, ram, fh.gnttab)
        self.rx_left = posted[used:]
        wait(lambda: (be.failed and be.backend_state() == XenbusState.Closing)
             or ((self._hdr(TX_PFN).rsp_prod - self.tx_cons) & 0xFFFFFFFF >= len(want_tx)
                 and (self._hdr(RX_PFN).rsp_prod - self.rx_cons) & 0xFFFFFFFF >= len(want_rx)
                 and not tx_fatal and not bogus and not be._kicked), "responses")
        fh.gnttab.race = None
        wait_idle(be)
        got_tx = self._take(TX_PFN, "tx_cons", NET_TX_RING_SIZE, NETIF_TX_ENTRY_SIZE, NetifTxResponse)
        got_rx = self._take(RX_PFN, "rx_cons", NET_RX_RING_SIZE, NETIF_RX_ENTRY_SIZE, NetifRxResponse)
        sent = []
        while True:
            try:
                sent.append(self.peer.recv(VNET_READ_SIZE))
            except BlockingIOError:
                break
        be.drop_queued_frames()        # frames no buffer took: not carried into the next input

        if bogus or tx_fatal:
            if not be.failed and not self.raced:
                raise Finding("a protocol break on the transmit ring did not end the device")
            if be.failed and not fh.host.store.read_str(f"{be.be_path}/error", ""):
                raise Finding("failed device without its error in xenstore")
        elif be.failed and not self.raced:
            raise Finding(f"device failed on honest input: {be.failed}")
        fh.check_released(keep_mapped=0 if be.failed else 2)
        if self.raced or bogus or tx_fatal or be.failed:
            fh.check_untouched({TX_PFN, RX_PFN})
            if len(got_tx) > len(tx) or len(got_rx) > len(posted):
                raise Finding(f"{len(got_tx)}/{len(got_rx)} responses to {len(tx)}/{len(posted)} requests")
            return
        got_tx = [(r.id, r.status) for r in got_tx]
        if got_tx != want_tx:
            raise Finding(f"transmit responses {got_tx[:8]}..., the model says {want_tx[:8]}...")
        if sent != want_frames:
            diff = next((i, len(a), len(b)) for i, (a, b) in enumerate(zip(sent + [b""], want_frames + [b""]))
                        if a != b)
            raise Finding(f"{len(sent)} frames on the link, the model says {len(want_frames)}; "
                          f"frame {diff[0]}: {diff[1]} bytes, the model's {diff[2]}")
        got_rx = [(r.id, r.offset, r.flags, r.status) for r in got_rx]
        if got_rx != want_rx:
            raise Finding(f"receive responses {got_rx[:6]}, the model says {want_rx[:6]}")
        for pfn in (TX_PFN, RX_PFN):
            ram[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] = fh.page(pfn)
        if fh.mv != ram:
            bad = next(i for i in range(len(ram)) if ram[i] != fh.mv[i])
            raise Finding(f"guest RAM differs from the model at {bad:#x}")

    def _tx_requests(self, inp: Input) -> list:
        out = []
        while len(out) < 64 and inp.chance(220):
            nslots = 1 + inp.below(inp.choice((1, 3, 6, MAX_TX_SLOTS + 3)))
            sizes = [inp.choice((14, 60, 100, 1500, 4096, 0, 13, 4097)) if inp.chance(200)
                     else inp.u16() for _ in range(nslots)]
            first_size = sum(sizes) if inp.chance(220) else inp.u16()
            flags = inp.choice((0, NETTXF_csum_blank, NETTXF_data_validated)) \
                | (NETTXF_extra_info if inp.chance(30) else 0)
            if inp.chance(10):
                flags = inp.u16()
            for i in range(nslots):
                size = first_size if i == 0 else sizes[i]
                more = NETTXF_more_data if i < nslots - 1 else 0
                f = (flags | more) if i == 0 else (more if inp.chance(240) else inp.u16())
                page_off = inp.choice((0, 0, 14, 100, PAGE_SIZE - sizes[i] if sizes[i] <= PAGE_SIZE else 0))
                out.append(NetifTxRequest(gref=inp.choice(REFS) if inp.chance(240) else _not_ring(inp.u32()),
                                          offset=page_off if inp.chance(240) else inp.u16(),
                                          flags=f & 0xFFFF, id=inp.u16(), size=size & 0xFFFF))
                if i == 0 and f & NETTXF_extra_info:
                    for _ in range(1 + inp.below(MAX_TX_EXTRAS + 2)):
                        more = XEN_NETIF_EXTRA_FLAG_MORE if inp.chance(60) else 0
                        etype = inp.choice((XEN_NETIF_EXTRA_TYPE_GSO,) * 4 + (2, 3, 4, 5, 0, 6, 255))
                        if etype == XEN_NETIF_EXTRA_TYPE_GSO:
                            e = NetifExtraGso(type=etype, flags=more, size=inp.choice((1448, 0, 1, inp.u16())),
                                              gso_type=inp.choice((1, 2, 0, 3, inp.u8())))
                        else:
                            e = NetifExtraInfo(type=etype if inp.chance(240) else inp.u8(), flags=more)
                        out.append(NetifTxRequest.from_buffer_copy(bytes(e).ljust(12, b"\0")))
                        if not e.flags & XEN_NETIF_EXTRA_FLAG_MORE:
                            break
        if inp.chance(20):   # a packet cut short: its tail is not produced
            out = out[:len(out) - inp.below(3)]
        return out

    def _race(self, inp: Input, ref: int) -> None:
        if not inp.chance(40):
            return
        self.raced = True
        target = ref if inp.chance(160) or not 0 <= ref < NR_REFS else inp.choice(REFS)
        if target in (TX_REF, RX_REF) or not 0 <= target < NR_REFS:
            return
        k = inp.u8() % 4
        flags = (0, GTF_permit_access, GTF_permit_access | GTF_readonly, inp.u16() & ~0x18)[k]
        self.fh.grant(target, flags, 0, inp.choice(FRAMES))


def _frame(gnttab, ref: int, writable: bool):
    if not 0 <= ref < NR_REFS:
        return None
    e = gnttab.read_entry(ref)
    if e.flags & 3 != GTF_permit_access or e.domid != 0 or (writable and e.flags & GTF_readonly):
        return None
    return e.frame if e.frame < RAM_PAGES else None


def _vnet_header(frame: bytes, flags: int, gso) -> bytes | None:
    """The virtio_net_hdr a packet leaves with, or None for a packet dropped."""
    if not flags & NETTXF_csum_blank and not gso:
        return bytes(VirtioNetHdr(flags=VIRTIO_NET_HDR_F_DATA_VALID if flags & NETTXF_data_validated else 0))
    if gso and not flags & NETTXF_csum_blank:
        return None
    try:
        start, offset, version, proto, l4_end = locate_checksum(frame[:TX_HEAD_COPY], len(frame))
    except BadHeaders:
        return None
    if not gso:
        return bytes(VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, l4_end, 0, start, offset))
    g = gso[-1]
    if proto != 6 or version != (4 if g.gso_type == 1 else 6):
        return None
    return bytes(VirtioNetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 1 if g.gso_type == 1 else 4, l4_end, g.size,
                              start, offset))


def model_tx(reqs: list, ram: bytearray, gnttab, vnet: bool = False):
    """netif transmit as Xen's netback answers it: [(id, status)], the
    frames sent, and whether the ring's contents break the protocol."""
    rsps, frames = [], []
    i = 0
    while i < len(reqs):
        first = reqs[i]
        i += 1
        slots, out = [first], [(first.id, NetifStatus.okay)]
        extras = {}
        if first.flags & NETTXF_extra_info:
            while True:
                if i >= len(reqs) or len(extras) >= MAX_TX_EXTRAS:
                    return rsps, frames, True       # missing, or a chain too long
                extra = NetifExtraInfo.from_buffer_copy(bytes(reqs[i]))
                i += 1
                out.append((0, NetifStatus.null))
                if not 0 < extra.type < XEN_NETIF_EXTRA_TYPE_MAX:
                    return rsps, frames, True
                extras[len(extras)] = extra
                if not extra.flags & XEN_NETIF_EXTRA_FLAG_MORE:
                    break
        types = {e.type for e in extras.values()}
        if types & {XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_TYPE_MCAST_DEL}:
            rsps += out                             # a filter change alone: no packet
            continue
        while slots[-1].flags & NETTXF_more_data:
            if len(slots) >= MAX_TX_SLOTS or i >= len(reqs):
                return rsps, frames, True
            slots.append(reqs[i])
            out.append((reqs[i].id, NetifStatus.okay))
            i += 1
        gso = [NetifExtraGso.from_buffer_copy(bytes(e)) for e in extras.values()
               if e.type == XEN_NETIF_EXTRA_TYPE_GSO]
        if gso and (gso[-1].size == 0 or gso[-1].gso_type not in (1, 2)):
            return rsps, frames, True               # Xen's xenvif_set_skb_gso: fatal
        frame = _gather(slots, ram, gnttab)
        hdr = _vnet_header(bytes(frame), first.flags, gso) if vnet and frame is not None else None
        if vnet:
            dropped = frame is None or hdr is None
        else:
            # a plain link takes no GSO packet, and a blank checksum must be found
            dropped = frame is None or gso or (first.flags & NETTXF_csum_blank and not fill_blank_checksum(frame))
        if dropped:
            out = [(rid, NetifStatus.error if s == NetifStatus.okay else s) for rid, s in out]
        else:
            frames.append((hdr or b"") + bytes(frame))
        rsps += out
    return rsps, frames, False


def _gather(slots, ram, gnttab):
    total = slots[0].size
    rest = sum(s.size for s in slots[1:])
    if rest > total or total > MAX_PACKET or total < 14:
        return None
    frame = bytearray()
    for s, size in zip(slots, [total - rest] + [s.size for s in slots[1:]]):
        if s.offset + size > PAGE_SIZE:
            return None
        f = _frame(gnttab, s.gref, writable=False)
        if f is None:
            return None
        frame += ram[f * PAGE_SIZE + s.offset:f * PAGE_SIZE + s.offset + size]
    return frame


def model_rx(frames: list, reqs: list, ram: bytearray, gnttab) -> list:
    """Frames into posted buffers as netback's copy mode does: the
    responses, and how many buffers they used."""
    out, r = [], 0
    for frame in frames:
        need = max(1, -(-len(frame) // PAGE_SIZE))
        if need > MAX_RX_SLOTS:
            continue
        if len(reqs) - r < need:
            break
        for k in range(need):
            req = reqs[r]
            r += 1
            chunk = frame[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
            f = _frame(gnttab, req.gref, writable=True)
            flags = NETRXF_more_data if k < need - 1 else 0
            if f is None:
                out.append((req.id, 0, flags, NetifStatus.error))     # flags kept: the chain goes on
                continue
            ram[f * PAGE_SIZE:f * PAGE_SIZE + len(chunk)] = chunk
            out.append((req.id, 0, flags, len(chunk)))
    return out, r


@ci_settings(400)
@given(st.binary(max_size=Harness.MAX_SIZE))
def test_fuzz_netif(harness, data):
    with Oracle() as oracle:
        oracle.run_or_reset(harness, data)


@ci_settings(300)
@given(st.binary(max_size=Harness.MAX_SIZE))
def test_fuzz_netif_vnet(vnet_harness, data):
    with Oracle() as oracle:
        oracle.run_or_reset(vnet_harness, data)


@pytest.fixture(scope="module")
def harness():
    h = Harness()
    yield h
    h.close()


@pytest.fixture(scope="module")
def vnet_harness():
    h = Harness(vnet=True)
    yield h
    h.close()
