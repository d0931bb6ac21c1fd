"""Xen PV kernel loader: bzImage / vmlinux -> loadable segments + Xen ELF notes.

Follows what Xen's toolstack does (xg_dom_bzimageloader.c, xg_dom_elfloader.c
and libelf's libelf-dominfo.c): unwrap a bzImage payload whatever its
compression, parse the ELF64, collect the "Xen" notes from PT_NOTE segments
(falling back to SHT_NOTE sections), validate them like libelf and compute
the kernel's virtual extent. Everything that can go wrong with a file raises
LoaderError with one line that says what is wrong.
"""
from __future__ import annotations

import bz2
import dataclasses
import lzma
import os
import struct
import zlib
from typing import NamedTuple

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

from pyvmm.xen_abi.abi import XEN_ELFNOTE_OWNER, ElfNote, XenFeat


class LoaderError(Exception):
    """The kernel image cannot be loaded; str() is one human-readable line."""


# ---------------------------------------------------------------------------
# ELF64 structures (declared once; tests/kernels.py builds files with them)
# ---------------------------------------------------------------------------

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_EXEC = 2
ET_DYN = 3
EM_386 = 3
EM_X86_64 = 62

PT_NULL = 0
PT_LOAD = 1
PT_NOTE = 4
PF_X = 1
PF_W = 2
PF_R = 4

SHT_NULL = 0
SHT_PROGBITS = 1
SHT_STRTAB = 3
SHT_NOTE = 7
SHT_NOBITS = 8

Elf64Ehdr = Struct(
    "e_ident_magic" / Const(ELF_MAGIC),
    "e_ident_class" / Int8ul,
    "e_ident_data" / Int8ul,
    "e_ident_version" / Int8ul,
    "e_ident_osabi" / Int8ul,
    Padding(8),
    "e_type" / Int16ul,
    "e_machine" / Int16ul,
    "e_version" / Int32ul,
    "e_entry" / Int64ul,
    "e_phoff" / Int64ul,
    "e_shoff" / Int64ul,
    "e_flags" / Int32ul,
    "e_ehsize" / Int16ul,
    "e_phentsize" / Int16ul,
    "e_phnum" / Int16ul,
    "e_shentsize" / Int16ul,
    "e_shnum" / Int16ul,
    "e_shstrndx" / Int16ul,
)
assert Elf64Ehdr.sizeof() == 64

Elf64Phdr = Struct(
    "p_type" / Int32ul,
    "p_flags" / Int32ul,
    "p_offset" / Int64ul,
    "p_vaddr" / Int64ul,
    "p_paddr" / Int64ul,
    "p_filesz" / Int64ul,
    "p_memsz" / Int64ul,
    "p_align" / Int64ul,
)
assert Elf64Phdr.sizeof() == 56

Elf64Shdr = Struct(
    "sh_name" / Int32ul,
    "sh_type" / Int32ul,
    "sh_flags" / Int64ul,
    "sh_addr" / Int64ul,
    "sh_offset" / Int64ul,
    "sh_size" / Int64ul,
    "sh_link" / Int32ul,
    "sh_info" / Int32ul,
    "sh_addralign" / Int64ul,
    "sh_entsize" / Int64ul,
)
assert Elf64Shdr.sizeof() == 64

Elf64Nhdr = Struct("n_namesz" / Int32ul, "n_descsz" / Int32ul, "n_type" / Int32ul)
assert Elf64Nhdr.sizeof() == 12
ELF_NOTE_ALIGN = 4

# Only e_ident is needed to tell a 32-bit ELF from a 64-bit one.
ElfIdent = Struct("magic" / Const(ELF_MAGIC), "ei_class" / Int8ul, "ei_data" / Int8ul)

# ---------------------------------------------------------------------------
# bzImage (Documentation/x86/boot.rst): only the fields the loader needs
# ---------------------------------------------------------------------------

BZ_SETUP_HEADER_OFFSET = 0x1F1
BZ_HDRS_MAGIC = b"HdrS"
BZ_MIN_PROTOCOL = 0x0208  # first protocol with payload_offset/payload_length
BZ_DEFAULT_SETUP_SECTS = 4  # setup_sects == 0 means 4 (boot.rst)
BZ_SECTOR = 512

BzSetupHeader = Struct(  # starts at file offset 0x1f1
    "setup_sects" / Int8ul,  # 0x1f1
    Padding(0x202 - 0x1F2),
    "header" / Bytes(4),  # 0x202 "HdrS"
    "version" / Int16ul,  # 0x206
    Padding(0x248 - 0x208),
    "payload_offset" / Int32ul,  # 0x248
    "payload_length" / Int32ul,  # 0x24c
)
BZ_HEADER_END = BZ_SETUP_HEADER_OFFSET + BzSetupHeader.sizeof()
assert BZ_HEADER_END == 0x250

# Compression magics, as xg_dom_bzimageloader.c and the kernel's decompress.c
# recognise them. Order matters only in that no magic is a prefix of another.
MAGIC_GZIP = b"\x1f\x8b"
MAGIC_BZIP2 = b"BZh"
MAGIC_XZ = b"\xfd7zXZ\x00"
MAGIC_ZSTD = b"\x28\xb5\x2f\xfd"
MAGIC_LZMA = b"\x5d\x00"
MAGIC_LZOP = b"\x89LZO\x00\r\n\x1a\n"
MAGIC_LZ4_LEGACY = b"\x02\x21\x4c\x18"

# Refuse to inflate more than this (Xen's XC_DOM_DECOMPRESS_MAX is 1 GiB).
DECOMPRESS_MAX = 1 << 30

# The kernel's legacy LZ4 framing: each block inflates to at most 8 MiB.
LZ4_LEGACY_BLOCK_MAX = 8 << 20
LZ4_LEGACY_CSIZE_MAX = LZ4_LEGACY_BLOCK_MAX + LZ4_LEGACY_BLOCK_MAX // 255 + 16  # LZ4_compressBound

# lzop container (lzop's lzop.c / the kernel's lib/decompress_unlzo.c)
LZOP_F_ADLER32_D = 0x00000001
LZOP_F_ADLER32_C = 0x00000002
LZOP_F_H_EXTRA_FIELD = 0x00000040
LZOP_F_H_FILTER = 0x00000800
LZOP_F_CRC32_D = 0x00000100
LZOP_F_CRC32_C = 0x00000200
LZOP_VERSION_WITH_LEVEL = 0x0940  # headers of lzop >= 0.94 carry more fields
LZOP_BLOCK_MAX = 64 << 20  # lzop's own limit on one block's size


def _detect_compression(data: bytes) -> str | None:
    for name, magic in (
        ("gzip", MAGIC_GZIP),
        ("bzip2", MAGIC_BZIP2),
        ("xz", MAGIC_XZ),
        ("zstd", MAGIC_ZSTD),
        ("lzma", MAGIC_LZMA),
        ("lzo", MAGIC_LZOP),
        ("lz4", MAGIC_LZ4_LEGACY),
    ):
        if data.startswith(magic):
            return name
    return None


def _stream_decompress(obj, data: bytes, what: str) -> bytes:
    """Run a zlib/bz2/lzma decompressor object; trailing data is ignored."""
    try:
        out = obj.decompress(data, DECOMPRESS_MAX + 1)
    except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as e:
        raise LoaderError(f"corrupt {what} payload: {e}") from None
    if len(out) > DECOMPRESS_MAX:
        raise LoaderError(f"{what} payload inflates to more than {DECOMPRESS_MAX >> 20} MiB")
    if not obj.eof:
        raise LoaderError(f"truncated {what} payload: compressed stream ends early")
    return out


# zstd input fed per call: its decompressobj has no output limit, and 1024
# bytes inflate to at most ~32 MiB, so a bomb is caught near DECOMPRESS_MAX.
ZSTD_FEED = 1024


def _decompress_zstd(data: bytes) -> bytes:
    import zstandard

    parts, size = [], 0
    obj = zstandard.ZstdDecompressor().decompressobj()
    try:
        for pos in range(0, len(data), ZSTD_FEED):
            parts.append(obj.decompress(data[pos:pos + ZSTD_FEED]))
            size += len(parts[-1])
            if size > DECOMPRESS_MAX:
                raise LoaderError(f"zstd payload inflates to more than {DECOMPRESS_MAX >> 20} MiB")
            if obj.eof:
                break  # the end of the first frame: what follows is ignored
    except zstandard.ZstdError as e:
        raise LoaderError(f"corrupt zstd payload: {e}") from None
    if not obj.eof:
        raise LoaderError("truncated zstd payload: compressed stream ends early")
    return b"".join(parts)


def _decompress_lz4_legacy(data: bytes) -> bytes:
    """The kernel's LZ4: magic, then [u32 csize][block] until something that is no block."""
    import lz4.block

    pos = len(MAGIC_LZ4_LEGACY)
    # blocks kept apart and joined once: growing one bytearray by 8 MiB
    # blocks re-copied it each time (~1 s of a boot in the faithful lane)
    parts: list[bytes] = []
    size = nblocks = 0
    src = memoryview(data)
    while pos + 4 <= len(data):
        (csize,) = struct.unpack_from("<I", data, pos)
        if csize == int.from_bytes(MAGIC_LZ4_LEGACY, "little"):
            pos += 4  # a concatenated archive: the kernel skips the magic
            continue
        if csize == 0 or csize > LZ4_LEGACY_CSIZE_MAX or pos + 4 + csize > len(data):
            break  # e.g. the appended uncompressed size: not a block
        try:
            block = lz4.block.decompress(src[pos + 4 : pos + 4 + csize], uncompressed_size=LZ4_LEGACY_BLOCK_MAX)
        except lz4.block.LZ4BlockError as e:
            if nblocks == 0:
                raise LoaderError(f"corrupt lz4 payload: {e}") from None
            break  # trailing bytes that merely looked like a block
        parts.append(block)
        size += len(block)
        nblocks += 1
        pos += 4 + csize
        if size > DECOMPRESS_MAX:
            raise LoaderError(f"lz4 payload inflates to more than {DECOMPRESS_MAX >> 20} MiB")
    if nblocks == 0:
        raise LoaderError("truncated lz4 payload: no complete block")
    return b"".join(parts)


def _lzo1x_decompress(block: bytes, dst_len: int) -> bytes:
    try:
        import lzokay
    except ImportError:
        raise LoaderError("LZO-compressed kernel: install lzokay (pip install lzokay) to load it") from None
    try:
        out = lzokay.decompress(block, dst_len)
    except lzokay.OutputOverrunError:
        raise LoaderError("corrupt lzo payload: block inflates to the wrong size") from None
    except lzokay.LzokayError as e:
        raise LoaderError(f"corrupt lzo payload: {e}") from None
    # lzokay returns its whole zero-filled buffer, not the length it wrote
    # (its Python binding drops that), so a block that inflates short would
    # pass as zero padding.  A last byte that is not zero was written; else
    # one byte less room must overrun if the block really fills dst_len.
    if out[-1] == 0:
        try:
            lzokay.decompress(block, dst_len - 1)
        except lzokay.OutputOverrunError:
            return out
        except lzokay.LzokayError as e:
            raise LoaderError(f"corrupt lzo payload: {e}") from None
        raise LoaderError("corrupt lzo payload: block inflates to the wrong size")
    return out


def _decompress_lzop(data: bytes) -> bytes:
    """The lzop container the kernel uses for CONFIG_KERNEL_LZO."""

    def need(pos: int, n: int) -> None:
        if pos + n > len(data):
            raise LoaderError("truncated lzo payload: lzop header or block past the end")

    pos = len(MAGIC_LZOP)
    need(pos, 4)
    version, _lib_version = struct.unpack_from(">HH", data, pos)
    pos += 4
    if version >= LZOP_VERSION_WITH_LEVEL:
        need(pos, 2)
        pos += 2  # version needed to extract
    need(pos, 1)
    method = data[pos]
    pos += 1
    if not 1 <= method <= 3:  # 1..3 are the LZO1X variants
        raise LoaderError(f"lzo payload uses unsupported lzop method {method}")
    if version >= LZOP_VERSION_WITH_LEVEL:
        pos += 1  # level
    need(pos, 4)
    (flags,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if flags & LZOP_F_H_FILTER:
        pos += 4
    pos += 4 + 4  # mode, mtime_low
    if version >= LZOP_VERSION_WITH_LEVEL:
        pos += 4  # mtime_high
    need(pos, 1)
    pos += 1 + data[pos]  # file name
    pos += 4  # header checksum
    if flags & LZOP_F_H_EXTRA_FIELD:
        need(pos, 4)
        (extra,) = struct.unpack_from(">I", data, pos)
        pos += 4 + extra + 4
    out = bytearray()
    while True:
        need(pos, 4)
        (dst_len,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if dst_len == 0:
            break  # end of stream
        need(pos, 4)
        (src_len,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if dst_len > LZOP_BLOCK_MAX or src_len > dst_len or src_len == 0:
            raise LoaderError("corrupt lzo payload: bad block sizes")
        pos += 4 * bool(flags & LZOP_F_ADLER32_D) + 4 * bool(flags & LZOP_F_CRC32_D)
        if src_len < dst_len:
            pos += 4 * bool(flags & LZOP_F_ADLER32_C) + 4 * bool(flags & LZOP_F_CRC32_C)
        need(pos, src_len)
        block = data[pos : pos + src_len]
        pos += src_len
        out += block if src_len == dst_len else _lzo1x_decompress(block, dst_len)
        if len(out) > DECOMPRESS_MAX:
            raise LoaderError(f"lzo payload inflates to more than {DECOMPRESS_MAX >> 20} MiB")
    return bytes(out)


def decompress(data: bytes) -> tuple[str, bytes]:
    """Decompress a kernel payload by its magic; returns (compression, bytes)."""
    kind = _detect_compression(data)
    if kind is None:
        raise LoaderError(f"unknown compression (payload starts with {bytes(data[:6]).hex()})")
    if kind == "gzip":
        out = _stream_decompress(zlib.decompressobj(16 + zlib.MAX_WBITS), data, kind)
    elif kind == "bzip2":
        out = _stream_decompress(bz2.BZ2Decompressor(), data, kind)
    elif kind == "xz":
        out = _stream_decompress(lzma.LZMADecompressor(lzma.FORMAT_XZ), data, kind)
    elif kind == "lzma":
        out = _stream_decompress(lzma.LZMADecompressor(lzma.FORMAT_ALONE), data, kind)
    elif kind == "zstd":
        out = _decompress_zstd(data)
    elif kind == "lz4":
        out = _decompress_lz4_legacy(data)
    else:
        out = _decompress_lzop(data)
    return kind, out


def bzimage_payload(data: bytes) -> bytes | None:
    """The compressed payload of a bzImage, or None if `data` is no bzImage."""
    if len(data) < BZ_HEADER_END or data[0x202:0x206] != BZ_HDRS_MAGIC:
        return None
    hdr = BzSetupHeader.parse(data[BZ_SETUP_HEADER_OFFSET:BZ_HEADER_END])
    if hdr.version < BZ_MIN_PROTOCOL:
        raise LoaderError(
            f"bzImage boot protocol {hdr.version >> 8}.{hdr.version & 0xff:02d} is too old (need 2.08+)"
        )
    setup_sects = hdr.setup_sects or BZ_DEFAULT_SETUP_SECTS
    start = (setup_sects + 1) * BZ_SECTOR + hdr.payload_offset
    if hdr.payload_length == 0:
        raise LoaderError("bzImage has an empty payload")
    if start + hdr.payload_length > len(data):
        raise LoaderError("truncated bzImage: payload extends past end of file")
    return data[start : start + hdr.payload_length]


# ---------------------------------------------------------------------------
# Xen notes
# ---------------------------------------------------------------------------

# libelf's elf_xen_feature_names: the only names FEATURES may require.
FEATURE_NAMES: dict[str, int] = {
    "writable_page_tables": XenFeat.writable_page_tables,
    "writable_descriptor_tables": XenFeat.writable_descriptor_tables,
    "auto_translated_physmap": XenFeat.auto_translated_physmap,
    "supervisor_mode_kernel": XenFeat.supervisor_mode_kernel,
    "pae_pgdir_above_4gb": XenFeat.pae_pgdir_above_4gb,
    "hvm_callback_vector": XenFeat.hvm_callback_vector,
    "dom0": XenFeat.dom0,
}
FEATURE_NAME_MAX = 63  # libelf copies each name into a 64-byte buffer

_STRING_NOTES = {
    ElfNote.XEN_VERSION,
    ElfNote.GUEST_OS,
    ElfNote.GUEST_VERSION,
    ElfNote.LOADER,
    ElfNote.PAE_MODE,
    ElfNote.FEATURES,
    ElfNote.BSD_SYMTAB,
}
_NUMERIC_SIZES = (1, 2, 4, 8)  # what libelf's elf_note_numeric accepts


@dataclasses.dataclass
class XenNotes:
    """Xen ELF notes of a kernel, resolved the way libelf resolves them."""

    entry: int = 0  # ENTRY note, else e_entry
    virt_base: int = 0  # VIRT_BASE, 0 if unset
    paddr_offset: int = 0  # PADDR_OFFSET, 0 if unset (notes interface)
    hypercall_page: int | None = None  # VA of the page to fill with stubs
    init_p2m: int | None = None  # INIT_P2M as given (the builder decides if usable)
    mod_start_pfn: bool = False  # initrd may stay unmapped, passed as PFN
    features: set[str] = dataclasses.field(default_factory=set)  # names in FEATURES
    required_features: set[str] = dataclasses.field(default_factory=set)  # the '!' ones
    supported_features: int = 0  # bitmask: FEATURES names | SUPPORTED_FEATURES
    required_features_mask: int = 0
    guest_os: str = ""
    guest_version: str = ""
    xen_version: str = ""
    loader: str = ""
    pae_mode: str = ""
    l1_mfn_valid: tuple[int, ...] | None = None  # (mask, value) pairs as u64s
    hv_start_low: int | None = None
    suspend_cancel: bool = False
    phys32_entry: int | None = None
    bsd_symtab: bool = False
    present: set[int] = dataclasses.field(default_factory=set)  # note types seen

    def has(self, note: ElfNote) -> bool:
        return int(note) in self.present


class LoadSegment(NamedTuple):
    paddr: int
    vaddr: int
    data: bytes  # p_filesz bytes from the file
    memsz: int  # data is followed by memsz - len(data) zero bytes (bss)


@dataclasses.dataclass
class KernelImage:
    segments: list[LoadSegment]
    notes: XenNotes
    virt_kstart: int  # VA of the lowest loaded byte
    virt_kend: int  # VA just past the highest loaded byte
    entry: int
    pstart: int  # lowest p_paddr
    pend: int  # highest p_paddr + p_memsz
    compression: str | None = None  # payload compression if it came from a bzImage

    @property
    def virt_offset(self) -> int:
        return self.notes.virt_base - self.notes.paddr_offset

    def image(self) -> bytes:
        """The loaded image [virt_kstart, virt_kend) as one zero-filled blob."""
        buf = bytearray(self.virt_kend - self.virt_kstart)
        for seg in self.segments:
            off = seg.paddr - self.pstart
            buf[off : off + len(seg.data)] = seg.data
        return bytes(buf)


def _cstr(desc: bytes) -> str:
    return desc.split(b"\0", 1)[0].decode("latin-1")


def _iter_notes(data: bytes, start: int, end: int):
    """Yield (name, type, desc) for each note in data[start:end]."""
    pos = start
    while pos + Elf64Nhdr.sizeof() <= end:
        nh = Elf64Nhdr.parse(data[pos : pos + Elf64Nhdr.sizeof()])
        name_off = pos + Elf64Nhdr.sizeof()
        desc_off = name_off + _align(nh.n_namesz, ELF_NOTE_ALIGN)
        nxt = desc_off + _align(nh.n_descsz, ELF_NOTE_ALIGN)
        if desc_off + nh.n_descsz > end:
            raise LoaderError("corrupt ELF note: note extends past its segment")
        yield data[name_off : name_off + nh.n_namesz].split(b"\0", 1)[0], nh.n_type, data[desc_off : desc_off + nh.n_descsz]
        pos = nxt


def _align(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


def _parse_features(text: str, notes: XenNotes) -> None:
    for raw in text.split("|"):
        name = raw[:FEATURE_NAME_MAX]
        if not name:
            continue
        required = name.startswith("!")
        if required:
            name = name[1:]
        bit = FEATURE_NAMES.get(name)
        if bit is None:
            if required:
                raise LoaderError(f"kernel requires unknown Xen feature {name!r}")
            notes.features.add(name)  # libelf ignores unknown optional names
            continue
        notes.features.add(name)
        notes.supported_features |= 1 << bit
        if required:
            notes.required_features.add(name)
            notes.required_features_mask |= 1 << bit


def _apply_note(notes: XenNotes, ntype: int, desc: bytes) -> None:
    try:
        kind = ElfNote(ntype)
    except ValueError:
        return  # unknown note types are ignored, as libelf does
    notes.present.add(int(kind))
    if kind in _STRING_NOTES:
        text = _cstr(desc)
        if kind == ElfNote.XEN_VERSION:
            notes.xen_version = text
        elif kind == ElfNote.GUEST_OS:
            notes.guest_os = text
        elif kind == ElfNote.GUEST_VERSION:
            notes.guest_version = text
        elif kind == ElfNote.LOADER:
            notes.loader = text
        elif kind == ElfNote.PAE_MODE:
            notes.pae_mode = text
        elif kind == ElfNote.BSD_SYMTAB:
            notes.bsd_symtab = text == "yes"
        elif kind == ElfNote.FEATURES:
            _parse_features(text, notes)
        return
    if kind == ElfNote.L1_MFN_VALID:
        if len(desc) % 8 == 0 and desc:
            notes.l1_mfn_valid = struct.unpack(f"<{len(desc) // 8}Q", desc)
        elif len(desc) in _NUMERIC_SIZES:
            notes.l1_mfn_valid = (int.from_bytes(desc, "little"),)
        else:
            raise LoaderError(f"bad Xen note L1_MFN_VALID: {len(desc)}-byte value")
        return
    if kind == ElfNote.SUPPORTED_FEATURES:
        if len(desc) < 4:
            raise LoaderError(f"bad Xen note SUPPORTED_FEATURES: {len(desc)}-byte value")
        notes.supported_features |= struct.unpack_from("<I", desc)[0]  # submap 0
        return
    if len(desc) not in _NUMERIC_SIZES:
        raise LoaderError(f"bad Xen note {kind.name}: {len(desc)}-byte value, expected 4 or 8 bytes")
    val = int.from_bytes(desc, "little")
    if kind == ElfNote.ENTRY:
        notes.entry = val
    elif kind == ElfNote.HYPERCALL_PAGE:
        notes.hypercall_page = val
    elif kind == ElfNote.VIRT_BASE:
        notes.virt_base = val
    elif kind == ElfNote.PADDR_OFFSET:
        notes.paddr_offset = val
    elif kind == ElfNote.INIT_P2M:
        notes.init_p2m = val
    elif kind == ElfNote.MOD_START_PFN:
        notes.mod_start_pfn = bool(val)
    elif kind == ElfNote.HV_START_LOW:
        notes.hv_start_low = val
    elif kind == ElfNote.SUSPEND_CANCEL:
        notes.suspend_cancel = bool(val)
    elif kind == ElfNote.PHYS32_ENTRY:
        notes.phys32_entry = val


# ---------------------------------------------------------------------------
# ELF
# ---------------------------------------------------------------------------


def _table(data: bytes, off: int, num: int, entsize: int, struct_, what: str) -> list:
    if num == 0:
        return []
    if entsize != struct_.sizeof():
        raise LoaderError(f"corrupt ELF: {what} entry size {entsize}, expected {struct_.sizeof()}")
    if off + num * entsize > len(data):
        raise LoaderError(f"truncated ELF: {what} table extends past end of file")
    return [struct_.parse(data[off + i * entsize : off + (i + 1) * entsize]) for i in range(num)]


def parse_elf(data: bytes, compression: str | None = None) -> KernelImage:
    """Parse a 64-bit x86 ELF with Xen notes into a KernelImage."""
    if len(data) < 6:
        raise LoaderError("not a Linux kernel or ELF file")
    ident = ElfIdent.parse(data[:6])
    if ident.ei_class == ELFCLASS32:
        raise LoaderError("32-bit kernels are not supported")
    if ident.ei_class != ELFCLASS64:
        raise LoaderError(f"corrupt ELF: unknown ELF class {ident.ei_class}")
    if ident.ei_data != ELFDATA2LSB:
        raise LoaderError("big-endian ELF: not an x86-64 kernel")
    if len(data) < Elf64Ehdr.sizeof():
        raise LoaderError("truncated ELF: file ends inside the ELF header")
    eh = Elf64Ehdr.parse(data[: Elf64Ehdr.sizeof()])
    if eh.e_machine != EM_X86_64:
        raise LoaderError(f"ELF is for machine {eh.e_machine}, not x86-64")
    phdrs = _table(data, eh.e_phoff, eh.e_phnum, eh.e_phentsize, Elf64Phdr, "program header")

    segments: list[LoadSegment] = []
    for i, ph in enumerate(phdrs):
        # libelf's elf_phdr_is_loadable: PT_LOAD with some access right.
        if ph.p_type != PT_LOAD or not ph.p_flags & (PF_R | PF_W | PF_X):
            continue
        if ph.p_filesz > ph.p_memsz:
            raise LoaderError(f"corrupt ELF: segment {i} has filesz > memsz")
        if ph.p_offset + ph.p_filesz > len(data):
            raise LoaderError(f"truncated ELF: segment {i} extends past end of file")
        segments.append(LoadSegment(ph.p_paddr, ph.p_vaddr, bytes(data[ph.p_offset : ph.p_offset + ph.p_filesz]), ph.p_memsz))
    if not segments:
        raise LoaderError("ELF has no loadable segments")

    notes = XenNotes()
    found = 0
    for ph in phdrs:
        # Some binutils leave p_offset 0 on note segments; libelf skips those.
        if ph.p_type != PT_NOTE or ph.p_offset == 0:
            continue
        if ph.p_offset + ph.p_filesz > len(data):
            raise LoaderError("truncated ELF: note segment extends past end of file")
        found += _collect(notes, data, ph.p_offset, ph.p_offset + ph.p_filesz)
    if found == 0:
        shdrs = _table(data, eh.e_shoff, eh.e_shnum, eh.e_shentsize, Elf64Shdr, "section header")
        for sh in shdrs[1:]:
            if sh.sh_type != SHT_NOTE:
                continue
            if sh.sh_offset + sh.sh_size > len(data):
                raise LoaderError("truncated ELF: note section extends past end of file")
            found += _collect(notes, data, sh.sh_offset, sh.sh_offset + sh.sh_size)
    if found == 0:
        raise LoaderError("ELF without Xen notes: this is not a Xen PV kernel")

    _check_notes(notes)
    if not notes.has(ElfNote.ENTRY):
        notes.entry = eh.e_entry

    # elf_xen_addr_calc_check
    if notes.has(ElfNote.PADDR_OFFSET) and not notes.has(ElfNote.VIRT_BASE):
        raise LoaderError("Xen notes set PADDR_OFFSET without VIRT_BASE")
    pstart = min(s.paddr for s in segments)
    pend = max(s.paddr + s.memsz for s in segments)
    virt_offset = (notes.virt_base - notes.paddr_offset) & 0xFFFFFFFFFFFFFFFF
    virt_kstart = (pstart + virt_offset) & 0xFFFFFFFFFFFFFFFF
    virt_kend = (pend + virt_offset) & 0xFFFFFFFFFFFFFFFF
    if virt_kstart > virt_kend or not virt_kstart <= notes.entry <= virt_kend or notes.virt_base > virt_kstart:
        raise LoaderError(
            f"kernel entry {notes.entry:#x} or start {virt_kstart:#x} out of bounds "
            f"(image {virt_kstart:#x}-{virt_kend:#x}, virt_base {notes.virt_base:#x})"
        )
    if notes.init_p2m is not None and virt_kstart <= notes.init_p2m < virt_kend:
        raise LoaderError(f"INIT_P2M {notes.init_p2m:#x} lies inside the kernel image")
    if notes.hypercall_page is not None and not virt_kstart <= notes.hypercall_page < virt_kend:
        raise LoaderError(f"HYPERCALL_PAGE {notes.hypercall_page:#x} lies outside the kernel image")
    return KernelImage(
        segments=segments,
        notes=notes,
        virt_kstart=virt_kstart,
        virt_kend=virt_kend,
        entry=notes.entry,
        pstart=pstart,
        pend=pend,
        compression=compression,
    )


def _collect(notes: XenNotes, data: bytes, start: int, end: int) -> int:
    n = 0
    for name, ntype, desc in _iter_notes(data, start, end):
        if name != XEN_ELFNOTE_OWNER:
            continue
        _apply_note(notes, ntype, desc)
        n += 1
    return n


def _check_notes(notes: XenNotes) -> None:
    # elf_xen_note_check: generic loader or a Linux guest, and Xen 3.0 ABI.
    if not notes.loader.startswith("generic") and not notes.guest_os.startswith("linux"):
        raise LoaderError(
            f"Xen notes name neither the generic loader nor Linux (LOADER {notes.loader!r}, GUEST_OS {notes.guest_os!r})"
        )
    if not notes.xen_version.startswith("xen-3.0"):
        raise LoaderError(f"kernel is built for Xen ABI {notes.xen_version!r}, need 'xen-3.0'")
    # xc_dom_parse_image + the x86 PV builder: autotranslate PV is gone.
    if notes.required_features_mask & (1 << XenFeat.auto_translated_physmap):
        raise LoaderError("kernel requires auto_translated_physmap: PV autotranslate guests are not supported")


def load_kernel(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview) -> KernelImage:
    """Load a bzImage (any of the 7 kernel compressions) or an ELF64 vmlinux."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
    else:
        try:
            with open(path_or_bytes, "rb") as f:
                data = f.read()
        except OSError as e:
            raise LoaderError(f"cannot read kernel {os.fspath(path_or_bytes)}: {e.strerror}") from None
    compression = None
    payload = bzimage_payload(data)
    if payload is not None:
        compression, data = decompress(payload)
        if not data.startswith(ELF_MAGIC):
            raise LoaderError(f"bzImage payload ({compression}) is not an ELF file")
    elif not data.startswith(ELF_MAGIC):
        # xc_dom_try_gunzip: a compressed vmlinux is accepted too.
        if _detect_compression(data) is None:
            raise LoaderError("not a Linux kernel or ELF file")
        compression, data = decompress(data)
        if not data.startswith(ELF_MAGIC):
            raise LoaderError("not a Linux kernel or ELF file")
    return parse_elf(data, compression)
