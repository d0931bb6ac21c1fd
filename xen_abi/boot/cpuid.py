"""The CPUID policy a 64-bit PV guest sees (XEN_PV_ABI.md §6).

Built from KVM_GET_SUPPORTED_CPUID: host leaves pass through a *whitelist*
of feature bits (what Xen gives PV guests, 'A' in cpufeatureset.h, minus
what this VMM cannot back), so a new host feature stays hidden until someone
decides otherwise. On top: HYPERVISOR set, OSXSAVE shown when XSAVE is
(Xen's documented PV leak, needed by Linux's xen_check_xsave), the XSAVE
leaf trimmed to the allowed state components, KVM's own leaves replaced by
Xen's at 0x40000000 ("XenVMMXenVMM").

The result is a sorted flat table of CpuidLeaf(leaf, subleaf, eax, ebx, ecx,
edx). Leaves whose sub-leaf is not significant carry subleaf = ANY_SUBLEAF;
lookup() tries the exact (leaf, subleaf) and then (leaf, ANY_SUBLEAF); a leaf
that is absent reads as zeros (as Xen's policy does beyond its max leaves).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

__all__ = ["CpuidLeaf", "ANY_SUBLEAF", "XEN_CPUID_BASE", "build_pv_cpuid", "lookup",
           "to_kvm_entries", "pack_table", "XEN_SIGNATURE", "with_native_feature_leaves",
           "NATIVE_FEATURE_REGS"]

ANY_SUBLEAF = 0xFFFFFFFF
XEN_CPUID_BASE = 0x40000000
HYPERVISOR_LEAF_FIRST = 0x40000000
HYPERVISOR_LEAF_LAST = 0x4FFFFFFF
XEN_SIGNATURE = b"XenVMMXenVMM"
XEN_HYPERCALL_MSR = 0x40000000  # base+2 EBX: MSR whose write installs a hypercall page
XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD = 1 << 0  # base+2 ECX bit 0
MAX_GRANT_V1_ADDR_BITS = 44  # Linux asks for grant v2 when base+5 EBX[7:0] exceeds this
KVM_CPUID_FLAG_SIGNIFICANT_INDEX = 1 << 0
EXT_LEAF_BASE = 0x80000000


class CpuidLeaf(NamedTuple):
    leaf: int
    subleaf: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def _mask(bits: dict[str, int], names: Iterable[str]) -> int:
    m = 0
    for n in names:
        m |= 1 << bits[n]
    return m


# ---- leaf 1 ----
L1_ECX = dict(SSE3=0, PCLMULQDQ=1, DTES64=2, MONITOR=3, DS_CPL=4, VMX=5, SMX=6, EIST=7, TM2=8,
              SSSE3=9, CNXT_ID=10, SDBG=11, FMA=12, CX16=13, XTPR=14, PDCM=15, PCID=17, DCA=18,
              SSE4_1=19, SSE4_2=20, X2APIC=21, MOVBE=22, POPCNT=23, TSC_DEADLINE=24, AESNI=25,
              XSAVE=26, OSXSAVE=27, AVX=28, F16C=29, RDRAND=30, HYPERVISOR=31)
L1_EDX = dict(FPU=0, VME=1, DE=2, PSE=3, TSC=4, MSR=5, PAE=6, MCE=7, CX8=8, APIC=9, SEP=11,
              MTRR=12, PGE=13, MCA=14, CMOV=15, PAT=16, PSE36=17, PSN=18, CLFLUSH=19, DS=21,
              ACPI=22, MMX=23, FXSR=24, SSE=25, SSE2=26, SS=27, HTT=28, TM=29, PBE=31)
L1_ECX_PV = _mask(L1_ECX, ["SSE3", "PCLMULQDQ", "SSSE3", "FMA", "CX16", "SSE4_1", "SSE4_2",
                           "MOVBE", "POPCNT", "AESNI", "XSAVE", "AVX", "F16C", "RDRAND"])
L1_EDX_PV = _mask(L1_EDX, ["FPU", "DE", "TSC", "MSR", "PAE", "MCE", "CX8", "APIC", "SEP", "MCA",
                           "CMOV", "PAT", "CLFLUSH", "MMX", "FXSR", "SSE", "SSE2", "SS", "HTT"])

# ---- leaf 7 ----
L7_EBX = dict(FSGSBASE=0, TSC_ADJUST=1, SGX=2, BMI1=3, HLE=4, AVX2=5, FDP_EXCP_ONLY=6, SMEP=7,
              BMI2=8, ERMS=9, INVPCID=10, RTM=11, PQM=12, NO_FPU_SEL=13, MPX=14, PQE=15,
              AVX512F=16, AVX512DQ=17, RDSEED=18, ADX=19, SMAP=20, AVX512_IFMA=21,
              CLFLUSHOPT=23, CLWB=24, PT=25, AVX512PF=26, AVX512ER=27, AVX512CD=28, SHA=29,
              AVX512BW=30, AVX512VL=31)
L7_ECX = dict(PREFETCHWT1=0, AVX512_VBMI=1, UMIP=2, PKU=3, OSPKE=4, WAITPKG=5, AVX512_VBMI2=6,
              CET_SS=7, GFNI=8, VAES=9, VPCLMULQDQ=10, AVX512_VNNI=11, AVX512_BITALG=12, TME=13,
              AVX512_VPOPCNTDQ=14, LA57=16, RDPID=22, KL=23, CLDEMOTE=25, MOVDIRI=27,
              MOVDIR64B=28, ENQCMD=29, SGX_LC=30, PKS=31)
L7_EDX = dict(AVX512_4VNNIW=2, AVX512_4FMAPS=3, FSRM=4, UINTR=5, AVX512_VP2INTERSECT=8,
              SRBDS_CTRL=9, MD_CLEAR=10, SERIALIZE=14, HYBRID=15, TSXLDTRK=16, PCONFIG=18,
              ARCH_LBR=19, CET_IBT=20, AMX_BF16=22, AVX512_FP16=23, AMX_TILE=24, AMX_INT8=25,
              IBRSB=26, STIBP=27, L1D_FLUSH=28, ARCH_CAPS=29, CORE_CAPS=30, SSBD=31)
L7_EBX_PV = _mask(L7_EBX, ["FSGSBASE", "BMI1", "HLE", "AVX2", "FDP_EXCP_ONLY", "BMI2", "ERMS",
                           "RTM", "NO_FPU_SEL", "AVX512F", "AVX512DQ", "RDSEED", "ADX",
                           "AVX512_IFMA", "CLFLUSHOPT", "CLWB", "AVX512PF", "AVX512ER",
                           "AVX512CD", "SHA", "AVX512BW", "AVX512VL"])
L7_ECX_PV = _mask(L7_ECX, ["PREFETCHWT1", "AVX512_VBMI", "AVX512_VBMI2", "GFNI", "VAES",
                           "VPCLMULQDQ", "AVX512_VNNI", "AVX512_BITALG", "AVX512_VPOPCNTDQ",
                           "RDPID", "CLDEMOTE", "MOVDIRI", "MOVDIR64B"])
# Speculation-control bits are hidden too: they advertise MSRs the shim does not emulate.
L7_EDX_PV = _mask(L7_EDX, ["AVX512_4VNNIW", "AVX512_4FMAPS", "FSRM", "AVX512_VP2INTERSECT",
                           "MD_CLEAR", "SERIALIZE", "TSXLDTRK", "AVX512_FP16"])
L7_1_EAX = dict(AVX_VNNI=4, AVX512_BF16=5)
L7_1_EAX_PV = _mask(L7_1_EAX, ["AVX_VNNI", "AVX512_BF16"])

# ---- leaf 0xD (XSAVE) ----
XSTATE = dict(X87=0, SSE=1, AVX=2, BNDREGS=3, BNDCSR=4, OPMASK=5, ZMM_HI256=6, HI16_ZMM=7,
              PT=8, PKRU=9, PASID=10, CET_U=11, CET_S=12, HDC=13, UINTR=14, LBR=15, HWP=16,
              XTILECFG=17, XTILEDATA=18)
XSTATE_PV = _mask(XSTATE, ["X87", "SSE", "AVX", "OPMASK", "ZMM_HI256", "HI16_ZMM"])
XSAVE_SUB1_EAX = dict(XSAVEOPT=0, XSAVEC=1, XGETBV1=2, XSAVES=3, XFD=4)
XSAVE_SUB1_EAX_PV = _mask(XSAVE_SUB1_EAX, ["XSAVEOPT", "XSAVEC", "XGETBV1"])
XSAVE_LEGACY_AREA = 512 + 64  # legacy region + XSAVE header

# ---- extended leaves ----
E1_ECX = dict(LAHF_LM=0, CMP_LEGACY=1, SVM=2, EXTAPIC=3, CR8_LEGACY=4, ABM=5, SSE4A=6,
              MISALIGNSSE=7, PREFETCHW=8, OSVW=9, IBS=10, XOP=11, SKINIT=12, WDT=13, LWP=15,
              FMA4=16, NODEID_MSR=19, TBM=21, TOPOEXT=22, PERFCTR_CORE=23, PERFCTR_NB=24,
              DBEXT=26, PERFCTR_LLC=28, MWAITX=29)
E1_EDX = dict(SYSCALL=11, NX=20, MMXEXT=22, FFXSR=25, PAGE1GB=26, RDTSCP=27, LM=29,
              _3DNOWEXT=30, _3DNOW=31)
E1_ECX_PV = _mask(E1_ECX, ["LAHF_LM", "CMP_LEGACY", "ABM", "SSE4A", "MISALIGNSSE", "PREFETCHW",
                           "XOP", "FMA4", "TBM"])
# On AMD, 0x80000001 EDX mirrors leaf-1 EDX bits 0..17 (minus a few): same PV mask there.
E1_EDX_PV = (_mask(E1_EDX, ["SYSCALL", "NX", "MMXEXT", "FFXSR", "RDTSCP", "LM", "_3DNOWEXT",
                            "_3DNOW"])
             | (L1_EDX_PV & 0x3FFFF))
E8_EBX = dict(CLZERO=0, RSTR_FP_ERR_PTRS=2, WBNOINVD=9)
E8_EBX_PV = _mask(E8_EBX, ["CLZERO", "RSTR_FP_ERR_PTRS", "WBNOINVD"])

# Leaves passed through unmodified (cache/TLB descriptors, topology, brand
# string, address sizes); everything not listed here or masked below is dropped.
PASSTHROUGH_LEAVES = frozenset({0x0, 0x2, 0x4, 0xB, 0x16, 0x18, 0x1F,
                                0x80000000, 0x80000002, 0x80000003, 0x80000004,
                                0x80000005, 0x80000006, 0x8000001D})
ALL = 0xFFFFFFFF


def _get(entries, leaf, sub=0):
    for e in entries:
        if e.leaf == leaf and e.subleaf in (sub, ANY_SUBLEAF):
            return e
    return None


def _normalise(host_entries) -> list[CpuidLeaf]:
    out = []
    for e in host_entries:
        if isinstance(e, CpuidLeaf):
            out.append(e)
        elif isinstance(e, tuple):
            out.append(CpuidLeaf(*e))
        else:  # kvm_cpuid_entry2
            sub = e.index if e.flags & KVM_CPUID_FLAG_SIGNIFICANT_INDEX else ANY_SUBLEAF
            out.append(CpuidLeaf(e.function, sub, e.eax, e.ebx, e.ecx, e.edx))
    return out


# The feature words of leaves 1 and 7 that guest code reads natively on
# kvm_pvm (vmm/quirks.py: cpuid_leaves_1_7_host_only): (leaf, subleaf) ->
# register names.
NATIVE_FEATURE_REGS = {(1, 0): ("ecx", "edx"), (7, 0): ("ebx", "ecx", "edx"), (7, 1): ("eax",)}
# Bits that stay as KVM reports them even then: their kernel side is a CR4
# bit or an MSR the shim/KVM would have to back (CR4.FSGSBASE; TSC_AUX for
# RDPID), not just an instruction running natively.
KVM_BACKED_BITS = {(7, 0): {"ebx": 1 << L7_EBX["FSGSBASE"], "ecx": 1 << L7_ECX["RDPID"]}}


def with_native_feature_leaves(host_entries, native) -> list[CpuidLeaf]:
    """host_entries with the feature words of leaves 1 and 7 replaced by
    what guest code really sees there (`native(leaf, subleaf)` -> eax, ebx,
    ecx, edx; vmm.hostcpu.cpuid on kvm_pvm).

    Why: under kvm_pvm guest CPL3 code sees the host's leaves 1 and 7 and
    runs with the host's XCR0 (e.g. x87|SSE|AVX|AVX-512), whatever
    KVM_GET_SUPPORTED_CPUID (there: no XSAVE, no AVX) and KVM_SET_XCRS say.
    glibc then uses AVX/AVX-512 registers in every process; a guest kernel
    told "no XSAVE" context-switches them with FXSAVE (x87/SSE only) and
    their contents leak between processes.  The PV policy has to offer what
    the hardware really enables, so the kernel saves all of it."""
    out = []
    for e in _normalise(host_entries):
        key = (e.leaf, 0 if e.subleaf == ANY_SUBLEAF else e.subleaf)
        regs = NATIVE_FEATURE_REGS.get(key)
        if regs:
            vals = dict(zip(("eax", "ebx", "ecx", "edx"), native(*key)))
            keep = KVM_BACKED_BITS.get(key, {})
            e = e._replace(**{r: (vals[r] & ~keep.get(r, 0)) | (getattr(e, r) & keep.get(r, 0))
                              for r in regs})
        out.append(e)
    return out


def _xsave_leaves(host: list[CpuidLeaf]) -> list[CpuidLeaf]:
    """Leaf 0xD restricted to the PV state components."""
    sub0 = _get(host, 0xD, 0)
    if sub0 is None:
        return []
    xcr0 = ((sub0.edx << 32) | sub0.eax) & XSTATE_PV
    comps = []
    size = XSAVE_LEGACY_AREA
    for i in range(2, 64):
        if not xcr0 >> i & 1:
            continue
        e = _get(host, 0xD, i)
        if e is None or e.eax == 0:  # a component KVM does not describe cannot be offered
            xcr0 &= ~(1 << i)
            continue
        comps.append(CpuidLeaf(0xD, i, e.eax, e.ebx, e.ecx & 0x3, 0))  # ecx bit1: align64
        size = max(size, e.ebx + e.eax)
    out = [CpuidLeaf(0xD, 0, xcr0 & ALL, size, size, xcr0 >> 32)]
    sub1 = _get(host, 0xD, 1)
    if sub1 is not None:
        # EBX (XSAVES area size) and ECX/EDX (IA32_XSS bits) only matter with XSAVES: hidden.
        out.append(CpuidLeaf(0xD, 1, sub1.eax & XSAVE_SUB1_EAX_PV, 0, 0, 0))
    return out + comps


def _xen_leaves(base: int, version: tuple[int, int], max_leaf_offset: int,
                addr_bits: int, tsc_khz: int) -> list[CpuidLeaf]:
    sig = [int.from_bytes(XEN_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8)]
    out = [
        CpuidLeaf(base + 0, ANY_SUBLEAF, base + max_leaf_offset, *sig),
        CpuidLeaf(base + 1, ANY_SUBLEAF, (version[0] << 16) | version[1], 0, 0, 0),
        CpuidLeaf(base + 2, ANY_SUBLEAF, 1, XEN_HYPERCALL_MSR,
                  XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD, 0),
    ]
    if max_leaf_offset >= 5:
        # base+3: TSC info (sub-leaf 0: flags/mode/guest kHz, 1: offset/scale, 2: host kHz).
        out += [CpuidLeaf(base + 3, 0, 0, 0, tsc_khz, 0),
                CpuidLeaf(base + 3, 1, 0, 0, 0, 0),
                CpuidLeaf(base + 3, 2, tsc_khz, 0, 0, 0),
                CpuidLeaf(base + 4, ANY_SUBLEAF, 0, 0, 0, 0),  # HVM-only features: empty for PV
                CpuidLeaf(base + 5, 0, 0, min(addr_bits, MAX_GRANT_V1_ADDR_BITS), 0, 0)]
    return out


def build_pv_cpuid(host_entries, *, xen_version: tuple[int, int] = (4, 17),
                   base: int = XEN_CPUID_BASE, max_leaf_offset: int = 5,
                   machine_addr_bits: int = 40, tsc_khz: int = 0) -> list[CpuidLeaf]:
    """The PV guest's CPUID table from the host's supported CPUID.

    host_entries: kvm_cpuid_entry2 objects (Kvm.supported_cpuid()) or 6-tuples.
    machine_addr_bits: width of the highest guest frame address (base+5 EBX),
        clamped to 44 so Linux keeps grant tables v1.
    """
    if max_leaf_offset not in (2, 5):
        raise ValueError("the Xen leaves end at base+2 or base+5")
    host = [e for e in _normalise(host_entries)
            if not HYPERVISOR_LEAF_FIRST <= e.leaf <= HYPERVISOR_LEAF_LAST]
    out: list[CpuidLeaf] = []
    xsave = False
    for e in host:
        if e.leaf in PASSTHROUGH_LEAVES:
            out.append(e)
        elif e.leaf == 1:
            ecx = e.ecx & L1_ECX_PV
            xsave = bool(ecx >> L1_ECX["XSAVE"] & 1)
            if xsave:  # Xen leaks OSXSAVE to PV kernels; Linux requires XSAVE+OSXSAVE together
                ecx |= 1 << L1_ECX["OSXSAVE"]
            ecx |= 1 << L1_ECX["HYPERVISOR"]
            out.append(e._replace(ecx=ecx, edx=e.edx & L1_EDX_PV))
        elif e.leaf == 7 and e.subleaf in (0, ANY_SUBLEAF):
            out.append(e._replace(ebx=e.ebx & L7_EBX_PV, ecx=e.ecx & L7_ECX_PV,
                                  edx=e.edx & L7_EDX_PV))
        elif e.leaf == 7 and e.subleaf == 1:
            out.append(e._replace(eax=e.eax & L7_1_EAX_PV, ebx=0, ecx=0, edx=0))
        elif e.leaf == 0x80000001:
            out.append(e._replace(ecx=e.ecx & E1_ECX_PV, edx=e.edx & E1_EDX_PV))
        elif e.leaf == 0x80000008:
            out.append(e._replace(ebx=e.ebx & E8_EBX_PV))
        # leaf 0xD handled below; anything else (MWAIT, thermal, PMU, RDT, SGX, PT,
        # AMX, SVM, SEV, KVM's own hypervisor leaves, ...) is dropped = reads as zero.
    if xsave:
        out += _xsave_leaves(host)
    l7 = _get(out, 7, 0)
    if l7 is not None and l7.subleaf == 0:
        # Keep the max sub-leaf of leaf 7 consistent with what is present.
        out[out.index(l7)] = l7._replace(eax=min(l7.eax, 1 if _get(out, 7, 1) else 0))
    out += _xen_leaves(base, xen_version, max_leaf_offset, machine_addr_bits, tsc_khz)
    out.sort(key=lambda e: (e.leaf, e.subleaf))
    return out


def lookup(table: list[CpuidLeaf], leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) for a CPUID query against the table."""
    any_hit = None
    for e in table:
        if e.leaf == leaf:
            if e.subleaf == subleaf:
                return e.eax, e.ebx, e.ecx, e.edx
            if e.subleaf == ANY_SUBLEAF:
                any_hit = e
    if any_hit is not None:
        return any_hit.eax, any_hit.ebx, any_hit.ecx, any_hit.edx
    return 0, 0, 0, 0


def pack_table(table: list[CpuidLeaf]) -> bytes:
    """The table as packed little-endian u32 6-tuples, for the shim's lookup."""
    out = bytearray()
    for e in table:
        for v in e:
            out += (v & ALL).to_bytes(4, "little")
    return bytes(out)


def to_kvm_entries(table: list[CpuidLeaf]):
    """The same policy as kvm_cpuid_entry2 objects for Vcpu.set_cpuid()."""
    from pyvmm.vmm.kvm import CpuidEntry

    out = []
    for e in table:
        sig = e.subleaf != ANY_SUBLEAF
        out.append(CpuidEntry(function=e.leaf, index=e.subleaf if sig else 0,
                              flags=KVM_CPUID_FLAG_SIGNIFICANT_INDEX if sig else 0,
                              eax=e.eax, ebx=e.ebx, ecx=e.ecx, edx=e.edx))
    return out


def find(table: list[CpuidLeaf], leaf: int, subleaf: int = 0) -> Optional[CpuidLeaf]:
    return _get(table, leaf, subleaf)
