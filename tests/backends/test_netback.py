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
        be._receive = lambda: (calls.append(1), receive())[1]
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
