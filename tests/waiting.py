"""Tests wait for the thing they need, never for a while: poll a predicate
until it holds, and fail with one line naming what never happened."""
from __future__ import annotations

import time

DEFAULT_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.005


def wait_for(predicate, what, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Return once predicate() is true; AssertionError after `timeout` seconds.
    `what` names the awaited thing: a string, or a function returning one
    (evaluated only on failure, e.g. to append the console's tail)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for "
                                 f"{what() if callable(what) else what}")
        time.sleep(POLL_INTERVAL_S)
