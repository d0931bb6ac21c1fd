"""The shared oracles themselves: an input that takes too much Python
memory, or kills a thread, is a finding."""
from __future__ import annotations

import threading

import pytest

from fuzzlib import Finding, Oracle


class _Greedy:
    def one(self, data: bytes) -> None:
        self.kept = bytearray(48 << 20)


class _Killer:
    def one(self, data: bytes) -> None:
        t = threading.Thread(target=lambda: 1 / 0)
        t.start()
        t.join()


def test_memory_per_input_is_measured():
    with Oracle(mem_limit=32 << 20, mem_every=1) as oracle:
        with pytest.raises(Finding, match="MiB of Python memory"):
            oracle.run(_Greedy(), b"")


def test_a_dead_thread_is_a_finding():
    with Oracle() as oracle:
        with pytest.raises(Finding, match="ZeroDivisionError"):
            oracle.run(_Killer(), b"")
