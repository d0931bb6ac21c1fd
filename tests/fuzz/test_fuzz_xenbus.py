"""Fuzzing the xenbus handshake of the back-ends: the frontend keys a guest
writes into xenstore (ring-ref, event-channel, protocol, ring-page-order,
request-rx-copy, multi-queue-num-queues and queue-N/...) and the sequence of
frontend states it goes through.

Each input attaches a block or network back-end, writes fuzzed keys and a
grant entry for the ring, then walks the frontend through fuzzed states
(valid ones, junk, going back to Initialising after Closed).  Oracles: no
traceback logged (a guest's mistake is never an internal error), no thread
dies; a failed device says why in its `error` node and sits in Closing;
once closed, the back-end holds no grant mapping, no bound port and no
thread (queue workers included).
"""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzhost import FuzzHost, track_busy, wait_idle
from fuzzlib import Finding, Input, Oracle, ci_settings
from pyvmm.backends.blkback import BlockBackend, DiskImage
from pyvmm.backends.netback import NetBackend, SocketLink
from pyvmm.xen_abi.abi import DOMID_SELF, GTF_permit_access, GTF_readonly, PAGE_SIZE, XenbusState

RING_REFS = ("2", "3", "2", "3", "2", "3", "0", "511", "512", "-1", "4294967296", "0x2", " 2", "２", "", "x", "9" * 5000)
PORTS = ("{port}",) * 6 + ("0", "1", "4095", "4096", "-1", "", "{port}0")
STATES = [str(int(s)) for s in XenbusState] + ["", "9", "-1", "x", "3 ", "00004"]
BLK_KEYS = {"protocol": ("x86_64-abi",) * 6 + ("x86_32-abi", "", "x" * 300),
            "ring-page-order": ("0",) * 6 + ("1", "x", "")}
NET_KEYS = {"request-rx-copy": ("1",) * 6 + ("0", "", "yes"), "feature-rx-notify": ("1", "0")}
CONNECT = (str(int(XenbusState.Initialised)), str(int(XenbusState.Connected)))
NUM_QUEUES = ("2", "2", "2", "3", "1", "0", "5", "-1", "x", "", "4294967298")


class Harness:
    MAX_SIZE = 256

    def __init__(self):
        self.fh = FuzzHost()
        self.dir = tempfile.mkdtemp(prefix="pyvmm-fuzz-xenbus-")
        self.path = os.path.join(self.dir, "disk.img")
        with open(self.path, "wb") as f:
            f.truncate(1 << 20)
        self.image = DiskImage.open(self.path)
        self.n = 0
        self.connected = 0          # inputs that got a device connected

    def close(self):
        self.image.close()
        os.unlink(self.path)
        os.rmdir(self.dir)
        self.fh.close()

    def one(self, data: bytes) -> None:
        inp = Input(data)
        fh = self.fh
        store = fh.host.store
        fh.clear_grants(set())
        self.n += 1
        net = inp.chance(100)
        link = peer = None
        port = fh.host.evtchn.alloc_unbound(DOMID_SELF, 0)
        ports = [port]
        # multi-queue: the back-end offers 1 to 4 queues, the frontend asks for some
        mq = inp.chance(100)
        max_queues = inp.choice((1, 2, 4)) if mq else 1
        nq = 1
        if net:
            link, peer = SocketLink.pair()
            be = NetBackend(fh.host, self.n % 8, link, "00:16:3e:00:00:03", max_queues=max_queues)
            ring_keys = ("tx-ring-ref", "rx-ring-ref")
            extra = NET_KEYS
        else:
            be = BlockBackend(fh.host, self.n % 8, self.image, max_queues=max_queues)
            ring_keys = ("ring-ref",)
            extra = BLK_KEYS
        keys = {}
        if mq:
            num = inp.choice(NUM_QUEUES)
            keys["multi-queue-num-queues"] = num
            nq = int(num) if num in ("1", "2", "3") else 2
        track_busy(be)
        try:
            while len(ports) < nq:
                ports.append(fh.host.evtchn.alloc_unbound(DOMID_SELF, 0))
            for q in range(nq):
                d = f"queue-{q}/" if mq and not (nq == 1 and inp.chance(200)) else ""
                for k in ring_keys:
                    keys[d + k] = inp.choice(RING_REFS)
                keys[d + "event-channel"] = inp.choice(PORTS).format(port=ports[q if inp.chance(220) else 0])
            for k, values in extra.items():
                if inp.chance(200):
                    keys[k] = inp.choice(values)
            for k in list(keys):
                if inp.chance(15):
                    del keys[k]                      # a key the frontend forgot
            for ref, pfn in ((2, 0), (3, 1)):
                flags = inp.choice((GTF_permit_access, GTF_permit_access, GTF_permit_access | GTF_readonly, 0))
                fh.grant(ref, flags, 0 if inp.chance(240) else 7, inp.choice((pfn,) * 6 + (63, 64, 0xFFFFFFFF)))
                fh.page(pfn)[:] = bytes(PAGE_SIZE)
            for k, v in keys.items():
                store.write(f"{be.fe_path}/{k}", v)
            wait_idle(be)
            for i in range(1 + inp.below(6)):
                state = inp.choice(CONNECT) if i == 0 and inp.chance(200) else inp.choice(STATES)
                store.write(f"{be.fe_path}/state", state)
                if inp.chance(40):           # the frontend rewrites a key meanwhile
                    store.write(f"{be.fe_path}/{inp.choice(sorted(keys)) if keys else 'event-channel'}",
                                inp.choice(PORTS).format(port=port))
                wait_idle(be)
            was_connected = be.connected
            if be.failed:
                if not store.read_str(f"{be.be_path}/error", ""):
                    raise Finding(f"device failed ({be.failed}) without its error in xenstore")
                if be.backend_state() not in (XenbusState.Closing, XenbusState.Closed):
                    raise Finding(f"failed device in state {be.backend_state().name}")
        finally:
            be.close()
            if link:
                link.close()
                peer.close()
            for p in ports:
                try:
                    fh.host.evtchn.close(p)
                except Exception:
                    pass
        self.connected += was_connected
        if be._thread.is_alive() or (net and be._reader is not None):
            raise Finding("a back-end thread outlived close()")
        if be._queue_workers or be.queues:
            raise Finding("queue workers or queues outlived close()")
        import threading
        if any(t.name.startswith(f"pyvmm-{be.name}-q") for t in threading.enumerate()):
            raise Finding("a queue worker thread outlived close()")
        fh.check_released(keep_mapped=0)
        if fh.host.evtchn.backend_ports:
            raise Finding(f"ports {list(fh.host.evtchn.backend_ports)} still bound after close()")


@ci_settings(400)
@given(st.binary(max_size=Harness.MAX_SIZE))
def test_fuzz_xenbus(harness, data):
    with Oracle() as oracle:
        oracle.run(harness, data)


@pytest.fixture(scope="module")
def harness():
    h = Harness()
    yield h
    h.close()
