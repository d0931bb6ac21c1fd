"""Network back-end (Xen's netback protocol, io/netif.h) onto a host packet link.

The guest's xen-netfront posts transmit requests (its packets, in pages it
granted read-only) on one ring and receive requests (empty pages granted
writable) on the other; this back-end copies each transmitted packet out
to the link (a TAP device, or one end of a socket pair) and each packet
from the link into the next posted receive page, as Xen's netback does in
its copy mode (feature-rx-copy, the only mode Linux's frontend accepts).

Transmit packets may span slots (NETTXF_more_data, feature-sg); the
checksum of a TCP/UDP packet the guest left blank (NETTXF_csum_blank, the
frontend's checksum offload) is filled in here before it leaves.  Received
packets larger than a page are spread over several slots.

Each transmit slot is checked before use (grant, offset + size within the
page, sizes adding up); a bad packet is answered NETIF_RSP_ERROR and
dropped, a packet whose slots run past what the frontend produced, or a
bogus ring index, ends the device.
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


from pyvmm.xen_abi.abi import (
    NETIF_RX_ENTRY_SIZE,
    NETIF_TX_ENTRY_SIZE,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_extra_info,
    NETTXF_more_data,
    PAGE_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    NetifExtraInfo,
    NetifRxRequest,
    NetifRxResponse,
    NetifStatus,
    NetifTxRequest,
    NetifTxResponse,
)
from pyvmm.xen_abi.hypervisor.evtchn import BACKEND_DOMID
from pyvmm.xen_abi.hypervisor.grant_table import GrantError

from .xenbus import BackRing, ProtocolError, XenbusBackend

log = logging.getLogger(__name__)

__all__ = ["NetBackend", "TapDevice", "SocketLink", "NetError", "default_mac", "parse_mac"]

# A packet may use at most this many transmit slots (XEN_NETBK_LEGACY_SLOTS_MAX).
MAX_TX_SLOTS = 18
MAX_PACKET = 65535 + 14
RX_QUEUE_MAX = 512          # packets from the link waiting for receive buffers
READ_BATCH = 64             # frames read from the link per wake-up
MAX_RX_SLOTS = 17           # a received packet over more pages than this is dropped
XEN_OUI = "00:16:3e"        # Xen's MAC prefix

_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI = 0x0002, 0x1000
# linux/sockios.h: interface flags, and a port added to a bridge (what
# `ip link set TAP master BR` does, without needing iproute2)
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _SIOCBRADDIF = 0x8913, 0x8914, 0x89A2
_IFF_UP = 0x1
_ETH_P_IP, _ETH_P_IPV6, _ETH_P_8021Q = 0x0800, 0x86DD, 0x8100
_IPPROTO_TCP, _IPPROTO_UDP = 6, 17
_CSUM_FIELD = {_IPPROTO_TCP: 16, _IPPROTO_UDP: 6}


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
class TapDevice:
    """A Linux TAP interface (Ethernet frames, no packet-info header)."""

    def __init__(self, name: str):
        if not name or len(name.encode()) > 15 or "/" in name or " " in name:
            raise NetError(f"bad interface name {name!r}: at most 15 characters, no '/' or spaces")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise NetError("/dev/net/tun is missing: load the tun module (modprobe tun)") from None
        except PermissionError:
            raise NetError("/dev/net/tun: permission denied (TAP devices need root or CAP_NET_ADMIN)") from None
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI))
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

    def fileno(self) -> int:
        return self.fd

    def send(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            pass                      # the host side is not keeping up: drop, as a NIC would

    def recv(self) -> bytes | None:
        try:
            return os.read(self.fd, MAX_PACKET)
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
    cable to a test's Python peer, or to another guest's back-end)."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple["SocketLink", socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), b

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: bytes) -> None:
        try:
            self.sock.send(frame)
        except BlockingIOError:
            pass                      # the peer is not keeping up: drop

    def recv(self) -> bytes | None:
        try:
            data = self.sock.recv(MAX_PACKET)
        except BlockingIOError:
            return None
        except ConnectionError:
            raise EOFError from None
        if not data:
            raise EOFError           # the peer closed its end
        return data

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- checksums
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
    over the transport header and payload.  False for what it cannot parse
    (sent as is, as a NIC without that offload would)."""
    l3, ethertype = 14, int.from_bytes(frame[12:14], "big")
    if ethertype == _ETH_P_8021Q:
        l3, ethertype = 18, int.from_bytes(frame[16:18], "big")
    if ethertype == _ETH_P_IP and len(frame) >= l3 + 20:
        l4 = l3 + (frame[l3] & 0xF) * 4
        proto = frame[l3 + 9]
    elif ethertype == _ETH_P_IPV6 and len(frame) >= l3 + 40:
        l4, proto = l3 + 40, frame[l3 + 6]          # no extension headers
    else:
        return False
    field = _CSUM_FIELD.get(proto)
    if field is None or len(frame) < l4 + field + 2:
        return False
    csum = ~_ones_complement_sum(frame[l4:]) & 0xFFFF
    if proto == _IPPROTO_UDP and csum == 0:
        csum = 0xFFFF
    frame[l4 + field:l4 + field + 2] = csum.to_bytes(2, "big")
    return True


# ---------------------------------------------------------------- the back-end
class _DropPacket(Exception):
    """This packet is refused (NETIF_RSP_ERROR); the device goes on."""


class NetBackend(XenbusBackend):
    """Network interface `index` (vif<domid>.<index>, the guest's eth<index>)
    connected to `link` (TapDevice or SocketLink; the caller closes it)."""

    kind = "vif"

    def __init__(self, host, index: int, link, mac: str, tx_limiter=None, rx_limiter=None):
        self.link = link
        self.mac = parse_mac(mac)
        # ratelimit.RateLimiter each, or None: from the guest, and to it
        self.tx_limiter, self.rx_limiter = tx_limiter, rx_limiter
        self.limiters = {k: v for k, v in (("transmit", tx_limiter), ("receive", rx_limiter)) if v is not None}
        self.tx: BackRing | None = None
        self.rx: BackRing | None = None
        self.rx_queue: collections.deque[bytes] = collections.deque()
        self._rx_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stop_r = self._stop_w = -1
        self.stats = collections.Counter()
        super().__init__(host, index, name=f"vif{index}",
                         frontend={"handle": index, "mac": self.mac})

    # ---- handshake ----
    def features(self) -> dict:
        return {"handle": self.devid, "mac": self.mac, "feature-rx-copy": 1, "feature-rx-flip": 0,
                "feature-sg": 1, "feature-ipv6-csum-offload": 1,
                "feature-gso-tcpv4": 0, "feature-gso-tcpv6": 0}

    def connect(self, read) -> dict:
        try:
            copy = read("request-rx-copy")
        except ProtocolError:
            copy = "0"
        if copy != "1":
            raise ProtocolError("the frontend wants page flipping; only rx-copy is offered")
        try:
            tx_ref, rx_ref = int(read("tx-ring-ref")), int(read("rx-ring-ref"))
            port = int(read("event-channel"))
        except ValueError as e:
            raise ProtocolError(f"bad ring reference or event channel: {e}") from None
        self.tx = BackRing(self.map_grant(tx_ref), NETIF_TX_ENTRY_SIZE, NetifTxRequest, NetifTxResponse)
        self.rx = BackRing(self.map_grant(rx_ref), NETIF_RX_ENTRY_SIZE, NetifRxRequest, NetifRxResponse)
        self.bind_event_channel(port)
        self._start_reader()
        return {}

    def disconnect(self) -> None:
        self._stop_reader()
        self.tx = self.rx = None
        with self._rx_lock:
            self.rx_queue.clear()

    def close(self) -> None:
        super().close()
        self._stop_reader()

    def rings(self) -> dict:
        return {k: r for k, r in (("tx", self.tx), ("rx", self.rx)) if r is not None}

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
            with self._rx_lock:
                for frame in frames:
                    if len(self.rx_queue) >= RX_QUEUE_MAX:
                        self.stats["rx_dropped_queue_full"] += 1
                    else:
                        self.rx_queue.append(frame)
            if frames:
                self.kick()

    # ---- the rings (worker thread) ----
    def process(self) -> None:
        while self.tx is not None:
            held = self._transmit()
            rx_held, waiting = self._receive()
            if held or rx_held:          # a rate limit: retry_later() brings us back
                return
            more = self.tx.final_check()
            if waiting:
                # ask to hear of new receive buffers; look again only if the
                # waiting frame now fits (else we would spin until it does)
                more |= self.rx.final_check() and self.rx.unconsumed() >= waiting
            if not more:
                return

    def _transmit(self) -> bool:
        """Send what the guest queued; True if a rate limit held some back."""
        tx, held = self.tx, False
        while tx.unconsumed():
            wait = self.tx_limiter.wait() if self.tx_limiter is not None else 0
            if wait:                     # over the rate: the packets wait on the ring
                self.retry_later(wait)
                held = True
                break
            first = tx.take_request()
            slots, responses = [first], [(first.id, NetifStatus.okay)]
            if first.flags & NETTXF_extra_info:
                while True:                 # extra-info slots carry no data: answered NULL
                    if not tx.unconsumed():
                        raise ProtocolError("packet's extra-info slot missing from the ring")
                    extra = NetifExtraInfo.from_buffer_copy(bytes(tx.take_request()))
                    responses.append((None, NetifStatus.null))
                    if not extra.flags & XEN_NETIF_EXTRA_FLAG_MORE:
                        break
            while slots[-1].flags & NETTXF_more_data:
                if len(slots) >= MAX_TX_SLOTS:
                    raise ProtocolError(f"packet over {MAX_TX_SLOTS} slots")
                if not tx.unconsumed():
                    raise ProtocolError("packet's following slot missing from the ring")
                slots.append(tx.take_request())
                responses.append((slots[-1].id, NetifStatus.okay))
            try:
                frame = self._gather(slots)
                if first.flags & NETTXF_csum_blank:
                    fill_blank_checksum(frame)
                try:
                    self.link.send(bytes(frame))
                except OSError as e:   # the link refused it (down, closed, too big): drop it
                    self.stats["tx_link_errors"] += 1
                    log.info("%s of domain %d: link refused a frame: %s", self.name, self.domid, e)
                else:
                    self.stats["tx_packets"] += 1
                    self.stats["tx_bytes"] += len(frame)
                    if self.tx_limiter is not None:
                        self.tx_limiter.consume(len(frame))
            except (_DropPacket, GrantError) as e:
                log.info("%s of domain %d: transmit dropped: %s", self.name, self.domid, e)
                self.stats["tx_errors"] += 1
                responses = [(i, NetifStatus.error if s == NetifStatus.okay else s) for i, s in responses]
            for rid, status in responses:
                tx.put_response(NetifTxResponse(id=rid or 0, status=status))
        if tx.push_responses():
            self.notify_frontend()
        return held

    def _gather(self, slots: list) -> bytearray:
        """The packet's bytes from its slots' granted pages."""
        total = slots[0].size                # the first slot gives the packet's size
        rest = sum(s.size for s in slots[1:])
        if rest > total or total > MAX_PACKET or total < 14:
            raise _DropPacket(f"slot sizes {[s.size for s in slots]} do not add up")
        sizes = [total - rest] + [s.size for s in slots[1:]]
        frame = bytearray()
        gnttab = self.host.gnttab
        for s, size in zip(slots, sizes):
            if s.offset + size > PAGE_SIZE:
                raise _DropPacket(f"slot [{s.offset}, +{size}) crosses its page")
            frame += gnttab.copy_from_guest(s.gref, s.offset, size, BACKEND_DOMID)
        return frame

    def _receive(self) -> tuple[bool, int]:
        """Deliver queued frames while buffers last: whether a rate limit held
        some back, and the buffers the next queued frame waits for (0: none)."""
        rx = self.rx
        gnttab = self.host.gnttab
        delivered = waiting = 0
        held = False
        while True:
            with self._rx_lock:
                queued = bool(self.rx_queue)
            wait = self.rx_limiter.wait() if queued and self.rx_limiter is not None else 0
            if wait:                     # over the rate: frames wait in rx_queue (bounded)
                self.retry_later(wait)
                held = True
                break
            with self._rx_lock:
                if not self.rx_queue:
                    break
                frame = self.rx_queue[0]
                need = max(1, -(-len(frame) // PAGE_SIZE))
                if need > MAX_RX_SLOTS:
                    self.rx_queue.popleft()
                    self.stats["rx_dropped_too_big"] += 1
                    continue
                if rx.unconsumed() < need:
                    waiting = need           # wait for the guest to post buffers
                    break
                self.rx_queue.popleft()
            for i in range(need):
                req = rx.take_request()
                chunk = frame[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                status, flags = len(chunk), NETRXF_more_data if i < need - 1 else 0
                try:
                    gnttab.copy_to_guest(req.gref, 0, chunk, BACKEND_DOMID)
                except GrantError as e:
                    log.info("%s of domain %d: receive buffer refused: %s", self.name, self.domid, e)
                    status, flags = NetifStatus.error, 0
                rx.put_response(NetifRxResponse(id=req.id, offset=0, flags=flags, status=status))
            delivered += 1
            self.stats["rx_packets"] += 1
            self.stats["rx_bytes"] += len(frame)
            if self.rx_limiter is not None:
                self.rx_limiter.consume(len(frame))
        if delivered and rx.push_responses():
            self.notify_frontend()
        return held, waiting

