"""The PV CPUID policy: masking, Xen leaves, XSAVE trimming, lookup."""
from __future__ import annotations

import os

import pytest

from pyvmm.xen_abi.boot.cpuid import (
    ANY_SUBLEAF,
    E1_EDX,
    L1_ECX,
    L1_EDX,
    L7_EBX,
    L7_ECX,
    L7_EDX,
    XEN_SIGNATURE,
    XSTATE,
    CpuidLeaf,
    build_pv_cpuid,
    lookup,
    pack_table,
    to_kvm_entries,
    with_native_feature_leaves,
)

ALL = 0xFFFFFFFF


def synthetic_host(xsave=True):
    """A host that claims every feature bit, KVM leaves included."""
    ecx1 = ALL if xsave else ALL & ~(1 << L1_ECX["XSAVE"])
    host = [
        CpuidLeaf(0, ANY_SUBLEAF, 0x1F, 1, 2, 3),
        CpuidLeaf(1, ANY_SUBLEAF, 0x000806F8, 0x00010800, ecx1, ALL),
        CpuidLeaf(5, ANY_SUBLEAF, 0x40, 0x40, 3, 0x11142120),  # MONITOR/MWAIT
        CpuidLeaf(6, ANY_SUBLEAF, ALL, ALL, ALL, ALL),
        CpuidLeaf(7, 0, 2, ALL, ALL, ALL),
        CpuidLeaf(7, 1, ALL, ALL, ALL, ALL),
        CpuidLeaf(7, 2, ALL, ALL, ALL, ALL),
        CpuidLeaf(0xA, ANY_SUBLEAF, ALL, ALL, ALL, ALL),
        # XSAVE: x87|SSE|AVX|MPX(3,4)|AVX-512(5,6,7)|PKRU(9)|AMX(17,18)
        CpuidLeaf(0xD, 0, (1 << 0 | 1 << 1 | 1 << 2 | 1 << 3 | 1 << 4 | 0xE0 | 1 << 9 | 3 << 17) & ALL,
                  0x2B00, 0x2B00, 0),
        CpuidLeaf(0xD, 1, 0x1F, 0x1000, 0x1800, 0),
        CpuidLeaf(0xD, 2, 256, 576, 0, 0),
        CpuidLeaf(0xD, 3, 64, 960, 0, 0),
        CpuidLeaf(0xD, 4, 64, 1024, 0, 0),
        CpuidLeaf(0xD, 5, 64, 1088, 0, 0),
        CpuidLeaf(0xD, 6, 512, 1152, 0, 0),
        CpuidLeaf(0xD, 7, 1024, 1664, 0, 0),
        CpuidLeaf(0xD, 9, 8, 2688, 0, 0),
        CpuidLeaf(0xD, 17, 64, 2752, 0, 0),
        CpuidLeaf(0xD, 18, 8192, 2816, 0, 0),
        CpuidLeaf(0x40000000, ANY_SUBLEAF, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),  # "KVMKVMKVM"
        CpuidLeaf(0x40000001, ANY_SUBLEAF, ALL, 0, 0, 0),
        CpuidLeaf(0x80000000, ANY_SUBLEAF, 0x80000021, 0, 0, 0),
        CpuidLeaf(0x80000001, ANY_SUBLEAF, 0, 0, ALL, ALL),
        CpuidLeaf(0x80000008, ANY_SUBLEAF, 0x3030, ALL, 7, 0),
        CpuidLeaf(0x8000000A, ANY_SUBLEAF, ALL, ALL, ALL, ALL),
    ]
    return host


def bit(v, n):
    return v >> n & 1


def test_leaf1_masking_and_synthesised_bits():
    t = build_pv_cpuid(synthetic_host())
    _, _, ecx, edx = lookup(t, 1)
    for name in ("VMX", "SMX", "MONITOR", "DTES64", "DS_CPL", "EIST", "TM2", "PCID", "X2APIC",
                 "TSC_DEADLINE", "SDBG", "DCA", "PDCM", "XTPR"):
        assert not bit(ecx, L1_ECX[name]), name
    for name in ("VME", "PSE", "PGE", "PSE36", "MTRR", "DS", "ACPI", "TM", "PBE", "PSN"):
        assert not bit(edx, L1_EDX[name]), name
    for name in ("SSE3", "SSSE3", "CX16", "SSE4_2", "POPCNT", "AESNI", "AVX", "XSAVE"):
        assert bit(ecx, L1_ECX[name]), name
    for name in ("FPU", "TSC", "MSR", "PAE", "CX8", "CMOV", "PAT", "FXSR", "SSE2"):
        assert bit(edx, L1_EDX[name]), name
    assert bit(ecx, L1_ECX["HYPERVISOR"]) and bit(ecx, L1_ECX["OSXSAVE"])


def test_no_osxsave_without_xsave_and_hypervisor_always():
    t = build_pv_cpuid(synthetic_host(xsave=False))
    _, _, ecx, _ = lookup(t, 1)
    assert not bit(ecx, L1_ECX["XSAVE"]) and not bit(ecx, L1_ECX["OSXSAVE"])
    assert bit(ecx, L1_ECX["HYPERVISOR"])
    assert lookup(t, 0xD, 0) == (0, 0, 0, 0), "no XSAVE leaf without XSAVE"


def test_leaf7_masking():
    t = build_pv_cpuid(synthetic_host())
    eax, ebx, ecx, edx = lookup(t, 7, 0)
    for name in ("TSC_ADJUST", "SGX", "SMEP", "SMAP", "INVPCID", "MPX", "PQM", "PQE", "PT"):
        assert not bit(ebx, L7_EBX[name]), name
    for name in ("UMIP", "PKU", "OSPKE", "WAITPKG", "CET_SS", "LA57", "ENQCMD", "SGX_LC", "PKS", "KL"):
        assert not bit(ecx, L7_ECX[name]), name
    for name in ("CET_IBT", "AMX_BF16", "AMX_TILE", "AMX_INT8", "HYBRID", "ARCH_LBR", "IBRSB",
                 "STIBP", "SSBD", "ARCH_CAPS", "CORE_CAPS", "L1D_FLUSH", "UINTR", "PCONFIG"):
        assert not bit(edx, L7_EDX[name]), name
    for name in ("FSGSBASE", "BMI1", "AVX2", "BMI2", "ERMS", "ADX", "CLFLUSHOPT", "SHA"):
        assert bit(ebx, L7_EBX[name]), name
    assert eax == 1, "max sub-leaf follows what is present"
    assert lookup(t, 7, 1)[0] == 0x30 and lookup(t, 7, 2) == (0, 0, 0, 0)


def test_extended_leaves_and_dropped_leaves():
    t = build_pv_cpuid(synthetic_host())
    _, _, ecx, edx = lookup(t, 0x80000001)
    assert not bit(ecx, 2), "SVM hidden"
    for name in ("PAGE1GB",):
        assert not bit(edx, E1_EDX[name])
    for name in ("SYSCALL", "NX", "LM", "RDTSCP"):
        assert bit(edx, E1_EDX[name]), name
    for mirrored in (1, 3, 12, 13, 17):  # VME PSE MTRR PGE PSE36 mirrored by AMD
        assert not bit(edx, mirrored)
    assert lookup(t, 0x80000008)[0] == 0x3030 and lookup(t, 0x80000008)[1] == 0x205
    for leaf in (5, 6, 0xA, 0x8000000A):
        assert lookup(t, leaf) == (0, 0, 0, 0), hex(leaf)


def test_xen_leaves():
    t = build_pv_cpuid(synthetic_host(), machine_addr_bits=52, tsc_khz=2_500_000)
    eax, ebx, ecx, edx = lookup(t, 0x40000000)
    assert b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx)) == XEN_SIGNATURE
    assert eax == 0x40000005
    assert lookup(t, 0x40000001)[0] == (4 << 16) | 17
    assert lookup(t, 0x40000002) == (1, 0x40000000, 1, 0)
    assert lookup(t, 0x40000005)[1] == 44, "clamped so Linux keeps grant v1"
    assert lookup(t, 0x40000003, 0)[2] == 2_500_000
    assert lookup(t, 0x40000004) == (0, 0, 0, 0)
    assert not any(e.leaf == 0x40000001 and e.eax == ALL for e in t), "KVM's leaves are gone"
    short = build_pv_cpuid(synthetic_host(), max_leaf_offset=2)
    assert lookup(short, 0x40000000)[0] == 0x40000002 and lookup(short, 0x40000005) == (0, 0, 0, 0)
    with pytest.raises(ValueError):
        build_pv_cpuid(synthetic_host(), max_leaf_offset=3)


def test_xsave_leaf_trimmed():
    t = build_pv_cpuid(synthetic_host())
    eax, ebx, ecx, edx = lookup(t, 0xD, 0)
    allowed = {XSTATE[n] for n in ("X87", "SSE", "AVX", "OPMASK", "ZMM_HI256", "HI16_ZMM")}
    assert eax == sum(1 << b for b in allowed) and edx == 0
    assert ecx == 1664 + 1024, "size up to the last allowed component (Hi16_ZMM)"
    assert lookup(t, 0xD, 1)[0] == 0x7, "XSAVEOPT/XSAVEC/XGETBV1 kept, XSAVES/XFD hidden"
    assert lookup(t, 0xD, 1)[1:] == (0, 0, 0)
    for sub in (3, 4, 9, 17, 18):
        assert lookup(t, 0xD, sub) == (0, 0, 0, 0), sub
    assert lookup(t, 0xD, 2)[:2] == (256, 576)


def test_lookup_semantics_and_sorting():
    t = build_pv_cpuid(synthetic_host())
    keys = [(e.leaf, e.subleaf) for e in t]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert lookup(t, 1, 0) == lookup(t, 1, 12345), "sub-leaf ignored for leaf 1"
    assert lookup(t, 0x12345678) == (0, 0, 0, 0)
    packed = pack_table(t)
    assert len(packed) == 24 * len(t)
    assert int.from_bytes(packed[0:4], "little") == t[0].leaf
    ents = to_kvm_entries(t)
    e1 = next(e for e in ents if e.function == 1)
    assert e1.flags == 0 and e1.ecx == lookup(t, 1)[2]
    e7 = next(e for e in ents if e.function == 7 and e.index == 1)
    assert e7.flags == 1


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")
def test_policy_from_this_hosts_kvm():
    from pyvmm.vmm.kvm import Kvm
    kvm = Kvm()
    try:
        host = kvm.supported_cpuid()
    finally:
        kvm.close()
    t = build_pv_cpuid(host)
    _, _, ecx, edx = lookup(t, 1)
    assert bit(ecx, L1_ECX["HYPERVISOR"])
    assert not bit(edx, L1_EDX["PSE"]) and not bit(edx, L1_EDX["PGE"])
    assert not bit(lookup(t, 0x80000001)[3], E1_EDX["PAGE1GB"])
    assert lookup(t, 0x40000000)[0] in (0x40000002, 0x40000005)
    # every host bit we show was offered by the host (besides the synthesised ones)
    hl1 = next(e for e in host if e.function == 1)
    assert edx & ~hl1.edx == 0
    assert ecx & ~hl1.ecx & ~((1 << 31) | (1 << 27)) == 0


def test_native_feature_leaves_replace_leaf1_and_7_words():
    """kvm_pvm: the feature words of leaves 1 and 7 come from what guest code
    sees natively (XSAVE, AVX, AVX-512 ...), except FSGSBASE and RDPID whose
    kernel side (CR4 bit, TSC_AUX) stays KVM's; other words/leaves untouched."""
    kvm = [CpuidLeaf(1, ANY_SUBLEAF, 0x00A10F11, 0x01020800, 0x81202000, 0x078BFBFF),
           CpuidLeaf(7, 0, 1, 0x01800002, 0x104, 0x20000000),
           CpuidLeaf(7, 1, 0, 0, 0, 0),
           CpuidLeaf(0xD, 0, 0xE7, 0x980, 0x980, 0),
           CpuidLeaf(0xD, 2, 0x100, 0x240, 0, 0), CpuidLeaf(0xD, 5, 0x40, 0x340, 0, 0),
           CpuidLeaf(0xD, 6, 0x200, 0x380, 0, 0), CpuidLeaf(0xD, 7, 0x400, 0x580, 0, 0)]
    fsgs, rdpid = 1 << L7_EBX["FSGSBASE"], 1 << L7_ECX["RDPID"]
    native_regs = {(1, 0): (0x11111111, 0x22222222, ALL, ALL),
                   (7, 0): (0x55, ALL, ALL, 0x10),
                   (7, 1): (0x20, 9, 9, 9)}
    asked = []

    def native(leaf, sub):
        asked.append((leaf, sub))
        return native_regs[(leaf, sub)]
    out = with_native_feature_leaves(kvm, native)
    assert sorted(asked) == [(1, 0), (7, 0), (7, 1)]
    l1, l70, l71, ld = out[:4]
    assert (l1.eax, l1.ebx) == (0x00A10F11, 0x01020800)        # family/APIC id: KVM's
    assert (l1.ecx, l1.edx) == (ALL, ALL)
    assert l70.eax == 1 and l70.edx == 0x10
    assert l70.ebx == ALL & ~fsgs                                # KVM has no FSGSBASE
    assert l70.ecx == ALL & ~rdpid | (0x104 & rdpid)
    assert (l71.eax, l71.ebx) == (0x20, 0)
    assert ld == kvm[3]
    # through the policy: XSAVE (+ leaked OSXSAVE), AVX, AVX-512F offered
    t = build_pv_cpuid(out)
    assert bit(lookup(t, 1)[2], L1_ECX["XSAVE"]) and bit(lookup(t, 1)[2], L1_ECX["OSXSAVE"])
    assert bit(lookup(t, 1)[2], L1_ECX["AVX"]) and bit(lookup(t, 7)[1], L7_EBX["AVX512F"])
    assert not bit(lookup(t, 7)[1], L7_EBX["FSGSBASE"])
    assert lookup(t, 0xD, 0)[0] == 0xE7
