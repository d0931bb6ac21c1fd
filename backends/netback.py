"""Network back-end (Xen's netback protocol, io/netif.h) onto a host packet link.

The guest's xen-netfront posts transmit requests (its packets, in pages it
granted read-only) on one ring and receive requests (empty pages granted
writable) on the other; this back-end hands each transmitted packet to the
link (a TAP device, or one end of a socket pair) and copies each packet
from the link into posted receive pages, as Xen's netback does in its copy
mode (feature-rx-copy, the only mode Linux's frontend accepts).

Offload.  A TAP is opened with IFF_VNET_HDR: every frame crossing it carries
a virtio_net_hdr, so checksums and TCP segmentation are passed between the
guest's kernel and the host's, and pyvmm computes no checksum and splits no
segment (a 64 KiB TCP send crosses the rings as one packet, not ~45):

* offered to the guest (backend keys): feature-sg, feature-ipv6-csum-offload,
  and, on a link with vnet headers, feature-gso-tcpv4 and feature-gso-tcpv6
  (IPv4 checksum offload needs no key).  A link without them (a SocketLink
  to a Python test peer) gets no GSO, and blank checksums are filled in
  here (fill_blank_checksum), the one place Python still sums a packet;
* guest -> host: NETTXF_csum_blank becomes VIRTIO_NET_HDR_F_NEEDS_CSUM with
  csum_start/csum_offset found in the L3/L4 headers (locate_checksum, which
  follows Linux's skb_checksum_setup that Xen's netback uses);
  NETTXF_data_validated becomes F_DATA_VALID; a GSO extra-info slot (TCPv4
  or TCPv6, its size) becomes the header's gso_type/gso_size.  The frame
  goes out in one writev: the header, the first TX_HEAD_COPY bytes copied
  out of the guest (the headers, parsed from that copy), then the rest
  straight from the granted pages, mapped read-only for the call;
* host -> guest: frames are read with their header; the TAP is told
  (TUNSETOFFLOAD) what the frontend announced in its own directory
  (feature-gso-tcpv4/6 with feature-sg, blank IPv4 checksums unless
  feature-no-csum-offload, IPv6 ones with feature-ipv6-csum-offload), so the
  host kernel finishes whatever the guest cannot take.  F_NEEDS_CSUM becomes
  NETRXF_csum_blank|NETRXF_data_validated, F_DATA_VALID NETRXF_data_validated,
  and a GSO frame's first response carries NETRXF_extra_info with the
  netif_extra_info GSO entry in the next ring slot (it uses up a request),
  then the data slots, as in Xen's xenvif_rx_skb.

Each transmit slot is checked before use (grant, offset + size within the
page, sizes adding up); a bad packet (sizes that lie, headers that do not
say where a blank checksum goes, GSO on a packet that is not TCP of its IP
version) is answered NETIF_RSP_ERROR and dropped.  What Xen's netback calls
fatal ends the device: a packet whose slots run past what the frontend
produced or over 18 slots, a bogus ring index, an extra-info type 0 or
unknown, a GSO size of 0 or an unknown GSO type, and (pyvmm's bound) an
extra-info chain over MAX_TX_EXTRAS slots.  A frame from the link whose
virtio_net_hdr lies (GSO size 0, hdr_len past the frame, a checksum place
outside the frame or not where its headers say, an unknown GSO type) or
that the guest did not ask for is dropped and counted (stats), never
delivered; the queue towards the guest is bounded in frames and bytes.

Multiple queues (multi-queue-max-queues: the guest's vCPUs, at most
xenbus.MAX_QUEUES): a frontend asking for N > 1 gives queue-K/tx-ring-ref,
rx-ring-ref and event-channel per queue (split event channels are not
offered).  Each queue has its own rings, port, worker thread and bounded
queue of frames towards the guest (RX_QUEUE_MAX frames, RX_QUEUE_BYTES
per queue, as Linux's netback bounds each queue).  What the guest sends on
a queue goes to the link from that queue's worker (one writev per frame,
so frames from different queues never interleave); a frame from the link
goes to the queue its flow hashes to (flow_queue: IP addresses, protocol
and TCP/UDP ports, so one flow stays in order on one queue, as Linux's
netback picks a queue by the skb's flow hash; anything else to queue 0).
Refused, ending the device: num-queues 0, above the maximum or not a
number, a queue's key missing or not a number, a ring page named twice
(two queues, or a queue's tx and rx), an event channel named for two
queues, and a bogus ring index on any queue (Linux's netback disables the
whole vif for it too).
"""
from __future__ import annotations

import collections
import fcntl
import hashlib
import logging
import os
import select
import socket
import struct
import threading
import zlib

from pyvmm.xen_abi.abi import (
    NETIF_RX_ENTRY_SIZE,
    NETIF_TX_ENTRY_SIZE,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_more_data,
    PAGE_SIZE,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_FORMAT,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_MAX,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    NetifExtraGso,
    NetifRxRequest,
    NetifRxResponse,
    NetifStatus,
    NetifTxRequest,
    NetifTxResponse,
)
from pyvmm.xen_abi.hypervisor.evtchn import BACKEND_DOMID
from pyvmm.xen_abi.hypervisor.grant_table import GrantError

from .xenbus import (BackendQueue, BackRing, ProtocolError, XenbusBackend, check_distinct, default_max_queues,
                     queue_dir, read_num_queues)

log = logging.getLogger(__name__)

__all__ = ["NetBackend", "TapDevice", "SocketLink", "NetError", "BadHeaders", "default_mac", "parse_mac",
           "locate_checksum", "fill_blank_checksum", "flow_queue"]

# A packet may use at most this many transmit slots (XEN_NETBK_LEGACY_SLOTS_MAX).
MAX_TX_SLOTS = 18
MAX_PACKET = 65535 + 14
RX_QUEUE_MAX = 512          # packets from the link waiting for receive buffers
RX_QUEUE_BYTES = 2 << 20    # ... and at most this many bytes of them
READ_BATCH = 64             # frames read from the link per wake-up
MAX_RX_SLOTS = 17           # a received packet over more pages than this is dropped
# a read from a link with vnet headers: the header and the largest frame the
# guest can take, plus one byte so that a longer (truncated) one shows as too big
VNET_READ_SIZE = VIRTIO_NET_HDR_SIZE + MAX_RX_SLOTS * PAGE_SIZE + 1
# bytes of a transmitted packet copied out of the guest's pages (the headers
# are parsed from this copy, never from pages the guest can still rewrite);
# the rest goes to the link straight from the granted pages
TX_HEAD_COPY = 256
# a netif_extra_info chain longer than this is fatal: an honest frontend sends
# each type at most once (Xen bounds the chain only by the ring)
MAX_TX_EXTRAS = XEN_NETIF_EXTRA_TYPE_MAX - 1
XEN_OUI = "00:16:3e"        # Xen's MAC prefix

_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0          # _IOW('T', 208, unsigned int)
_TUNSETVNETHDRSZ = 0x400454D8        # _IOW('T', 216, int)
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
# linux/sockios.h: interface flags, and a port added to a bridge (what
# `ip link set TAP master BR` does, without needing iproute2)
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _SIOCBRADDIF = 0x8913, 0x8914, 0x89A2
_IFF_UP = 0x1
_ETH_HLEN = 14
_ETH_P_IP, _ETH_P_IPV6, _ETH_P_8021Q = 0x0800, 0x86DD, 0x8100
_IPPROTO_TCP, _IPPROTO_UDP = 6, 17
_IPPROTO_HOPOPTS, _IPPROTO_ROUTING, _IPPROTO_FRAGMENT, _IPPROTO_AH, _IPPROTO_DSTOPTS = 0, 43, 44, 51, 60
_CSUM_FIELD = {_IPPROTO_TCP: 16, _IPPROTO_UDP: 6}
_VNET = struct.Struct(VIRTIO_NET_HDR_FORMAT)
_NO_VNET_HDR = bytes(VIRTIO_NET_HDR_SIZE)
_GSO_TO_XEN = {VIRTIO_NET_HDR_GSO_TCPV4: XEN_NETIF_GSO_TYPE_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6: XEN_NETIF_GSO_TYPE_TCPV6}
_XEN_TO_GSO = {v: k for k, v in _GSO_TO_XEN.items()}
_GSO_IP_VERSION = {VIRTIO_NET_HDR_GSO_TCPV4: 4, VIRTIO_NET_HDR_GSO_TCPV6: 6}
# what a link with vnet headers can carry towards the host: checksums left
# blank and TCP segments over the MTU, both ways
VNET_OFFLOADS = frozenset({"csum", "tso4", "tso6"})


class NetError(Exception):
    """A host-side link that cannot be used; str() is one line for the user."""


def default_mac(name: str, index: int) -> str:
    """A stable locally chosen address in Xen's OUI, from the guest name."""
    h = hashlib.sha256(f"{name}/{index}".encode()).digest()
    return f"{XEN_OUI}:{h[0] & 0x7F:02x}:{h[1]:02x}:{h[2]:02x}"


def parse_mac(text: str) -> str:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p)
                                  for p in parts):
        raise NetError(f"bad MAC address {text!r}: use six hex pairs, e.g. 00:16:3e:12:34:56")
    if int(parts[0], 16) & 1:
        raise NetError(f"MAC address {text!r} is a multicast address; the first byte must be even")
    return text.lower()


# ---------------------------------------------------------------- host links
# A link is what the back-end moves Ethernet frames to and from.  It has
#   vnet_hdr   True if every frame it takes and gives starts with a
#              virtio_net_hdr (checksum and GSO offload information);
#   offloads   what it can carry towards the host (VNET_OFFLOADS, or none);
#   set_offload(TUN_F_*)  what the back-end can take from it (the guest's
#              receive features); a link with no such control ignores it;
#   fileno(), recv() -> one frame or None, send(frame), sendv(buffers) (one
#   frame gathered from several buffers), close().

class TapDevice:
    """A Linux TAP interface (Ethernet frames, no packet-info header), by
    default with IFF_VNET_HDR: frames carry a virtio_net_hdr, so the host
    kernel and the guest pass checksum and segmentation offload to each
    other instead of pyvmm doing either."""

    def __init__(self, name: str, vnet_hdr: bool = True):
        if not name or len(name.encode()) > 15 or "/" in name or " " in name:
            raise NetError(f"bad interface name {name!r}: at most 15 characters, no '/' or spaces")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise NetError("/dev/net/tun is missing: load the tun module (modprobe tun)") from None
        except PermissionError:
            raise NetError("/dev/net/tun: permission denied (TAP devices need root or CAP_NET_ADMIN)") from None
        flags = _IFF_TAP | _IFF_NO_PI | (_IFF_VNET_HDR if vnet_hdr else 0)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
            if vnet_hdr:
                # the 10-byte header, whatever an earlier user of a persistent
                # device set; nothing offloaded to us until a guest says it copes
                fcntl.ioctl(fd, _TUNSETVNETHDRSZ, struct.pack("i", VIRTIO_NET_HDR_SIZE))
                fcntl.ioctl(fd, _TUNSETOFFLOAD, 0)
        except OSError as e:
            os.close(fd)
            if e.errno == 16:       # EBUSY
                raise NetError(f"TAP device {name} is in use by another program") from None
            if e.errno == 1:        # EPERM
                raise NetError(f"TAP device {name}: permission denied (needs root or CAP_NET_ADMIN, "
                               f"or a device created with 'ip tuntap add {name} mode tap user ...')") from None
            raise NetError(f"TAP device {name}: {e.strerror}") from None
        self.fd = fd
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.offloads = VNET_OFFLOADS if vnet_hdr else frozenset()
        self.offload_flags = 0
        self.bridge: str | None = None

    @staticmethod
    def check_bridge(bridge: str) -> None:
        if "/" in bridge or not os.path.isdir(f"/sys/class/net/{bridge}/bridge"):
            raise NetError(f"bridge {bridge!r} does not exist on this host "
                           f"(create it: ip link add {bridge} type bridge; ip link set {bridge} up)")

    def join_bridge(self, bridge: str) -> None:
        """Make the TAP a port of the host bridge and bring it up, as xl's
        vif-bridge script does."""
        self.check_bridge(bridge)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                index = socket.if_nametoindex(self.name)
                fcntl.ioctl(s, _SIOCBRADDIF, struct.pack("16si20x", bridge.encode(), index))
                flags = struct.unpack_from("16xH", fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack("16s24x",
                                                                                      self.name.encode())))[0]
                fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", self.name.encode(), flags | _IFF_UP))
            except OSError as e:
                raise NetError(f"cannot add TAP device {self.name} to bridge {bridge}: {e.strerror}") from None
        self.bridge = bridge

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD: the TUN_F_* the reader (the guest) can take; the
        host kernel finishes checksums and segments itself for the rest."""
        if not self.vnet_hdr or flags == self.offload_flags or self.fd < 0:
            return
        fcntl.ioctl(self.fd, _TUNSETOFFLOAD, flags)
        self.offload_flags = flags

    def fileno(self) -> int:
        return self.fd

    def send(self, frame) -> None:
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            pass                      # the host side is not keeping up: drop, as a NIC would

    def sendv(self, buffers: list) -> None:
        try:
            os.writev(self.fd, buffers)
        except BlockingIOError:
            pass

    def recv(self) -> bytes | None:
        try:
            return os.read(self.fd, VNET_READ_SIZE if self.vnet_hdr else MAX_PACKET)
        except BlockingIOError:
            return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self):
        return f"TapDevice({self.name!r})"


class SocketLink:
    """One end of a SOCK_SEQPACKET socket pair: each message one frame.
    `SocketLink.pair()` gives the back-end's end and the peer's socket (a
    cable to a test's Python peer, or to another guest's back-end).  With
    vnet_hdr each message is a virtio_net_hdr and the frame, as on a TAP
    with IFF_VNET_HDR (the peer must speak it too)."""

    def __init__(self, sock: socket.socket, vnet_hdr: bool = False):
        sock.setblocking(False)
        self.sock = sock
        self.vnet_hdr = vnet_hdr
        self.offloads = VNET_OFFLOADS if vnet_hdr else frozenset()
        self.offload_flags = 0

    @classmethod
    def pair(cls, vnet_hdr: bool = False) -> tuple["SocketLink", socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a, vnet_hdr), b

    def fileno(self) -> int:
        return self.sock.fileno()

    def set_offload(self, flags: int) -> None:
        self.offload_flags = flags    # the peer may read it; a socket cannot enforce it

    def send(self, frame) -> None:
        try:
            self.sock.send(frame)
        except BlockingIOError:
            pass                      # the peer is not keeping up: drop

    def sendv(self, buffers: list) -> None:
        try:
            self.sock.sendmsg(buffers)
        except BlockingIOError:
            pass

    def recv(self) -> bytes | None:
        try:
            data = self.sock.recv(VNET_READ_SIZE if self.vnet_hdr else MAX_PACKET)
        except BlockingIOError:
            return None
        except ConnectionError:
            raise EOFError from None
        if not data:
            raise EOFError           # the peer closed its end
        return data

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- headers and checksums
class BadHeaders(ValueError):
    """A frame whose L3/L4 headers do not say where its checksum goes."""


def locate_checksum(frame, length: int) -> tuple[int, int, int, int, int]:
    """Where a CHECKSUM_PARTIAL frame's TCP/UDP checksum goes, found from its
    headers as Linux's skb_checksum_setup (Xen's netback) finds it: (csum_start,
    csum_offset, IP version, L4 protocol, end of the L4 header).  `frame` holds
    at least the headers (a prefix of the frame), `length` is the whole
    frame's.  Raises BadHeaders for what Linux refuses: not IPv4/IPv6, an IP
    fragment, IPv6 extension headers that do not end, neither TCP nor UDP,
    headers past the frame.  One 802.1Q tag is allowed (Linux's netback sees
    the tagged protocol and refuses those)."""
    have = min(len(frame), length)
    if have < _ETH_HLEN:
        raise BadHeaders(f"{length}-byte frame shorter than an Ethernet header")
    l3, ethertype = _ETH_HLEN, (frame[12] << 8) | frame[13]
    if ethertype == _ETH_P_8021Q:
        if have < 18:
            raise BadHeaders("802.1Q header past the frame")
        l3, ethertype = 18, (frame[16] << 8) | frame[17]
    if ethertype == _ETH_P_IP:
        if have < l3 + 20:
            raise BadHeaders("IPv4 header past the frame")
        if frame[l3] >> 4 != 4 or frame[l3] & 0xF < 5:
            raise BadHeaders(f"bad IPv4 version/IHL byte {frame[l3]:#x}")
        if ((frame[l3 + 6] << 8) | frame[l3 + 7]) & 0x3FFF:     # MF or a fragment offset
            raise BadHeaders("IPv4 fragment")
        version, proto, l4 = 4, frame[l3 + 9], l3 + (frame[l3] & 0xF) * 4
    elif ethertype == _ETH_P_IPV6:
        if have < l3 + 40:
            raise BadHeaders("IPv6 header past the frame")
        if frame[l3] >> 4 != 6:
            raise BadHeaders(f"bad IPv6 version byte {frame[l3]:#x}")
        proto, off = frame[l3 + 6], 40
        end = 40 + ((frame[l3 + 4] << 8) | frame[l3 + 5])
        done = False
        while off <= end and not done:              # skb_checksum_setup_ipv6's walk
            if proto in (_IPPROTO_HOPOPTS, _IPPROTO_ROUTING, _IPPROTO_DSTOPTS, _IPPROTO_AH,
                         _IPPROTO_FRAGMENT):
                if have < l3 + off + 8:
                    raise BadHeaders("IPv6 extension header past the frame")
                if proto == _IPPROTO_FRAGMENT:
                    if ((frame[l3 + off + 2] << 8) | frame[l3 + off + 3]) & 0xFFF9:   # offset or M
                        raise BadHeaders("IPv6 fragment")
                    size = 8
                elif proto == _IPPROTO_AH:
                    size = (frame[l3 + off + 1] + 2) * 4
                else:
                    size = (frame[l3 + off + 1] + 1) * 8
                proto = frame[l3 + off]
                off += size
            else:
                done = True
        if not done:
            raise BadHeaders("IPv6 extension headers run past the payload length")
        version, l4 = 6, l3 + off
    else:
        raise BadHeaders(f"ethertype {ethertype:#06x} is neither IPv4 nor IPv6")
    field = _CSUM_FIELD.get(proto)
    if field is None:
        raise BadHeaders(f"L4 protocol {proto} is neither TCP nor UDP")
    if proto == _IPPROTO_TCP:
        if have < l4 + 20:
            raise BadHeaders("TCP header past the frame")
        l4_end = l4 + (frame[l4 + 12] >> 4) * 4
        if l4_end < l4 + 20 or l4_end > length:
            raise BadHeaders(f"TCP data offset {frame[l4 + 12] >> 4} outside [5, the frame]")
    else:
        if have < l4 + 8:
            raise BadHeaders("UDP header past the frame")
        l4_end = l4 + 8
    return l4, field, version, proto, l4_end


def _ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    # summed as native (little-endian) words: RFC 1071's sum is the same
    # up to a byte swap, undone at the end
    s = sum(memoryview(data).cast("H"))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ((s & 0xFF) << 8) | (s >> 8)


def fill_blank_checksum(frame: bytearray) -> bool:
    """Complete the TCP/UDP checksum of a CHECKSUM_PARTIAL frame: its
    checksum field holds the pseudo-header sum, the rest is to be summed
    over the transport header and payload.  Only for links without vnet
    headers (a socket to a Python peer), where nothing else would; False for
    a frame whose headers do not say where the checksum goes."""
    try:
        l4, field, _, proto, _ = locate_checksum(frame, len(frame))
    except BadHeaders:
        return False
    csum = ~_ones_complement_sum(frame[l4:]) & 0xFFFF
    if proto == _IPPROTO_UDP and csum == 0:
        csum = 0xFFFF
    frame[l4 + field:l4 + field + 2] = csum.to_bytes(2, "big")
    return True


def flow_queue(frame, n: int) -> int:
    """The queue (0..n-1) a frame from the link goes to: a hash of its flow
    (IP addresses and protocol, with TCP/UDP ports when it is not a
    fragment), so a flow stays on one queue; a frame that is not IP (ARP,
    ...) goes to queue 0."""
    if n <= 1 or len(frame) < _ETH_HLEN:
        return 0
    l3, ethertype = _ETH_HLEN, (frame[12] << 8) | frame[13]
    if ethertype == _ETH_P_8021Q and len(frame) >= 18:
        l3, ethertype = 18, (frame[16] << 8) | frame[17]
    if ethertype == _ETH_P_IP and len(frame) >= l3 + 20:
        proto = frame[l3 + 9]
        key = bytes(frame[l3 + 12:l3 + 20]) + bytes((proto,))
        l4 = l3 + (frame[l3] & 0xF) * 4
        fragment = ((frame[l3 + 6] << 8) | frame[l3 + 7]) & 0x3FFF
    elif ethertype == _ETH_P_IPV6 and len(frame) >= l3 + 40:
        proto = frame[l3 + 6]
        key = bytes(frame[l3 + 8:l3 + 40]) + bytes((proto,))
        l4, fragment = l3 + 40, 0
    else:
        return 0
    if proto in (_IPPROTO_TCP, _IPPROTO_UDP) and not fragment and len(frame) >= l4 + 4:
        key += bytes(frame[l4:l4 + 4])
    return zlib.crc32(key) % n


# ---------------------------------------------------------------- the back-end
class _DropPacket(Exception):
    """This packet is refused (NETIF_RSP_ERROR); the device goes on."""


def _flag(read, key: str) -> bool:
    """A frontend feature key: absent or not "1" is off."""
    try:
        return read(key).strip() == "1"
    except ProtocolError:
        return False


class _NetQueue(BackendQueue):
    """One queue of a vif: its transmit and receive rings (served by one
    thread) and the frames from the link waiting for its receive buffers
    (filled by the link's reader, taken by the queue's thread: `lock`)."""

    def __init__(self, index: int, tx: BackRing, rx: BackRing):
        super().__init__(index)
        self.tx, self.rx = tx, rx
        # (frame data, NETRXF_* flags, GSO extra slot or None) per queued frame
        self.rx_queue: collections.deque[tuple] = collections.deque()
        self.rx_queued_bytes = 0
        self.lock = threading.Lock()


class NetBackend(XenbusBackend):
    """Network interface `index` (vif<domid>.<index>, the guest's eth<index>)
    connected to `link` (TapDevice or SocketLink; the caller closes it).
    `max_queues`: what multi-queue-max-queues offers (default: the guest's
    vCPUs, at most xenbus.MAX_QUEUES)."""

    kind = "vif"

    def __init__(self, host, index: int, link, mac: str, tx_limiter=None, rx_limiter=None,
                 max_queues: int | None = None):
        self.link = link
        self.vnet = bool(getattr(link, "vnet_hdr", False))
        self.mac = parse_mac(mac)
        # ratelimit.RateLimiter each, or None: from the guest, and to it
        self.tx_limiter, self.rx_limiter = tx_limiter, rx_limiter
        self.limiters = {k: v for k, v in (("transmit", tx_limiter), ("receive", rx_limiter)) if v is not None}
        self.max_queues = default_max_queues(host) if max_queues is None else max(1, int(max_queues))
        # the link reader's own counters (drops before a frame has a queue)
        self._link_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stop_r = self._stop_w = -1
        # what the frontend can receive (its own feature keys, read at connect)
        self.rx_csum4 = self.rx_csum6 = False
        self.rx_gso: frozenset[int] = frozenset()       # VIRTIO_NET_HDR_GSO_* it takes
        self._device_stats = collections.Counter()
        super().__init__(host, index, name=f"vif{index}",
                         frontend={"handle": index, "mac": self.mac})

    # ---- handshake ----
    def features(self) -> dict:
        offloads = getattr(self.link, "offloads", frozenset())
        return {"handle": self.devid, "mac": self.mac, "feature-rx-copy": 1, "feature-rx-flip": 0,
                "feature-sg": 1, "feature-ipv6-csum-offload": 1,
                "feature-gso-tcpv4": int("tso4" in offloads), "feature-gso-tcpv6": int("tso6" in offloads),
                "multi-queue-max-queues": self.max_queues}

    def connect(self, read) -> dict:
        try:
            copy = read("request-rx-copy")
        except ProtocolError:
            copy = "0"
        if copy != "1":
            raise ProtocolError("the frontend wants page flipping; only rx-copy is offered")
        n = read_num_queues(read, self.max_queues)
        keys = []           # (tx-ring-ref, rx-ring-ref, event-channel) per queue, all read first
        for i in range(n):
            d = queue_dir(i, n)
            try:
                keys.append((int(read(f"{d}tx-ring-ref")), int(read(f"{d}rx-ring-ref")),
                             int(read(f"{d}event-channel"))))
            except ValueError as e:
                raise ProtocolError(f"bad {d} ring reference or event channel: {e}") from None
        if n > 1:           # (one queue: as before, the frontend's own business)
            check_distinct({"ring-ref": [r for k in keys for r in k[:2]], "event-channel": [k[2] for k in keys]})
        self._read_receive_features(read)
        queues = []
        for i, (tx_ref, rx_ref, port) in enumerate(keys):
            q = _NetQueue(i, BackRing(self.map_grant(tx_ref), NETIF_TX_ENTRY_SIZE, NetifTxRequest, NetifTxResponse),
                          BackRing(self.map_grant(rx_ref), NETIF_RX_ENTRY_SIZE, NetifRxRequest, NetifRxResponse))
            self.bind_queue(q, port, lambda q=q: self._serve_queue(q), several=n > 1)
            queues.append(q)
        self.queues = queues
        self._start_reader()
        return {}

    def _read_receive_features(self, read) -> None:
        """What the guest can take, as Xen's netback reads it (xenbus.c):
        blank IPv4 checksums unless feature-no-csum-offload, IPv6 ones with
        feature-ipv6-csum-offload, TCP GSO per feature-gso-tcpv4/6 (and only
        with feature-sg: a GSO packet spans slots).  The TAP is told the
        same, so the host kernel finishes what the guest cannot."""
        self.rx_csum4 = not _flag(read, "feature-no-csum-offload")
        self.rx_csum6 = _flag(read, "feature-ipv6-csum-offload")
        sg = _flag(read, "feature-sg")
        gso = set()
        if self.vnet and sg and self.rx_csum4 and _flag(read, "feature-gso-tcpv4"):
            gso.add(VIRTIO_NET_HDR_GSO_TCPV4)
        if self.vnet and sg and self.rx_csum6 and _flag(read, "feature-gso-tcpv6"):
            gso.add(VIRTIO_NET_HDR_GSO_TCPV6)
        self.rx_gso = frozenset(gso)
        # TUN_F_CSUM is all protocols at once: only if the guest takes both
        offload = 0
        if self.rx_csum4 and self.rx_csum6:
            offload = TUN_F_CSUM
            offload |= TUN_F_TSO4 if VIRTIO_NET_HDR_GSO_TCPV4 in gso else 0
            offload |= TUN_F_TSO6 if VIRTIO_NET_HDR_GSO_TCPV6 in gso else 0
        self._set_link_offload(offload if self.vnet else 0)

    def _set_link_offload(self, flags: int) -> None:
        try:
            self.link.set_offload(flags)
        except (AttributeError, OSError) as e:   # the link went away, or is not one that can
            log.info("%s of domain %d: link offload %#x not set: %s", self.name, self.domid, flags, e)

    def disconnect(self) -> None:
        self._stop_reader()
        self._set_link_offload(0)
        self.drop_queued_frames()

    def drop_queued_frames(self) -> None:
        """Forget every frame waiting for a receive buffer."""
        for q in list(self.queues):
            with q.lock:
                q.rx_queue.clear()
                q.rx_queued_bytes = 0

    def close(self) -> None:
        super().close()
        self._stop_reader()

    @property
    def tx(self) -> BackRing | None:
        """The first queue's transmit ring (the only one with one queue)."""
        queues = self.queues
        return queues[0].tx if queues else None

    @property
    def rx(self) -> BackRing | None:
        queues = self.queues
        return queues[0].rx if queues else None

    @property
    def rx_queue(self) -> collections.deque:
        """Frames waiting for the first queue's receive buffers."""
        queues = self.queues
        return queues[0].rx_queue if queues else collections.deque()

    def rings(self) -> dict:
        queues = list(self.queues)
        if len(queues) == 1:
            return {"tx": queues[0].tx, "rx": queues[0].rx}
        return {f"{k}{q.index}": r for q in queues for k, r in (("tx", q.tx), ("rx", q.rx))}

    # ---- packets from the link ----
    def _start_reader(self) -> None:
        self._stop_r, self._stop_w = os.pipe()
        self._reader = threading.Thread(target=self._read_link, args=(self._stop_r,),
                                        name=f"pyvmm-{self.name}-link", daemon=True)
        self._reader.start()

    def _stop_reader(self) -> None:
        if self._reader is None:
            return
        os.write(self._stop_w, b"\0")
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._reader = None

    def _read_link(self, stop_r: int) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.link, stop_r], [], [])
            except (OSError, ValueError):
                return
            if stop_r in ready:
                return
            frames = []
            try:
                while len(frames) < READ_BATCH and (frame := self.link.recv()) is not None:
                    frames.append(frame)
            except (EOFError, OSError):
                log.info("%s of domain %d: the link closed", self.name, self.domid)
                return
            if self.queue_frames(frames):
                self.kick()

    def queue_frames(self, frames) -> int:
        """Queue frames as read from the link for the guest (any thread):
        each is checked and its offload information turned into netif's,
        what the guest cannot take is dropped and counted, the rest goes to
        its flow's queue (whose worker is woken when there are several; with
        one the caller kicks the device).  How many queued."""
        queues = self.queues
        if not queues:
            return 0
        n = len(queues)
        with self._link_lock:          # the device's own counters: one writer at a time
            entries = []
            for frame in frames:
                entry = self._rx_entry(frame) if self.vnet else (frame, 0, None)
                if entry is not None:
                    entries.append(entry)
            queued, woken = 0, set()
            for entry in entries:
                q = queues[flow_queue(entry[0], n)]
                size = len(entry[0])
                with q.lock:
                    full = len(q.rx_queue) >= RX_QUEUE_MAX or q.rx_queued_bytes + size > RX_QUEUE_BYTES
                    if not full:
                        q.rx_queue.append(entry)
                        q.rx_queued_bytes += size
                if full:
                    self._device_stats["rx_dropped_queue_full"] += 1
                else:
                    queued += 1
                    woken.add(q)
        for q in woken:
            if q.worker is not None:
                q.worker.kick()
        return queued

    def _rx_drop(self, why: str, counter: str = "rx_dropped_bad_vnet_hdr") -> None:
        self._device_stats[counter] += 1
        log.debug("%s of domain %d: frame from the link dropped: %s", self.name, self.domid, why)

    def _rx_entry(self, raw: bytes):
        """A frame from a vnet link: (data, NETRXF flags, GSO extra or None),
        or None when it is dropped.  The header is the host kernel's (or a
        socket peer's) word and is checked against the frame: a frame the
        guest would refuse or misread never reaches its ring."""
        if len(raw) < VIRTIO_NET_HDR_SIZE + _ETH_HLEN:
            self._rx_drop(f"{len(raw)} bytes: shorter than a virtio_net_hdr and an Ethernet header")
            return None
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack_from(raw)
        data = memoryview(raw)[VIRTIO_NET_HDR_SIZE:]
        n = len(data)
        if hdr_len > n:
            self._rx_drop(f"hdr_len {hdr_len} past the {n}-byte frame")
            return None
        # netif has no ECN flag: such a packet goes on as plain TCP GSO, as Xen's netback passes it
        gso = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
        if gso not in (VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6) \
                or (gso == VIRTIO_NET_HDR_GSO_NONE and gso_type):
            self._rx_drop(f"GSO type {gso_type:#x} (only TCP is offered)")
            return None
        rx_flags = 0
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            if csum_start + csum_offset + 2 > n:
                self._rx_drop(f"checksum at {csum_start}+{csum_offset} outside the {n}-byte frame")
                return None
            try:
                start, offset, version, proto, _ = locate_checksum(data[:TX_HEAD_COPY], n)
            except BadHeaders as e:
                self._rx_drop(f"checksum to fill in, but {e}")
                return None
            if (start, offset) != (csum_start, csum_offset):
                # the guest finds the checksum from the headers (netfront's
                # checksum_setup): a header saying otherwise is not to be believed
                self._rx_drop(f"checksum at {csum_start}+{csum_offset}, the headers say {start}+{offset}")
                return None
            if not (self.rx_csum4 if version == 4 else self.rx_csum6):
                self._rx_drop(f"blank IPv{version} checksum, the guest cannot take it", "rx_dropped_offload")
                return None
            rx_flags = NETRXF_csum_blank | NETRXF_data_validated
        elif flags & VIRTIO_NET_HDR_F_DATA_VALID:
            rx_flags = NETRXF_data_validated
        extra = None
        if gso != VIRTIO_NET_HDR_GSO_NONE:
            if not gso_size:
                self._rx_drop("GSO size 0")
                return None
            if not rx_flags & NETRXF_csum_blank:
                self._rx_drop("GSO without a checksum to fill in")
                return None
            if proto != _IPPROTO_TCP or version != _GSO_IP_VERSION[gso]:
                self._rx_drop(f"TCPv{_GSO_IP_VERSION[gso]} GSO on an IPv{version} protocol {proto} frame")
                return None
            if gso not in self.rx_gso:
                self._rx_drop(f"TCPv{_GSO_IP_VERSION[gso]} GSO, the guest did not ask for it",
                              "rx_dropped_offload")
                return None
            extra = bytes(NetifExtraGso(type=XEN_NETIF_EXTRA_TYPE_GSO, size=gso_size,
                                        gso_type=_GSO_TO_XEN[gso]))
        return data, rx_flags, extra

    # ---- the rings (worker thread) ----
    def process(self) -> None:
        """The device's worker: serves the rings when there is one queue
        (with several, each queue's worker runs _serve_queue)."""
        queues = self.queues
        if len(queues) == 1:
            self._serve_queue(queues[0])

    def _serve_queue(self, q: _NetQueue) -> None:
        """One queue's rings, by the one thread serving that queue."""
        while not (q.worker is not None and q.worker.stopping):
            held = self._transmit(q)
            rx_held, waiting = self._receive(q)
            if held or rx_held:          # a rate limit: retry_later() brings us back
                return
            more = q.tx.final_check()
            if waiting:
                # ask to hear of new receive buffers; look again only if the
                # waiting frame now fits (else we would spin until it does)
                more |= q.rx.final_check() and q.rx.unconsumed() >= waiting
            if not more:
                return

    def _take_extras(self, tx: BackRing, responses: list) -> dict:
        """The netif_extra_info slots after a packet's first: {type: raw 8
        bytes}.  As Xen's xenvif_get_extras: a missing slot or a type 0 or
        beyond XEN_NETIF_EXTRA_TYPE_MAX is fatal; a chain over
        MAX_TX_EXTRAS slots is fatal too (pyvmm's bound; Xen's is the ring)."""
        extras = {}
        for _ in range(MAX_TX_EXTRAS):
            if not tx.unconsumed():
                raise ProtocolError("packet's extra-info slot missing from the ring")
            raw = bytes(tx.take_request())[:8]
            responses.append((None, NetifStatus.null))      # extra-info slots are answered NULL
            etype, eflags = raw[0], raw[1]
            if not 0 < etype < XEN_NETIF_EXTRA_TYPE_MAX:
                raise ProtocolError(f"invalid extra-info type {etype}")
            extras[etype] = raw
            if not eflags & XEN_NETIF_EXTRA_FLAG_MORE:
                return extras
        raise ProtocolError(f"extra-info chain over {MAX_TX_EXTRAS} slots")

    @staticmethod
    def _gso(extras: dict) -> tuple[int, int] | None:
        """(VIRTIO_NET_HDR_GSO_*, size) from a GSO extra; a size of 0 or an
        unknown type is fatal, as in Xen's xenvif_set_skb_gso."""
        raw = extras.get(XEN_NETIF_EXTRA_TYPE_GSO)
        if raw is None:
            return None
        e = NetifExtraGso.from_buffer_copy(raw)
        if not e.size:
            raise ProtocolError("GSO size must not be zero")
        if e.gso_type not in _XEN_TO_GSO:
            raise ProtocolError(f"bad GSO type {e.gso_type}")
        return _XEN_TO_GSO[e.gso_type], e.size

    def _transmit(self, q: _NetQueue) -> bool:
        """Send what the guest queued on one queue; True if a rate limit held some back."""
        tx, held, stats = q.tx, False, q.stats
        while tx.unconsumed():
            wait = self.tx_limiter.wait() if self.tx_limiter is not None else 0
            if wait:                     # over the rate: the packets wait on the ring
                self.retry_queue_later(q, wait)
                held = True
                break
            first = tx.take_request()
            slots, responses = [first], [(first.id, NetifStatus.okay)]
            extras = self._take_extras(tx, responses) if first.flags & NETTXF_extra_info else {}
            if XEN_NETIF_EXTRA_TYPE_MCAST_ADD in extras or XEN_NETIF_EXTRA_TYPE_MCAST_DEL in extras:
                # a multicast filter change, no packet: Xen answers the
                # request alone (and its more_data slots as packets of their
                # own).  Nothing is filtered here, so there is nothing to change.
                for rid, status in responses:
                    tx.put_response(NetifTxResponse(id=rid or 0, status=status))
                continue
            while slots[-1].flags & NETTXF_more_data:
                if len(slots) >= MAX_TX_SLOTS:
                    raise ProtocolError(f"packet over {MAX_TX_SLOTS} slots")
                if not tx.unconsumed():
                    raise ProtocolError("packet's following slot missing from the ring")
                slots.append(tx.take_request())
                responses.append((slots[-1].id, NetifStatus.okay))
            gso = self._gso(extras) if extras else None
            try:
                size = self._send_packet(slots, gso)
            except (_DropPacket, GrantError) as e:
                log.info("%s of domain %d: transmit dropped: %s", self.name, self.domid, e)
                stats["tx_errors"] += 1
                responses = [(i, NetifStatus.error if s == NetifStatus.okay else s) for i, s in responses]
            except OSError as e:   # the link refused it (down, closed, too big): drop it
                stats["tx_link_errors"] += 1
                log.info("%s of domain %d: link refused a frame: %s", self.name, self.domid, e)
            else:
                stats["tx_packets"] += 1
                stats["tx_bytes"] += size
                if gso is not None:
                    stats["tx_gso_packets"] += 1
                if self.tx_limiter is not None:
                    self.tx_limiter.consume(size)
            for rid, status in responses:
                tx.put_response(NetifTxResponse(id=rid or 0, status=status))
        if tx.push_responses():
            q.notify()
        return held

    @staticmethod
    def _slot_sizes(slots: list) -> list[int]:
        """Bytes of the packet in each slot: the first slot's size is the
        packet's.  Sizes that do not add up, or a slot crossing its page,
        drop the packet (Xen's netback drops the first and ends the device
        for the second; a drop is kinder and as safe here)."""
        total = slots[0].size
        rest = sum(s.size for s in slots[1:])
        if rest > total or total > MAX_PACKET or total < _ETH_HLEN:
            raise _DropPacket(f"slot sizes {[s.size for s in slots]} do not add up")
        sizes = [total - rest] + [s.size for s in slots[1:]]
        for s, size in zip(slots, sizes):
            if s.offset + size > PAGE_SIZE:
                raise _DropPacket(f"slot [{s.offset}, +{size}) crosses its page")
        return sizes

    def _send_packet(self, slots: list, gso) -> int:
        """Hand one packet to the link; its size.  Raises _DropPacket (or
        GrantError) for a packet refused, OSError for one the link refused."""
        sizes = self._slot_sizes(slots)
        if self.vnet:
            return self._send_vnet(slots, sizes, gso)
        if gso is not None:
            raise _DropPacket("a GSO packet, and the link takes no vnet header (feature-gso-* was 0)")
        frame = bytearray()
        gnttab = self.host.gnttab
        for s, size in zip(slots, sizes):
            frame += gnttab.copy_from_guest(s.gref, s.offset, size, BACKEND_DOMID)
        if slots[0].flags & NETTXF_csum_blank and not fill_blank_checksum(frame):
            raise _DropPacket("a blank checksum, and the headers do not say where it goes")
        self.link.send(frame)
        return len(frame)

    def _send_vnet(self, slots: list, sizes: list, gso) -> int:
        """One writev to the link: a virtio_net_hdr, the packet's first
        TX_HEAD_COPY bytes copied out (its headers, parsed from the copy),
        and the rest straight from the granted pages, mapped read-only for
        the call (Xen's netback copies its first 128 bytes and maps the rest
        the same way).  No checksum is computed: a blank one (NETTXF_csum_blank)
        goes out as VIRTIO_NET_HDR_F_NEEDS_CSUM with csum_start/csum_offset
        found in the headers, as Xen's skb_checksum_setup finds them."""
        gnttab = self.host.gnttab
        total = slots[0].size
        flags = slots[0].flags
        # the head: copied, slot by slot, until TX_HEAD_COPY bytes
        want = min(total, TX_HEAD_COPY)
        head_parts, tail = [], []          # tail: (gref, offset, size) still to map
        for s, size in zip(slots, sizes):
            take = min(size, want)
            if take or not size:         # (a slot of no bytes: its grant is still checked)
                head_parts.append(gnttab.copy_from_guest(s.gref, s.offset, take, BACKEND_DOMID))
                want -= take
            if size > take:
                tail.append((s.gref, s.offset + take, size - take))
        head = head_parts[0] if len(head_parts) == 1 else b"".join(head_parts)
        if flags & NETTXF_csum_blank or gso is not None:
            try:
                start, offset, version, proto, l4_end = locate_checksum(head, total)
            except BadHeaders as e:
                raise _DropPacket(f"a blank checksum, and {e}") from None
            if gso is None:
                hdr = _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, l4_end, 0, start, offset)
            else:
                gso_type, gso_size = gso
                if not flags & NETTXF_csum_blank:
                    # Xen's netback recomputes the pseudo-header sum of such a
                    # "buggy peer's" packet; Linux's netfront never sends one
                    raise _DropPacket("a GSO packet without NETTXF_csum_blank")
                if proto != _IPPROTO_TCP or version != _GSO_IP_VERSION[gso_type]:
                    raise _DropPacket(f"TCPv{_GSO_IP_VERSION[gso_type]} GSO on an IPv{version} "
                                      f"protocol {proto} packet")
                hdr = _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, l4_end, gso_size, start, offset)
        elif flags & NETTXF_data_validated:
            hdr = _VNET.pack(VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0)
        else:
            hdr = _NO_VNET_HDR
        if not tail:
            self.link.sendv([hdr, head])
            return total
        maps = []
        try:
            parts = [hdr, head]
            for gref, off, size in tail:
                m = gnttab.map(gref, BACKEND_DOMID, readonly=True)
                maps.append(m)
                parts.append(m.view[off:off + size])
            self.link.sendv(parts)
            del parts
        finally:
            for m in maps:
                try:
                    gnttab.unmap(m)
                except GrantError:
                    pass
        return total

    def _receive(self, q: _NetQueue) -> tuple[bool, int]:
        """Deliver queued frames while buffers last: whether a rate limit held
        some back, and the buffers the next queued frame waits for (0: none).
        A frame is spread over receive buffers a page each; with a GSO extra
        (NETRXF_extra_info on its first slot) the second slot carries the
        netif_extra_info, as Xen's netback lays it out (xenvif_rx_skb)."""
        rx, stats, rx_queue = q.rx, q.stats, q.rx_queue
        gnttab = self.host.gnttab
        delivered = waiting = 0
        held = False
        while True:
            with q.lock:
                queued = bool(rx_queue)
            wait = self.rx_limiter.wait() if queued and self.rx_limiter is not None else 0
            if wait:                     # over the rate: frames wait in rx_queue (bounded)
                self.retry_queue_later(q, wait)
                held = True
                break
            with q.lock:
                if not rx_queue:
                    break
                frame, flags, extra = rx_queue[0]
                pages = max(1, -(-len(frame) // PAGE_SIZE))
                if pages > MAX_RX_SLOTS:
                    rx_queue.popleft()
                    q.rx_queued_bytes -= len(frame)
                    stats["rx_dropped_too_big"] += 1
                    continue
                need = pages + (extra is not None)
                if rx.unconsumed() < need:
                    waiting = need           # wait for the guest to post buffers
                    break
                rx_queue.popleft()
                q.rx_queued_bytes -= len(frame)
            if extra is not None:
                flags |= NETRXF_extra_info
            for i in range(pages):
                req = rx.take_request()
                chunk = frame[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                f = (flags if i == 0 else 0) | (NETRXF_more_data if i < pages - 1 else 0)
                status = len(chunk)
                try:
                    gnttab.copy_to_guest(req.gref, 0, chunk, BACKEND_DOMID)
                except GrantError as e:
                    # the slot's flags stay: the frontend walks the packet by them
                    log.info("%s of domain %d: receive buffer refused: %s", self.name, self.domid, e)
                    status = NetifStatus.error
                rx.put_response(NetifRxResponse(id=req.id, offset=0, flags=f, status=status))
                if i == 0 and extra is not None:
                    rx.take_request()        # the extra-info takes a buffer's slot, not its page
                    rx.put_response(NetifExtraGso.from_buffer_copy(extra))
            delivered += 1
            stats["rx_packets"] += 1
            stats["rx_bytes"] += len(frame)
            if extra is not None:
                stats["rx_gso_packets"] += 1
            if self.rx_limiter is not None:
                self.rx_limiter.consume(len(frame))
        if delivered and rx.push_responses():
            q.notify()
        return held, waiting
