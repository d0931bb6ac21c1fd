"""A tiny IPv4 host in Python at the far end of a guest's network link (a
SocketLink pair): it answers ARP for its address, ICMP echo, and TFTP read
requests with one data block.  It checks the checksums of everything it
receives (so the back-end's filling of blank TCP/UDP checksums is tested)
and keeps what it saw for the test to inspect."""
from __future__ import annotations

import socket
import struct
import threading

ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806
IPPROTO_ICMP, IPPROTO_UDP = 1, 17
TFTP_PORT = 69
TFTP_RRQ, TFTP_DATA, TFTP_ACK = 1, 3, 4
BROADCAST = b"\xff" * 6


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip_bytes(text: str) -> bytes:
    return socket.inet_aton(text)


def mac_bytes(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 1) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0, src, dst)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def udp(src_ip: bytes, dst_ip: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    length = 8 + len(payload)
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, IPPROTO_UDP, length)
    hdr = struct.pack("!HHHH", sport, dport, length, 0)
    c = checksum(pseudo + hdr + payload) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, length, c) + payload


class NetPeer:
    def __init__(self, sock: socket.socket, mac: str = "02:00:00:00:02:01", ip: str = "10.0.2.1",
                 tftp_files: dict[str, bytes] | None = None):
        self.sock = sock
        self.mac, self.ip = mac_bytes(mac), ip_bytes(ip)
        self.tftp_files = tftp_files or {}
        self.seen = {"arp": 0, "icmp_echo": 0, "udp": 0, "bad_checksum": 0, "frames": 0,
                     "largest": 0}
        self.tftp_requests: list[str] = []
        self._thread = threading.Thread(target=self._run, name="netpeer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self.sock.close()

    def _run(self) -> None:
        while True:
            try:
                frame = self.sock.recv(70000)
            except OSError:
                return
            if not frame:
                return
            self.seen["frames"] += 1
            self.seen["largest"] = max(self.seen["largest"], len(frame))
            try:
                self._handle(frame)
            except (struct.error, IndexError, UnicodeDecodeError):
                pass

    def _send(self, dst_mac: bytes, ethertype: int, payload: bytes) -> None:
        self.sock.send(dst_mac + self.mac + struct.pack("!H", ethertype) + payload)

    def _handle(self, frame: bytes) -> None:
        src_mac, ethertype = frame[6:12], struct.unpack("!H", frame[12:14])[0]
        body = frame[14:]
        if ethertype == ETH_P_ARP:
            op, sha, spa, tpa = struct.unpack("!6xH6s4s6x4s", body[:28])
            if op == 1 and tpa == self.ip:
                self.seen["arp"] += 1
                reply = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 2, self.mac, self.ip, sha, spa)
                self._send(src_mac, ETH_P_ARP, reply)
            return
        if ethertype != ETH_P_IP:
            return
        ihl = (body[0] & 0xF) * 4
        total = struct.unpack("!H", body[2:4])[0]
        proto, src_ip, dst_ip = body[9], body[12:16], body[16:20]
        if checksum(body[:ihl]) != 0:
            self.seen["bad_checksum"] += 1
            return
        if dst_ip != self.ip:
            return
        l4 = body[ihl:total]
        if proto == IPPROTO_ICMP:
            if checksum(l4) != 0:
                self.seen["bad_checksum"] += 1
                return
            if l4[0] == 8:                 # echo request -> echo reply
                self.seen["icmp_echo"] += 1
                reply = b"\0\0\0\0" + l4[4:]
                reply = reply[:2] + struct.pack("!H", checksum(reply)) + reply[4:]
                self._send(src_mac, ETH_P_IP, ipv4(self.ip, src_ip, IPPROTO_ICMP, reply))
        elif proto == IPPROTO_UDP:
            pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, IPPROTO_UDP, len(l4))
            if struct.unpack("!H", l4[6:8])[0] != 0 and checksum(pseudo + l4) != 0:
                self.seen["bad_checksum"] += 1
                return
            self.seen["udp"] += 1
            sport, dport = struct.unpack("!HH", l4[:4])
            data = l4[8:]
            if dport == TFTP_PORT and struct.unpack("!H", data[:2])[0] == TFTP_RRQ:
                name = data[2:].split(b"\0")[0].decode()
                self.tftp_requests.append(name)
                content = self.tftp_files.get(name)
                if content is not None and len(content) < 512:
                    block = struct.pack("!HH", TFTP_DATA, 1) + content
                    self._send(src_mac, ETH_P_IP,
                               ipv4(self.ip, src_ip, IPPROTO_UDP, udp(self.ip, src_ip, TFTP_PORT, sport, block)))
