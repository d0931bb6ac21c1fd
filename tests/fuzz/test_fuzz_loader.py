"""Fuzzing the kernel loader (load_kernel) and, for what it accepts, the
domain builder, with mutated synthetic kernels from tests/kernels.py: ELF
vmlinux files and bzImages with each of the seven compressions.

Each input picks a seed kernel, may mutate the ELF inside it and compress
it again (so that the ELF and note parsers are reached through every
decompressor), then mutates the file itself: header fields set to boundary
values, bytes flipped, chunks overwritten, the file cut short or grown.

Oracles: load_kernel raises only LoaderError, with one line; what it
accepts is self-consistent (entry inside the image, segments within their
memsz) and build_pv_domain on 64 MiB of RAM either lays it out or raises
BuildError; each input within MEM_LIMIT of Python memory (when measured)
and TIME_LIMIT seconds.
"""
from __future__ import annotations

import bz2
import lzma
import struct
import time
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernels
from fuzzlib import Finding, Input, Oracle, ci_settings
from pyvmm.vmm.memory import GuestMemory
from pyvmm.xen_abi.boot.builder import BuildError, build_pv_domain
from pyvmm.xen_abi.boot.loader import LoaderError, load_kernel

TIME_LIMIT = 5.0
RAM = 64 << 20
# offsets worth setting: ELF header and first program headers, the bzImage header
_ELF_FIELDS = [(4, 1), (5, 1), (16, 2), (18, 2), (24, 8), (32, 8), (40, 8), (52, 2), (54, 2), (56, 2),
               (58, 2), (60, 2), (62, 2)] + [(64 + 56 * i + o, w) for i in range(4)
                                             for o, w in ((0, 4), (4, 4), (8, 8), (16, 8), (24, 8),
                                                          (32, 8), (40, 8))]
_BZ_FIELDS = [(0x1F1, 1), (0x202, 4), (0x206, 2), (0x248, 4), (0x24C, 4)]


def _compress(kind: str, data: bytes) -> bytes:
    """What the kernel build makes, in-process (the fuzzer recompresses often)."""
    if kind == "gzip":
        c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return c.compress(data) + c.flush()
    if kind == "bzip2":
        return bz2.compress(data, 1)
    if kind == "xz":
        return lzma.compress(data, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=0)
    if kind == "lzma":
        return lzma.compress(data, lzma.FORMAT_ALONE, preset=0)
    if kind == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=1).compress(data)
    if kind == "lz4":
        return kernels.lz4_legacy(data)
    return kernels.compress("lzo", data)


class Harness:
    MAX_SIZE = 512
    MEM_LIMIT = 256 << 20

    def __init__(self):
        elf = kernels.make_linux_like(text_size=0x3000, data_size=0x1000, bss_size=0x2000)
        elf_sh = kernels.make_linux_like(text_size=0x1000, data_size=0x1000, bss_size=0x1000,
                                         notes_in="shdr", hypercall_page=kernels.LINUX_VIRT_BASE
                                         + kernels.LINUX_PHYS_START + 0x1000)
        self.elfs = [elf, elf_sh]
        self.seeds = [("elf", elf), ("elf", elf_sh), ("gzip-vmlinux", _compress("gzip", elf))]
        for kind in kernels.COMPRESSIONS:
            self.seeds.append((kind, kernels.bzimage_of(elf, kind)))
        self.ram = GuestMemory(RAM, name="fuzz-loader-ram")

    def close(self):
        self.ram.close()

    def _mutate_elf(self, inp: Input, elf: bytes) -> bytes:
        b = bytearray(elf)
        for _ in range(1 + inp.below(4)):
            self._edit(inp, b, _ELF_FIELDS, note_area=(64 + 56 * 3, 64 + 56 * 3 + 400))
        return bytes(b)

    @staticmethod
    def _edit(inp: Input, b: bytearray, fields, note_area=None) -> None:
        k = inp.u8()
        if not b:
            b += inp.raw(8)
            return
        if k < 100 and fields:
            off, width = inp.choice(fields)
            if off + width <= len(b):
                b[off:off + width] = inp.interesting(width * 8).to_bytes(width, "little")
        elif k < 150:
            lo, hi = note_area if note_area and inp.chance(128) else (0, len(b))
            off = lo + inp.below(max(1, min(hi, len(b)) - lo))
            if off < len(b):
                b[off] ^= 1 << inp.below(8) if inp.chance(200) else inp.u8()
        elif k < 180:
            off = inp.below(len(b))
            chunk = inp.blob(32)
            b[off:off + len(chunk)] = chunk
        elif k < 200:
            del b[inp.below(len(b)):]                      # cut short
        elif k < 215:
            off = inp.below(len(b))
            del b[off:off + 1 + inp.below(64)]
        elif k < 230:
            off = inp.below(len(b))
            b[off:off] = inp.blob(64)
        elif k < 240 and len(b) >= 4:                      # a u32 anywhere
            off = inp.below(len(b) - 3)
            b[off:off + 4] = struct.pack("<I", inp.interesting(32))

    def one(self, data: bytes) -> None:
        inp = Input(data)
        kind, blob = inp.choice(self.seeds)
        if inp.chance(90):
            elf = self._mutate_elf(inp, inp.choice(self.elfs))
            if kind == "elf":
                blob = elf
            elif kind == "gzip-vmlinux":
                blob = _compress("gzip", elf)
            elif kind != "lzo":
                blob = kernels.make_bzimage(_compress(kind, elf), uncompressed_size=len(elf))
        b = bytearray(blob)
        fields = _BZ_FIELDS if kind not in ("elf", "gzip-vmlinux") else _ELF_FIELDS
        payload_at = 5 * 512 + 0x400
        for _ in range(inp.below(4)):
            self._edit(inp, b, fields, note_area=(payload_at, payload_at + 64)
                       if fields is _BZ_FIELDS else None)
        t0 = time.monotonic()
        try:
            k = load_kernel(bytes(b))
        except LoaderError as e:
            if "\n" in str(e) or not str(e):
                raise Finding(f"LoaderError message is not one line: {str(e)!r}")
            k = None
        if time.monotonic() - t0 > TIME_LIMIT:
            raise Finding(f"load_kernel took {time.monotonic() - t0:.1f} s")
        if k is None:
            return
        if not k.virt_kstart <= k.entry <= k.virt_kend:
            raise Finding(f"accepted entry {k.entry:#x} outside [{k.virt_kstart:#x}, {k.virt_kend:#x}]")
        for s in k.segments:
            if len(s.data) > s.memsz or not k.pstart <= s.paddr <= s.paddr + s.memsz <= k.pend:
                raise Finding(f"accepted segment {s.paddr:#x}+{s.memsz:#x} outside [{k.pstart:#x}, {k.pend:#x})")
        try:
            build_pv_domain(self.ram, k, shared_info_mfn=(RAM >> 12) + 1)
        except BuildError as e:
            if "\n" in str(e):
                raise Finding(f"BuildError message is not one line: {str(e)!r}")
        if time.monotonic() - t0 > TIME_LIMIT:
            raise Finding(f"loading and building took {time.monotonic() - t0:.1f} s")


@ci_settings(1000)
@given(st.binary(max_size=Harness.MAX_SIZE))
def test_fuzz_loader(harness, data):
    with Oracle(mem_limit=Harness.MEM_LIMIT) as oracle:
        oracle.run(harness, data)


@pytest.fixture(scope="module")
def harness():
    h = Harness()
    yield h
    h.close()
