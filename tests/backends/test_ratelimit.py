"""Token-bucket rate limits (backends/ratelimit.py) and the back-ends
holding a queue while over them: the rate is never exceeded, a request
larger than the burst still goes through, every request is answered."""
from __future__ import annotations

import time

import pytest

from pyvmm.backends.ratelimit import BURST_S, RateLimiter, TokenBucket
from pyvmm.xen_abi.abi import PAGE_SIZE, BlkifOp, BlkifStatus


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_refills_at_its_rate_up_to_its_burst():
    c = Clock()
    b = TokenBucket(1000, clock=c)                 # burst: 0.1 s of the rate
    assert b.size == 1000 * BURST_S and b.wait() == 0
    b.consume(100)
    assert b.wait() == 0 and b.tokens == 0
    b.consume(500)                                 # into debt: one big request still goes
    assert b.wait() == pytest.approx(0.5)
    c.t += 0.25
    assert b.wait() == pytest.approx(0.25)
    c.t += 10                                      # refill stops at the burst
    assert b.wait() == 0 and b.tokens == b.size
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_limiter_waits_for_the_slower_bucket():
    c = Clock()
    lim = RateLimiter(bytes_per_s=1 << 20, ops_per_s=10, clock=c)
    for _ in range(2):
        assert lim.wait() == 0
        lim.consume(4096)
    assert lim.wait() == pytest.approx(0.1)        # ops: 1 allowed per 0.1 s after the burst
    assert lim.throttled == 1 and "10 ops/s" in lim.describe()


def test_blkback_under_a_rate_limit(host, tmp_path):
    """64 reads of 32 KiB at 512 KiB/s: about 4 s; never faster than the
    rate allows (burst included), and every request answered."""
    from test_blkback import FakeFrontend, _attach, _image

    path = _image(tmp_path)
    img, be, fe = _attach(host, path)
    be.limiter = RateLimiter(bytes_per_s=512 << 10)
    be.limiters = {"requests": be.limiter}
    fe.connect()
    refs = [fe.grant(FakeFrontend.DATA_PFN + i) for i in range(8)]
    n, per = 64, 8 * PAGE_SIZE
    t0 = time.monotonic()
    for batch in range(4):                          # 16 requests a batch: fits the ring
        for i in range(16):
            fe.push(fe.request(BlkifOp.read, (batch * 16 + i) * 8 % 512, [(r, 0, 7) for r in refs],
                               req_id=i), notify=(i == 15))
        rsps = fe.responses(16)
        assert [r.status for r in rsps] == [BlkifStatus.okay] * 16
    elapsed = time.monotonic() - t0
    allowed = (n * per - be.limiter.bytes.size - per) / (512 << 10)
    assert elapsed >= allowed * 0.95, f"{n * per} bytes in {elapsed:.2f} s: over the rate"
    assert be.limiter.throttled > 0 and "limited to 0.524288 MB/s" in be.describe()
    img.close()


@pytest.fixture
def host():
    from fakefront import backend_host

    with backend_host() as h:
        yield h


def test_netback_under_rate_limits_both_ways():
    """TX (from the guest) and RX (to it) each under 200 KB/s: 60 frames of
    1400 bytes each way take at least what the rate allows (after the burst
    and the one frame that may take the bucket into debt); all arrive."""

    from pyvmm.backends.netback import NetBackend, SocketLink
    from fakefront import backend_host
    from test_netback import GUEST_MAC, FakeNetfront

    rate, frames, size = 200_000, 60, 1400
    with backend_host() as host:
        link, far = SocketLink.pair()
        be = NetBackend(host, 0, link, GUEST_MAC, tx_limiter=RateLimiter(rate), rx_limiter=RateLimiter(rate))
        host.backends.append(be)
        fe = FakeNetfront(host)
        fe.connect()
        frame = bytes.fromhex("ffffffffffff") + bytes.fromhex(GUEST_MAC.replace(":", "")) + b"\x08\x00" + \
            bytes(size - 14)
        t0 = time.monotonic()
        for _ in range(frames):
            fe.send(frame)
        got = 0
        far.settimeout(10)
        while got < frames:
            assert len(far.recv(65536)) == size
            got += 1
        tx_s = time.monotonic() - t0
        fe.tx_responses(frames)
        fe.post_rx(frames)
        t0 = time.monotonic()
        for _ in range(frames):
            far.send(frame)
        assert len(fe.received(frames)) == frames
        rx_s = time.monotonic() - t0
        allowed = (frames * size - rate * BURST_S - size) / rate
        assert tx_s >= allowed * 0.95 and rx_s >= allowed * 0.95, (tx_s, rx_s, allowed)
        assert "transmit limited to 0.2 MB/s" in be.describe() and "receive limited" in be.describe()
        be.close()
        link.close()
        far.close()
