"""Shared-page helpers: the byte view a ring server takes, and its u32
index fields moved whole."""
from __future__ import annotations

import pytest

from pyvmm.xen_abi.memory.shared_page import u32_fields, writable_bytes


def test_writable_bytes_refuses_read_only_or_short_pages():
    with pytest.raises(ValueError, match="console ring"):
        writable_bytes(bytes(4096), 16, "console ring")
    with pytest.raises(ValueError, match="at least 4096"):
        writable_bytes(bytearray(100), 4096, "xenstore ring")
    assert len(writable_bytes(memoryview(bytearray(64)).cast("I"), 64, "ring")) == 64


def test_u32_fields_are_the_little_endian_words_of_the_page():
    page = bytearray(64)
    fields = u32_fields(writable_bytes(page, 64, "ring"), 8, 24)
    fields[1] = 0x11223344
    assert page[12:16] == bytes([0x44, 0x33, 0x22, 0x11])
    page[20:24] = (0xdeadbeef).to_bytes(4, "little")
    assert fields[3] == 0xdeadbeef
    with pytest.raises(ValueError):
        u32_fields(writable_bytes(page, 64, "ring"), 2, 10)
