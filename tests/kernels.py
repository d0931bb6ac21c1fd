"""Test helpers that synthesise small Xen PV kernels: ELF64 files with Xen
notes, wrapped into bzImages with each of the compressions Linux uses.

The ELF structures come from pyvmm.xen_abi.boot.loader (declared once there).
"""
from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess
from pathlib import Path

import lz4.block

from pyvmm.xen_abi.abi import ElfNote
from pyvmm.xen_abi.boot.loader import (
    BZ_HDRS_MAGIC,
    BZ_SECTOR,
    BZ_SETUP_HEADER_OFFSET,
    ELF_MAGIC,
    ELFCLASS64,
    ELFDATA2LSB,
    EM_X86_64,
    ET_EXEC,
    EV_CURRENT,
    LZ4_LEGACY_BLOCK_MAX,
    MAGIC_LZ4_LEGACY,
    PF_R,
    PF_W,
    PF_X,
    PT_LOAD,
    PT_NOTE,
    SHT_NOTE,
    SHT_STRTAB,
    BzSetupHeader,
    Elf64Ehdr,
    Elf64Nhdr,
    Elf64Phdr,
    Elf64Shdr,
)

LINUX_VIRT_BASE = 0xFFFFFFFF80000000
LINUX_PHYS_START = 0x1000000  # vmlinux is linked at 16 MiB
LINUX_INIT_P2M = 0x8000000000
HV_START_LOW = 0xFFFF800000000000
PAGE = 4096

COMPRESSIONS = ("gzip", "bzip2", "xz", "lzma", "lzo", "lz4", "zstd")


@dataclasses.dataclass
class Seg:
    paddr: int
    data: bytes
    memsz: int | None = None  # default: len(data)
    vaddr: int | None = None  # default: paddr + virt_base in make_linux_like
    flags: int = PF_R | PF_X


def _align(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


def note_bytes(name: bytes, ntype: int, desc: bytes) -> bytes:
    namez = name + b"\0"
    out = Elf64Nhdr.build(dict(n_namesz=len(namez), n_descsz=len(desc), n_type=ntype))
    out += namez.ljust(_align(len(namez), 4), b"\0")
    out += desc.ljust(_align(len(desc), 4), b"\0")
    return out


def xen_note(ntype: int, value) -> tuple[bytes, int, bytes]:
    """A Xen note; ints become u64, str become NUL-terminated, bytes are raw."""
    if isinstance(value, bool) or isinstance(value, int):
        desc = struct.pack("<Q", int(value))
    elif isinstance(value, str):
        desc = value.encode() + b"\0"
    else:
        desc = bytes(value)
    return (b"Xen", int(ntype), desc)


def linux_notes(
    entry: int,
    *,
    virt_base: int = LINUX_VIRT_BASE,
    init_p2m: int | None = LINUX_INIT_P2M,
    hypercall_page: int | None = None,
    mod_start_pfn: bool = True,
    features: str = "!writable_page_tables|pae_pgdir_above_4gb",
    guest_os: str = "linux",
    loader: str = "generic",
    xen_version: str = "xen-3.0",
) -> list[tuple[bytes, int, bytes]]:
    """The note set of a Linux 6.1 x86-64 kernel (xen-head.S), adjustable."""
    notes = [
        xen_note(ElfNote.GUEST_OS, guest_os),
        xen_note(ElfNote.GUEST_VERSION, "2.6"),
        xen_note(ElfNote.XEN_VERSION, xen_version),
        xen_note(ElfNote.VIRT_BASE, virt_base),
        xen_note(ElfNote.PADDR_OFFSET, 0),
        xen_note(ElfNote.ENTRY, entry),
        xen_note(ElfNote.FEATURES, features),
        (b"Xen", int(ElfNote.SUPPORTED_FEATURES), struct.pack("<I", 0x8801)),
        xen_note(ElfNote.PAE_MODE, "yes"),
        xen_note(ElfNote.LOADER, loader),
        xen_note(ElfNote.L1_MFN_VALID, struct.pack("<QQ", 1, 1)),
        (b"Xen", int(ElfNote.SUSPEND_CANCEL), struct.pack("<I", 1)),
        xen_note(ElfNote.HV_START_LOW, HV_START_LOW),
    ]
    if mod_start_pfn:
        notes.append(xen_note(ElfNote.MOD_START_PFN, 1))
    if init_p2m is not None:
        notes.append(xen_note(ElfNote.INIT_P2M, init_p2m))
    if hypercall_page is not None:
        notes.append(xen_note(ElfNote.HYPERCALL_PAGE, hypercall_page))
    return notes


def make_elf(
    segments: list[Seg],
    notes: list[tuple[bytes, int, bytes]],
    *,
    entry: int,
    virt_base: int = 0,
    notes_in: str = "phdr",  # "phdr", "shdr", "both" or "none"
    elf_class: int = ELFCLASS64,
    machine: int = EM_X86_64,
) -> bytes:
    """Build an ELF64 executable: header, program headers, notes, segments,
    then (if asked) section headers with a SHT_NOTE section."""
    if elf_class != ELFCLASS64:
        # Only e_ident matters for the loader's 32-bit check.
        ident = ELF_MAGIC + bytes([elf_class, ELFDATA2LSB, EV_CURRENT]) + bytes(9)
        return ident + bytes(64)
    note_blob = b"".join(note_bytes(*n) for n in notes)
    want_pt_note = notes_in in ("phdr", "both") and note_blob
    phnum = len(segments) + (1 if want_pt_note else 0)
    off = Elf64Ehdr.sizeof() + phnum * Elf64Phdr.sizeof()
    note_off = off
    off += len(note_blob)
    seg_offs = []
    for s in segments:
        off = _align(off, PAGE)
        seg_offs.append(off)
        off += len(s.data)
    shstrtab = b"\0.notes\0.shstrtab\0"
    want_sh = notes_in in ("shdr", "both") and note_blob
    shstr_off = off
    off += len(shstrtab)
    sh_off = _align(off, 8)

    phdrs = []
    if want_pt_note:
        phdrs.append(
            dict(p_type=PT_NOTE, p_flags=PF_R, p_offset=note_off, p_vaddr=0, p_paddr=0,
                 p_filesz=len(note_blob), p_memsz=len(note_blob), p_align=4)
        )
    for s, so in zip(segments, seg_offs):
        vaddr = s.vaddr if s.vaddr is not None else s.paddr + virt_base
        memsz = s.memsz if s.memsz is not None else len(s.data)
        phdrs.append(
            dict(p_type=PT_LOAD, p_flags=s.flags, p_offset=so, p_vaddr=vaddr, p_paddr=s.paddr,
                 p_filesz=len(s.data), p_memsz=memsz, p_align=PAGE)
        )
    shdrs = []
    if want_sh:
        null = dict(sh_name=0, sh_type=0, sh_flags=0, sh_addr=0, sh_offset=0, sh_size=0,
                    sh_link=0, sh_info=0, sh_addralign=0, sh_entsize=0)
        shdrs = [
            null,
            dict(null, sh_name=1, sh_type=SHT_NOTE, sh_offset=note_off, sh_size=len(note_blob), sh_addralign=4),
            dict(null, sh_name=8, sh_type=SHT_STRTAB, sh_offset=shstr_off, sh_size=len(shstrtab), sh_addralign=1),
        ]
    eh = Elf64Ehdr.build(
        dict(e_ident_class=ELFCLASS64, e_ident_data=ELFDATA2LSB, e_ident_version=EV_CURRENT, e_ident_osabi=0,
             e_type=ET_EXEC, e_machine=machine, e_version=EV_CURRENT, e_entry=entry,
             e_phoff=Elf64Ehdr.sizeof(), e_shoff=sh_off if shdrs else 0, e_flags=0,
             e_ehsize=Elf64Ehdr.sizeof(), e_phentsize=Elf64Phdr.sizeof(), e_phnum=len(phdrs),
             e_shentsize=Elf64Shdr.sizeof(), e_shnum=len(shdrs), e_shstrndx=2 if shdrs else 0)
    )
    out = bytearray(eh)
    for p in phdrs:
        out += Elf64Phdr.build(p)
    # Notes are placed even when only sections reference them.
    out += note_blob
    for s, so in zip(segments, seg_offs):
        out += bytes(so - len(out))
        out += s.data
    out += shstrtab
    if shdrs:
        out += bytes(sh_off - len(out))
        for s in shdrs:
            out += Elf64Shdr.build(s)
    return bytes(out)


def pattern(n: int, seed: int = 1) -> bytes:
    """Deterministic, mildly compressible bytes (so compressors do real work)."""
    block = bytes((i * 131 + seed * 17 + (i >> 7)) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def make_linux_like(
    *,
    text_size: int = 0x20000,
    data_size: int = 0x8000,
    bss_size: int = 0x10000,
    phys_start: int = LINUX_PHYS_START,
    virt_base: int = LINUX_VIRT_BASE,
    entry_offset: int = 0x1C0,
    notes_in: str = "phdr",
    **note_kw,
) -> bytes:
    """A small vmlinux-shaped ELF: text, data+bss, Linux's Xen notes."""
    text = pattern(text_size, 1)
    data = pattern(data_size, 2)
    data_paddr = phys_start + _align(text_size, 0x200000)
    entry = virt_base + phys_start + entry_offset
    segs = [
        Seg(phys_start, text, flags=PF_R | PF_X),
        Seg(data_paddr, data, memsz=data_size + bss_size, flags=PF_R | PF_W),
    ]
    return make_elf(segs, linux_notes(entry, virt_base=virt_base, **note_kw), entry=entry,
                    virt_base=virt_base, notes_in=notes_in)


# ---------------------------------------------------------------------------
# Compression as the kernel's build does it, and the bzImage wrapper
# ---------------------------------------------------------------------------


def lz4_legacy(data: bytes) -> bytes:
    """The kernel's LZ4 framing (lz4 -l): magic, then [u32 csize][block] per 8 MiB."""
    out = bytearray(MAGIC_LZ4_LEGACY)
    for i in range(0, len(data), LZ4_LEGACY_BLOCK_MAX):
        blk = lz4.block.compress(data[i : i + LZ4_LEGACY_BLOCK_MAX], mode="high_compression", store_size=False)
        out += struct.pack("<I", len(blk)) + blk
    return bytes(out)


# The kernel's scripts/Makefile.lib commands for each KERNEL_* choice.
_TOOLS = {
    "gzip": ["gzip", "-n", "-9", "-c"],
    "bzip2": ["bzip2", "-9", "-c"],
    "lzma": ["lzma", "-9", "-c"],
    "xz": ["xz", "--check=crc32", "--x86", "--lzma2=,dict=32MiB", "-c"],
    "lzo": ["lzop", "-9", "-c"],
    "lz4": ["lz4", "-l", "-12", "--favor-decSpeed", "-c"],
    "zstd": ["zstd", "-19", "-q", "-c"],
}


def have_tool(kind: str) -> bool:
    return shutil.which(_TOOLS[kind][0]) is not None


def compress(kind: str, data: bytes, *, use_tool: bool = True) -> bytes:
    """Compress like the kernel build (command-line tool), lz4 optionally by hand."""
    if kind == "lz4" and not use_tool:
        return lz4_legacy(data)
    return subprocess.run(_TOOLS[kind], input=data, stdout=subprocess.PIPE, check=True).stdout


def make_bzimage(
    payload: bytes,
    *,
    setup_sects: int = 4,
    version: int = 0x020F,
    uncompressed_size: int | None = None,
    pm_prefix: int = 0x400,
) -> bytes:
    """A bzImage shell: setup sectors with the boot header, then protected-mode
    code (`pm_prefix` filler bytes standing in for the decompressor), then the
    payload with the kernel's size_append (u32 uncompressed size) at its end."""
    if uncompressed_size is not None:
        payload = payload + struct.pack("<I", uncompressed_size)
    nsects = setup_sects or 4
    setup = bytearray((nsects + 1) * BZ_SECTOR)
    hdr = BzSetupHeader.build(dict(setup_sects=setup_sects, header=BZ_HDRS_MAGIC, version=version,
                                   payload_offset=pm_prefix, payload_length=len(payload)))
    setup[BZ_SETUP_HEADER_OFFSET : BZ_SETUP_HEADER_OFFSET + len(hdr)] = hdr
    setup[0x1FE:0x200] = b"\x55\xaa"  # boot_flag
    return bytes(setup) + b"\x90" * pm_prefix + payload + b"\0" * 16  # trailing padding as in real images


def bzimage_of(elf: bytes, kind: str, **kw) -> bytes:
    return make_bzimage(compress(kind, elf, **kw), uncompressed_size=len(elf))


# ---------------------------------------------------------------------------
# The Debian cloud kernel (fetched once, cached)
# ---------------------------------------------------------------------------

DEBIAN_CACHE = Path.home() / ".cache" / "pyvmm" / "debian"


def debian_cloud_kernel() -> Path | None:
    """Path to the Debian 12 cloud vmlinuz, via guests.debian if it exists,
    else fetched here with apt-get download + dpkg-deb -x. None if unavailable."""
    try:
        from pyvmm.guests import debian  # the project's fetcher, when present

        if hasattr(debian, "cloud_kernel_path"):
            return Path(debian.cloud_kernel_path())
        if hasattr(debian, "cloud_kernel"):
            return Path(debian.cloud_kernel(progress=False).vmlinuz)
    except ImportError:
        pass
    except Exception as e:  # fetch failed there: try the plain apt-get route below
        if type(e).__name__ != "DebianError":
            raise
    found = sorted(DEBIAN_CACHE.glob("x/boot/vmlinuz-*-cloud-amd64"))
    if found:
        return found[-1]
    if not shutil.which("apt-get"):
        return None
    try:
        deps = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True,
                              text=True, check=True).stdout
        pkg = next(l.split()[-1] for l in deps.splitlines() if "Depends:" in l and "linux-image-6" in l)
        DEBIAN_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", pkg], cwd=DEBIAN_CACHE, check=True, capture_output=True)
        deb = sorted(DEBIAN_CACHE.glob(f"{pkg}_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(DEBIAN_CACHE / "x")], check=True)
    except (subprocess.CalledProcessError, StopIteration, IndexError, OSError):
        return None
    found = sorted(DEBIAN_CACHE.glob("x/boot/vmlinuz-*-cloud-amd64"))
    return found[-1] if found else None
