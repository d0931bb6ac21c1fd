"""The network back-end against a frontend played from Python (the rings
and grants Linux's xen-netfront would set up), with a Python IPv4 peer
(tests/netpeer.py) or a raw socket at the far end of the link: ARP and
ping through both rings, multi-slot transmits, blank checksums filled in,
received frames over a page, and the bad input a guest can give."""
from __future__ import annotations

import contextlib
import struct
import time

import pytest

from fakefront import FrontRing, backend_host
from netpeer import ETH_P_ARP, ETH_P_IP, IPPROTO_ICMP, IPPROTO_UDP, NetPeer, checksum, ip_bytes, ipv4, mac_bytes
from waiting import wait_for
from pyvmm.backends.netback import (
    NetBackend,
    NetError,
    SocketLink,
    TapDevice,
    default_mac,
    fill_blank_checksum,
    parse_mac,
)
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
    NETTXF_more_data,
    PAGE_SIZE,
    NetifRxRequest,
    NetifRxResponse,
    NetifStatus,
    NetifTxRequest,
    NetifTxResponse,
    XenbusState,
)

GUEST_MAC, GUEST_IP = "00:16:3e:00:00:01", "10.0.2.15"
PEER_MAC, PEER_IP = "02:00:00:00:02:01", "10.0.2.1"


class FakeNetfront:
    """xen-netfront's side: tx and rx rings, one event channel, rx buffers posted."""

    TX_PFN, RX_PFN = 0x10, 0x11
    TX_DATA_PFN = 0x100          # one page per tx slot from here
    RX_DATA_PFN = 0x300          # one page per rx buffer from here

    def __init__(self, host, index: int = 0):
        self.host, self.ram = host, host.ram
        self.path = f"/local/domain/1/device/vif/{index}"
        self.tx = FrontRing(self.ram, self.TX_PFN, NETIF_TX_ENTRY_SIZE, NET_TX_RING_SIZE)
        self.rx = FrontRing(self.ram, self.RX_PFN, NETIF_RX_ENTRY_SIZE, NET_RX_RING_SIZE)
        self.gnt = host.gnttab
        self.gnt.write_entry(8, GTF_permit_access, 0, self.TX_PFN)
        self.gnt.write_entry(9, GTF_permit_access, 0, self.RX_PFN)
        self.port = host.evtchn.alloc_unbound(DOMID_SELF, 0)
        self.next_tx_ref = 100
        s = host.store
        for k, v in {"tx-ring-ref": 8, "rx-ring-ref": 9, "event-channel": self.port,
                     "request-rx-copy": 1, "feature-rx-notify": 1, "feature-sg": 1}.items():
            s.write(f"{self.path}/{k}", str(v))
        self.rx_posted = 0

    def backend_key(self, key: str) -> str:
        be = self.host.store.read_str(f"{self.path}/backend")
        return self.host.store.read_str(f"{be}/{key}")

    def connect(self) -> None:
        wait_for(lambda: self.backend_key("state") == str(int(XenbusState.InitWait)), "InitWait")
        self.host.store.write(f"{self.path}/state", str(int(XenbusState.Connected)))
        wait_for(lambda: self.backend_key("state") == str(int(XenbusState.Connected)), "Connected")

    def post_rx(self, n: int) -> None:
        """Post n receive buffers (writable grants of fresh pages)."""
        for _ in range(n):
            i = self.rx_posted % NET_RX_RING_SIZE
            ref = 1000 + i
            self.gnt.write_entry(ref, GTF_permit_access, 0, self.RX_DATA_PFN + i)
            self.rx.put(NetifRxRequest(id=i, gref=ref))
            self.rx_posted += 1
        self.rx.publish()
        self.host.evtchn.send(self.port)

    def send(self, frame: bytes, flags: int = 0, split_at: list[int] | None = None,
             offset: int = 0) -> None:
        """Transmit a frame, over several slots when split_at gives the cut points."""
        cuts = [0] + (split_at or []) + [len(frame)]
        pieces = [frame[a:b] for a, b in zip(cuts, cuts[1:])]
        for n, piece in enumerate(pieces):
            pfn = self.TX_DATA_PFN + (self.next_tx_ref % 64)
            ref = self.next_tx_ref
            self.next_tx_ref += 1
            off = offset if n == 0 else 0
            self.ram.write(pfn * PAGE_SIZE + off, piece)
            self.gnt.write_entry(ref, GTF_permit_access | GTF_readonly, 0, pfn)
            f = (flags if n == 0 else 0) | (NETTXF_more_data if n < len(pieces) - 1 else 0)
            size = len(frame) if n == 0 else len(piece)
            self.tx.put(NetifTxRequest(gref=ref, offset=off, flags=f, id=(ref % NET_TX_RING_SIZE), size=size))
        self.tx.publish()
        self.host.evtchn.send(self.port)

    def tx_responses(self, n: int) -> list[NetifTxResponse]:
        return self.tx.take_responses(n, NetifTxResponse)

    def received(self, n: int) -> list[tuple[NetifRxResponse, bytes]]:
        out = []
        for rsp in self.rx.take_responses(n, NetifRxResponse):
            data = b""
            if rsp.status > 0:
                data = self.ram.read((self.RX_DATA_PFN + rsp.id) * PAGE_SIZE + rsp.offset, rsp.status)
            out.append((rsp, data))
        return out


def _arp_request(src_mac: bytes, src_ip: bytes, target_ip: bytes) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, src_mac, src_ip, b"\0" * 6, target_ip)
    return b"\xff" * 6 + src_mac + struct.pack("!H", ETH_P_ARP) + body


def _ping(src_mac: bytes, dst_mac: bytes, seq: int, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x77, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IP) + ipv4(ip_bytes(GUEST_IP), ip_bytes(PEER_IP), IPPROTO_ICMP, icmp)


@contextlib.contextmanager
def _interface(mac: str = GUEST_MAC):
    """(host, backend, frontend, far end of the link): one interface whose
    frontend has not connected yet."""
    with backend_host() as host:
        link, far_end = SocketLink.pair()
        be = NetBackend(host, 0, link, mac)
        host.backends.append(be)
        try:
            yield host, be, FakeNetfront(host), far_end
        finally:
            link.close()
            far_end.close()


@pytest.fixture
def net():
    """(host, backend, frontend, peer): a connected interface with a NetPeer on the link."""
    with _interface() as (host, be, fe, peer_sock):
        fe.connect()
        peer = NetPeer(peer_sock, mac=PEER_MAC, ip=PEER_IP)
        yield host, be, fe, peer
        be.close()
        peer.close()


def test_nodes_features_and_mac():
    with _interface("00:16:3E:AA:bb:01") as (host, be, fe, _):
        assert host.store.read_str(f"{fe.path}/mac") == "00:16:3e:aa:bb:01"
        assert host.store.read_str(f"{fe.path}/handle") == "0"
        assert fe.backend_key("feature-rx-copy") == "1"
        assert fe.backend_key("feature-sg") == "1"
        fe.connect()
    assert default_mac("debian", 0).startswith("00:16:3e:") and default_mac("a", 0) != default_mac("b", 0)
    for bad in ("00:16:3e:00:00", "01:00:00:00:00:01", "zz:00:00:00:00:00", "0016.3e00.0001"):
        with pytest.raises(NetError):
            parse_mac(bad)


def test_arp_and_ping_through_both_rings(net):
    host, be, fe, peer = net
    fe.post_rx(8)
    gm = mac_bytes(GUEST_MAC)
    fe.send(_arp_request(gm, ip_bytes(GUEST_IP), ip_bytes(PEER_IP)))
    assert [r.status for r in fe.tx_responses(1)] == [NetifStatus.okay]
    (rsp, arp), = fe.received(1)
    assert rsp.status == len(arp) == 42 and not rsp.flags & NETRXF_more_data
    assert arp[12:14] == struct.pack("!H", ETH_P_ARP) and arp[22:28] == mac_bytes(PEER_MAC)
    # a ping split over three slots, starting mid-page
    frame = _ping(gm, mac_bytes(PEER_MAC), 1, bytes(range(256)) * 4)
    fe.send(frame, split_at=[40, 600], offset=3000)
    assert [r.status for r in fe.tx_responses(3)] == [NetifStatus.okay] * 3
    (rsp, reply), = fe.received(1)
    assert reply[:6] == gm and reply[34] == 0 and reply[42:] == frame[42:]     # echo reply, same payload
    assert peer.seen["icmp_echo"] == 1 and peer.seen["bad_checksum"] == 0
    assert be.stats["tx_packets"] == 2 and be.stats["rx_packets"] == 2


def test_blank_udp_checksum_is_filled_in(net):
    host, be, fe, peer = net
    fe.post_rx(4)
    gm, src, dst = mac_bytes(GUEST_MAC), ip_bytes(GUEST_IP), ip_bytes(PEER_IP)
    payload = b"\0\x01hello\0octet\0"                      # a TFTP read request
    length = 8 + len(payload)
    # CHECKSUM_PARTIAL: the field holds the (uncomplemented) pseudo-header sum
    pseudo = sum(struct.unpack("!6H", src + dst + b"\0\0\0\0")) + IPPROTO_UDP + length
    while pseudo >> 16:
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    udp = struct.pack("!HHHH", 40000, 69, length, pseudo) + payload
    frame = mac_bytes(PEER_MAC) + gm + struct.pack("!H", ETH_P_IP) + ipv4(src, dst, IPPROTO_UDP, udp)
    fe.send(frame, flags=NETTXF_csum_blank)
    fe.tx_responses(1)
    wait_for(lambda: peer.tftp_requests == ["hello"], "the peer to accept the datagram")
    assert peer.seen["bad_checksum"] == 0
    # the same datagram without the flag keeps its (wrong) checksum: the peer drops it
    fe.send(frame)
    fe.tx_responses(1)
    wait_for(lambda: peer.seen["bad_checksum"] == 1, "the peer to see a bad checksum")
    # what the helper does, on its own: the result verifies
    f = bytearray(frame)
    assert fill_blank_checksum(f)
    assert checksum(src + dst + struct.pack("!BBH", 0, IPPROTO_UDP, length) + bytes(f[34:])) == 0
    assert not fill_blank_checksum(bytearray(b"\xff" * 12 + b"\x08\x06" + bytes(28)))   # ARP


def test_frames_wait_for_buffers_and_big_ones_span_pages():
    with _interface() as (host, be, fe, raw):
        fe.connect()
        big = bytes(range(256)) * 36                     # 9216 bytes: three pages
        raw.send(b"\x11" * 60)
        raw.send(big)
        wait_for(lambda: len(be.rx_queue) == 2 or be.stats["rx_packets"], "frames queued")
        assert fe.rx.responses_ready() == 0              # no buffers posted yet
        fe.post_rx(4)
        got = fe.received(4)
        assert got[0][1] == b"\x11" * 60
        assert [r.flags & NETRXF_more_data for r, _ in got[1:]] == [NETRXF_more_data, NETRXF_more_data, 0]
        assert b"".join(d for _, d in got[1:]) == big


def test_waiting_for_buffers_does_not_spin():
    """Found by fuzzing: a queued frame needing more buffers than the guest
    posted had the worker loop at full speed until the guest posted more
    (one buffer posted, a three-page frame waiting).  It must sleep until
    the guest's next notification instead."""
    with _interface() as (host, be, fe, raw):
        fe.connect()
        calls = []
        receive = be._receive
        be._receive = lambda q: (calls.append(1), receive(q))[1]
        raw.send(bytes(range(256)) * 36)                 # 9216 bytes: three pages
        wait_for(lambda: be.rx_queue, "the frame queued")
        fe.post_rx(1)
        time.sleep(0.3)
        assert len(calls) < 10, f"the worker looked {len(calls)} times in 0.3 s"
        fe.post_rx(2)
        got = fe.received(3)
        assert b"".join(d for _, d in got) == bytes(range(256)) * 36


def test_bad_transmits_get_errors_and_nothing_leaves(net):
    host, be, fe, peer = net
    gm = mac_bytes(GUEST_MAC)
    frame = _ping(gm, mac_bytes(PEER_MAC), 1, b"x" * 64)

    def tx_raw(*reqs):
        for r in reqs:
            fe.tx.put(r)
        fe.tx.publish()
        host.evtchn.send(fe.port)
        return [r.status for r in fe.tx_responses(len(reqs))]

    host.ram.write(FakeNetfront.TX_DATA_PFN * PAGE_SIZE, frame)
    fe.gnt.write_entry(50, GTF_permit_access | GTF_readonly, 0, FakeNetfront.TX_DATA_PFN)
    E = NetifStatus.error
    assert tx_raw(NetifTxRequest(gref=99999, offset=0, size=len(frame), id=1)) == [E]       # wild grant
    assert tx_raw(NetifTxRequest(gref=50, offset=4090, size=len(frame), id=2)) == [E]       # crosses page
    assert tx_raw(NetifTxRequest(gref=50, offset=0, size=10, id=3)) == [E]                  # runt
    assert tx_raw(NetifTxRequest(gref=50, offset=0, size=20, flags=NETTXF_more_data, id=4),
                  NetifTxRequest(gref=50, offset=0, size=30, id=5)) == [E, E]               # sizes
    assert be.stats["tx_packets"] == 0 and peer.seen["frames"] == 0
    assert tx_raw(NetifTxRequest(gref=50, offset=0, size=len(frame), id=6)) == [NetifStatus.okay]
    wait_for(lambda: peer.seen["icmp_echo"] == 1, "the good packet")
    assert be.failed is None and be.connected


def test_truncated_packet_or_bogus_index_loses_the_device(net):
    host, be, fe, peer = net
    fe.tx.put(NetifTxRequest(gref=50, offset=0, size=100, flags=NETTXF_more_data, id=1))
    fe.tx.publish()                        # its next slot never comes
    host.evtchn.send(fe.port)
    wait_for(lambda: fe.backend_key("state") == str(int(XenbusState.Closing)), "Closing")
    assert "following slot missing" in fe.backend_key("error")
    assert not be.connected and host.gnttab.active_mappings() == 0


def test_tx_ring_overflow_loses_the_device(net):
    host, be, fe, peer = net
    fe.tx.publish(NET_TX_RING_SIZE + 10)
    host.evtchn.send(fe.port)
    wait_for(lambda: fe.backend_key("state") == str(int(XenbusState.Closing)), "Closing")
    assert "ring overflow" in fe.backend_key("error")


def test_tap_errors_are_one_line():
    for bad in ("", "x" * 16, "a/b"):
        with pytest.raises(NetError, match="bad interface name"):
            TapDevice(bad)


def test_a_closed_link_drops_frames_not_the_device(net):
    """The far end goes away: transmits are answered OKAY (as a NIC with no
    carrier would) and counted, the device stays connected."""
    host, be, fe, peer = net
    peer.close()
    frame = _ping(mac_bytes(GUEST_MAC), mac_bytes(PEER_MAC), 1, b"y" * 32)
    for _ in range(3):
        fe.send(frame)
        assert [r.status for r in fe.tx_responses(1)] == [NetifStatus.okay]
    assert be.stats["tx_link_errors"] == 3 and be.stats["tx_packets"] == 0
    assert be.connected and be.failed is None


# ---------------------------------------------------------------- offload over vnet headers
# A link with vnet headers (a TAP with IFF_VNET_HDR, here a SocketLink whose
# peer reads and writes the virtio_net_hdr itself): checksum offload and TCP
# GSO pass between the guest's rings and the link, no checksum is computed.

from pyvmm.backends.netback import (
    MAX_TX_EXTRAS,
    RX_QUEUE_BYTES,
    BadHeaders,
    locate_checksum,
)
from pyvmm.xen_abi.abi import (
    GTF_reading,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETTXF_data_validated,
    NETTXF_extra_info,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    NetifExtraGso,
    NetifExtraInfo,
    VirtioNetHdr,
)

_G6 = bytes.fromhex("fd000000000000000000000000000002")
_P6 = bytes.fromhex("fd000000000000000000000000000001")
FULL_RX = {"feature-gso-tcpv4": 1, "feature-gso-tcpv6": 1, "feature-ipv6-csum-offload": 1}


def _tcp_frame(payload_len: int, v6: bool = False, doff: int = 5, vlan: bool = False) -> bytes:
    """Ethernet + IPv4/IPv6 + TCP (checksum field: an arbitrary marker, as
    a CHECKSUM_PARTIAL packet's pseudo-header sum would be)."""
    payload = bytes((i * 7) & 0xFF for i in range(payload_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, doff << 4, 0x18, 65535, 0xBEEF, 0) \
        + bytes(4 * doff - 20) + payload
    if v6:
        l3 = struct.pack("!IHBB16s16s", 0x60000000, len(tcp), 6, 64, _G6, _P6) + tcp
        ethertype = 0x86DD
    else:
        l3 = ipv4(ip_bytes(GUEST_IP), ip_bytes(PEER_IP), 6, tcp)
        ethertype = ETH_P_IP
    tag = struct.pack("!HH", 0x8100, 5) if vlan else b""
    return mac_bytes(PEER_MAC) + mac_bytes(GUEST_MAC) + tag + struct.pack("!H", ethertype) + l3


def _vnet(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0) -> bytes:
    return bytes(VirtioNetHdr(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset))


@contextlib.contextmanager
def _vnet_interface(fe_features: dict | None = None, vnet: bool = True):
    """(host, backend, frontend, link, peer socket): connected, the frontend
    announcing fe_features (default: everything netfront announces)."""
    with backend_host() as host:
        link, peer = SocketLink.pair(vnet_hdr=vnet)
        be = NetBackend(host, 0, link, GUEST_MAC)
        host.backends.append(be)
        fe = FakeNetfront(host)
        for k, v in (FULL_RX if fe_features is None else fe_features).items():
            host.store.write(f"{fe.path}/{k}", str(v))
        peer.settimeout(5)
        try:
            fe.connect()
            yield host, be, fe, link, peer
        finally:
            be.close()
            link.close()
            peer.close()


def _send_with_extras(fe, frame: bytes, flags: int, extras: list, pieces: int = 4096) -> int:
    """Transmit frame in page-sized slots with extra-info slots after the
    first; the number of ring slots used."""
    cuts = list(range(0, len(frame), pieces)) + [len(frame)]
    n = 0
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        ref = fe.next_tx_ref
        fe.next_tx_ref += 1
        pfn = FakeNetfront.TX_DATA_PFN + (ref % 64)
        fe.ram.write(pfn * PAGE_SIZE, frame[a:b])
        fe.gnt.write_entry(ref, GTF_permit_access | GTF_readonly, 0, pfn)
        f = (flags | (NETTXF_extra_info if extras else 0)) if k == 0 else 0
        f |= NETTXF_more_data if b < len(frame) else 0
        fe.tx.put(NetifTxRequest(gref=ref, offset=0, flags=f, id=ref % NET_TX_RING_SIZE,
                                 size=len(frame) if k == 0 else b - a))
        n += 1
        if k == 0:
            for e in extras:
                fe.tx.put(NetifTxRequest.from_buffer_copy(bytes(e).ljust(12, b"\0")))
                n += 1
    fe.tx.publish()
    fe.host.evtchn.send(fe.port)
    return n


def _gso_extra(size: int = 1448, gso_type: int = XEN_NETIF_GSO_TYPE_TCPV4, more: bool = False):
    return NetifExtraGso(type=XEN_NETIF_EXTRA_TYPE_GSO, flags=XEN_NETIF_EXTRA_FLAG_MORE if more else 0,
                         size=size, gso_type=gso_type)


def _dead(fe, be, why: str) -> None:
    wait_for(lambda: fe.backend_key("state") == str(int(XenbusState.Closing)), "Closing")
    assert why in fe.backend_key("error"), fe.backend_key("error")
    assert be.failed and not be.connected


def test_features_and_offload_follow_the_link_and_the_frontend():
    with _vnet_interface() as (host, be, fe, link, peer):
        assert (fe.backend_key("feature-gso-tcpv4"), fe.backend_key("feature-gso-tcpv6")) == ("1", "1")
        assert fe.backend_key("feature-sg") == fe.backend_key("feature-ipv6-csum-offload") == "1"
        assert link.offload_flags == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    # what the guest cannot receive is not offloaded to it
    with _vnet_interface({"feature-gso-tcpv4": 1, "feature-ipv6-csum-offload": 1}) as (_, be, _f, link, _p):
        assert link.offload_flags == TUN_F_CSUM | TUN_F_TSO4
    with _vnet_interface({"feature-gso-tcpv4": 1}) as (_, be, _f, link, _p):      # no IPv6 blank checksums
        assert link.offload_flags == 0 and be.rx_gso == {VIRTIO_NET_HDR_GSO_TCPV4}   # (it could take that)
    with _vnet_interface({**FULL_RX, "feature-sg": 0}) as (_, be, _f, link, _p):    # GSO needs SG
        assert link.offload_flags == TUN_F_CSUM
    with _vnet_interface({**FULL_RX, "feature-no-csum-offload": 1}) as (_, be, _f, link, _p):
        assert link.offload_flags == 0
    # a link without vnet headers offers no GSO
    with _vnet_interface(vnet=False) as (_, be, fe, link, _p):
        assert (fe.backend_key("feature-gso-tcpv4"), fe.backend_key("feature-gso-tcpv6")) == ("0", "0")
        assert link.offload_flags == 0


@pytest.mark.parametrize("v6", [False, True], ids=["tcpv4", "tcpv6"])
def test_tx_gso_packet_leaves_as_one_frame_with_its_vnet_header(v6):
    with _vnet_interface() as (host, be, fe, link, peer):
        frame = _tcp_frame(60000, v6=v6)
        l4 = 14 + (40 if v6 else 20)
        n = _send_with_extras(fe, frame, NETTXF_csum_blank | NETTXF_data_validated,
                              [_gso_extra(1448, XEN_NETIF_GSO_TYPE_TCPV6 if v6 else XEN_NETIF_GSO_TYPE_TCPV4)])
        rsps = fe.tx_responses(n)
        assert [r.status for r in rsps] == [0, NetifStatus.null] + [0] * (n - 2)
        got = peer.recv(1 << 17)
        hdr = VirtioNetHdr.from_buffer_copy(got[:10])
        assert (hdr.flags, hdr.gso_type, hdr.gso_size, hdr.csum_start, hdr.csum_offset, hdr.hdr_len) == \
            (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4,
             1448, l4, 16, l4 + 20)
        assert got[10:] == frame                     # as the guest wrote it: the checksum left blank
        assert be.stats["tx_gso_packets"] == 1 and be.stats["tx_bytes"] == len(frame)
        # the pages were mapped for the write only, and their grants released
        assert host.gnttab.active_mappings() == 2
        for ref in range(100, fe.next_tx_ref):
            assert not host.gnttab.read_entry(ref).flags & GTF_reading


def test_tx_checksum_flags_become_vnet_flags():
    with _vnet_interface() as (host, be, fe, link, peer):
        small = _tcp_frame(100, doff=8, vlan=True)            # options and an 802.1Q tag
        fe.send(small, flags=NETTXF_csum_blank)
        fe.tx_responses(1)
        got = peer.recv(1 << 17)
        assert got[:10] == _vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 18 + 20 + 32, 0, 18 + 20, 16)
        assert got[10:] == small
        fe.send(small, flags=NETTXF_data_validated)
        fe.tx_responses(1)
        assert peer.recv(1 << 17)[:10] == _vnet(VIRTIO_NET_HDR_F_DATA_VALID)
        arp = _arp_request(mac_bytes(GUEST_MAC), ip_bytes(GUEST_IP), ip_bytes(PEER_IP))
        fe.send(arp)
        fe.tx_responses(1)
        assert peer.recv(1 << 17) == bytes(10) + arp


def _tx_statuses(fe, frame, flags, extras=()):
    n = _send_with_extras(fe, frame, flags, list(extras))
    return [r.status for r in fe.tx_responses(n)]


def test_hostile_transmits_are_dropped_with_errors():
    """Packets a guest gets wrong but that do not break the ring protocol:
    NETIF_RSP_ERROR for each of their slots (NULL for extra-info slots), the
    packet dropped, the device goes on.  (Xen's netback answers OKAY and
    drops where its skb_checksum_setup fails; the drop is the same.)"""
    E, N = NetifStatus.error, NetifStatus.null
    with _vnet_interface() as (host, be, fe, link, peer):
        peer.setblocking(False)
        short = _tcp_frame(0)[:14 + 20 + 10]                       # TCP header cut short
        assert _tx_statuses(fe, short, NETTXF_csum_blank, [_gso_extra()]) == [E, N]     # GSO, no room for TCP
        assert _tx_statuses(fe, short, NETTXF_csum_blank) == [E]
        arp = _arp_request(mac_bytes(GUEST_MAC), ip_bytes(GUEST_IP), ip_bytes(PEER_IP))
        assert _tx_statuses(fe, arp, NETTXF_csum_blank) == [E]                          # not IP
        frag = bytearray(_tcp_frame(100))
        frag[14 + 6] = 0x20                                                             # IPv4 MF
        assert _tx_statuses(fe, bytes(frag), NETTXF_csum_blank) == [E]
        bad_doff = bytearray(_tcp_frame(10))
        bad_doff[14 + 20 + 12] = 0xF0                                                   # 60-byte TCP header
        assert _tx_statuses(fe, bytes(bad_doff), NETTXF_csum_blank) == [E]              # ... past the frame
        bad_ihl = bytearray(_tcp_frame(100))
        bad_ihl[14] = 0x43
        assert _tx_statuses(fe, bytes(bad_ihl), NETTXF_csum_blank) == [E]
        big = _tcp_frame(9000)
        assert _tx_statuses(fe, big, NETTXF_csum_blank,
                            [_gso_extra(gso_type=XEN_NETIF_GSO_TYPE_TCPV6)]) == [E, N, E, E]   # v6 GSO, v4 packet
        assert _tx_statuses(fe, big, 0, [_gso_extra()]) == [E, N, E, E]                 # GSO, no csum_blank
        # slots that lie: the first says less than the rest carry
        for ref, data in ((60, big[:4096]), (61, big[4096:])):
            fe.ram.write((FakeNetfront.TX_DATA_PFN + ref - 59) * PAGE_SIZE, data)
            fe.gnt.write_entry(ref, GTF_permit_access | GTF_readonly, 0, FakeNetfront.TX_DATA_PFN + ref - 59)
        fe.tx.put(NetifTxRequest(gref=60, size=3000, flags=NETTXF_more_data | NETTXF_csum_blank
                                 | NETTXF_extra_info, id=1))
        fe.tx.put(NetifTxRequest.from_buffer_copy(bytes(_gso_extra()).ljust(12, b"\0")))
        fe.tx.put(NetifTxRequest(gref=61, size=4000, id=2))
        fe.tx.publish()
        host.evtchn.send(fe.port)
        assert [r.status for r in fe.tx_responses(3)] == [E, N, E]
        # a multicast filter change is answered alone, nothing sent
        mc = NetifExtraInfo(type=XEN_NETIF_EXTRA_TYPE_MCAST_ADD)
        fe.tx.put(NetifTxRequest(gref=60, size=0, flags=NETTXF_extra_info, id=3))
        fe.tx.put(NetifTxRequest.from_buffer_copy(bytes(mc).ljust(12, b"\0")))
        fe.tx.publish()
        host.evtchn.send(fe.port)
        assert [r.status for r in fe.tx_responses(2)] == [NetifStatus.okay, N]
        with pytest.raises(BlockingIOError):
            peer.recv(1 << 17)
        assert be.stats["tx_packets"] == 0 and be.stats["tx_errors"] == 9
        # and a good one still goes
        assert _tx_statuses(fe, big, NETTXF_csum_blank, [_gso_extra()]) == [0, N, 0, 0]
        peer.setblocking(True)
        assert peer.recv(1 << 17)[10:] == big
        assert be.connected and not be.failed and host.gnttab.active_mappings() == 2


def test_gso_on_a_link_without_vnet_headers_is_dropped():
    with _vnet_interface(vnet=False) as (host, be, fe, link, peer):
        assert _tx_statuses(fe, _tcp_frame(5000), NETTXF_csum_blank, [_gso_extra()]) == \
            [NetifStatus.error, NetifStatus.null, NetifStatus.error]
        assert be.connected and be.stats["tx_errors"] == 1


@pytest.mark.parametrize("extras, why", [
    ([_gso_extra(size=0)], "GSO size must not be zero"),
    ([_gso_extra(gso_type=7)], "bad GSO type 7"),
    ([_gso_extra(gso_type=0)], "bad GSO type 0"),
    ([NetifExtraInfo(type=0)], "invalid extra-info type 0"),
    ([NetifExtraInfo(type=6)], "invalid extra-info type 6"),
    ([_gso_extra(more=True)] * (MAX_TX_EXTRAS + 1), f"extra-info chain over {MAX_TX_EXTRAS} slots"),
    ([_gso_extra(more=True)], "extra-info slot missing"),
], ids=["gso-size-0", "gso-type-7", "gso-type-0", "extra-type-0", "extra-type-6", "chain-too-long",
        "chain-unterminated"])
def test_broken_extra_info_ends_the_device(extras, why):
    """What Xen's netback calls fatal (xenvif_get_extras, xenvif_set_skb_gso):
    the device goes, with the reason in xenstore."""
    with _vnet_interface() as (host, be, fe, link, peer):
        _send_with_extras(fe, _tcp_frame(3000), NETTXF_csum_blank, extras)
        _dead(fe, be, why)
        assert host.gnttab.active_mappings() == 0


def _rx_packets(fe, n_responses: int) -> list:
    """[(first response, extras, data)] from n raw rx responses, walked as
    netfront's xennet_get_responses walks them."""
    raw = fe.rx.take_responses(n_responses, NetifRxResponse)
    out, i = [], 0
    while i < len(raw):
        first = raw[i]
        i += 1
        extras = []
        if first.flags & NETRXF_extra_info:
            while True:
                e = NetifExtraGso.from_buffer_copy(bytes(raw[i]))
                i += 1
                extras.append(e)
                if not e.flags & XEN_NETIF_EXTRA_FLAG_MORE:
                    break
        data, r = b"", first
        while True:
            assert r.status >= 0 and r.offset + r.status <= PAGE_SIZE
            data += fe.ram.read((FakeNetfront.RX_DATA_PFN + r.id) * PAGE_SIZE + r.offset, r.status)
            if not r.flags & NETRXF_more_data:
                break
            r = raw[i]
            i += 1
        out.append((first, extras, data))
    return out


def test_rx_gso_frame_arrives_as_one_packet_with_its_extra_slot():
    with _vnet_interface() as (host, be, fe, link, peer):
        frame = _tcp_frame(65536 - 54)                      # 64 KiB with its headers
        peer.send(_vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16) + frame)
        fe.post_rx(32)
        pages = -(-len(frame) // PAGE_SIZE)
        (first, extras, data), = _rx_packets(fe, pages + 1)
        assert first.flags & (NETRXF_csum_blank | NETRXF_data_validated | NETRXF_extra_info | NETRXF_more_data) \
            == NETRXF_csum_blank | NETRXF_data_validated | NETRXF_extra_info | NETRXF_more_data
        assert [(e.type, e.size, e.gso_type) for e in extras] == [(XEN_NETIF_EXTRA_TYPE_GSO, 1448,
                                                                   XEN_NETIF_GSO_TYPE_TCPV4)]
        assert data == frame
        assert be.stats["rx_gso_packets"] == 1 and be.stats["rx_packets"] == 1
        # IPv6, DATA_VALID, and nothing at all
        f6 = _tcp_frame(3000, v6=True)
        peer.send(_vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 74, 1428, 54, 16) + f6)
        (first, extras, data), = _rx_packets(fe, 2)
        assert [(e.size, e.gso_type) for e in extras] == [(1428, XEN_NETIF_GSO_TYPE_TCPV6)] and data == f6
        small = _tcp_frame(10)
        peer.send(_vnet(VIRTIO_NET_HDR_F_DATA_VALID) + small)
        peer.send(_vnet() + small)
        (a, ea, da), (b, eb, db) = _rx_packets(fe, 2)
        assert (a.flags, b.flags, ea, eb, da, db) == (NETRXF_data_validated, 0, [], [], small, small)


def test_rx_gso_waits_for_room_for_its_extra_slot():
    with _vnet_interface() as (host, be, fe, link, peer):
        frame = _tcp_frame(8000)                             # two pages, and the extra slot
        peer.send(_vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16) + frame)
        wait_for(lambda: be.rx_queue, "the frame queued")
        fe.post_rx(2)
        time.sleep(0.2)
        assert fe.rx.responses_ready() == 0
        fe.post_rx(1)
        (first, extras, data), = _rx_packets(fe, 3)
        assert data == frame and len(extras) == 1


def _lies():
    f4, f6 = _tcp_frame(3000), _tcp_frame(3000, v6=True)
    ok = dict(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54,
              gso_size=1448, csum_start=34, csum_offset=16)
    return [
        ("gso-size-0", _vnet(**{**ok, "gso_size": 0}) + f4, "rx_dropped_bad_vnet_hdr"),
        ("hdr-len-past-frame", _vnet(**{**ok, "hdr_len": len(f4) + 1}) + f4, "rx_dropped_bad_vnet_hdr"),
        ("csum-start-outside", _vnet(**{**ok, "csum_start": len(f4) - 1}) + f4, "rx_dropped_bad_vnet_hdr"),
        ("csum-offset-outside", _vnet(**{**ok, "csum_offset": 0xFFF0}) + f4, "rx_dropped_bad_vnet_hdr"),
        ("csum-not-where-headers-say", _vnet(**{**ok, "csum_start": 30}) + f4, "rx_dropped_bad_vnet_hdr"),
        ("gso-udp", _vnet(**{**ok, "gso_type": VIRTIO_NET_HDR_GSO_UDP}) + f4, "rx_dropped_bad_vnet_hdr"),
        ("gso-unknown", _vnet(**{**ok, "gso_type": 0x42}) + f4, "rx_dropped_bad_vnet_hdr"),
        ("ecn-alone", _vnet(gso_type=VIRTIO_NET_HDR_GSO_ECN) + f4, "rx_dropped_bad_vnet_hdr"),
        ("gso-without-csum", _vnet(**{**ok, "flags": 0}) + f4, "rx_dropped_bad_vnet_hdr"),
        ("gso-v4-on-v6", _vnet(**{**ok, "csum_start": 54}) + f6, "rx_dropped_bad_vnet_hdr"),
        ("csum-on-arp", _vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 20, 6)
         + _arp_request(mac_bytes(PEER_MAC), ip_bytes(PEER_IP), ip_bytes(GUEST_IP)), "rx_dropped_bad_vnet_hdr"),
        ("shorter-than-header", b"\x01\x04\x00", "rx_dropped_bad_vnet_hdr"),
        ("runt", _vnet() + b"\xff" * 13, "rx_dropped_bad_vnet_hdr"),
        ("gso-not-negotiated", _vnet(**{**ok, "gso_type": VIRTIO_NET_HDR_GSO_TCPV6, "csum_start": 54,
                                        "hdr_len": 74}) + f6, "rx_dropped_offload"),
    ]


@pytest.mark.parametrize("name, raw, counter", _lies(), ids=[x[0] for x in _lies()])
def test_rx_vnet_headers_that_lie_are_dropped_and_counted(name, raw, counter):
    """From the link: a frame whose header lies is dropped and counted, never
    delivered malformed; the device goes on (the next frame arrives)."""
    with _vnet_interface({"feature-gso-tcpv4": 1, "feature-ipv6-csum-offload": 1}) as (host, be, fe, link, peer):
        fe.post_rx(8)
        peer.send(raw)
        good = _tcp_frame(20)
        peer.send(_vnet() + good)
        (first, extras, data), = _rx_packets(fe, 1)
        assert data == good and be.stats[counter] == 1 and be.stats["rx_packets"] == 1
        assert be.connected and not be.failed


def test_rx_queue_is_bounded_in_bytes():
    """A link flooding 64 KiB frames at a guest that posts no buffers: the
    queue stops at RX_QUEUE_BYTES, the rest is dropped and counted."""
    with _vnet_interface() as (host, be, fe, link, peer):
        frame = _vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16) \
            + _tcp_frame(65536 - 54)
        n = 2 * RX_QUEUE_BYTES // len(frame) + 2
        peer.settimeout(None)
        for _ in range(n):
            peer.send(frame)
        wait_for(lambda: len(be.rx_queue) + be.stats["rx_dropped_queue_full"] == n, "all frames read")
        assert be.queues[0].rx_queued_bytes <= RX_QUEUE_BYTES and be.stats["rx_dropped_queue_full"] >= n // 2


def test_locate_checksum_follows_skb_checksum_setup():
    assert locate_checksum(_tcp_frame(10), 64)[:2] == (34, 16)
    assert locate_checksum(_tcp_frame(10, v6=True), 84)[:2] == (54, 16)
    # IPv6 with a hop-by-hop and a routing header before UDP
    ext = bytes([43, 0]) + bytes(6) + bytes([17, 1]) + bytes(14)
    udp6 = struct.pack("!IHBB16s16s", 0x60000000, len(ext) + 8, 0, 64, _G6, _P6) + ext + bytes(8)
    frame = bytes(12) + b"\x86\xdd" + udp6
    assert locate_checksum(frame, len(frame))[:4] == (14 + 40 + 24, 6, 6, 17)
    short_payload = bytes(12) + b"\x86\xdd" + udp6[:4] + b"\x00\x04" + udp6[6:]    # ext headers past it
    fragment = bytes(12) + b"\x86\xdd" + udp6[:6] + b"\x2c" + udp6[7:42] + b"\x00\x08" + udp6[44:]
    for bad in (frame[:-1], short_payload, fragment):
        with pytest.raises(BadHeaders):
            locate_checksum(bad, len(bad))


def test_tap_device_takes_vnet_headers_and_offload_flags():
    """A real TAP with IFF_VNET_HDR in a network namespace of its own:
    TUNSETOFFLOAD takes what a guest can receive."""
    import ctypes
    import os
    import shutil
    import subprocess
    import threading
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        pytest.skip("needs root, /dev/net/tun and iproute2")
    ns = f"pyvmm-t{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        out = {}

        def inside():
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                assert libc.setns(fd, 0x40000000) == 0
            finally:
                os.close(fd)
            try:
                tap = TapDevice("pvgso0")
                tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
                tap.set_offload(TUN_F_CSUM)
                out["flags"] = tap.offload_flags
                plain = TapDevice("pvgso1", vnet_hdr=False)
                out["plain"] = (plain.vnet_hdr, plain.offloads)
                plain.close()
                tap.close()
            except Exception as e:          # noqa: BLE001 - reported below
                out["error"] = e

        t = threading.Thread(target=inside)
        t.start()
        t.join()
        assert "error" not in out, out.get("error")
        assert out["flags"] == TUN_F_CSUM and out["plain"] == (False, frozenset())
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def test_an_empty_slot_with_a_bad_grant_drops_the_packet():
    """Found by fuzzing the vnet link: a slot carrying no bytes was never
    looked at, so its wild grant went unnoticed; Xen's netback maps every
    slot, and a bad grant fails the packet."""
    with _vnet_interface() as (host, be, fe, link, peer):
        frame = _tcp_frame(1000)
        fe.ram.write(FakeNetfront.TX_DATA_PFN * PAGE_SIZE, frame)
        fe.gnt.write_entry(50, GTF_permit_access | GTF_readonly, 0, FakeNetfront.TX_DATA_PFN)
        fe.tx.put(NetifTxRequest(gref=50, size=len(frame), flags=NETTXF_more_data, id=1))
        fe.tx.put(NetifTxRequest(gref=99999, size=0, id=2))
        fe.tx.publish()
        host.evtchn.send(fe.port)
        assert [r.status for r in fe.tx_responses(2)] == [NetifStatus.error] * 2
        assert be.stats["tx_errors"] == 1 and be.connected


@pytest.fixture(scope="module")
def rx_property_be():
    """One connected backend for the property below (its frontend takes
    TCPv4 GSO and blank checksums, not TCPv6 GSO)."""
    with _vnet_interface({"feature-gso-tcpv4": 1, "feature-ipv6-csum-offload": 1}) as (host, be, fe, link, peer):
        yield be


from hypothesis import given, settings, strategies as st  # noqa: E402

_u16 = st.one_of(st.sampled_from([0, 6, 14, 16, 34, 54, 74, 1448, 0xFFFF]), st.integers(0, 0xFFFF))
_frames = st.one_of(
    st.builds(_tcp_frame, st.integers(0, 9000), st.booleans(), st.integers(5, 15), st.booleans()),
    st.binary(max_size=200),
    st.builds(lambda f, n: f[:n], st.builds(_tcp_frame, st.integers(0, 100), st.booleans()), st.integers(0, 80)))


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(flags=st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 255)),
       gso_type=st.one_of(st.sampled_from([0, 1, 4, 3, 5, 0x80, 0x81, 0x84]), st.integers(0, 255)),
       hdr_len=_u16, gso_size=_u16, csum_start=_u16, csum_offset=_u16, frame=_frames, honest=st.booleans())
def test_rx_entry_never_passes_a_lying_header(rx_property_be, flags, gso_type, hdr_len, gso_size, csum_start,
                                              csum_offset, frame, honest):
    """Whatever header and frame the link gives: dropped (and counted), or
    delivered with netif flags the frame backs up, never an exception.
    (`honest`: the checksum place and hdr_len as the headers say, so that
    the rest of the header gets its chance to lie.)"""
    be = rx_property_be
    if honest:
        try:
            csum_start, csum_offset, _, _, hdr_len = locate_checksum(frame, len(frame))
            flags |= VIRTIO_NET_HDR_F_NEEDS_CSUM
        except BadHeaders:
            pass
    raw = _vnet(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) + frame
    before = sum(be.stats.values())
    entry = be._rx_entry(raw)
    if entry is None:
        assert sum(be.stats.values()) == before + 1
        return
    data, rx_flags, extra = entry
    assert bytes(data) == frame and len(frame) >= 14 and hdr_len <= len(frame)
    if rx_flags & NETRXF_csum_blank:
        assert flags & VIRTIO_NET_HDR_F_NEEDS_CSUM
        assert locate_checksum(frame, len(frame))[:2] == (csum_start, csum_offset)
        assert csum_start + csum_offset + 2 <= len(frame)
    if extra is not None:
        e = NetifExtraGso.from_buffer_copy(extra)
        assert e.type == XEN_NETIF_EXTRA_TYPE_GSO and e.size == gso_size > 0
        assert e.gso_type == XEN_NETIF_GSO_TYPE_TCPV4 and gso_type & 0x7F == VIRTIO_NET_HDR_GSO_TCPV4
        assert rx_flags & NETRXF_csum_blank and locate_checksum(frame, len(frame))[2:4] == (4, 6)
    else:
        assert gso_type == 0



# ---- multiple queues (multi-queue-max-queues) ----
class MultiQueueNetfront(FakeNetfront):
    """xen-netfront with several queues (talk_to_netback): multi-queue-num-queues
    at the top, queue-N/tx-ring-ref, rx-ring-ref and event-channel per queue."""

    def __init__(self, host, nq: int, num_queues: str | None = None):
        self.host, self.ram, self.gnt = host, host.ram, host.gnttab
        self.path = "/local/domain/1/device/vif/0"
        s = host.store
        self.queues = []
        for q in range(nq):
            tx_pfn, rx_pfn = 0x20 + 2 * q, 0x21 + 2 * q
            tx_ref, rx_ref = 20 + 2 * q, 21 + 2 * q
            self.gnt.write_entry(tx_ref, GTF_permit_access, 0, tx_pfn)
            self.gnt.write_entry(rx_ref, GTF_permit_access, 0, rx_pfn)
            port = host.evtchn.alloc_unbound(DOMID_SELF, 0)
            self.queues.append({"tx": FrontRing(self.ram, tx_pfn, NETIF_TX_ENTRY_SIZE, NET_TX_RING_SIZE),
                                "rx": FrontRing(self.ram, rx_pfn, NETIF_RX_ENTRY_SIZE, NET_RX_RING_SIZE),
                                "port": port, "rx_posted": 0, "tx_ref": tx_ref, "rx_ref": rx_ref})
            for k, v in {"tx-ring-ref": tx_ref, "rx-ring-ref": rx_ref, "event-channel": port}.items():
                s.write(f"{self.path}/queue-{q}/{k}", str(v))
        for k, v in {"multi-queue-num-queues": nq if num_queues is None else num_queues,
                     "request-rx-copy": 1, "feature-rx-notify": 1, "feature-sg": 1}.items():
            s.write(f"{self.path}/{k}", str(v))
        self.q = 0
        self.next_tx_ref = 100
        self.on(0)

    def on(self, q: int) -> "MultiQueueNetfront":
        self.queues[self.q]["rx_posted"] = getattr(self, "rx_posted", 0)
        self.q = q
        d = self.queues[q]
        self.tx, self.rx, self.port, self.rx_posted = d["tx"], d["rx"], d["port"], d["rx_posted"]
        return self

    def post_rx(self, n: int) -> None:
        for _ in range(n):
            i = self.rx_posted % 64            # 64 pages per queue's buffers
            ref = 1000 + 64 * self.q + i
            self.gnt.write_entry(ref, GTF_permit_access, 0, self.RX_DATA_PFN + 64 * self.q + i)
            self.rx.put(NetifRxRequest(id=i, gref=ref))
            self.rx_posted += 1
        self.rx.publish()
        self.host.evtchn.send(self.port)

    def received(self, n: int, timeout: float = 10) -> list:
        out = []
        for rsp in self.rx.take_responses(n, NetifRxResponse, timeout):
            data = b""
            if rsp.status > 0:
                data = self.ram.read((self.RX_DATA_PFN + 64 * self.q + rsp.id) * PAGE_SIZE + rsp.offset,
                                     rsp.status)
            out.append((rsp, data))
        return out

    def key(self, q: int, name: str, value) -> None:
        self.host.store.write(f"{self.path}/queue-{q}/{name}", str(value))


@contextlib.contextmanager
def _mq_interface(nq: int, max_queues: int = 4, num_queues: str | None = None):
    with backend_host() as host:
        link, far_end = SocketLink.pair()
        be = NetBackend(host, 0, link, GUEST_MAC, max_queues=max_queues)
        host.backends.append(be)
        try:
            yield host, be, MultiQueueNetfront(host, nq, num_queues), far_end
        finally:
            be.close()
            link.close()
            far_end.close()


def _udp_frame(sport: int, dport: int = 7, payload: bytes = b"x" * 32) -> bytes:
    from netpeer import udp
    src, dst = ip_bytes(PEER_IP), ip_bytes(GUEST_IP)
    return (mac_bytes(GUEST_MAC) + mac_bytes(PEER_MAC) + struct.pack("!H", ETH_P_IP)
            + ipv4(src, dst, IPPROTO_UDP, udp(src, dst, sport, dport, payload)))


def _net_queue_threads(be) -> list[str]:
    import threading
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(f"pyvmm-{be.name}-q"))


def test_flow_queue_keeps_a_flow_on_one_queue_and_spreads_flows():
    from pyvmm.backends.netback import flow_queue
    frames = [_udp_frame(40000 + i) for i in range(64)]
    picks = [flow_queue(f, 4) for f in frames]
    assert set(picks) == {0, 1, 2, 3}                   # 64 flows over all four queues
    assert all(flow_queue(f, 4) == p for f, p in zip(frames, picks))
    assert all(flow_queue(f, 1) == 0 for f in frames)
    arp = _arp_request(mac_bytes(PEER_MAC), ip_bytes(PEER_IP), ip_bytes(GUEST_IP))
    assert flow_queue(arp, 4) == 0 and flow_queue(b"\x00" * 10, 4) == 0
    # a fragment's ports are not looked at: every fragment of a datagram goes one way
    frag = bytearray(frames[0])
    frag[20] |= 0x20                                    # more fragments
    other = bytearray(frames[1])
    other[20] |= 0x20
    assert flow_queue(bytes(frag), 4) == flow_queue(bytes(other), 4)


def test_each_queue_transmits_and_receives_on_its_own_rings():
    """Two queues: a packet sent on queue 1 leaves on the link and is
    answered on queue 1's ring and port; frames from the link arrive on the
    queue their flow hashes to, in order, and only there."""
    from pyvmm.backends.netback import flow_queue
    with _mq_interface(2) as (host, be, fe, far):
        assert fe.backend_key("multi-queue-max-queues") == "4"
        fe.connect()
        assert len(be.queues) == 2 and _net_queue_threads(be) == ["pyvmm-vif0-q0", "pyvmm-vif0-q1"]
        assert host.gnttab.active_mappings() == 4
        far.settimeout(5)
        for q in (1, 0):
            for d in fe.queues:
                host.evtchn.clear_pending(d["port"])
            frame = _udp_frame(5000 + q)
            fe.on(q).send(frame)
            assert [r.status for r in fe.tx_responses(1)] == [NetifStatus.okay]
            assert [host.evtchn.is_pending(d["port"]) for d in fe.queues] == [i == q for i in range(2)]
            assert far.recv(4096) == frame
        # from the link: flows to both queues, three frames each
        flows = {}
        sport = 40000
        while len(flows) < 2:
            flows.setdefault(flow_queue(_udp_frame(sport), 2), sport)
            sport += 1
        for q in (0, 1):
            fe.on(q).post_rx(8)
        sent = {q: [_udp_frame(flows[q], payload=bytes([k]) * 40) for k in range(3)] for q in (0, 1)}
        for k in range(3):
            for q in (0, 1):
                far.send(sent[q][k])
        for q in (0, 1):
            got = fe.on(q).received(3)
            assert [d for _, d in got] == sent[q]
        time.sleep(0.2)
        assert all(d["rx"].responses_ready() == 0 for d in fe.queues)
        assert be.stats["rx_packets"] == 6 and be.stats["tx_packets"] == 2
        fe.host.store.write(f"{fe.path}/state", str(int(XenbusState.Closing)))
        wait_for(lambda: host.gnttab.active_mappings() == 0 and not _net_queue_threads(be), "queues gone")


@pytest.mark.parametrize("num_queues, why", [
    ("0", "valid range is 1 - 4"), ("9", "guest requested 9 queues"), ("many", "is not a number")])
def test_bad_number_of_net_queues_ends_the_device(num_queues, why):
    """Linux's netback refuses above the maximum (and, since 2026, 0); pyvmm
    refuses both and a value that is not a number."""
    with _mq_interface(2, num_queues=num_queues) as (host, be, fe, far):
        wait_for(lambda: fe.backend_key("state") == str(int(XenbusState.InitWait)), "InitWait")
        host.store.write(f"{fe.path}/state", str(int(XenbusState.Connected)))
        wait_for(lambda: fe.backend_key("state") == str(int(XenbusState.Closing)), "Closing")
        assert why in fe.backend_key("error")
        assert host.gnttab.active_mappings() == 0 and not _net_queue_threads(be)


@pytest.mark.parametrize("case", ["missing rx-ring-ref", "bad tx-ring-ref", "tx is rx",
                                  "ring of another queue", "event channel twice", "event channel no port"])
def test_bad_net_queue_keys_end_the_device(case):
    with _mq_interface(3) as (host, be, fe, far):
        if case == "missing rx-ring-ref":
            host.store.rm(f"{fe.path}/queue-2/rx-ring-ref")
            why = "queue-2/rx-ring-ref' missing"
        elif case == "bad tx-ring-ref":
            fe.key(1, "tx-ring-ref", "0x15")
            why = "bad queue-1/ ring reference"
        elif case == "tx is rx":
            fe.key(1, "rx-ring-ref", fe.queues[1]["tx_ref"])
            why = f"ring-ref {fe.queues[1]['tx_ref']} named twice"
        elif case == "ring of another queue":
            fe.key(2, "tx-ring-ref", fe.queues[0]["rx_ref"])
            why = f"ring-ref {fe.queues[0]['rx_ref']} named twice"
        elif case == "event channel twice":
            fe.key(2, "event-channel", fe.queues[0]["port"])
            why = f"event-channel {fe.queues[0]['port']} named twice"
        else:
            fe.key(1, "event-channel", 4000)
            why = "event channel 4000"
        wait_for(lambda: fe.backend_key("state") == str(int(XenbusState.InitWait)), "InitWait")
        host.store.write(f"{fe.path}/state", str(int(XenbusState.Connected)))
        wait_for(lambda: fe.backend_key("state") == str(int(XenbusState.Closing)), "Closing")
        assert why in fe.backend_key("error"), fe.backend_key("error")
        assert host.gnttab.active_mappings() == 0 and not _net_queue_threads(be)


def test_bogus_index_on_one_net_queue_ends_the_whole_device():
    """As Linux's netback (xenvif_fatal_tx_err disables the whole vif): a
    transmit ring overflow on queue 1 ends the device, every queue."""
    with _mq_interface(2) as (host, be, fe, far):
        fe.connect()
        q1 = fe.on(1)
        q1.tx.put(NetifTxRequest(gref=100, offset=0, flags=0, id=0, size=60))
        q1.tx.publish(NET_TX_RING_SIZE + 9)
        host.evtchn.send(q1.port)
        wait_for(lambda: fe.backend_key("state") == str(int(XenbusState.Closing)), "Closing")
        assert fe.backend_key("error").startswith("queue 1: ring overflow")
        wait_for(lambda: not _net_queue_threads(be), "queue workers gone")
        assert host.gnttab.active_mappings() == 0 and not be.connected


def test_each_net_queue_s_backlog_is_bounded():
    """A link flooding one flow at a guest posting no buffers: that queue
    holds at most RX_QUEUE_MAX frames, the rest is dropped and counted."""
    from pyvmm.backends.netback import RX_QUEUE_MAX
    with _mq_interface(2) as (host, be, fe, far):
        fe.connect()
        frame = _udp_frame(40000)
        n = RX_QUEUE_MAX + 100
        far.settimeout(None)
        for _ in range(n):
            far.send(frame)
        wait_for(lambda: sum(len(q.rx_queue) for q in be.queues) + be.stats["rx_dropped_queue_full"] == n,
                 "all frames read")
        assert max(len(q.rx_queue) for q in be.queues) == RX_QUEUE_MAX
        assert be.stats["rx_dropped_queue_full"] == 100
