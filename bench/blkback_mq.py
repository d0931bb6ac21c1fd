"""The block back-end's throughput with one queue and with several, without a guest.

    python bench/blkback_mq.py [--seconds 4] [--queues 1,2] [--size-kib 44] [--image-mib 64]

A frontend played from Python (tests/backends/test_blkback.py's helpers:
real rings and grants in a fake domain's RAM, feature-persistent as Linux's
blkfront uses it) keeps each queue's ring full of reads of --size-kib
(11 segments: 44 KiB, a direct request) spread over a page-cache-warm
image, one Python thread per queue; the back-end serves each queue with
its own worker (one queue: the device's worker).  Reported: MiB/s served in
all, requests per second, and the back-end's worker CPU and wall time per
request.  Everything runs in one process, so the frontend threads take
the GIL too: this measures how far the back-end's queues overlap (preadv
releases the GIL), not what a guest would see.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "backends")]

import test_blkback as t                                      # noqa: E402
from fakefront import backend_host                             # noqa: E402
from pyvmm.backends.blkback import BlockBackend, DiskImage, xvd_devid   # noqa: E402
from pyvmm.xen_abi.abi import BLKIF_RING_SIZE, BlkifOp, BlkifResponse, XenbusState   # noqa: E402


def run(queues: int, seconds: float, size_kib: int, image: str) -> dict:
    with backend_host() as host:
        img = DiskImage.open(image)
        be = BlockBackend(host, 0, img, max_queues=max(queues, 1))
        host.backends.append(be)
        if queues == 1:
            fe = t.FakeFrontend(host, host.ram, xvd_devid(0))
        else:
            fe = t.MultiQueueFrontend(host, host.ram, xvd_devid(0), queues)
        host.store.write(f"{fe.path}/feature-persistent", "1")
        fe.connect()
        segs = size_kib // 4
        sectors = img.size // 512
        stop = threading.Event()
        done = [0] * queues
        errors = []

        def feeder(q: int) -> None:
            ring = fe.rings[q] if queues > 1 else fe.ring
            port = fe.ports[q] if queues > 1 else fe.port
            # each queue its own data pages (a queue's grants, as blkfront's per-ring pool)
            refs = [fe.grant(t.FakeFrontend.DATA_PFN + q * segs + i) for i in range(segs)]
            pos = q * 7919
            inflight = 0
            try:
                while not stop.is_set():
                    while inflight < BLKIF_RING_SIZE:
                        pos = (pos + segs * 8) % (sectors - segs * 8)
                        ring.put(fe.request(BlkifOp.read, pos, [(r, 0, 7) for r in refs], req_id=inflight))
                        inflight += 1
                    ring.publish()
                    host.evtchn.send(port)
                    n = ring.responses_ready()
                    while not n and not stop.is_set():
                        time.sleep(0.0002)
                        n = ring.responses_ready()
                    if n:
                        for rsp in ring.take_responses(n, BlkifResponse):
                            if rsp.status:
                                errors.append(rsp.status)
                        inflight -= n
                        done[q] += n
            except Exception as e:          # reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=feeder, args=(q,), daemon=True) for q in range(queues)]
        before = dict(be.stats)
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        time.sleep(seconds)
        stop.set()
        for th in threads:
            th.join(10)
        span = time.perf_counter() - t0
        after = dict(be.stats)
        fe.state(XenbusState.Closing)
        t.wait_for(lambda: not be.connected and fe.backend_state() == XenbusState.Closing, "the device closed")
        be.close()
        img.close()
        reqs = sum(done)
        runs = {k: after.get(k, 0) - before.get(k, 0) for k in ("worker_cpu_us", "worker_wall_us")}
        assert not errors, errors[:5]
        return {"queues": queues, "mib_s": reqs * size_kib / 1024 / span, "req_s": reqs / span,
                "cpu_us_per_req": runs["worker_cpu_us"] / max(reqs, 1),
                "wall_us_per_req": runs["worker_wall_us"] / max(reqs, 1), "per_queue": done}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--queues", default="1,2")
    ap.add_argument("--size-kib", type=int, default=44)
    ap.add_argument("--image-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="alternate the queue counts this many times")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyvmm-blkmq-") as d:
        image = os.path.join(d, "disk.img")
        with open(image, "wb") as f:
            f.write(os.urandom(args.image_mib << 20))       # and so in the page cache
        print(f"{'queues':>6} {'MiB/s':>8} {'requests/s':>11} {'worker CPU us/req':>18} "
              f"{'worker wall us/req':>19}  requests per queue")
        for _ in range(args.rounds):
            for q in (int(x) for x in args.queues.split(",")):
                r = run(q, args.seconds, args.size_kib, image)
                print(f"{r['queues']:>6} {r['mib_s']:>8.1f} {r['req_s']:>11.0f} {r['cpu_us_per_req']:>18.0f} "
                      f"{r['wall_us_per_req']:>19.0f}  {r['per_queue']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
