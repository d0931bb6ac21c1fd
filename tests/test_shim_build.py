"""The shim builds, its header agrees with abi.py / vmm_region.py, and the
VMM region layout is self-consistent."""
from __future__ import annotations

import re
import struct

import pytest

from pyvmm.vmm import x86
from pyvmm.xen_abi import abi
from pyvmm.xen_abi.memory import vmm_region as R
from pyvmm.xen_abi.shim.build import SHIM_DIR, build_shim


def header_defines() -> dict[str, int]:
    out = {}
    for m in re.finditer(r"^#define\s+(\w+)\s+\(?([0-9a-fA-Fx]+)[uUlL]*\)?", (SHIM_DIR / "xen_abi.h").read_text(), re.M):
        out[m.group(1)] = int(m.group(2), 0)
    return out


def expected_from_python(name: str):
    """The Python value a header name must equal (None: not mirrored)."""
    if name.endswith("_SIZE") and name.startswith("XEN_"):
        return {"XEN_TRAP_INFO_SIZE": abi.TrapInfo.sizeof(), "XEN_IRET_CONTEXT_SIZE": abi.IretContext.sizeof(),
                "XEN_MMU_UPDATE_SIZE": abi.MmuUpdate.sizeof(), "XEN_MMUEXT_OP_SIZE": abi.MmuextOp.sizeof(),
                "XEN_MULTICALL_ENTRY_SIZE": abi.MulticallEntry.sizeof()}[name]
    groups = [("HC_", abi.Hypercall, {}), ("XEN_SEGBASE_", abi.SegBase, {}),
              ("XEN_SCHEDOP_", abi.SchedOp, {"yield": "yield_"}),
              ("XEN_CALLBACKTYPE_", abi.CallbackType, {}), ("XEN_MMUEXT_", abi.MmuextCmd, {}),
              ("XEN_MMU_", abi.MmuUpdateCmd, {})]
    for prefix, enum, rename in groups:
        if name.startswith(prefix) and not name.endswith("_SIZE"):
            key = name[len(prefix):]
            key = rename.get(key, key)
            if prefix == "XEN_CALLBACKTYPE_":
                key = key.upper()
            return enum[key].value
    plain = {
        "XEN_CALLBACKOP_register": abi.CALLBACKOP_REGISTER, "XEN_CALLBACKOP_unregister": abi.CALLBACKOP_UNREGISTER,
        "XEN_CALLBACKF_mask_events": abi.CALLBACKF_MASK_EVENTS,
        "XEN_UVMF_FLUSHTYPE_MASK": abi.UVMF_FLUSHTYPE_MASK, "XEN_UVMF_TLB_FLUSH": abi.UVMF_TLB_FLUSH,
        "XEN_UVMF_INVLPG": abi.UVMF_INVLPG, "XEN_VGCF_IN_SYSCALL": abi.VGCF_IN_SYSCALL,
        "XEN_TI_MASK_EVENTS": abi.TI_MASK_EVENTS, "XEN_TI_DPL_MASK": abi.TI_DPL_MASK,
        "XEN_FLAT_RING3_CS32": abi.FLAT_RING3_CS32, "XEN_FLAT_RING3_SS": abi.FLAT_RING3_SS64,
        "XEN_FLAT_RING3_CS64": abi.FLAT_RING3_CS64, "XEN_HV_VIRT_START": abi.HYPERVISOR_VIRT_START,
        "XEN_HV_VIRT_END": abi.HYPERVISOR_VIRT_END, "XEN_HV_L4_FIRST": abi.HYPERVISOR_L4_FIRST_SLOT,
        "XEN_HV_L4_COUNT": abi.HYPERVISOR_L4_LAST_SLOT - abi.HYPERVISOR_L4_FIRST_SLOT + 1,
        "VI_UPCALL_PENDING": abi.VCPU_INFO_UPCALL_PENDING, "VI_UPCALL_MASK": abi.VCPU_INFO_UPCALL_MASK,
        "VI_PENDING_SEL": abi.VCPU_INFO_PENDING_SEL, "VI_CR2": abi.VCPU_INFO_CR2, "VI_SIZE": abi.VCPU_INFO_SIZE,
        "XEN_TRAP_INFO_SIZE": abi.TrapInfo.sizeof(), "XEN_IRET_CONTEXT_SIZE": abi.IretContext.sizeof(),
        "XEN_MMU_UPDATE_SIZE": abi.MmuUpdate.sizeof(), "XEN_MMUEXT_OP_SIZE": abi.MmuextOp.sizeof(),
        "XEN_MULTICALL_ENTRY_SIZE": abi.MulticallEntry.sizeof(),
        "CPUID_ENT_SIZE": R.CPUID_ENT.size, "VEC_SYSCALL": None, "VEC_SYSCALL_GP": None,
        "PC_BOOT_SIZE": None, "SG_SIZE": None,
        "CPUID_ANY_SUBLEAF": 0xFFFFFFFF,
    }
    if name in plain:
        return plain[name]
    if name.startswith("XEN_E"):
        return abi.XenErrno[name[4:]].value
    for prefix in ("PC_", "SG_", "SGF_", "MB_", "MBOP_"):
        if name.startswith(prefix):
            return getattr(R, name)
    raise KeyError(name)


def test_header_matches_python():
    defs = header_defines()
    assert len(defs) > 60
    for name, value in defs.items():
        if name == "SHIM_XEN_ABI_H":
            continue
        want = expected_from_python(name)
        if want is not None:
            assert value == want, f"shim/xen_abi.h {name} = {value:#x}, Python says {want:#x}"


def test_shim_builds_and_fits():
    s = build_shim()
    assert s.base == R.REGION_VA + R.SHIM_OFF
    assert 0 < len(s.image) <= s.size <= R.SHIM_MAX
    for name in ("shim_vectors", "shim_syscall_entry", "shim_trap", "shim_copy_insn", "shim_iret_insn"):
        assert s.base <= s.sym(name) < s.base + s.size
    # 256 16-byte stubs: vector 14 (#PF, CPU pushes the error code) starts
    # with `push $14` (6a 0e), vector 6 (#UD) with `push $0` first
    stub = lambda v: s.image[s.sym("shim_vectors") - s.base + 16 * v:][:4]
    assert stub(14)[:2] == b"\x6a\x0e"
    assert stub(6)[:4] == b"\x6a\x00\x6a\x06"
    # cached: a second build returns the same bytes without recompiling
    assert build_shim().image == s.image


@pytest.mark.parametrize("ram", [16 << 20, 1 << 30, (4 << 30) + (8 << 20)])
def test_region_layout(ram):
    r = R.VmmRegion(ram)
    assert r.gpa >= ram and r.gpa % (2 << 20) == 0
    assert r.m2p_pages * R.PAGE >= r.ram_pages * 8
    assert R.PT_OFF + r.nr_pt_frames * R.PAGE == r.m2p_off and r.ftype_off == r.m2p_off + r.m2p_pages * R.PAGE
    assert r.ftype_pages * R.PAGE >= r.ram_pages and r.size == r.ftype_off + r.ftype_pages * R.PAGE
    for v in r.vcpus:
        assert (R.REGION_VA + v.stack_block_off) % R.PERCPU_BLOCK_SIZE == 0
    r.mem.close()


def test_region_tables_and_m2p():
    r = R.VmmRegion(16 << 20, is_pvm=True)
    r.build_tables(0x3000)
    assert set(r.l4_entries) == {R.M2P_SLOT, R.REGION_SLOT, R.DIRECTMAP_SLOT, R.M2P_ALIAS_SLOT}
    assert r.l4_entries[R.M2P_ALIAS_SLOT] == r.l4_entries[R.M2P_SLOT]

    def leaf(va):
        off = (r.l4_entries[x86.pt_index(va, 4)] & x86.PTE_ADDR_MASK) - r.gpa
        for level in (3, 2, 1):
            e = r.mem.read_u64(off + x86.pt_index(va, level) * 8)
            assert e & x86.PTE_P, hex(va)
            if level == 2 and e & x86.PTE_PS:
                return e
            off = (e & x86.PTE_ADDR_MASK) - r.gpa
        return e

    m2p = leaf(R.M2P_VA)
    assert m2p & x86.PTE_US and not m2p & x86.PTE_RW and m2p & x86.PTE_NX
    assert r.mem.read_u64(r.m2p_off + 8 * 1234) == 1234
    shim = leaf(R.REGION_VA + R.SHIM_OFF)
    assert not shim & x86.PTE_US and not shim & x86.PTE_NX
    tramp = leaf(r.lstar(0))
    assert tramp & x86.PTE_US and not tramp & x86.PTE_RW     # kvm_pvm lane: user-executable
    data = leaf(r.percpu_va(0))
    assert data & x86.PTE_NX and not data & x86.PTE_US
    assert (leaf(R.DIRECTMAP_VA + (5 << 20)) & x86.PTE_ADDR_MASK) == 4 << 20   # 2 MiB page
    r.mem.close()


def test_region_trampoline_supervisor_on_real_kvm():
    r = R.VmmRegion(16 << 20, is_pvm=False)
    r.build_tables(0x3000)
    off = (r.l4_entries[R.REGION_SLOT] & x86.PTE_ADDR_MASK) - r.gpa
    va = r.lstar(0)
    for level in (3, 2):
        off = (r.mem.read_u64(off + x86.pt_index(va, level) * 8) & x86.PTE_ADDR_MASK) - r.gpa
    assert not r.mem.read_u64(off + x86.pt_index(va, 1) * 8) & x86.PTE_US
    r.mem.close()


def test_syscall_trampoline_encoding():
    from pyvmm.xen_abi.hypervisor.domain import syscall_trampoline
    va, slot, top, entry = 0xFFFF808000021000, 0xFFFF80800008E048, 0xFFFF80800008E000, 0xFFFF808000040FF9
    code = syscall_trampoline(va, slot, top, entry)
    assert code[:6] == b"\x0f\x01\xf8" * 2                      # swapgs; swapgs
    assert code[6:9] == b"\x48\x89\x25"                          # mov %rsp, rel32(%rip)
    assert va + 13 + struct.unpack_from("<i", code, 9)[0] == slot
    assert code[13:15] == b"\x48\xbc" and struct.unpack_from("<Q", code, 15)[0] == top
    assert code[23] == 0xE9 and va + 28 + struct.unpack_from("<i", code, 24)[0] == entry
