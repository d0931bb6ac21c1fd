"""Kernel loader: bzImage unwrapping (7 compressions), ELF64 + Xen notes."""
from __future__ import annotations

import struct

import lzokay
import pytest

from pyvmm.xen_abi.abi import ElfNote, XenFeat
from pyvmm.xen_abi.boot.loader import ELFCLASS32, MAGIC_LZOP, LoaderError, decompress, load_kernel

from kernels import (
        COMPRESSIONS, LINUX_INIT_P2M, LINUX_PHYS_START, LINUX_VIRT_BASE, Seg, bzimage_of, compress,
        debian_cloud_kernel, have_tool, linux_notes, lz4_legacy, make_bzimage, make_elf, make_linux_like,
        pattern, xen_note,
    )


@pytest.fixture(scope="module")
def elf() -> bytes:
    return make_linux_like()


def check_linux_like(k, elf_bytes: bytes) -> None:
    """The image matches what make_linux_like() put in: segments and notes."""
    ref = load_kernel(elf_bytes)
    assert [(s.paddr, s.vaddr, s.data, s.memsz) for s in k.segments] == [
        (s.paddr, s.vaddr, s.data, s.memsz) for s in ref.segments
    ]
    assert k.segments[0].paddr == LINUX_PHYS_START
    assert k.segments[0].data == pattern(0x20000, 1)
    assert k.segments[1].memsz - len(k.segments[1].data) == 0x10000  # bss
    assert k.virt_kstart == LINUX_VIRT_BASE + LINUX_PHYS_START
    assert k.virt_kend == LINUX_VIRT_BASE + k.segments[1].paddr + k.segments[1].memsz
    assert k.entry == k.notes.entry == LINUX_VIRT_BASE + LINUX_PHYS_START + 0x1C0
    assert k.notes.virt_base == LINUX_VIRT_BASE
    assert k.notes.init_p2m == LINUX_INIT_P2M
    assert k.notes.mod_start_pfn is True


def test_plain_elf_notes(elf):
    k = load_kernel(elf)
    check_linux_like(k, elf)
    n = k.notes
    assert k.compression is None
    assert n.guest_os == "linux" and n.loader == "generic" and n.xen_version == "xen-3.0"
    assert n.features == {"writable_page_tables", "pae_pgdir_above_4gb"}
    assert n.required_features == {"writable_page_tables"}
    # FEATURES bits 0 and 4, SUPPORTED_FEATURES 0x8801 ORed in.
    assert n.supported_features == 0x8801 | (1 << XenFeat.pae_pgdir_above_4gb)
    assert n.hypercall_page is None
    assert n.l1_mfn_valid == (1, 1)
    assert n.suspend_cancel is True
    assert n.hv_start_low == 0xFFFF800000000000
    assert n.paddr_offset == 0


def test_image_blob(elf):
    k = load_kernel(elf)
    img = k.image()
    assert len(img) == k.virt_kend - k.virt_kstart
    assert img[:0x20000] == pattern(0x20000, 1)
    data_off = k.segments[1].paddr - k.pstart
    assert img[data_off : data_off + 0x8000] == pattern(0x8000, 2)
    assert img[data_off + 0x8000 :] == bytes(0x10000)


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_bzimage_roundtrip(elf, kind):
    if not have_tool(kind):
        pytest.fail(f"compression tool for {kind} missing (apt-get install it)")
    k = load_kernel(bzimage_of(elf, kind))
    assert k.compression == kind
    check_linux_like(k, elf)


def test_bzimage_lz4_legacy_multiblock():
    # > 8 MiB of image: the legacy framing needs two blocks.
    big = make_linux_like(text_size=9 << 20)
    payload = lz4_legacy(big)
    (first,) = struct.unpack_from("<I", payload, 4)
    assert 8 + first < len(payload)  # really two blocks
    k = load_kernel(make_bzimage(payload, uncompressed_size=len(big)))
    assert k.compression == "lz4"
    assert k.segments[0].data == pattern(9 << 20, 1)


def test_bzimage_lz4_cli_multiblock():
    if not have_tool("lz4"):
        pytest.fail("lz4 tool missing")
    big = make_linux_like(text_size=9 << 20)
    k = load_kernel(bzimage_of(big, "lz4"))
    assert k.segments[0].data == pattern(9 << 20, 1)


def test_bzimage_lzo_cli_multiblock():
    """lzop cuts at 256 KiB: many blocks, some ending in zero bytes."""
    if not have_tool("lzo"):
        pytest.fail("lzop tool missing")
    big = make_linux_like(text_size=1 << 20)
    k = load_kernel(bzimage_of(big, "lzo"))
    assert k.compression == "lzo"
    assert k.segments[0].data == pattern(1 << 20, 1)


def lzop_stream(*blocks: tuple[int, bytes]) -> bytes:
    """A minimal lzop container (no checksums) of (dst_len, block) pairs:
    the block sizes say what each block should inflate to."""
    header = struct.pack(">HHHBBIIIIBI", 0x1030, 0x2080, 0x0940, 1, 9, 0, 0o100644, 0, 0, 0, 0)
    body = b"".join(struct.pack(">II", dst, len(b)) + b for dst, b in blocks)
    return MAGIC_LZOP + header + body + bytes(4)


def test_lzo_blocks_inflate_to_exactly_their_size():
    for data in (pattern(5000, 3) + b"\x01", pattern(5000, 3) + bytes(64)):   # last byte set / zero
        block = lzokay.compress(data)
        assert decompress(lzop_stream((len(data), block), (len(data), block))) == ("lzo", data * 2)
        for wrong in (len(data) - 1, len(data) + 1):
            with pytest.raises(LoaderError, match="^corrupt lzo payload: block inflates to the wrong size$"):
                decompress(lzop_stream((wrong, block)))


def test_error_corrupt_and_truncated_lzo(elf):
    with pytest.raises(LoaderError, match="^corrupt lzo payload: "):
        decompress(lzop_stream((4096, b"\x00\xff" * 100)))
    if not have_tool("lzo"):
        pytest.fail("lzop tool missing")
    payload = compress("lzo", elf)
    assert "truncated lzo payload" in err(make_bzimage(payload[: len(payload) // 2]))


def test_bzimage_setup_sects_zero_means_four(elf):
    payload = compress("gzip", elf)
    k = load_kernel(make_bzimage(payload, setup_sects=0, uncompressed_size=len(elf)))
    assert k.segments[0].data == pattern(0x20000, 1)


def test_compressed_vmlinux(elf):
    # Xen's toolstack also accepts a gzipped vmlinux (xc_dom_try_gunzip).
    k = load_kernel(compress("gzip", elf))
    assert k.compression == "gzip"
    check_linux_like(k, elf)


def test_notes_from_sections_only():
    e = make_linux_like(notes_in="shdr")
    k = load_kernel(e)
    assert k.notes.virt_base == LINUX_VIRT_BASE and k.notes.init_p2m == LINUX_INIT_P2M


def test_entry_defaults_to_e_entry():
    entry = LINUX_VIRT_BASE + LINUX_PHYS_START + 0x40
    notes = [n for n in linux_notes(0) if n[1] != ElfNote.ENTRY]
    e = make_elf([Seg(LINUX_PHYS_START, b"\x90" * 4096)], notes, entry=entry, virt_base=LINUX_VIRT_BASE)
    assert load_kernel(e).entry == entry


def test_non_linux_guest_with_generic_loader():
    entry = LINUX_PHYS_START + 0x100
    notes = [
        xen_note(ElfNote.GUEST_OS, "pyvmm-test"),
        xen_note(ElfNote.LOADER, "generic"),
        xen_note(ElfNote.XEN_VERSION, "xen-3.0"),
        xen_note(ElfNote.HYPERCALL_PAGE, LINUX_PHYS_START + 0x1000),
        (b"Xen", int(ElfNote.ENTRY), struct.pack("<I", entry)),  # 4-byte numeric note
    ]
    e = make_elf([Seg(LINUX_PHYS_START, bytes(0x3000))], notes, entry=0)
    k = load_kernel(e)
    assert k.notes.guest_os == "pyvmm-test"
    assert k.notes.virt_base == 0 and k.virt_kstart == LINUX_PHYS_START
    assert k.entry == entry
    assert k.notes.hypercall_page == LINUX_PHYS_START + 0x1000
    assert k.notes.init_p2m is None and not k.notes.mod_start_pfn


def test_file_path(tmp_path, elf):
    p = tmp_path / "vmlinux"
    p.write_bytes(elf)
    assert load_kernel(p).entry == load_kernel(str(p)).entry


# --------------------------------------------------------------------------- errors


def err(data) -> str:
    with pytest.raises(LoaderError) as ei:
        load_kernel(data)
    msg = str(ei.value)
    assert "\n" not in msg and msg
    return msg


def test_error_bin_true():
    msg = err("/bin/true")
    assert "without Xen notes" in msg


def test_error_garbage():
    assert "not a Linux kernel or ELF file" in err(b"\x00garbage" * 100)
    assert "not a Linux kernel or ELF file" in err(b"")


def test_error_missing_file(tmp_path):
    assert "cannot read kernel" in err(tmp_path / "nope")


def test_error_32bit():
    e = make_elf([], [], entry=0, elf_class=ELFCLASS32)
    assert err(e) == "32-bit kernels are not supported"


def test_error_wrong_machine():
    e = make_elf([Seg(0x1000, b"x")], linux_notes(0x1000, virt_base=0), entry=0x1000, machine=183)
    assert "not x86-64" in err(e)


def test_error_truncated_bzimage(elf):
    bz = bzimage_of(elf, "gzip")
    payload_len = struct.unpack_from("<I", bz, 0x24C)[0]
    cut = bz[: 5 * 512 + 0x400 + payload_len // 2]
    assert err(cut) == "truncated bzImage: payload extends past end of file"


def test_error_truncated_compressed_stream(elf):
    # The header claims a shorter payload: the stream itself is cut.
    for kind in ("gzip", "xz", "zstd", "bzip2", "lzma"):
        payload = compress(kind, elf)
        msg = err(make_bzimage(payload[: len(payload) // 2]))
        assert "truncated" in msg or "corrupt" in msg, (kind, msg)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_decompression_bomb_stops_at_the_limit(monkeypatch, kind):
    """Found reading the loader for its fuzz harness (random mutation does
    not make bombs): a zstd payload was inflated whole before its size was
    checked (4 KiB of zstd make 128 MiB), so a kernel file of a few MiB
    could have the host allocate terabytes.  Every compression stops near
    DECOMPRESS_MAX instead."""
    import tracemalloc
    import zlib

    import zstandard

    from pyvmm.xen_abi.boot import loader

    monkeypatch.setattr(loader, "DECOMPRESS_MAX", 1 << 20)
    zeros = bytes(256 << 20)
    if kind == "zstd":
        payload = zstandard.ZstdCompressor(level=1).compress(zeros)
    else:
        c = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        payload = c.compress(zeros) + c.flush()
    del zeros
    tracemalloc.start()
    try:
        with pytest.raises(LoaderError, match="inflates to more than 1 MiB"):
            decompress(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 << 20, f"{peak >> 20} MiB to refuse a 256 MiB payload"


def test_error_unknown_compression():
    assert "unknown compression" in err(make_bzimage(b"\x11\x22\x33\x44" * 64))


def test_error_old_boot_protocol(elf):
    assert "too old" in err(make_bzimage(compress("gzip", elf), version=0x0206))


def test_error_corrupt_gzip():
    payload = b"\x1f\x8b\x08\x00" + b"\xff" * 200
    assert "gzip" in err(make_bzimage(payload))


def test_error_payload_not_elf():
    assert "not an ELF" in err(make_bzimage(compress("gzip", b"hello world" * 100)))


def test_error_truncated_elf(elf):
    assert "truncated ELF" in err(elf[:0x2000])


def test_error_xen_version():
    assert "xen-3.0" in err(make_linux_like(xen_version="xen-2.0"))


def test_error_not_generic_not_linux():
    assert "neither the generic loader nor Linux" in err(make_linux_like(guest_os="netbsd", loader="bsd"))


def test_error_unknown_required_feature():
    assert "unknown Xen feature 'frobnicate'" in err(make_linux_like(features="!frobnicate|writable_page_tables"))


def test_unknown_optional_feature_ignored():
    k = load_kernel(make_linux_like(features="frobnicate|!writable_page_tables"))
    assert k.notes.required_features == {"writable_page_tables"}


def test_error_autotranslate():
    assert "auto_translated_physmap" in err(make_linux_like(features="!auto_translated_physmap"))


def test_error_entry_out_of_bounds():
    notes = linux_notes(LINUX_VIRT_BASE + 0x100)  # below the image
    e = make_elf([Seg(LINUX_PHYS_START, bytes(4096))], notes, entry=0, virt_base=LINUX_VIRT_BASE)
    assert "out of bounds" in err(e)


def test_error_p2m_inside_kernel():
    start = LINUX_VIRT_BASE + LINUX_PHYS_START
    e = make_elf([Seg(LINUX_PHYS_START, bytes(8192))], linux_notes(start, init_p2m=start + 4096), entry=start,
                 virt_base=LINUX_VIRT_BASE)
    assert "INIT_P2M" in err(e)


def test_error_bad_numeric_note_size():
    start = LINUX_VIRT_BASE + LINUX_PHYS_START
    notes = linux_notes(start) + [(b"Xen", int(ElfNote.VIRT_BASE), b"\x00\x00\x00")]
    e = make_elf([Seg(LINUX_PHYS_START, bytes(4096))], notes, entry=start, virt_base=LINUX_VIRT_BASE)
    assert "3-byte" in err(e)


def test_error_note_past_segment():
    e = bytearray(make_linux_like())
    # First note header sits right after the ELF and program headers (2 PT_LOAD + PT_NOTE).
    note_off = 64 + 3 * 56
    struct.pack_into("<I", e, note_off + 4, 0x7FFFFFFF)  # n_descsz
    assert "note" in err(bytes(e))


def test_fuzz_never_crashes(elf):
    """Random corruption gives LoaderError (or a valid image), never another exception."""
    import random

    rnd = random.Random(1234)
    bz = bzimage_of(elf, "gzip")
    for base in (elf, bz):
        for _ in range(150):
            d = bytearray(base)
            for _ in range(rnd.randint(1, 8)):
                d[rnd.randrange(min(len(d), 0x600))] = rnd.randrange(256)
            try:
                load_kernel(bytes(d))
            except LoaderError:
                pass


# --------------------------------------------------------------------------- Debian


@pytest.fixture(scope="module")
def debian_kernel():
    p = debian_cloud_kernel()
    if p is None:
        pytest.skip("Debian cloud kernel not available (apt-get download failed)")
    return load_kernel(p)


def test_debian_cloud_kernel_notes(debian_kernel):
    k = debian_kernel
    n = k.notes
    assert k.compression == "lz4"
    assert n.virt_base == 0xFFFFFFFF80000000
    assert n.paddr_offset == 0
    assert n.init_p2m == 0x8000000000
    assert n.mod_start_pfn is True
    assert n.hypercall_page is None  # 6.1.121+: hypercalls are plain syscall
    assert n.features == {"writable_page_tables", "pae_pgdir_above_4gb"}
    assert n.required_features == {"writable_page_tables"}
    assert n.supported_features & 0x8801 == 0x8801
    assert n.guest_os == "linux" and n.loader == "generic" and n.xen_version == "xen-3.0"
    assert n.hv_start_low == 0xFFFF800000000000
    assert n.l1_mfn_valid == (1, 1)
    assert n.phys32_entry is not None and n.phys32_entry < 1 << 32
    assert k.virt_kstart == 0xFFFFFFFF81000000
    assert k.virt_kstart <= k.entry < k.virt_kend
    # The entry point is startup_xen: it begins with cld (0xfc).
    img_off = k.entry - k.virt_kstart
    seg = next(s for s in k.segments if s.paddr <= k.pstart + img_off < s.paddr + len(s.data))
    assert seg.data[k.pstart + img_off - seg.paddr] == 0xFC
