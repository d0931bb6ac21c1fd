"""Tiny long-mode machines for flat test binaries (no firmware).

The VMM sets everything up from Python: identity page tables, a GDT with
kernel and user segments, a TSS, an IDT whose gates point at symbols of the
binary, and the vCPU's sregs already in 64-bit mode at CPL0. Used by the
vmm tests, the quirk probes and bench/exits.py.

assemble() builds a .S file (vmm/flat/*.S, or text) into a flat binary at a
chosen origin with pyvmm/toolchain.py, cached by content hash.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyvmm import toolchain

from . import x86
from .kvm import Kvm, KvmSegment, Vcpu, Vm
from .memory import GuestMemory

# ---- guest-physical layout (identity mapped, VA == GPA) ----
GDT_GPA = 0x1000
IDT_GPA = 0x2000
TSS_GPA = 0x3000
PML4_GPA = 0x4000
PDPT_GPA = 0x5000
PD_GPA = 0x6000                 # 4 consecutive PDs: 0-4 GiB in 2 MiB pages
PD_COUNT = 4
CODE_ORG = 0x10000
USER_STACK_TOP = 0x70000
KERNEL_STACK_TOP = 0x80000
IST1_STACK_TOP = 0x90000
DEFAULT_MEM_SIZE = 4 << 20
# The 4th GiB holds the LAPIC (0xfee00000): map it uncached.
MMIO_GIB = 3

# ---- GDT layout (sysret-compatible: user CS = base+16, user SS = base+8) ----
GDT_NULL, GDT_KCODE, GDT_KDATA, GDT_UCODE32, GDT_UDATA, GDT_UCODE, GDT_TSS = range(7)
KERNEL_CS = x86.selector(GDT_KCODE)
KERNEL_DS = x86.selector(GDT_KDATA)
USER_CS32 = x86.selector(GDT_UCODE32, 3)
USER_DS = x86.selector(GDT_UDATA, 3)
USER_CS = x86.selector(GDT_UCODE, 3)
TSS_SEL = x86.selector(GDT_TSS)
GDT_LIMIT = (GDT_TSS + 2) * 8 - 1       # the TSS descriptor takes two slots
FLAT_LIMIT_PAGES = 0xFFFFF

STAR_VALUE = ((USER_CS32 & ~x86.SELECTOR_RPL_MASK | 3) << x86.STAR_SYSRET_CS_SHIFT) | \
    (KERNEL_CS << x86.STAR_SYSCALL_CS_SHIFT)

CR0_LONG = (x86.CR0_PE | x86.CR0_MP | x86.CR0_ET | x86.CR0_NE | x86.CR0_WP
            | x86.CR0_AM | x86.CR0_PG)
CR4_LONG = x86.CR4_PAE | x86.CR4_OSFXSR | x86.CR4_OSXMMEXCPT
EFER_LONG = x86.EFER_LME | x86.EFER_LMA | x86.EFER_SCE | x86.EFER_NXE

# Names passed to every assembled file as -D, so .S sources and Python share
# one definition.
ASM_DEFINES = {
    "KERNEL_CS": KERNEL_CS, "KERNEL_DS": KERNEL_DS, "USER_CS": USER_CS,
    "USER_DS": USER_DS, "USER_CS32": USER_CS32, "TSS_SEL": TSS_SEL,
    "USER_STACK_TOP": USER_STACK_TOP, "KERNEL_STACK_TOP": KERNEL_STACK_TOP,
    "IDT_GPA": IDT_GPA, "APIC_BASE": x86.APIC_DEFAULT_BASE,
}

FLAT_DIR = Path(__file__).resolve().parent / "flat"


@dataclass
class FlatBinary:
    image: bytes
    org: int
    symbols: dict[str, int] = field(default_factory=dict)

    def sym(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise KeyError(f"symbol {name!r} not in flat binary") from None


def assemble(source: str | Path, org: int = CODE_ORG, defines: dict | None = None) -> FlatBinary:
    """Assemble a .S (path, name in vmm/flat/, or source text) into a flat
    binary linked at `org`."""
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                    and source.endswith(".S")):
        p = Path(source)
        if not p.is_absolute() and not p.exists():
            p = FLAT_DIR / p
        name, text = p.stem, p.read_text()
    else:
        name, text = "inline", source
    defs = dict(ASM_DEFINES)
    defs.update(defines or {})
    built = toolchain.build(f"flat/{name}", [toolchain.Source("guest.S", text)],
                            cflags=["-nostdlib", "-ffreestanding"], defines=defs,
                            link=toolchain.Link(address=org, entry="_start"),
                            flat=["-j", ".text", "-j", ".data", "-j", ".rodata"])
    return FlatBinary(built.flat, org, built.symbols)


def _segment(sel: int, code: bool, dpl: int) -> KvmSegment:
    return KvmSegment(base=0, limit=0xFFFFFFFF, selector=sel,
                      type=x86.SEG_TYPE_CODE_XR_A if code else x86.SEG_TYPE_DATA_RW_A,
                      present=1, dpl=dpl, db=0 if code else 1, s=1, l=1 if code else 0, g=1)


class FlatVm:
    """One VM + one vCPU in 64-bit mode at CPL0, ready to run `binary`.

    gates: {vector: (symbol, dpl, ist)} written into the IDT. By default
    every symbol named isr_<n> becomes an interrupt gate with DPL 0 and
    every uisr_<n> one with DPL 3 (reachable by `int n` from CPL3).
    """

    def __init__(self, kvm: Kvm, binary: FlatBinary, mem_size: int = DEFAULT_MEM_SIZE,
                 irqchip: bool = False, gates: dict | None = None, entry: str = "_start"):
        self.kvm = kvm
        self.binary = binary
        self.vm: Vm = kvm.create_vm()
        self.mem = GuestMemory(mem_size, name="flat")
        try:
            self.vm.add_memory(0, self.mem)
            if irqchip:
                self.vm.create_irqchip()
            self.vcpu: Vcpu = self.vm.create_vcpu(0)
            self.vcpu.set_cpuid(kvm.supported_cpuid())
            self._build_tables(gates)
            self.mem.write(binary.org, binary.image)
            self._enter_long_mode(binary.sym(entry))
        except BaseException:
            self.close()
            raise

    def _build_tables(self, gates):
        m = self.mem
        gdt = [0] * (GDT_TSS)
        gdt[GDT_KCODE] = x86.make_seg_descriptor(0, FLAT_LIMIT_PAGES, x86.SEG_TYPE_CODE_XR_A, 0, long=True)
        gdt[GDT_KDATA] = x86.make_seg_descriptor(0, FLAT_LIMIT_PAGES, x86.SEG_TYPE_DATA_RW_A, 0)
        gdt[GDT_UCODE32] = x86.make_seg_descriptor(0, FLAT_LIMIT_PAGES, x86.SEG_TYPE_CODE_XR_A, 3)
        gdt[GDT_UDATA] = x86.make_seg_descriptor(0, FLAT_LIMIT_PAGES, x86.SEG_TYPE_DATA_RW_A, 3)
        gdt[GDT_UCODE] = x86.make_seg_descriptor(0, FLAT_LIMIT_PAGES, x86.SEG_TYPE_CODE_XR_A, 3, long=True)
        for i, d in enumerate(gdt):
            m.write_u64(GDT_GPA + 8 * i, d)
        m.write(GDT_GPA + 8 * GDT_TSS, x86.make_system_descriptor16(
            TSS_GPA, x86.TSS64_SIZE - 1, x86.SYS_TYPE_TSS64_AVAIL))
        m.write(TSS_GPA, x86.make_tss64(KERNEL_STACK_TOP, [IST1_STACK_TOP]))
        if gates is None:
            gates = {}
            for name in self.binary.symbols:
                prefix, _, num = name.partition("_")
                if prefix in ("isr", "uisr") and num.isdigit():
                    gates[int(num)] = (name, 3 if prefix == "uisr" else 0, 0)
        for vec, (symname, dpl, ist) in gates.items():
            m.write(IDT_GPA + vec * x86.GATE_SIZE, x86.make_gate(
                self.binary.sym(symname), KERNEL_CS, ist, x86.SYS_TYPE_INT_GATE, dpl))
        # identity map 0-4 GiB with 2 MiB pages; user-accessible so CPL3
        # test code can run from the same image
        flags = x86.PTE_P | x86.PTE_RW | x86.PTE_US | x86.PTE_A | x86.PTE_D
        m.write_u64(PML4_GPA, PDPT_GPA | flags)
        for g in range(PD_COUNT):
            pd = PD_GPA + g * x86.PAGE_SIZE
            m.write_u64(PDPT_GPA + 8 * g, pd | flags)
            extra = x86.PTE_PCD | x86.PTE_PWT if g == MMIO_GIB else 0
            for i in range(x86.PT_ENTRIES):
                gpa = g * x86.HUGE_PAGE_SIZE + i * x86.LARGE_PAGE_SIZE
                m.write_u64(pd + 8 * i, gpa | flags | extra | x86.PTE_PS)

    def _enter_long_mode(self, rip: int):
        s = self.vcpu.get_sregs()       # keeps apic_base as KVM set it
        s.cs = _segment(KERNEL_CS, True, 0)
        s.ds = s.es = s.fs = s.gs = s.ss = _segment(KERNEL_DS, False, 0)
        s.tr.base, s.tr.limit, s.tr.selector = TSS_GPA, x86.TSS64_SIZE - 1, TSS_SEL
        s.tr.type, s.tr.present, s.tr.s, s.tr.dpl = x86.SYS_TYPE_TSS64_BUSY, 1, 0, 0
        s.tr.l = s.tr.db = s.tr.g = 0
        s.tr.unusable = 0
        s.ldt.selector, s.ldt.present, s.ldt.unusable = 0, 0, 1
        s.gdt.base, s.gdt.limit = GDT_GPA, GDT_LIMIT
        s.idt.base, s.idt.limit = IDT_GPA, x86.IDT_ENTRIES * x86.GATE_SIZE - 1
        s.cr0, s.cr3, s.cr4, s.efer = CR0_LONG, PML4_GPA, CR4_LONG, EFER_LONG
        self.vcpu.set_sregs(s)
        r = self.vcpu.get_regs()
        r.rip, r.rsp, r.rflags = rip, KERNEL_STACK_TOP, x86.RFLAGS_FIXED
        self.vcpu.set_regs(r)
        self.vcpu.set_msrs({x86.MSR_STAR: STAR_VALUE})

    def sym(self, name: str) -> int:
        return self.binary.sym(name)

    def close(self):
        vm = getattr(self, "vm", None)
        if vm is not None:
            vm.close()
        self.mem.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def cpl(cs_selector: int) -> int:
    return cs_selector & x86.SELECTOR_RPL_MASK
