"""Token-bucket rate limits for a back-end's I/O, as Firecracker's rate
limiters do it: one bucket for bytes, one for operations, each refilled
at its rate per second up to its burst.

A back-end asks `wait()` before it takes the next request off the ring:
0 means go on, anything else the seconds until the buckets are out of
debt, during which it leaves the ring alone (the frontend sees a slow
device and queues, as on a real one) and retries on a timer.  After
serving a request it pays with `consume(nbytes)`; one request may take a
bucket into debt, so a request larger than the burst still goes through,
and the average stays at the rate.

    limiter = RateLimiter(bytes_per_s=20 << 20, ops_per_s=500)
"""
from __future__ import annotations

import threading
import time

__all__ = ["TokenBucket", "RateLimiter", "BURST_S"]

#: Default burst: what the rate gives in this many seconds.
BURST_S = 0.1


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None, clock=time.monotonic):
        if rate <= 0:
            raise ValueError("a rate must be positive")
        self.rate = float(rate)
        self.size = float(burst) if burst else max(1.0, self.rate * BURST_S)
        self.tokens = self.size
        self._clock = clock
        self._t = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.size, self.tokens + (now - self._t) * self.rate)
        self._t = now

    def wait(self) -> float:
        self._refill()
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def consume(self, n: float) -> None:
        self._refill()
        self.tokens -= n


class RateLimiter:
    """Bytes and/or operations per second for one queue of one device."""

    def __init__(self, bytes_per_s: float | None = None, ops_per_s: float | None = None, clock=time.monotonic):
        self.bytes = TokenBucket(bytes_per_s, clock=clock) if bytes_per_s else None
        self.ops = TokenBucket(ops_per_s, clock=clock) if ops_per_s else None
        self._lock = threading.Lock()
        self.throttled = 0            # times a queue had to wait (for status reports)

    def wait(self) -> float:
        with self._lock:
            w = max((b.wait() for b in (self.bytes, self.ops) if b is not None), default=0.0)
            if w:
                self.throttled += 1
            return w

    def consume(self, nbytes: int) -> None:
        with self._lock:
            if self.bytes is not None:
                self.bytes.consume(nbytes)
            if self.ops is not None:
                self.ops.consume(1)

    def describe(self) -> str:
        parts = []
        if self.bytes is not None:
            parts.append(f"{self.bytes.rate / 1e6:g} MB/s")
        if self.ops is not None:
            parts.append(f"{self.ops.rate:g} ops/s")
        return " and ".join(parts) + f" (throttled {self.throttled} times)"
