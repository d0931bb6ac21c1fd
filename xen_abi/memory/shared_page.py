"""Pages the guest shares with pyvmm (rings, consoles): the byte view a
server works on, and its 32-bit index fields.

An index the guest's other vCPUs may read or write while pyvmm does must be
moved with one naturally aligned 32-bit load or store.  The struct module
does not do that: it moves a field byte by byte and zero-fills it before a
store, so a guest could see a torn or a zero index (it did: the xenstore
ring's "req_prod = 0", issue 11) and a server could read one torn.
A memoryview cast to "I" loads and stores each element whole."""
from __future__ import annotations


def writable_bytes(page, min_len: int, what: str) -> memoryview:
    """`page` as a writable byte view of at least `min_len` bytes."""
    view = memoryview(page)
    if view.format != "B":
        view = view.cast("B")
    if view.readonly or len(view) < min_len:
        raise ValueError(f"{what} must be a writable view of at least {min_len} bytes")
    return view


def u32_fields(view: memoryview, start: int, end: int) -> memoryview:
    """The little-endian u32 fields in bytes [start, end) of `view`, each read
    and written with one 32-bit access: element i is the field at start + 4 i."""
    if start % 4 or (end - start) % 4:
        raise ValueError("u32 fields must be 4-byte aligned")
    return view[start:end].cast("I")
