"""The network back-end's own time per MiB transmitted, without a guest.

    python bench/netback_tx.py [--mib 8]

A frontend played from Python (tests/backends/test_netback.py's helpers:
real rings and grants in a fake domain's RAM) transmits TCP packets with
blank checksums to a NetBackend on a socket pair whose peer drains it, and
the back-end's transmit work is timed in its worker thread:

* 1514-byte packets on a link without vnet headers (each copied out of the
  grants and its checksum summed in Python: the old path to a TAP);
* 1514-byte packets on a link with vnet headers (NEEDS_CSUM, one writev);
* 65000-byte TCPv4 GSO packets (a GSO extra-info slot, 16 page slots).

Back-end time only (the guest's side is bench/devices.py's business).
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "backends")]

import test_netback as t                                      # noqa: E402
from pyvmm.xen_abi.abi import NET_TX_RING_SIZE, NETTXF_csum_blank   # noqa: E402


def run(vnet: bool, size: int, gso: bool, mib: int) -> tuple[float, float]:
    """(ms of back-end transmit time per MiB, packets per MiB)."""
    with t._vnet_interface(vnet=vnet) as (host, be, fe, link, peer):
        stop = threading.Event()

        def drain():
            peer.settimeout(0.2)
            while not stop.is_set():
                try:
                    peer.recv(1 << 17)
                except OSError:
                    pass

        threading.Thread(target=drain, daemon=True).start()
        frame = t._tcp_frame(size - 54)
        extras = [t._gso_extra()] if gso else []
        busy = 0.0
        transmit = be._transmit

        def timed(q):
            nonlocal busy
            t0 = time.perf_counter()
            try:
                return transmit(q)
            finally:
                busy += time.perf_counter() - t0

        be._transmit = timed
        n, sent = (mib << 20) // size, 0
        per_packet = -(-size // 4096) + len(extras)
        while sent < n:
            fe.next_tx_ref = 100             # the previous batch's grants are all answered
            batch = min(n - sent, max(1, (NET_TX_RING_SIZE // 2) // per_packet))
            slots = sum(t._send_with_extras(fe, frame, NETTXF_csum_blank, extras) for _ in range(batch))
            fe.tx_responses(slots)
            sent += batch
        stop.set()
        assert be.stats["tx_errors"] == 0, be.stats
        return busy / mib * 1e3, be.stats["tx_packets"] / mib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=8)
    args = ap.parse_args()
    print(f"{'transmit, per MiB':<44} {'back-end ms':>11} {'packets':>8}")
    for label, vnet, size, gso in (("1514 B, no vnet header (checksum in Python)", False, 1514, False),
                                   ("1514 B, vnet header (NEEDS_CSUM)", True, 1514, False),
                                   ("65000 B TCPv4 GSO, vnet header", True, 65000, True)):
        ms, packets = run(vnet, size, gso, args.mib)
        print(f"{label:<44} {ms:>11.1f} {packets:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
