"""A PV domain: guest RAM + VMM region, one KVM VM, the shim, the builder,
the vCPU run loop and the slow-hypercall exit to Python.

    dom = Domain(kernel_image, ram_size=16 << 20)
    result = dom.run(timeout=10)      # -> RunResult(reason, console, ...)

SMP (nr_vcpus > 1): vCPU 0 runs on the thread that calls run(); the guest
brings the others up with VCPUOP_initialise / VCPUOP_up, and each then runs
on a thread of its own (_vcpu_loop).  Locking:

* `_hypercall_lock` serialises the Python hypercall handlers of all vCPUs
  (Xen's domain lock, coarser); the shim's own paths run in parallel;
* `_cond` guards the run state every vCPU thread reads between KVM_RUNs:
  stop, pause, which vCPUs are online, the result that ends the domain;
  a vCPU thread waits on it while paused or down, using no CPU;
* back-ends run under the notifier's backend_lock (notify.py), taken
  after `_hypercall_lock` when a hypercall sends to a back-end, never
  before it.
"""
from __future__ import annotations

import array
import collections
import contextlib
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from pyvmm.vmm import x86
from pyvmm.vmm.kvm import ExitReason, Kvm, KvmError, KvmSegment, KvmXcrs
from pyvmm.vmm.memory import GuestMemory
from pyvmm.vmm.quirks import on_kvm_pvm

from pyvmm.xen_abi import abi
from pyvmm.xen_abi.memory import vmm_region as R
from pyvmm.xen_abi.shim import priv
from pyvmm.xen_abi.shim.layout import CPUID_ENT, EVENTS, GLOBALS, MAILBOX, PERCPU, SHIM_EXIT_PORT, MailboxOp
from pyvmm.xen_abi.boot.builder import build_pv_domain, cmdline_with_cpu_count
from pyvmm.xen_abi.hypervisor.channels import DomainChannels
from pyvmm.xen_abi.hypervisor.evtchn import EventChannels
from pyvmm.xen_abi.hypervisor.grant_table import GrantTable
from pyvmm.xen_abi.memory.guest_va import GuestVirtualMemory
from pyvmm.xen_abi.memory.page_types import PageTypes
from pyvmm.xen_abi.hypervisor.hypercalls.context import (DomainShutdown, HypercallContext, PvDomainBase,
                                                         ShimRequest)
from pyvmm.xen_abi.hypervisor.hypercalls.dispatch import HypercallDispatcher
from pyvmm.xen_abi.hypervisor.listeners import Listeners, SlowHypercall
from pyvmm.xen_abi.hypervisor.notify import EventNotifier, ShimFifo
from pyvmm.xen_abi.hypervisor.reservation import Reservation
from pyvmm.xen_abi.hypervisor import time as time_
from pyvmm.xen_abi.hypervisor.time import DomainClock
from pyvmm.xen_abi.boot.loader import KernelImage, load_kernel
from pyvmm.xen_abi.memory.physmem import PhysicalMemory
from pyvmm.xen_abi.shim.build import build_shim

MASK64 = (1 << 64) - 1

# syscall entry: the shim's private CS/SS pair and Xen's sysret pair
# (sysret loads CS = base+16, SS = base+8 from 0xe023: 0xe033 / 0xe02b).
STAR = (abi.FLAT_RING3_CS32 << x86.STAR_SYSRET_CS_SHIFT) | (R.SHIM_CS << x86.STAR_SYSCALL_CS_SHIFT)
SFMASK = x86.RFLAGS_TF | x86.RFLAGS_IF | x86.RFLAGS_DF | x86.RFLAGS_AC | x86.RFLAGS_NT
INITIAL_RFLAGS = x86.RFLAGS_IF | x86.RFLAGS_FIXED
XSTATE_FP_SSE = 0x3   # XCR0 x87|SSE: what Xen gives a PV vCPU before its xsetbv
# Console output a domain keeps (read_console, RunResult.console): a guest
# that writes without end must not grow the host without end.
CONSOLE_HISTORY = 1 << 20


class ShimPanic(RuntimeError):
    """The shim hit a fault it cannot attribute to the guest (a shim bug)."""


class DomainTimeout(RuntimeError):
    pass


@dataclass
class RunResult:
    reason: abi.ShutdownReason
    console: bytes             # its last CONSOLE_HISTORY bytes of console output
    crash_info: dict | None = None
    slow_exits: int = 0
    elapsed: float = 0.0
    exit_counts: dict = field(default_factory=dict)   # Domain.exit_counts at the end
    stopped: bool = False      # ended by Domain.stop() from the host (reason: poweroff)

    @property
    def text(self) -> str:
        return self.console.decode(errors="replace")


class ConsoleHistory:
    """The last `limit` bytes of a guest's console output, and how many it
    wrote in all: offsets count from the guest's first byte, so a reader
    goes on where it left off while the oldest output is let go."""

    def __init__(self, limit: int = CONSOLE_HISTORY):
        self.limit = limit
        self.total = 0
        self._tail = bytearray()

    def append(self, data: bytes) -> None:
        self.total += len(data)
        self._tail += data[-self.limit:]
        excess = len(self._tail) - self.limit
        if excess > 0:
            del self._tail[:excess]

    @property
    def start(self) -> int:
        """The offset of the oldest byte kept."""
        return self.total - len(self._tail)

    def read(self, offset: int = 0) -> bytes:
        """What is kept from `offset` on (from the oldest byte kept, if `offset` is older)."""
        return bytes(self._tail[max(offset - self.start, 0):])


def _seg(sel: int, *, code: bool, dpl: int, long: bool) -> KvmSegment:
    return KvmSegment(base=0, limit=0xFFFFFFFF, selector=sel,
                      type=x86.SEG_TYPE_CODE_XR_A if code else x86.SEG_TYPE_DATA_RW_A,
                      present=1, dpl=dpl, db=0 if long else 1, s=1, l=1 if long else 0, g=1)


def _null_seg() -> KvmSegment:
    return KvmSegment(selector=0, unusable=1, present=0)


class Domain(PvDomainBase):
    def __init__(self, kernel: KernelImage | bytes | str, *, ram_size: int = 16 << 20,
                 cmdline: str = "", initrd: bytes | None = None, echo: bool = False,
                 kvm: Kvm | None = None, is_pvm: bool | None = None, name: str = "domU",
                 uuid: str | None = None, nr_vcpus: int = 1, vcpus_online: int | None = None):
        # nr_vcpus: the most the guest may bring up (xl's maxvcpus); xenstore
        # offers the first vcpus_online (default all) to it as "online"
        if not 1 <= nr_vcpus <= R.MAX_VCPUS:
            raise ValueError(f"nr_vcpus must be 1..{R.MAX_VCPUS}, got {nr_vcpus}")
        if vcpus_online is not None and not 1 <= vcpus_online <= nr_vcpus:
            raise ValueError(f"vcpus_online must be 1..{nr_vcpus}, got {vcpus_online}")
        if not isinstance(kernel, KernelImage):
            kernel = load_kernel(kernel)
        self.echo = echo
        self._console_history = ConsoleHistory()
        self.is_pvm = on_kvm_pvm() if is_pvm is None else is_pvm
        self.kvm = kvm or Kvm()
        self._own_kvm = kvm is None
        self.vm = self.kvm.create_vm()
        self.vm.create_irqchip()          # LAPIC: the shim's timer and event-check vectors
        self.notifier = None              # kicks before it exists find nothing to wake
        # observers (listeners.py): trace.py, the CLI's terminal, benchmarks
        self.on_vcpu_exit = Listeners("vCPU exit")
        self.on_hypercall = Listeners("hypercall")
        self.on_console_output = Listeners("console output")
        self._console_lock = threading.Lock()
        self.ram = GuestMemory(ram_size, name="ram")
        self.region = R.VmmRegion(ram_size, nr_vcpus=nr_vcpus, is_pvm=self.is_pvm)
        # where XENMEM_machphys_mapping puts the M2P (vmm_region: kvm_pvm quirk)
        self.m2p_va = R.M2P_ALIAS_VA if self.is_pvm else R.M2P_VA
        self.phys = PhysicalMemory([(0, self.ram), (self.region.gpa, self.region.mem)])
        self.shim = build_shim()
        self.slow_exits = 0
        self._stop_requested = False
        self._pause_requested = False
        self._cond = threading.Condition()     # the run state below (module docstring)
        self._hypercall_lock = threading.RLock()
        self._shim_requests: dict = {}   # vCPU -> (ctx, nr, args, rip) of a hypercall waiting on the shim
        self._online = [i == 0 for i in range(nr_vcpus)]   # VCPUOP_up / down
        self._started = [False] * nr_vcpus     # has a thread (vCPU 0: run())
        self._parked = set()                   # vCPU threads waiting: paused or down
        self._clock_paused = False
        self._result: RunResult | None = None  # how the domain ended, first vCPU to see it
        self._failure: BaseException | None = None   # a secondary vCPU thread's exception
        self._threads: list[threading.Thread] = []
        self._initial_context: dict[int, object] = {}   # VCPUOP_initialise, for the first up
        self.vcpu_tids: dict[int, int] = {}    # vCPU -> host thread id (its CPU time: bench/smp.py)
        self._down_since = [0] * nr_vcpus      # system time a vCPU went down (secondaries: from boot)
        self.exit_counts = collections.Counter()   # exits to Python by _exit_key (bench/boot.py)
        self._install_region()
        self.vm.add_memory(0, self.ram)
        self.vm.add_memory(self.region.gpa, self.region.mem)
        self.layout = build_pv_domain(
            self.ram, kernel, initrd=initrd, cmdline=cmdline_with_cpu_count(cmdline, nr_vcpus),
            shared_info_mfn=self.region.shared_info_mfn,
            hypervisor_l4_entries=self.region.hypervisor_l4_entries(),
            ram_is_zero=True)          # self.ram is a fresh memfd
        self._adjust_bootstrap_tables()
        # ports 1..MAX_EVTCHN_PORT, either ABI (xl's default max_event_channels)
        evtchn = EventChannels(self.phys, self.region.shared_info_gpa, nr_vcpus, kick=self.kick,
                               nr_ports=abi.MAX_EVTCHN_PORT + 1)
        reg = self.region
        page_types = PageTypes(reg.mem.address + reg.page_type_off, reg.ram_pages)
        gnttab = GrantTable(self.phys, self.region.gpa_of(R.GRANT_OFF), max_frames=R.MAX_GRANT_FRAMES,
                            page_types=page_types)
        super().__init__(phys=self.phys, nr_vcpus=nr_vcpus, e820=self.layout.e820,
                         shared_info_gpa=self.region.shared_info_gpa, evtchn=evtchn, gnttab=gnttab,
                         page_types=page_types)
        self.reservation = Reservation(
            self.ram, m2p_write=lambda mfn, v: reg.mem.write_u64(reg.m2p_off + 8 * mfn, v),
            page_types=page_types)
        self.dispatcher = HypercallDispatcher(self)
        self.vcpus = [self.vm.create_vcpu(i) for i in range(nr_vcpus)]
        self.vcpu = self.vcpus[0]
        for vcpu in self.vcpus:       # before DomainClock adds the LAPIC bits
            vcpu.set_cpuid(self.kvm.supported_cpuid())
        self._setup_vcpu(0)
        EVENTS.write(self.region.mem, self.region.vcpus[0].events_off, online=1, initialised=1)
        self.name = name
        self.notifier = EventNotifier(self.vm, self.region, self.evtchn)
        self.evtchn.fifo_shim = ShimFifo(self.region, self.phys)
        self.clock = DomainClock(self.kvm, self.vcpus, self.region, self.phys)   # LAPIC timers, pvclock

        self.channels = DomainChannels(self.evtchn, self.gnttab, self.ram, self.layout, self.page_types,
                                       domid=self.domid, name=name, uuid=uuid, nr_vcpus=len(self.region.vcpus),
                                       console_write=self.console_write, vcpus_online=vcpus_online)
        self.backends: list = []                      # split-driver back-ends (attach())

    # ---- devices ----
    @property
    def store(self):
        """The domain's xenstore (what back-ends and tools read and write)."""
        return self.channels.store

    def attach(self, backend):
        """Keep a back-end (backends/xenbus.py) for the domain's lifetime:
        it is closed, before the memory it maps, when the domain is."""
        self.backends.append(backend)
        return backend

    # ---- set-up ----
    def _install_region(self):
        reg, m, shim = self.region, self.region.mem, self.shim
        m.write(R.SHIM_OFF, shim.image)
        reg.build_tables(shim.size)
        # shared_info: events masked on every vCPU, as Xen's builder leaves them
        for v in range(abi.XEN_LEGACY_MAX_VCPUS):
            m.write(R.SHARED_INFO_OFF + v * abi.VCPU_INFO_SIZE + abi.VCPU_INFO_UPCALL_MASK, b"\x01")
        # CPUID policy for the forced-emulation prefix
        self.cpuid_table = self._cpuid_policy()
        packed = b"".join(CPUID_ENT.pack(*(x & 0xFFFFFFFF for x in e)) for e in self.cpuid_table)
        if len(packed) > R.PAGE:
            raise RuntimeError("CPUID policy does not fit its page")
        m.write(R.CPUID_OFF, packed)
        GLOBALS.write(m, R.GLOBALS_OFF, shared_info=reg.shared_info_va, cpuid_table=reg.va(R.CPUID_OFF),
                      nr_cpuid=len(self.cpuid_table), directmap=R.DIRECTMAP_VA,
                      ram_pages=reg.ram_pages, m2p=reg.va(reg.m2p_off),
                      page_type=reg.va(reg.page_type_off), tlb_stamp=reg.va(reg.tlb_stamp_off),
                      region_gpa=reg.gpa)
        for slot, e in reg.hypervisor_l4_entries().items():
            m.write_u64(R.GLOBALS_OFF + GLOBALS.offset("l4_slots", slot - abi.HYPERVISOR_L4_FIRST_SLOT), e)
        # IDT (shared by all vCPUs)
        vec_base = shim.sym("shim_vectors")
        ist = {x86.VEC_DF: R.IST_DF, x86.VEC_NMI: R.IST_NMI, x86.VEC_MC: R.IST_MC}
        idt = b"".join(x86.make_gate(vec_base + 16 * v, R.SHIM_CS, ist.get(v, 0), x86.SYS_TYPE_INT_GATE,
                                     3 if v in R.USER_GATES else 0) for v in range(x86.IDT_ENTRIES))
        m.write(R.IDT_OFF, idt)
        for v in reg.vcpus:
            self._install_vcpu_area(v)

    def _install_vcpu_area(self, v: R.VcpuArea):
        reg, m = self.region, self.region.mem
        # GDT page 14: Xen's flat ring-3 selectors (DPL 3) + the shim's own
        gdt14 = v.gdt_off + abi.FIRST_RESERVED_GDT_BYTE
        def put(sel, desc):
            m.write(gdt14 + (sel & ~7) - abi.FIRST_RESERVED_GDT_BYTE, desc)
        put(abi.FLAT_RING3_CS32, struct.pack("<Q", x86.make_seg_descriptor(0, 0xFFFFF, x86.SEG_TYPE_CODE_XR_A, 3)))
        put(abi.FLAT_RING3_DS32, struct.pack("<Q", x86.make_seg_descriptor(0, 0xFFFFF, x86.SEG_TYPE_DATA_RW_A, 3)))
        put(abi.FLAT_RING3_CS64, struct.pack("<Q", x86.make_seg_descriptor(0, 0xFFFFF, x86.SEG_TYPE_CODE_XR_A, 3, long=True)))
        put(R.SHIM_CS, struct.pack("<Q", x86.make_seg_descriptor(0, 0xFFFFF, x86.SEG_TYPE_CODE_XR_A, 0, long=True)))
        put(R.SHIM_DS, struct.pack("<Q", x86.make_seg_descriptor(0, 0xFFFFF, x86.SEG_TYPE_DATA_RW_A, 0)))
        put(R.SHIM_TSS, x86.make_system_descriptor16(reg.va(v.tss_off), x86.TSS64_SIZE - 1, TSS_BUSY))
        blk = v.stack_block_off
        m.write(v.tss_off, x86.make_tss64(reg.va(blk + R.STACK_TOP),
                                          [reg.va(blk + R.IST_DF_TOP), reg.va(blk + R.IST_NMI_TOP),
                                           reg.va(blk + R.IST_MC_TOP)]))
        m.write(v.tramp_off, syscall_trampoline(reg.va(v.tramp_off),
                                                reg.va(v.percpu_off + PERCPU.offset("syscall_rsp")),
                                                reg.va(blk + R.STACK_TOP), self.shim.sym("shim_syscall_entry")))
        PERCPU.write(m, v.percpu_off, vcpu_id=v.index,
                     vcpu_info=reg.shared_info_va + v.index * abi.VCPU_INFO_SIZE,
                     lstar=reg.va(v.tramp_off), kernel_mode=1, mailbox=reg.va(v.mailbox_off))
        priv.init_vcpu(m, v.percpu_off, len(reg.vcpus))   # emulator state + counters (shim/priv.c)

    def _cpuid_policy(self):
        from pyvmm.xen_abi.boot.cpuid import build_pv_cpuid, with_native_feature_leaves
        host = self.kvm.supported_cpuid()
        if self.is_pvm:
            # guest code sees the host's leaves 1/7 and runs with the host's
            # XCR0 there: offer the kernel what user space will really use
            from pyvmm.vmm import hostcpu
            host = with_native_feature_leaves(host, hostcpu.cpuid)
        return build_pv_cpuid(host)

    def _adjust_bootstrap_tables(self):
        """Xen's pin-time adjust_guest_l1e on the bootstrap tables: present
        L1 entries get _PAGE_USER (the kernel runs in ring 3).  Later
        mappings are adjusted by the shim (mmu_update, update_va_mapping,
        and lazily on the first kernel-mode access).  A table at a time
        through the RAM's 64-bit view: ~40 pages of 512 entries, which one
        read_u64/write_u64 call each made ~0.4 s of a boot at TCG speed."""
        words = self.ram.u64
        for pfn in self.layout.page_table_pfns:
            first = pfn << (abi.PAGE_SHIFT - 3)
            table = words[first:first + 512]
            table[:] = array.array("Q", [e | x86.PTE_US if e & x86.PTE_P else e for e in table])

    def _setup_vcpu(self, index: int):
        """vCPU 0 as Xen's domain builder leaves it: kernel entry, the
        bootstrap stack and tables, start_info in rsi."""
        vcpu, reg, lay = self.vcpus[index], self.region, self.layout
        v = reg.vcpus[index]
        PERCPU.write(reg.mem, v.percpu_off, cr3_kernel=lay.l4_pfn << abi.PAGE_SHIFT,
                     kernel_sp=lay.stack_top, kernel_ss=abi.FLAT_KERNEL_SS)
        self._setup_sregs(index, cr3=lay.l4_pfn << abi.PAGE_SHIFT,
                          cs=abi.FLAT_KERNEL_CS64, ss=abi.FLAT_KERNEL_SS)
        r = vcpu.get_regs()
        for name in ("rax", "rbx", "rcx", "rdx", "rdi", "rbp", "r8", "r9", "r10", "r11",
                     "r12", "r13", "r14", "r15"):
            setattr(r, name, 0)
        r.rip, r.rsp, r.rsi, r.rflags = lay.entry, lay.stack_top, lay.start_info_va, INITIAL_RFLAGS
        vcpu.set_regs(r)
        self._setup_msrs(index, fs_base=0, gs_base=0, kernel_gs_base=0)

    def _setup_sregs(self, index: int, *, cr3: int, cs: int, ss: int) -> None:
        """Segments, descriptor tables, control registers of a vCPU about to
        start in guest mode (the shim's GDT and IDT; cs/ss: the guest's)."""
        vcpu, reg = self.vcpus[index], self.region
        v = reg.vcpus[index]
        s = vcpu.get_sregs()
        s.cs = _seg(cs | 3, code=True, dpl=3, long=True)
        s.ss = _seg(ss | 3, code=False, dpl=3, long=False)
        s.ds = s.es = s.fs = s.gs = _null_seg()
        s.tr = KvmSegment(base=reg.va(v.tss_off), limit=x86.TSS64_SIZE - 1, selector=R.SHIM_TSS,
                          type=TSS_BUSY, present=1, s=0)
        s.ldt = KvmSegment(selector=0, type=x86.SYS_TYPE_LDT, present=0, unusable=1)
        s.gdt.base, s.gdt.limit = reg.va(v.gdt_off), R.GDT_PAGES * R.PAGE - 1
        s.idt.base, s.idt.limit = reg.va(R.IDT_OFF), x86.IDT_ENTRIES * x86.GATE_SIZE - 1
        s.cr0 = x86.CR0_PE | x86.CR0_MP | x86.CR0_ET | x86.CR0_NE | x86.CR0_WP | x86.CR0_PG
        # SMEP only where the trampoline page can stay supervisor-only
        s.cr4 = x86.CR4_PAE | x86.CR4_OSFXSR | x86.CR4_OSXMMEXCPT | (0 if self.is_pvm else x86.CR4_SMEP)
        # Xen runs with CR4.OSXSAVE and its PV CPUID leaks it (cpuid.py); the
        # guest's xgetbv/xsave at CPL3 need it really set (priv.c: xsetbv)
        if any(e[0] == 1 and (e[4] >> 26) & 1 for e in self.cpuid_table):
            s.cr4 |= x86.CR4_OSXSAVE
        s.cr3 = cr3
        s.efer = x86.EFER_LME | x86.EFER_LMA | x86.EFER_SCE | x86.EFER_NXE
        vcpu.set_sregs(s)
        if s.cr4 & x86.CR4_OSXSAVE:
            # Xen's XCR0 for a PV vCPU until the guest's own xsetbv (KVM's
            # default is x87 alone)
            self._set_xcr0(XSTATE_FP_SSE, index)

    def _setup_msrs(self, index: int, *, fs_base: int, gs_base: int, kernel_gs_base: int) -> None:
        lstar = self.region.lstar(index)
        self.vcpus[index].set_msrs({
            x86.MSR_STAR: STAR, x86.MSR_LSTAR: lstar, x86.MSR_CSTAR: lstar, x86.MSR_SFMASK: SFMASK,
            x86.MSR_FS_BASE: fs_base, x86.MSR_GS_BASE: gs_base, x86.MSR_KERNEL_GS_BASE: kernel_gs_base})

    # ---- running ----
    def console_write(self, data: bytes) -> None:
        # console_io and the ring back-end: a ring drain in progress (other
        # thread) lands first, so a guest that waited for it sees its order
        with self.notifier.backend_lock if self.notifier else contextlib.nullcontext():
            with self._console_lock:
                self._console_history.append(data)
                if self.echo:
                    sys.stdout.buffer.write(data)
                    sys.stdout.flush()
            self.on_console_output(data)      # outside _console_lock: it may read_console()

    @property
    def console(self) -> bytes:
        """The console output kept: the last CONSOLE_HISTORY bytes."""
        return self.read_console()[0]

    def read_console(self, offset: int = 0) -> tuple[bytes, int]:
        """Console output from `offset` on, and the offset to continue from.
        Offsets count every byte the guest wrote; only the last
        CONSOLE_HISTORY bytes are kept, so an older offset reads from the
        oldest byte kept."""
        with self._console_lock:
            history = self._console_history
            return history.read(offset), history.total

    def send_console_input(self, data: bytes) -> int:
        """Queue input for the guest's console ring (raises its console port)."""
        return self.channels.send_console_input(data)

    def kick(self, vcpu_id: int) -> None:
        """A port of vcpu_id was raised from Python: event-check interrupt."""
        if self.notifier is not None:
            self.notifier.kick(vcpu_id)

    def _mailbox(self, index: int = 0):
        return self.region.mailbox_gpa(index)

    def _handle_shim_exit(self, index: int):
        """One exit through the shim port.  Returns a RunResult to stop."""
        mb = self._mailbox(index)
        p = self.phys
        op = MAILBOX.read(p, mb, "op")
        if op in (MailboxOp.HYPERCALL, MailboxOp.GRANT_PTE):
            if op == MailboxOp.HYPERCALL:
                if index in self._shim_requests:
                    raise ShimPanic(f"vCPU {index}: a hypercall while one waits on the shim")
                nr = MAILBOX.read(p, mb, "nr")
                args = tuple(MAILBOX.read(p, mb, "args", i) for i in range(6))
                cr3 = MAILBOX.read(p, mb, "cr3")
                vm = GuestVirtualMemory(p, cr3, page_types=self.page_types)
                ctx = HypercallContext(vcpu_id=index, vm=vm, phys=p,
                                       in_kernel_mode=bool(MAILBOX.read(p, mb, "kmode")))
                rip = MAILBOX.read(p, mb, "rip")
                call = lambda: self.dispatcher.dispatch(ctx, nr, args)   # noqa: E731
            else:   # the shim's answer to a ShimRequest (grant PTEs: shim/mmu.c)
                if index not in self._shim_requests:
                    raise ShimPanic(f"vCPU {index}: a shim answer with no request outstanding")
                ctx, nr, args, rip = self._shim_requests.pop(index)
                answer = MAILBOX.read(p, mb, "info")
                answer -= (answer >> 63) << 64
                call = lambda: self.dispatcher.resume(ctx, answer)   # noqa: E731
            self.notifier.enter_exit(index)
            try:
                with self._hypercall_lock:
                    rc = call()
            except BaseException as e:
                self.on_hypercall(SlowHypercall(index, nr, args, rip, error=e))
                if isinstance(e, DomainShutdown):
                    return e.reason, None
                raise
            finally:
                self.notifier.enter_exit(None)
            if isinstance(rc, ShimRequest):
                self._shim_requests[index] = (ctx, nr, args, rip)
                for i, v in enumerate(rc.args):
                    p.write_u64(mb + MAILBOX.offset("args", i), v & MASK64)
                MAILBOX.write(p, mb, op=rc.op)
                return None, None
            MAILBOX.write(p, mb, op=MailboxOp.HYPERCALL)
            self.on_hypercall(SlowHypercall(index, nr, args, rip, result=rc))
            self.clock.after_hypercall(nr, self.evtchn)
            MAILBOX.write(p, mb, result=rc & MASK64)
            return None, None
        if op == MailboxOp.SET_XCR0:      # the shim's xsetbv (validated there)
            MAILBOX.write(p, mb, result=0 if self._set_xcr0(MAILBOX.read(p, mb, "args", 0), index) else 1)
            return None, None
        info = {k: MAILBOX.read(p, mb, k) for k in ("info", "rip", "info2")}
        if op == MailboxOp.CRASH:
            return abi.ShutdownReason.crash, info
        if op == MailboxOp.PANIC:
            raise ShimPanic(f"shim fault: vector {info['info']:#x} at {info['rip']:#x} "
                            f"(cr2/err {info['info2']:#x})")
        raise ShimPanic(f"unknown shim exit op {op}")

    def _set_xcr0(self, value: int, index: int = 0) -> bool:
        """XCR0 of a vCPU through KVM (False if KVM refuses the value)."""
        x = KvmXcrs()
        x.nr_xcrs = 1
        x.xcrs[0].xcr = 0
        x.xcrs[0].value = value
        try:
            self.vcpus[index].set_xcrs(x)
        except KvmError:
            return False
        return True

    def vcpu_info_moved(self, vcpu_id: int, gpa: int) -> None:
        """VCPUOP_register_vcpu_info: point the shim at the new vcpu_info
        (guest RAM, reached through the shim's 1:1 map)."""
        if gpa < self.ram.size:
            va = R.DIRECTMAP_VA + gpa
        else:
            va = R.REGION_VA + (gpa - self.region.gpa)
        PERCPU.write(self.region.mem, self.region.vcpus[vcpu_id].percpu_off, vcpu_info=va)
        self.clock.vcpu_info_moved(vcpu_id, gpa)

    def vcpu_time_area_moved(self, vcpu_id: int, pieces) -> None:
        """VCPUOP_register_vcpu_time_memory_area: time.py keeps the copy."""
        self.clock.time_area_moved(vcpu_id, pieces)

    def now_ns(self) -> int:
        """Guest system time (ns): the pvclock's origin (time.py)."""
        return self.clock.now_ns()

    def _exit_key(self, ex, index: int = 0) -> str:
        """Name of one exit for exit_counts: "sched_op:yield" for a slow
        hypercall, "shim:block", "io:0x..." for another port, else the KVM
        exit reason ("intr", "hlt", ...)."""
        if ex.reason != ExitReason.IO:
            return getattr(ex.reason, "name", str(ex.reason)).lower()
        if ex.port != SHIM_EXIT_PORT:
            return f"io:{ex.port:#x}"
        mb, p = self._mailbox(index), self.phys
        op = MAILBOX.read(p, mb, "op")
        if op != MailboxOp.HYPERCALL:
            return f"shim:{_MBOP_NAMES.get(op, op)}"
        nr, a0 = MAILBOX.read(p, mb, "nr"), MAILBOX.read(p, mb, "args", 0)
        try:
            name = abi.Hypercall(nr).name
        except ValueError:
            return f"hypercall_{nr}"
        sub = _HYPERCALL_SUBOPS.get(nr)
        if sub is None:
            return name
        try:      # the guest's own sub-op number: may be anything
            return f"{name}:{sub(a0 & (abi.MEMOP_CMD_MASK if nr == abi.Hypercall.memory_op else MASK64)).name}"
        except ValueError:
            return f"{name}:{a0 & 0xFFFF}"

    # ---- the vCPUs of an SMP guest (VCPUOP_initialise / up / down) ----
    def vcpu_initialise(self, vcpu_id: int, c) -> None:
        """VCPUOP_initialise, Python's half (vcpu_op.py checked the context;
        the shim took its GDT and base pointers): the callbacks, trap table
        and kernel stack into the vCPU's percpu block, the registers kept
        for its first VCPUOP_up.  The vCPU is not running."""
        m, off = self.region.mem, self.region.vcpus[vcpu_id].percpu_off
        cb_mask = 0
        if c.flags & abi.VGCF_FAILSAFE_DISABLES_EVENTS:
            cb_mask |= 1 << abi.CallbackType.FAILSAFE
        if c.flags & abi.VGCF_SYSCALL_DISABLES_EVENTS:
            cb_mask |= 1 << abi.CallbackType.SYSCALL
        PERCPU.write(m, off, kernel_sp=c.kernel_sp, kernel_ss=c.kernel_ss,
                     kernel_mode=1 if c.flags & abi.VGCF_IN_KERNEL else 0,
                     event_cb=c.event_callback_eip, failsafe_cb=c.failsafe_callback_eip,
                     syscall_cb=c.syscall_callback_eip, cb_mask=cb_mask, vcr0_ts=0)
        traps = bytearray()
        for t in c.trap_ctxt:
            traps += struct.pack("<QQ", t.address, t.flags)
        m.write(off + PERCPU.offset("traps"), bytes(traps))
        rflags = c.user_regs.rflags
        priv.set_iopl(m, off, (rflags >> 12) & 3)    # Xen: the IOPL bits are the virtual IOPL
        self._initial_context[vcpu_id] = c
        EVENTS.write(m, self.region.vcpus[vcpu_id].events_off, initialised=1)

    def _load_initial_context(self, index: int) -> None:
        """The registers of a VCPUOP_initialise context into KVM (its first up)."""
        c = self._initial_context.pop(index)
        u = c.user_regs
        kernel = bool(c.flags & abi.VGCF_IN_KERNEL)
        pc = PERCPU.read(self.region.mem, self.region.vcpus[index].percpu_off,
                         "cr3_kernel" if kernel else "cr3_user")
        self._setup_sregs(index, cr3=pc, cs=u.cs, ss=u.ss)
        self._load_ldtr(index)
        r = self.vcpus[index].get_regs()
        for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10",
                     "r11", "r12", "r13", "r14", "r15", "rip"):
            setattr(r, name, getattr(u, name))
        r.rflags = (u.rflags & x86.RFLAGS_GUEST_SETTABLE) | INITIAL_RFLAGS
        self.vcpus[index].set_regs(r)
        # in kernel mode the user GS base is the inactive one (Xen's toggle_guest_mode)
        gs, shadow = (c.gs_base_kernel, c.gs_base_user) if kernel else (c.gs_base_user, c.gs_base_kernel)
        self._setup_msrs(index, fs_base=c.fs_base, gs_base=gs, kernel_gs_base=shadow)
        # with the in-kernel LAPIC a vCPU other than the BSP waits for INIT/SIPI
        self.vcpus[index].set_mp_state(KVM_MP_STATE_RUNNABLE)

    def _load_ldtr(self, index: int) -> None:
        """LDTR from the LDT descriptor the shim wrote into the vCPU's GDT
        when it took the context's LDT (mmu.c mmu_vcpu_context); none if
        it is not present."""
        v = self.region.vcpus[index]
        lo, hi = struct.unpack("<QQ", self.region.mem.read(v.gdt_off + R.SHIM_LDT, 16))
        if not lo >> 47 & 1:
            return
        base = (lo >> 16 & 0xFFFFFF) | (lo >> 56 & 0xFF) << 24 | (hi & 0xFFFFFFFF) << 32
        limit = (lo & 0xFFFF) | (lo >> 48 & 0xF) << 16
        s = self.vcpus[index].get_sregs()
        s.ldt = KvmSegment(base=base, limit=limit, selector=R.SHIM_LDT, type=x86.SYS_TYPE_LDT, present=1)
        self.vcpus[index].set_sregs(s)

    def vcpu_up(self, vcpu_id: int) -> None:
        """VCPUOP_up (vcpu_op.py checked it is initialised): start its thread
        the first time, else wake it where VCPUOP_down left it."""
        with self._cond:
            self._online[vcpu_id] = True
            start = not self._started[vcpu_id]
            self._started[vcpu_id] = True
            self._cond.notify_all()
        if start:
            self._load_initial_context(vcpu_id)
            self._count_offline(vcpu_id)
            EVENTS.write(self.region.mem, self.region.vcpus[vcpu_id].events_off, online=1)
            t = threading.Thread(target=self._secondary, args=(vcpu_id,), name=f"pyvmm-vcpu{vcpu_id}",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _count_offline(self, index: int) -> None:
        """A vCPU comes up: the time since it went down is "offline"."""
        off = self.region.vcpus[index].events_off
        down = max(0, self.now_ns() - self._down_since[index])
        EVENTS.write(self.region.mem, off, offline_ns=EVENTS.read(self.region.mem, off, "offline_ns") + down)

    # ---- runstate accounting (vcpu_op.py; the shim writes the area on ticks) ----
    def runstate_times(self, st) -> tuple[int, list[int]]:
        now = self.now_ns()
        times = time_.runstate_times(self.region.mem, self.region.vcpus[st.vcpu_id].events_off, now)
        if not self._online[st.vcpu_id]:       # down now: the time since counts as offline
            extra = max(0, now - self._down_since[st.vcpu_id])
            times[abi.RUNSTATE_offline] += extra
            times[abi.RUNSTATE_running] = max(0, times[abi.RUNSTATE_running] - extra)
        return now, times

    def runstate_area_moved(self, vcpu_id: int, va: int) -> None:
        # the shim's next tick writes the new area whatever changed since
        EVENTS.write(self.region.mem, self.region.vcpus[vcpu_id].events_off, runstate_va=va,
                     runstate_written=MASK64)

    def vm_assist_changed(self, value: int) -> None:
        flag = value >> abi.VmAssistType.RUNSTATE_UPDATE_FLAG & 1
        for v in self.region.vcpus:
            EVENTS.write(self.region.mem, v.events_off, runstate_update_flag=flag)

    def online_vcpus(self) -> list[int]:
        """The vCPUs that are up (VCPUOP_up and not down since)."""
        with self._cond:
            return [i for i, up in enumerate(self._online) if up]

    def vcpu_down(self, vcpu_id: int) -> None:
        """VCPUOP_down: the vCPU stops before it next enters the guest (its
        own hypercall returns 0 when it is up again, as under Xen)."""
        with self._cond:
            self._online[vcpu_id] = False
        self.vcpus[vcpu_id].kick()

    def _secondary(self, index: int) -> None:
        try:
            self._vcpu_loop(index, None, None)
        except BaseException as e:       # to run(), on vCPU 0's thread
            with self._cond:
                if self._failure is None and self._result is None:
                    self._failure = e
                self._cond.notify_all()
            self._kick_all()

    def _kick_all(self, but: int | None = None) -> None:
        for i, v in enumerate(self.vcpus):
            if i != but:
                v.kick()

    # ---- stop, pause ----
    def stop(self) -> None:
        """From any thread: make run() return soon (RunResult.stopped), as
        `xl destroy` would; the guest is not told."""
        with self._cond:
            self._stop_requested = True
            self._cond.notify_all()
        self._kick_all()

    @property
    def paused(self) -> bool:
        """pause() took: every started vCPU is out of KVM_RUN, waiting."""
        with self._cond:
            return self._all_parked()

    def _all_parked(self) -> bool:
        return self._pause_requested and self._parked >= {i for i, s in enumerate(self._started) if s}

    def pause(self, wait: float = 0.0) -> bool:
        """From another thread, as `xl pause`: every vCPU leaves KVM_RUN and
        waits, using no CPU, the guest's clock stopped (time.py); back-ends
        keep serving what is in flight, and events raised meanwhile stay
        pending.  Waits up to `wait` seconds for the vCPUs to stop; returns
        whether they have."""
        with self._cond:
            self._pause_requested = True
        self._kick_all()
        with self._cond:
            return self._cond.wait_for(lambda: self._all_parked() or self._stop_requested, wait)

    def unpause(self) -> None:
        with self._cond:
            self._pause_requested = False
            if self._clock_paused:          # every vCPU is still out of KVM_RUN
                self.clock.resume()
                self._clock_paused = False
            self._cond.notify_all()

    def _park(self, index: int, deadline: float | None = None) -> None:
        """On a vCPU thread, with _cond held: wait while paused or down (or
        until the domain ends, or `deadline` passes).  The last vCPU to
        stop for a pause stops the guest's clock; a vCPU that was down
        flushes its TLB."""
        was_down = not self._online[index]
        events = self.region.vcpus[index].events_off
        if was_down:     # other vCPUs' TLB flushes stop waiting for this one (smp.c)
            EVENTS.write(self.region.mem, events, online=0)
            self._down_since[index] = self.now_ns()
        self._parked.add(index)
        try:
            while ((self._pause_requested or not self._online[index]) and not self._ending()
                   and (deadline is None or time.monotonic() < deadline)):
                if self._all_parked() and not self._clock_paused:
                    self.clock.pause()
                    self._clock_paused = True
                    self._cond.notify_all()
                self._cond.wait(0.5)
        finally:
            self._parked.discard(index)
        if was_down and self._online[index]:
            vcpu = self.vcpus[index]
            vcpu.set_sregs(vcpu.get_sregs())      # CR3 reloaded: nothing stale (smp.c)
            self._count_offline(index)
            EVENTS.write(self.region.mem, events, online=1)

    def _ending(self) -> bool:
        return self._stop_requested or self._result is not None or self._failure is not None

    # ---- the run loop ----
    def run(self, timeout: float | None = 30.0) -> RunResult:
        """Run the guest until it shuts down (or crashes), stop() is called,
        or `timeout` seconds pass (DomainTimeout; None: no limit).  vCPU 0
        runs on this thread, the others on their own."""
        t0 = time.monotonic()
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, self.vcpu.kick)
            timer.daemon = True
            timer.start()
        with self._cond:
            self._started[0] = True
        try:
            result = self._vcpu_loop(0, t0, timeout)
        finally:
            if timer is not None:
                timer.cancel()
            self._end_secondaries()
        result.elapsed = time.monotonic() - t0
        result.slow_exits = self.slow_exits
        result.exit_counts = dict(self.exit_counts)
        return result

    def _end_secondaries(self) -> None:
        with self._cond:
            if self._result is None and self._failure is None:
                self._stop_requested = True
            self._cond.notify_all()
        self._kick_all(but=0)
        for t in self._threads:
            t.join(timeout=10)

    def _finish(self, result: RunResult) -> RunResult:
        """The domain ends (shutdown, crash, stop): the first vCPU to get
        here decides how; the others are kicked out of the guest."""
        with self._cond:
            if self._result is None:
                self._quiesce()
                self._result = result
            self._cond.notify_all()
            result = self._result
        self._kick_all()
        return result

    def _vcpu_loop(self, index: int, t0: float | None, timeout: float | None) -> RunResult:
        vcpu = self.vcpus[index]
        self.vcpu_tids[index] = threading.get_native_id()
        # the runstate's "runnable" time: KVM counts the run-queue wait of
        # the thread that set the MSR, so this one, before its first run
        events = self.region.vcpus[index].events_off
        base = time_.enable_steal_time(self.kvm, vcpu, self.region.gpa_of(events + EVENTS.offset("kvm_steal")))
        if base is not None:
            EVENTS.write(self.region.mem, events, steal_base=base)
        while True:
            if self._pause_requested or not self._online[index] or self._ending():
                with self._cond:
                    if self._failure is not None:     # another vCPU's thread failed
                        if index == 0:
                            raise self._failure       # run() reports it
                        return RunResult(abi.ShutdownReason.crash, self.console)
                    if self._result is not None:
                        return self._result
                    if self._stop_requested:
                        return self._finish(RunResult(abi.ShutdownReason.poweroff, self.console, None,
                                                      stopped=True))
                    self._park(index, None if timeout is None else t0 + timeout)
                if timeout is not None and time.monotonic() - t0 >= timeout:
                    raise DomainTimeout(f"guest still running after {timeout} s (no vCPU up: "
                                        f"{not any(self._online)}); console so far: {self.console[-500:]!r}")
                continue
            ex = vcpu.run()
            self.on_vcpu_exit(ex)
            self.exit_counts[self._exit_key(ex, index)] += 1
            if ex.reason == ExitReason.IO and ex.port == SHIM_EXIT_PORT:
                self.slow_exits += 1
                reason, info = self._handle_shim_exit(index)
                if reason is not None:
                    return self._finish(RunResult(reason, self.console, info))
                continue
            if ex.reason == ExitReason.INTR:
                if timeout is not None and time.monotonic() - t0 >= timeout:
                    raise DomainTimeout(f"guest still running after {timeout} s; "
                                        f"console so far: {self.console[-500:]!r}")
                continue
            if ex.reason == ExitReason.IO and self.notifier.handle_io(ex, index):
                continue
            if ex.reason == ExitReason.IO:
                if not ex.is_out:
                    ex.set_value(MASK64)
                continue
            regs = vcpu.get_regs()
            raise ShimPanic(f"unexpected exit {ex!r} on vCPU {index} at rip {regs.rip:#x}")

    def _quiesce(self) -> None:
        """Wait for an in-flight back-end notification, then drain the
        console ring once more (the guest may stop right after writing)."""
        with self.notifier.backend_lock:
            self.channels.console_server.process()

    def close(self):
        for be in reversed(getattr(self, "backends", [])):
            be.close()
        if getattr(self, "notifier", None) is not None:
            self.notifier.close()
        for obj in (*getattr(self, "vcpus", ()), self.vm):
            if obj is not None:
                obj.close()
        self.ram.close()
        self.region.mem.close()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# exit_counts: hypercalls whose first argument is a sub-op, and its enum
_HYPERCALL_SUBOPS = {
    abi.Hypercall.vcpu_op: abi.VcpuOp, abi.Hypercall.sched_op: abi.SchedOp,
    abi.Hypercall.sched_op_compat: abi.SchedOp, abi.Hypercall.event_channel_op: abi.EvtchnOp,
    abi.Hypercall.grant_table_op: abi.GnttabOp, abi.Hypercall.memory_op: abi.MemoryOp,
    abi.Hypercall.xen_version: abi.XenVer, abi.Hypercall.console_io: abi.ConsoleIoCmd,
    abi.Hypercall.physdev_op: abi.PhysdevOp, abi.Hypercall.xenpmu_op: abi.XenPmuOp,
}
_MBOP_NAMES = {op: op.name.lower() for op in MailboxOp if op != MailboxOp.HYPERCALL}

TSS_BUSY = 0xB   # 64-bit TSS, busy (TR is loaded through KVM_SET_SREGS)
KVM_MP_STATE_RUNNABLE = 0


def syscall_trampoline(va: int, save_slot_va: int, stack_top: int, entry: int) -> bytes:
    """Per-vCPU LSTAR code (Xen's per-CPU stub idea):
        swapgs; swapgs            real KVM: a no-op pair at CPL0.  kvm_pvm:
                                  the first one raises #GP at CPL3 with
                                  RIP == LSTAR, which the shim treats as
                                  the syscall
        mov %rsp, save_slot(%rip)
        movabs $stack_top, %rsp
        pushq $FLAT_RING3_SS64    the start of the frame an iretq takes:
        pushq save_slot(%rip)     ss and the guest rsp
        jmp shim_syscall_entry
    """
    swapgs = b"\x0f\x01\xf8"
    code = bytearray(swapgs + swapgs)
    at = va + len(code) + 7
    code += b"\x48\x89\x25" + struct.pack("<i", save_slot_va - at)
    code += b"\x48\xbc" + struct.pack("<Q", stack_top)
    code += b"\x68" + struct.pack("<i", abi.FLAT_RING3_SS64)
    at = va + len(code) + 6
    code += b"\xff\x35" + struct.pack("<i", save_slot_va - at)
    at = va + len(code) + 5
    code += b"\xe9" + struct.pack("<i", entry - at)
    return bytes(code)
