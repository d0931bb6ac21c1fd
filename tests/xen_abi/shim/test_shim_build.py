"""The shim builds, the headers generated from xen_abi/shim/layout.py compile
and hold C to the layout Python uses, and the VMM region layout is
self-consistent."""
from __future__ import annotations

import struct
import subprocess

import pytest

from pyvmm.vmm import x86
from pyvmm.vmm.memory import GuestMemory
from pyvmm.xen_abi import abi
from pyvmm.xen_abi.memory import vmm_region as R
from pyvmm.xen_abi.shim import layout, priv
from pyvmm.xen_abi.shim.build import build_shim


def compile_probe(tmp_path, name: str, text: str) -> subprocess.CompletedProcess:
    """gcc -c one file against the generated headers (nothing is linked)."""
    for header, body in layout.c_headers().items():
        (tmp_path / header).write_text(body)
    (tmp_path / name).write_text(text)
    return subprocess.run(["gcc", "-Wall", "-Werror", "-I", str(tmp_path), "-c", str(tmp_path / name),
                           "-o", str(tmp_path / (name + ".o"))], capture_output=True, text=True)


def test_generated_headers_compile_in_c_and_assembly(tmp_path):
    c = compile_probe(tmp_path, "probe.c", """#include <stddef.h>
#include "xen_numbers.h"
#include "shim_layout.h"
_Static_assert(HC_iret == 23 && SCHEDOP_block == 1 && CALLBACKTYPE_syscall == 2, "xen");
_Static_assert(MB_ARGS == 16 && MBOP_SET_XCR0 == 5 && EVB_BACKEND_MAP == 512, "layout");
_Static_assert(HYPERVISOR_VIRT_START == 0xffff800000000000UL && REGION_VA > HYPERVISOR_VIRT_START, "va");
""")
    assert c.returncode == 0, c.stderr
    asm = compile_probe(tmp_path, "probe.S", """#include "xen_numbers.h"
#include "shim_layout.h"
        movabsq $HYPERVISOR_VIRT_END, %rdx
        movq PERCPU_IN_BLOCK+PRIV_OFF+PRIV_FAST_IO(%rcx), %rax
        pushq $VEC_HYPERCALL
""")
    assert asm.returncode == 0, asm.stderr


def test_layout_checks_catch_a_c_struct_that_drifted(tmp_path):
    """shim.h's structs are checked field by field against layout.py."""
    fields = "op, nr, args[6], cr3, kmode, result, rip, info, info2"
    probe = """#include <stddef.h>
#include <stdint.h>
#include "shim_layout.h"
struct mailbox { uint64_t %s; };
MB_CHECK_LAYOUT(struct mailbox);
"""
    ok = compile_probe(tmp_path, "ok.c", probe % fields)
    assert ok.returncode == 0, ok.stderr
    swapped = compile_probe(tmp_path, "swapped.c", probe % fields.replace("op, nr", "nr, op"))
    assert swapped.returncode and "MB_OP" in swapped.stderr


def test_xen_numbers_follow_abi():
    numbers = {name: value for _, defines in layout.xen_numbers() for name, value, _ in defines}
    assert numbers["HC_set_timer_op"] == abi.Hypercall.set_timer_op
    assert numbers["SCHEDOP_yield"] == abi.SchedOp.yield_
    assert numbers["CALLBACKTYPE_event"] == abi.CallbackType.EVENT
    assert numbers["XEN_ETIME"] == abi.XenErrno.ETIME
    # offsets computed from abi.py's construct declarations
    assert (numbers["VI_UPCALL_PENDING"], numbers["VI_UPCALL_MASK"], numbers["VI_PENDING_SEL"],
            numbers["VI_CR2"], numbers["VI_SIZE"]) == (
        abi.VCPU_INFO_UPCALL_PENDING, abi.VCPU_INFO_UPCALL_MASK, abi.VCPU_INFO_PENDING_SEL,
        abi.VCPU_INFO_CR2, abi.VCPU_INFO_SIZE)
    assert numbers["SI_EVTCHN_PENDING"] == abi.SHARED_INFO_EVTCHN_PENDING
    assert numbers["SI_EVTCHN_MASK"] == abi.SHARED_INFO_EVTCHN_MASK


def test_blocks_are_read_and_written_by_name():
    mem = GuestMemory(2 * R.PAGE, name="layout-test")
    try:
        layout.PERCPU.write(mem, 0x100, kernel_sp=0x1234, kernel_ss=abi.FLAT_KERNEL_SS)
        assert mem.read_u64(0x100 + layout.PERCPU.offset("kernel_sp")) == 0x1234
        assert layout.PERCPU.read(mem, 0x100, "kernel_ss") == abi.FLAT_KERNEL_SS
        mem.write_u64(layout.MAILBOX.offset("args", 5), 99)
        assert layout.MAILBOX.read(mem, 0, "args", 5) == 99
        assert layout.MAILBOX.offset("cr3") == layout.MAILBOX.offset("args", 5) + 8
        with pytest.raises(IndexError):
            layout.MAILBOX.offset("args", 6)
        assert layout.EVENTS.offset("backend_map", 3) == layout.EVENTS.offset("backend_map") + 3
        assert layout.EVENTS.offset("kvm_steal") == 512 + abi.EVTCHN_2L_NR_CHANNELS // 8
        assert layout.EVENTS.offset("kvm_steal") % 64 == 0      # KVM wants it 64-byte aligned
    finally:
        mem.close()


def test_priv_state_and_counters_read_back_by_name():
    """xen_abi/shim/priv.py reads what the shim's priv.c keeps (PRIV block)."""
    mem = GuestMemory(2 * R.PAGE, name="priv-test")
    try:
        priv.init_vcpu(mem, 0, nr_vcpus=2)
        base = layout.PRIV_OFF
        mem.write_u64(base + layout.PRIV.offset("iopl"), 1)
        mem.write_u32(base + layout.PRIV.offset("counters", layout.PRIV_CNT_HCALL + abi.Hypercall.mmu_update), 3)
        mem.write_u32(base + layout.PRIV.offset("counters", layout.PRIV_CNT_TRAPS + x86.VEC_PF), 4)
        mem.write_u64(base + layout.PRIV.offset("fast_io"), 5)
        state = priv.read_state(mem, 0)
        assert (state["nr_vcpus"], state["iopl"], state["dr"]) == (2, 1, [0] * 8)
        assert priv.read_counters(mem, 0) == {"hypercall mmu_update": 3, "trap 14": 4,
                                               "fast in/out (#GP fast path)": 5}
    finally:
        mem.close()


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
    assert R.PT_OFF + r.nr_pt_frames * R.PAGE == r.m2p_off and r.page_type_off == r.m2p_off + r.m2p_pages * R.PAGE
    assert r.page_type_pages * R.PAGE >= 4 * r.ram_pages and r.tlb_stamp_off == r.page_type_off + r.page_type_pages * R.PAGE
    assert r.tlb_stamp_pages * R.PAGE >= 8 * r.ram_pages and r.size == r.tlb_stamp_off + r.tlb_stamp_pages * R.PAGE
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
    assert code[23] == 0x68 and struct.unpack_from("<i", code, 24)[0] == 0xE02B  # pushq $FLAT_RING3_SS64
    assert code[28:30] == b"\xff\x35"                           # pushq rel32(%rip): the guest rsp
    assert va + 34 + struct.unpack_from("<i", code, 30)[0] == slot
    assert code[34] == 0xE9 and va + 39 + struct.unpack_from("<i", code, 35)[0] == entry
    assert len(code) == 39
