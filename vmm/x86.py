"""x86-64 architectural constants and descriptor builders (Intel SDM vol. 3).

Pure data: nothing here touches KVM, so the Xen layer and the tests can
build GDTs, IDTs, TSSs and page tables with the same names.
"""
from __future__ import annotations

import struct

# ---- control registers ----
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31

CR4_VME = 1 << 0
CR4_PVI = 1 << 1
CR4_TSD = 1 << 2
CR4_DE = 1 << 3
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_MCE = 1 << 6
CR4_PGE = 1 << 7
CR4_PCE = 1 << 8
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_UMIP = 1 << 11
CR4_LA57 = 1 << 12
CR4_FSGSBASE = 1 << 16
CR4_PCIDE = 1 << 17
CR4_OSXSAVE = 1 << 18
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22

EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

RFLAGS_CF = 1 << 0
RFLAGS_FIXED = 1 << 1          # bit 1 always reads as 1
RFLAGS_PF = 1 << 2
RFLAGS_ZF = 1 << 6
RFLAGS_SF = 1 << 7
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_OF = 1 << 11
RFLAGS_IOPL_SHIFT = 12
RFLAGS_IOPL_MASK = 3 << RFLAGS_IOPL_SHIFT
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18
RFLAGS_VIF = 1 << 19
RFLAGS_VIP = 1 << 20
RFLAGS_ID = 1 << 21
# what a PV guest may set in RFLAGS (arithmetic flags, TF, DF, AC, ID); the
# shim's iret applies the same mask (shim.h RFLAGS_GUEST_MASK)
RFLAGS_GUEST_SETTABLE = 0x254DD5

# ---- page-table entries ----
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7            # in L2/L3 entries: large page
PTE_PAT = 1 << 7           # in L1 entries
PTE_G = 1 << 8
PTE_NX = 1 << 63
PTE_ADDR_MASK = 0x000F_FFFF_FFFF_F000

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
LARGE_PAGE_SIZE = 1 << 21      # 2 MiB, an L2 PS entry
HUGE_PAGE_SIZE = 1 << 30       # 1 GiB, an L3 PS entry
PT_ENTRIES = 512
PT_INDEX_BITS = 9

# ---- MSRs ----
MSR_APIC_BASE = 0x1B
MSR_TSC = 0x10
MSR_SYSENTER_CS = 0x174
MSR_SYSENTER_ESP = 0x175
MSR_SYSENTER_EIP = 0x176
MSR_PAT = 0x277
MSR_TSC_DEADLINE = 0x6E0
MSR_EFER = 0xC000_0080
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SFMASK = 0xC000_0084
MSR_FS_BASE = 0xC000_0100
MSR_GS_BASE = 0xC000_0101
MSR_KERNEL_GS_BASE = 0xC000_0102
MSR_TSC_AUX = 0xC000_0103

APIC_BASE_BSP = 1 << 8
APIC_BASE_X2APIC = 1 << 10
APIC_BASE_ENABLE = 1 << 11
APIC_DEFAULT_BASE = 0xFEE0_0000
MSI_ADDRESS_BASE = 0xFEE0_0000
MSI_ADDRESS_DEST_SHIFT = 12

# STAR layout: SYSCALL CS = STAR[47:32], SYSRET base selector = STAR[63:48]
STAR_SYSCALL_CS_SHIFT = 32
STAR_SYSRET_CS_SHIFT = 48

# ---- segment descriptors ----
SEG_TYPE_ACCESSED = 1 << 0
SEG_TYPE_DATA_RW = 0x2           # data, writable
SEG_TYPE_CODE_XR = 0xA           # code, execute/read
SEG_TYPE_DATA_RW_A = SEG_TYPE_DATA_RW | SEG_TYPE_ACCESSED   # 3
SEG_TYPE_CODE_XR_A = SEG_TYPE_CODE_XR | SEG_TYPE_ACCESSED   # 11
# system descriptor types (S = 0)
SYS_TYPE_LDT = 0x2
SYS_TYPE_TSS64_AVAIL = 0x9
SYS_TYPE_TSS64_BUSY = 0xB
SYS_TYPE_INT_GATE = 0xE
SYS_TYPE_TRAP_GATE = 0xF

_DESC_S = 1 << 44               # code/data (vs system)
_DESC_P = 1 << 47
_DESC_AVL = 1 << 52
_DESC_L = 1 << 53
_DESC_DB = 1 << 54
_DESC_G = 1 << 55
_DESC_TYPE_SHIFT = 40
_DESC_DPL_SHIFT = 45

SELECTOR_RPL_MASK = 3
SELECTOR_TI_LDT = 1 << 2

# exception vectors
VEC_DE, VEC_DB, VEC_NMI, VEC_BP, VEC_OF, VEC_BR, VEC_UD, VEC_NM = range(8)
VEC_DF, VEC_TS, VEC_NP, VEC_SS, VEC_GP, VEC_PF = 8, 10, 11, 12, 13, 14
VEC_MF, VEC_AC, VEC_MC, VEC_XM = 16, 17, 18, 19

TSS64_SIZE = 104
TSS64_IST_COUNT = 7
GATE_SIZE = 16
IDT_ENTRIES = 256


def make_seg_descriptor(base: int, limit: int, type: int, dpl: int, long: bool = False,
                        s: bool = True, db: bool | None = None, g: bool = True,
                        present: bool = True) -> int:
    """An 8-byte code/data (or short system) segment descriptor as an int.

    `limit` is in units of the granularity (4 KiB pages when g). A 64-bit
    code segment (`long`) must have D/B clear; by default D/B is set for
    everything else (32-bit segments)."""
    if db is None:
        db = not long and s
    d = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16)
    d |= (type & 0xF) << _DESC_TYPE_SHIFT
    d |= (dpl & 3) << _DESC_DPL_SHIFT
    d |= ((limit >> 16) & 0xF) << 48
    d |= ((base >> 24) & 0xFF) << 56
    if s:
        d |= _DESC_S
    if present:
        d |= _DESC_P
    if long:
        d |= _DESC_L
    if db:
        d |= _DESC_DB
    if g:
        d |= _DESC_G
    return d


def make_system_descriptor16(base: int, limit: int, type: int, dpl: int = 0) -> bytes:
    """A 16-byte long-mode system descriptor (TSS or LDT)."""
    low = make_seg_descriptor(base & 0xFFFF_FFFF, limit, type, dpl, s=False, db=False, g=False)
    return struct.pack("<QQ", low, base >> 32)


def make_gate(offset: int, selector: int, ist: int, type: int, dpl: int) -> bytes:
    """A 16-byte long-mode IDT gate."""
    lo = (offset & 0xFFFF) | (selector & 0xFFFF) << 16
    lo |= (ist & 7) << 32
    lo |= (type & 0xF) << _DESC_TYPE_SHIFT
    lo |= (dpl & 3) << _DESC_DPL_SHIFT
    lo |= _DESC_P
    lo |= ((offset >> 16) & 0xFFFF) << 48
    return struct.pack("<QQ", lo, (offset >> 32) & 0xFFFF_FFFF)


def make_tss64(rsp0: int, ist: list[int] = (), rsp1: int = 0, rsp2: int = 0,
               iomap_base: int = TSS64_SIZE) -> bytes:
    """A 104-byte 64-bit TSS. iomap_base beyond the limit = no I/O bitmap."""
    ists = list(ist) + [0] * (TSS64_IST_COUNT - len(ist))
    if len(ists) != TSS64_IST_COUNT:
        raise ValueError("a 64-bit TSS has 7 IST slots")
    return struct.pack("<IQQQQ7QQHH", 0, rsp0, rsp1, rsp2, 0, *ists, 0, 0, iomap_base)


def selector(index: int, rpl: int = 0, ldt: bool = False) -> int:
    return (index << 3) | (SELECTOR_TI_LDT if ldt else 0) | (rpl & SELECTOR_RPL_MASK)


def msi_address(dest_apic_id: int = 0) -> int:
    return MSI_ADDRESS_BASE | (dest_apic_id << MSI_ADDRESS_DEST_SHIFT)


def pt_index(va: int, level: int) -> int:
    """Index into the level-`level` table (1 = L1/PT ... 4 = L4/PML4)."""
    return (va >> (PAGE_SHIFT + PT_INDEX_BITS * (level - 1))) & (PT_ENTRIES - 1)
