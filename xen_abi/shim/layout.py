"""The boundary between Python and the CPL0 shim, declared once.

Two kinds of numbers cross it:

* Xen's public ABI numbers the shim and the test guests use (hypercall
  numbers, sub-ops, errno values, selectors, vcpu_info/shared_info offsets,
  struct sizes), taken from xen_abi/abi.py under the names Xen's public
  headers give them (SCHEDOP_block, MMUEXT_PIN_L1_TABLE, XEN_EINVAL, ...;
  hypercalls as HC_<name>);
* the private layout: the blocks Python and the shim share (the per-vCPU
  boot block, the globals page, the mailbox of the exit to Python, the
  events block, the emulator state and counters), the mailbox operations,
  vectors, ports and the region constants of memory/vmm_region.py.

Python reads and writes the blocks by field name

    MAILBOX.read(phys, mailbox_gpa, "op")
    PERCPU.write(mem, percpu_off, kernel_sp=sp, kernel_ss=ss)

and the C side gets the same numbers from headers generated at build time
(``c_headers()``; kvmtool and Xen generate their asm-offsets headers the same
way): xen_numbers.h (Xen's numbers; the test guests include only this) and
shim_layout.h (the private layout; the shim includes both).  The C structs
stay hand-written in shim/shim.h, where C wants its own field types, and
are checked field by field at compile time by the <PREFIX>_CHECK_LAYOUT
macros generated here.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from pyvmm.xen_abi import abi
from pyvmm.xen_abi.boot.cpuid import ANY_SUBLEAF
from pyvmm.xen_abi.memory import page_types as PT
from pyvmm.xen_abi.memory import vmm_region as R

# ---------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Field:
    name: str
    doc: str = ""
    count: int = 1          # an array of `count` elements
    width: int = 8          # bytes per element
    at: int | None = None   # a fixed offset, past the previous field


class Block:
    """Fields in declaration order, each aligned to its width.  C names are
    <PREFIX>_<FIELD> (byte offsets) and <PREFIX>_SIZE."""

    def __init__(self, prefix: str, doc: str, *fields: Field):
        self.prefix, self.doc, self.fields = prefix, doc, {f.name: f for f in fields}
        self._offsets = {}
        off = 0
        for f in fields:
            off = -(-off // f.width) * f.width
            if f.at is not None:
                if f.at < off:
                    raise ValueError(f"{prefix}: {f.name} at {f.at:#x} overlaps the field before")
                off = f.at
            self._offsets[f.name] = off
            off += f.count * f.width
        self.size = off

    def offset(self, name: str, index: int = 0) -> int:
        f = self.fields[name]
        if not 0 <= index < f.count:
            raise IndexError(f"{self.prefix}: {name}[{index}] out of range")
        return self._offsets[name] + index * f.width

    def read(self, mem, base: int, name: str, index: int = 0) -> int:
        """One field (element) of the block at `base` in `mem` (guest-physical
        or region memory: anything with read/read_u32/read_u64)."""
        off, width = base + self.offset(name, index), self.fields[name].width
        if width == 8:
            return mem.read_u64(off)
        if width == 4:
            return mem.read_u32(off)
        return int.from_bytes(mem.read(off, width), "little")

    def write(self, mem, base: int, **values: int) -> None:
        """Scalar fields by name: write(mem, base, kernel_sp=..., kernel_ss=...)."""
        for name, value in values.items():
            off, width = base + self.offset(name), self.fields[name].width
            if width == 8:
                mem.write_u64(off, value)
            elif width == 4:
                mem.write_u32(off, value)
            else:
                mem.write(off, value.to_bytes(width, "little"))

    def c_defines(self) -> list[tuple[str, int, str]]:
        return [(f"{self.prefix}_{name.upper()}", self._offsets[name], f.doc)
                for name, f in self.fields.items()] + [(f"{self.prefix}_SIZE", self.size, "")]

    def c_layout_check(self, private_tail: bool = False) -> str:
        """A macro asserting that a C struct has this layout (and with
        `private_tail`, possibly more fields of the shim's own after it)."""
        checks = []
        for name, f in self.fields.items():
            member = f"{self.prefix}_{name.upper()}"
            checks.append(f'_Static_assert(offsetof(type, {name}) == {member}, "{member}");')
            checks.append(f'_Static_assert(sizeof(((type *)0)->{name}) == {f.count * f.width}, '
                          f'"size of {member}");')
        size = ">=" if private_tail else "=="
        checks.append(f'_Static_assert(sizeof(type) {size} {self.prefix}_SIZE, "{self.prefix}_SIZE")')
        return f"#define {self.prefix}_CHECK_LAYOUT(type) \\\n\t" + " \\\n\t".join(checks)


# Per-vCPU boot block at the bottom of the percpu pages (found from the
# stack: PERCPU_IN_BLOCK into the stack block), written by Python before the
# vCPU runs; C: the start of struct percpu (shim.h), the rest shim-private.
PERCPU = Block(
    "PC", "per-vCPU boot block (struct percpu)",
    Field("vcpu_id"),
    Field("vcpu_info", "VA of this vCPU's vcpu_info"),
    Field("lstar", "VA of this vCPU's syscall trampoline"),
    Field("kernel_sp"),
    Field("kernel_ss"),
    Field("kernel_mode", "1 = guest kernel mode (Xen's TF_kernel_mode)"),
    Field("cr3_kernel"),
    Field("cr3_user"),
    Field("mailbox", "VA of the mailbox page"),
    Field("syscall_rsp", "the trampoline saves the guest rsp here"),
    # the shim's from here on; Python writes them only into a vCPU that is
    # not running (VCPUOP_initialise of a secondary vCPU)
    Field("event_cb", "callbacks (CALLBACKOP_register)"),
    Field("failsafe_cb"),
    Field("syscall_cb"),
    Field("nmi_pending", "an NMI waits (VCPUOP_send_nmi; Xen's nmi_pending): set by any vCPU"),
    Field("nmi_masked", "NMIs held until HYPERVISOR_iret (Xen's async_exception_mask)"),
    Field("syscall32_cb"),
    Field("sysenter_cb"),
    Field("cb_mask", "bit n: callback type n masks events"),
    Field("vcr0_ts", "virtual CR0.TS (fpu_taskswitch)"),
    Field("traps", "the virtual IDT: (address, flags) per vector", count=2 * 256),
)

# The registers the shim saves on its stack at every entry from the guest,
# lowest address first (entry.S shim_common; C: struct frame in shim.h).
# Crash reports read the frame of the entry the shim was handling.
FRAME = Block(
    "FR", "saved registers of a shim entry (struct frame)",
    *(Field(r) for r in ("r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8", "rbp", "rdi",
                         "rsi", "rdx", "rcx", "rbx", "rax")),
    Field("vec", "vector, or VEC_SYSCALL"),
    Field("err", "error code, 0 where the CPU pushes none"),
    *(Field(r) for r in ("rip", "cs", "rflags", "rsp", "ss")),
)

# A hypercall from guest kernel mode takes a shorter path (entry.S
# shim_hypercall): it saves only what C may clobber and Xen's ABI keeps
# (r9 is no longer a parameter register), plus the parameters, so that
# multicall, the slow path and a user-mode syscall can still read them.
# Its last seven words line up with FRAME's (vec, then rax where FRAME has
# err, then the CPU frame), so a reader of the top of the stack sees
# rip..ss and the vector either way; vec is VEC_HYPERCALL while the shim
# is in the hypercall.
HC_FRAME = Block(
    "HF", "saved registers of a hypercall from guest kernel mode (struct hc_frame)",
    Field("r11"), Field("rcx"),
    Field("args", "rdi rsi rdx r10 r8 r9: the parameters (and r9, kept)", count=6),
    Field("vec", "VEC_HYPERCALL; C sets VEC_SYSCALL or VEC_HC_EVENTS for the full path"),
    Field("rax", "the hypercall number in, the result out"),
    *(Field(r) for r in ("rip", "cs", "rflags", "rsp", "ss")),
)

assert all(FRAME.size - FRAME.offset(a) == HC_FRAME.size - HC_FRAME.offset(b)
           for a, b in (("vec", "vec"), ("err", "rax"), ("rip", "rip"), ("ss", "ss")))


class CrashKind(enum.IntEnum):
    """Why the shim gave up on the guest (mailbox info of MailboxOp.CRASH);
    the kinds ending in _VEC carry the vector in their low byte."""
    NO_HANDLER_VEC = 0x100          # no trap-table entry for the vector
    BOUNCE_UNWRITABLE_VEC = 0x200   # the guest stack took no exception frame
    IRET_FRAME_UNREADABLE = 0x300   # HYPERVISOR_iret's frame is not readable
    IRET_TO_USER_WITHOUT_L4 = 0x301 # iret to user mode with no user page table
    BOOT_TABLES_INVALID = 0x302     # the initial page tables failed validation (err: the L4)
    BAD_IRET_FRAME_VEC = 0x400      # the CPU refused the frame HYPERVISOR_iret built


# The globals page (region offset GLOBALS_OFF), written by Python at start.
GLOBALS = Block(
    "SG", "globals page (struct globals)",
    Field("shared_info", "VA of shared_info"),
    Field("cpuid_table", "VA of the CPUID policy table"),
    Field("nr_cpuid"),
    Field("directmap", "VA where guest RAM is mapped 1:1 (supervisor)"),
    Field("ram_pages"),
    Field("l4_slots", "raw L4 entries of the hypervisor slots",
          count=abi.HYPERVISOR_L4_LAST_SLOT - abi.HYPERVISOR_L4_FIRST_SLOT + 1),
    Field("m2p", "VA of the M2P table (writable alias)"),
    Field("page_type", "VA of the page-type words, one u32 per RAM frame (memory/page_types.py)"),
    Field("tlb_stamp", "VA of the TLB clock stamps, one u64 per RAM frame (mmu.c)"),
    Field("region_gpa", "guest-physical base of the VMM region"),
)


# CPUID policy table (region offset CPUID_OFF; boot/cpuid.py builds it):
# leaf, subleaf (ANY_SUBLEAF = not significant), eax, ebx, ecx, edx.
CPUID_ENT = struct.Struct("<6I")

# The mailbox page: the one narrow exit to Python (`out` to SHIM_EXIT_PORT).
MAILBOX = Block(
    "MB", "mailbox of the exit to Python (struct mailbox)",
    Field("op", "MBOP_*"),
    Field("nr", "hypercall number"),
    Field("args", count=6),
    Field("cr3"),
    Field("kmode"),
    Field("result"),
    Field("rip"),
    Field("info", "free-form: panic vector, crash code, ..."),
    Field("info2"),
)


class MailboxOp(enum.IntEnum):
    HYPERCALL = 1
    PANIC = 2       # shim-internal fault: info = vector, rip, info2 = cr2 / error code
    CRASH = 3       # guest crashed (unhandled trap, bounce failed): info = why (trace.py)
    BLOCK = 4       # SCHEDOP_block with nothing pending
    SET_XCR0 = 5    # emulated xsetbv: args[0] = value; result 0 = set (KVM_SET_XCRS)
    # Python, mid-hypercall (grant_table_op on the domain's own grants), asks
    # the shim for a grant PTE: args = GrantPte request, info = GNTST_* back;
    # the shim answers and exits again with this op (shim/mmu.c mmu_grant_pte)
    GRANT_PTE = 6


class GrantPte(enum.IntEnum):
    """MBOP_GRANT_PTE requests: args[0] = kind, args[1] = host_addr (linear,
    or the PTE's machine address with GNTMAP_contains_pte), args[2] =
    GNTMAP_* flags; INSTALL: args[3] = the PTE; REMOVE: args[3] = the frame
    the PTE must map, args[4] = its P/RW bits, args[5] = new_addr (its PTE
    moves to host_addr: unmap_and_replace) or 0."""
    INSTALL = 1
    REMOVE = 2


SHIM_EXIT_PORT = 0x0700     # not a PIC port: the in-kernel irqchip would swallow those
# Pseudo vectors in the saved frame (entry.S): a syscall from guest user
# mode (bounced to the guest kernel), a hypercall in progress on the lean
# path (HC_FRAME), and a finished hypercall whose return delivers an event.
VEC_SYSCALL = 256
VEC_HYPERCALL = 257
VEC_HC_EVENTS = 258

# Per-vCPU events block (VCPU_EVENTS_OFF into the stack block): time,
# timers, event delivery and blocking (shim/events.c).  Python writes the
# inputs before the vCPU first runs (and timer_port whenever VIRQ_TIMER is
# (un)bound, backend_map whenever a back-end port is); the shim owns the rest.
EVENTS = Block(
    "EVB", "per-vCPU events block",
    Field("timer_port", "port bound to VIRQ_TIMER here; 0 = none"),
    Field("tsc_timestamp", "private copy of the pvclock snapshot"),
    Field("system_time"),
    Field("tsc_mul", "tsc_to_system_mul"),
    Field("tsc_shift", "sign-extended"),
    Field("ns_to_tsc_mul", "tsc ticks = ns * this >> 32"),
    Field("xen_version", "the xen_version(XENVER_version) answer"),
    Field("flags", "EVF_*"),
    Field("deadline_ns", "armed one-shot deadline (system time), shim"),
    Field("armed", "1 while a one-shot is armed, shim"),
    Field("timer_irqs", "counters, shim"),
    Field("check_irqs"),
    Field("blocks"),
    Field("backend_sends"),
    # SMP (shim/smp.c): remote TLB flushes.  A flusher bumps flush_req of
    # each target, then sends EV_FLUSH_VECTOR and waits for flush_done to
    # catch up -- unless the target is not running guest code (online 0:
    # down or never started; in_exit 1: in an exit to Python), which
    # flushes before it next returns to the guest.
    Field("online", "1 while the vCPU is up, Python"),
    Field("in_exit", "1 while the vCPU is in an exit to Python, shim"),
    Field("flush_req", "TLB flushes requested of this vCPU, other vCPUs' shims"),
    Field("flush_done", "the last request this vCPU's shim served"),
    Field("flushes", "counter: remote flushes served, shim"),
    Field("polls", "counter: SCHEDOP_poll calls, shim"),
    Field("ipi_sends", "counter: EVTCHNOP_send on IPI ports, shim"),
    Field("initialised", "1 once VCPUOP_initialise took (vCPU 0: from the start), Python"),
    Field("init_lock", "held by the vCPU initialising this one, shim"),
    # runstate accounting (Xen's runstate area, for the guest's steal
    # clock): the shim writes the guest's area on timer ticks, Python when
    # the vCPU goes up or down; both from these (time.py runstate_times)
    Field("runstate_va", "the guest's runstate area (VCPUOP_register_runstate_memory_area), Python"),
    Field("runstate_update_flag", "1: VMASST_TYPE_runstate_update_flag is on, Python"),
    Field("runstate_due", "a tick came: write the area on the way to the guest, shim"),
    Field("blocked_ns", "time halted in SCHEDOP_block / poll, shim"),
    Field("offline_ns", "time down (and before the first up), Python"),
    Field("steal_base", "kvm_steal's value when it was enabled (KVM starts it at the "
          "thread's whole run-queue wait), Python"),
    Field("runstate_written", "kvm_steal + blocked_ns + offline_ns when the shim last wrote "
          "the area (each only grows: the same sum, the same area); ~0 after the area moved, "
          "shim / Python"),
    Field("backend_map", "bit per port whose remote end is a back-end: sends go out "
          "through EV_SEND_PORT", count=abi.EVTCHN_2L_NR_CHANNELS // 8, width=1, at=512),
    Field("kvm_steal", "KVM's struct kvm_steal_time (MSR_KVM_STEAL_TIME): u64 steal "
          "(ns runnable but not running) first", count=8, at=1024),
    # FIFO event channels (shim/events.c fifo_*): see FIFO below
    Field("fifo_cb", "VA of this vCPU's control block (EVTCHNOP_init_control); 0 = none, Python"),
    Field("fifo_link_sum", "bit w: fifo_link[w] may have bits; any raiser (locked), the shim clears"),
    Field("fifo_link", "bit per port raised for this vCPU and not yet linked: any raiser "
          "(locked), this vCPU's shim links and clears", count=abi.MAX_EVTCHN_PORT // 64 + 1),
    Field("fifo_tail", "each queue's tail port, 0 = none; shim, under FIFO.lock",
          count=abi.EVTCHN_FIFO_MAX_QUEUES, width=4),
)


# FIFO event channels, per domain (region page FIFO_OFF).  Python writes
# it at EVTCHNOP_init_control / expand_array / set_priority; the shim links
# raised ports into the guest's queues (events.c fifo_drain).
FIFO_PORTS = abi.MAX_EVTCHN_PORT + 1
FIFO_ARRAY_PAGES = -(-FIFO_PORTS // abi.EVTCHN_FIFO_EVENT_WORDS_PER_PAGE)
FIFO = Block(
    "FF", "FIFO event channels of the domain",
    Field("on", "1 once EVTCHNOP_init_control succeeded, Python"),
    Field("lock", "held by the shim linking a port (all queue tails, lastq); shim"),
    Field("nr_words", "ports with an event word (array pages * 1024, at most FIFO_PORTS), Python"),
    Field("array", "VA of each event array page (the 1:1 map of guest RAM), Python",
          count=FIFO_ARRAY_PAGES),
    Field("prio", "each port's priority (EVTCHNOP_set_priority), Python", count=FIFO_PORTS, width=1),
    Field("lastq", "vCPU << 4 | priority of the queue each port was last linked on; shim "
          "under lock", count=FIFO_PORTS, width=1),
)
assert R.MAX_VCPUS <= 16   # lastq's vCPU nibble


class EventsFlag(enum.IntFlag):
    TSC_DEADLINE = 1    # LAPIC timer in TSC-deadline mode, else one-shot
    SEND_PORT = 2       # back-end sends go to EV_SEND_PORT (ioeventfd)


EV_TIMER_VECTOR = 0xF0      # LAPIC timer (LVT)
EV_CHECK_VECTOR = 0xF1      # "event check" MSI from the VMM (a kick)
EV_FLUSH_VECTOR = 0xF2      # TLB flush IPI from another vCPU's shim (smp.c)
EV_NMI_VECTOR = 0xF3        # virtual NMI kick (shim.c send_nmi), to another vCPU or to itself
# Event-channel routing (region page PORT_MAP_OFF), one byte per port,
# written by Python (notify.py) whenever a port is bound, moved or closed:
# the vCPU it notifies (Xen's notify_vcpu_id, 0 for closed ports), and
# whether it is an IPI port.  The shim does EVTCHNOP_send on IPI ports and
# EVTCHNOP_unmask with it, without an exit.
PORT_MAP_VCPU = 0x3F
PORT_MAP_IPI = 0x80
EV_SPURIOUS_VECTOR = 0xFF
# `outl port, EV_SEND_PORT`: EVTCHNOP_send to a back-end port; KVM signals
# the ioeventfd registered for that port (datamatch) without an exit, any
# other port exits to Python, which sends it.
EV_SEND_PORT = 0x0704

# Emulator state and tracing counters (shim/priv.c), PRIV_OFF bytes into
# the percpu pages (their second page, past struct percpu).
PRIV_OFF = 0x1E00
PRIV_CNT_TRAPS = 0          # counter of exception vector 0..31
PRIV_CNT_IRQ = 32           # vectors >= 32
PRIV_CNT_SYSCALL = 33       # guest syscalls (hypercalls + user syscalls)
PRIV_CNT_HCALL = 34         # counter of hypercall 0..
PRIV_CNT_NR_HCALL = 48
PRIV_CNT_N = PRIV_CNT_HCALL + PRIV_CNT_NR_HCALL
PRIV = Block(
    "PRIV", "emulator state and counters",
    Field("vcr4", "the CR4 the guest sees"),
    Field("iopl", "virtual IOPL (PHYSDEVOP_set_iopl), 0..3"),
    Field("iobmp", "PHYSDEVOP_set_iobitmap: the guest's I/O bitmap (a guest address)"),
    Field("iobmp_limit", "PHYSDEVOP_set_iobitmap: ports below it are looked up, 0..65536"),
    Field("dr", "dr0..dr7 (4, 5 unused; dr6, dr7 without their read-as-one bits)", count=8),
    Field("dr7_emul", "DR7 enable bits of I/O breakpoints: kept, never loaded (Xen's dr7_emul)"),
    Field("tsc_aux"),
    Field("xcr0"),
    Field("emulated", "counters: instructions emulated"),
    Field("msr_unknown", "rdmsr/wrmsr of MSRs Xen refuses (#GP)"),
    Field("last_msr", "the last such MSR | 1<<32 for a write"),
    Field("cpuids", "forced-emulation CPUIDs"),
    Field("nr_vcpus", "written by Python: vCPUs of the domain"),
    Field("fast_io", "counters: in/out and iretq done by entry.S's #GP fast paths"),
    Field("fast_iret"),
    Field("fast_cli", "cli/sti from guest kernel mode, skipped by entry.S's #GP fast path"),
    Field("counters", "u32 event counters, PRIV_CNT_*", count=PRIV_CNT_N, width=4),
)

assert PERCPU.size <= PRIV_OFF and PRIV_OFF + PRIV.size <= 2 * abi.PAGE_SIZE
assert GLOBALS.size <= abi.PAGE_SIZE and MAILBOX.size <= abi.PAGE_SIZE
assert EVENTS.size <= abi.PAGE_SIZE and FIFO.size <= abi.PAGE_SIZE

# ---------------------------------------------------------------- C headers


def _offsetof(declaration, name: str) -> int:
    """Byte offset of a field in one of abi.py's construct Structs."""
    off = 0
    for sub in declaration.subcons:
        if sub.name == name:
            return off
        off += sub.sizeof()
    raise KeyError(name)


# Xen's enums under the names of its public headers: (prefix, enum, spell)
_XEN_ENUMS = [
    ("HC_", abi.Hypercall, str),
    ("XEN_", abi.XenErrno, str),
    ("SCHEDOP_", abi.SchedOp, lambda n: n.rstrip("_")),
    ("SHUTDOWN_", abi.ShutdownReason, str),
    ("VCPUOP_", abi.VcpuOp, str),
    ("EVTCHNOP_", abi.EvtchnOp, str),
    ("EVTCHNSTAT_", abi.EvtchnStatus, str),
    ("VIRQ_", abi.Virq, str),
    ("MMUEXT_", abi.MmuextCmd, str),
    ("MMU_", abi.MmuUpdateCmd, str),
    ("SEGBASE_", abi.SegBase, str),
    ("CALLBACKTYPE_", abi.CallbackType, str.lower),
    ("XENVER_", abi.XenVer, str),
    ("CONSOLEIO_", abi.ConsoleIoCmd, str),
    ("PHYSDEVOP_", abi.PhysdevOp, str),
    ("XENMEM_", abi.MemoryOp, str),
    ("GNTTABOP_", abi.GnttabOp, str),
    ("XS_", abi.XsType, str),
]


def xen_numbers() -> list[tuple[str, list[tuple[str, int, str]]]]:
    """(section, [(C name, value, comment)]) of Xen's public numbers."""
    sections = [(f"{enum_.__name__} ({prefix}*)",
                 [(prefix + spell(m.name), m.value, "") for m in enum_])
                for prefix, enum_, spell in _XEN_ENUMS]
    sections.append(("flags and limits", [
        ("UVMF_NONE", abi.UVMF_NONE, ""), ("UVMF_TLB_FLUSH", abi.UVMF_TLB_FLUSH, ""),
        ("UVMF_INVLPG", abi.UVMF_INVLPG, ""), ("UVMF_FLUSHTYPE_MASK", abi.UVMF_FLUSHTYPE_MASK, ""),
        ("UVMF_ALL", abi.UVMF_ALL, ""),
        ("CALLBACKOP_register", abi.CALLBACKOP_REGISTER, ""),
        ("CALLBACKOP_unregister", abi.CALLBACKOP_UNREGISTER, ""),
        ("CALLBACKF_mask_events", abi.CALLBACKF_MASK_EVENTS, ""),
        ("VCPU_SSHOTTMR_future", abi.VCPU_SSHOTTMR_FUTURE, ""),
        ("VGCF_IN_SYSCALL", abi.VGCF_IN_SYSCALL, "iret_context.flags"),
        ("XEN_RUNSTATE_UPDATE", abi.XEN_RUNSTATE_UPDATE, "in state_entry_time while it is rewritten"),
        ("TI_DPL_MASK", abi.TI_DPL_MASK, ""), ("TI_MASK_EVENTS", abi.TI_MASK_EVENTS, ""),
        ("DOMID_SELF", abi.DOMID_SELF, ""),
        ("EVTCHN_2L_NR_CHANNELS", abi.EVTCHN_2L_NR_CHANNELS, ""),
        ("MAX_EVTCHN_PORT", abi.MAX_EVTCHN_PORT, "the domain's highest port (xl's max_event_channels)"),
        ("EVTCHN_FIFO_PRIORITY_MAX", abi.EVTCHN_FIFO_PRIORITY_MAX, ""),
        ("EVTCHN_FIFO_PRIORITY_DEFAULT", abi.EVTCHN_FIFO_PRIORITY_DEFAULT, ""),
        ("EVTCHN_FIFO_PRIORITY_MIN", abi.EVTCHN_FIFO_PRIORITY_MIN, ""),
        ("EVTCHN_FIFO_MAX_QUEUES", abi.EVTCHN_FIFO_MAX_QUEUES, ""),
        ("EVTCHN_FIFO_PENDING", abi.EVTCHN_FIFO_PENDING, "event word bits"),
        ("EVTCHN_FIFO_MASKED", abi.EVTCHN_FIFO_MASKED, ""),
        ("EVTCHN_FIFO_LINKED", abi.EVTCHN_FIFO_LINKED, ""),
        ("EVTCHN_FIFO_BUSY", abi.EVTCHN_FIFO_BUSY, ""),
        ("EVTCHN_FIFO_LINK_BITS", abi.EVTCHN_FIFO_LINK_BITS, ""),
        ("EVTCHN_FIFO_LINK_MASK", abi.EVTCHN_FIFO_LINK_MASK, ""),
        ("EVTCHN_FIFO_EVENT_WORDS_PER_PAGE", abi.EVTCHN_FIFO_EVENT_WORDS_PER_PAGE, ""),
        ("EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES", abi.EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES, ""),
        ("XENSTORE_RING_SIZE", abi.XENSTORE_RING_SIZE, ""),
    ]))
    sections.append(("grant tables", [
        (name, getattr(abi, name), "") for name in (
            "GTF_permit_access", "GTF_accept_transfer", "GTF_transitive", "GTF_type_mask",
            "GTF_readonly", "GTF_reading", "GTF_writing", "GTF_sub_page",
            "GNTMAP_device_map", "GNTMAP_host_map", "GNTMAP_readonly", "GNTMAP_application_map",
            "GNTMAP_contains_pte", "GNTCOPY_source_gref", "GNTCOPY_dest_gref",
            "GNTTAB_CACHE_CLEAN", "GNTTAB_CACHE_INVAL", "GNTTAB_CACHE_SOURCE_GREF",
            "GNTTAB_V1_ENTRY_SIZE", "GNTTAB_V2_ENTRY_SIZE", "GNTTAB_STATUS_SIZE",
            "GNTTAB_NR_RESERVED_ENTRIES")
    ] + [(f"GNTST_{n[6:]}", getattr(abi, n), "") for n in dir(abi) if n.startswith("GNTST_")] + [
        ("XEN_GNTTAB_MAP_GRANT_REF_SIZE", abi.GnttabMapGrantRef.sizeof(), ""),
        ("XEN_GNTTAB_UNMAP_GRANT_REF_SIZE", abi.GnttabUnmapGrantRef.sizeof(), ""),
        ("XEN_GNTTAB_UNMAP_AND_REPLACE_SIZE", abi.GnttabUnmapAndReplace.sizeof(), ""),
        ("XEN_GNTTAB_COPY_SIZE", abi.GnttabCopy.sizeof(), ""),
        ("XEN_GNTTAB_SETUP_TABLE_SIZE", abi.GnttabSetupTable.sizeof(), ""),
        ("XEN_GNTTAB_GET_STATUS_FRAMES_SIZE", abi.GnttabGetStatusFrames.sizeof(), ""),
        ("XEN_GNTTAB_SWAP_GRANT_REF_SIZE", abi.GnttabSwapGrantRef.sizeof(), ""),
        ("XEN_GNTTAB_CACHE_FLUSH_SIZE", abi.GnttabCacheFlush.sizeof(), ""),
        ("XEN_GNTTAB_TRANSFER_SIZE", abi.GnttabTransfer.sizeof(), ""),
    ]))
    sections.append(("selectors and the hypervisor hole", [
        ("FLAT_RING3_CS32", abi.FLAT_RING3_CS32, ""), ("FLAT_RING3_CS64", abi.FLAT_RING3_CS64, ""),
        ("FLAT_RING3_SS64", abi.FLAT_RING3_SS64, ""), ("FLAT_RING3_DS32", abi.FLAT_RING3_DS32, ""),
        ("FIRST_RESERVED_GDT_ENTRY", abi.FIRST_RESERVED_GDT_ENTRY, ""),
        ("HYPERVISOR_VIRT_START", abi.HYPERVISOR_VIRT_START, ""),
        ("HYPERVISOR_VIRT_END", abi.HYPERVISOR_VIRT_END, ""),
        ("HYPERVISOR_L4_FIRST_SLOT", abi.HYPERVISOR_L4_FIRST_SLOT, ""),
        ("HYPERVISOR_L4_SLOTS", GLOBALS.fields["l4_slots"].count, "slots of the hole"),
        ("MACH2PHYS_VIRT_START", abi.MACH2PHYS_VIRT_START, ""),
    ]))
    sections.append(("vcpu_info / shared_info byte offsets", [
        ("VI_UPCALL_PENDING", _offsetof(abi.VcpuInfo, "evtchn_upcall_pending"), ""),
        ("VI_UPCALL_MASK", _offsetof(abi.VcpuInfo, "evtchn_upcall_mask"), ""),
        ("VI_PENDING_SEL", _offsetof(abi.VcpuInfo, "evtchn_pending_sel"), ""),
        ("VI_CR2", _offsetof(abi.VcpuInfo, "cr2"), ""),
        ("VI_SIZE", abi.VcpuInfo.sizeof(), ""),
        ("SI_EVTCHN_PENDING", _offsetof(abi.SharedInfo, "evtchn_pending"), ""),
        ("SI_EVTCHN_MASK", _offsetof(abi.SharedInfo, "evtchn_mask"), ""),
    ]))
    sections.append(("struct sizes", [
        ("XEN_START_INFO_SIZE", abi.StartInfo.sizeof(), ""),
        ("XEN_TRAP_INFO_SIZE", abi.TrapInfo.sizeof(), ""),
        ("XEN_IRET_CONTEXT_SIZE", abi.IretContext.sizeof(), ""),
        ("XEN_MMU_UPDATE_SIZE", abi.MmuUpdate.sizeof(), ""),
        ("XEN_MMUEXT_OP_SIZE", abi.MmuextOp.sizeof(), ""),
        ("XEN_MULTICALL_ENTRY_SIZE", abi.MulticallEntry.sizeof(), ""),
        ("XEN_SCHED_POLL_SIZE", abi.SchedPoll.sizeof(), ""),
        ("XEN_VCPU_RUNSTATE_INFO_SIZE", abi.VcpuRunstateInfo.sizeof(), ""),
        ("XEN_EVTCHN_INIT_CONTROL_SIZE", abi.EvtchnInitControl.sizeof(), ""),
        ("XEN_EVTCHN_FIFO_CONTROL_BLOCK_SIZE", abi.EvtchnFifoControlBlock.sizeof(), ""),
        ("EVTCHN_FIFO_CB_READY", _offsetof(abi.EvtchnFifoControlBlock, "ready"), ""),
        ("EVTCHN_FIFO_CB_HEAD", _offsetof(abi.EvtchnFifoControlBlock, "head"), "u32[16]"),
    ]))
    sections.append(("vcpu_guest_context byte offsets (VCPUOP_initialise)", [
        ("VGC_FLAGS", _offsetof(abi.VcpuGuestContext, "flags"), ""),
        ("VGC_LDT_BASE", _offsetof(abi.VcpuGuestContext, "ldt_base"), "then ldt_ents"),
        ("VGC_GDT_FRAMES", _offsetof(abi.VcpuGuestContext, "gdt_frames"), ""),
        ("VGC_GDT_ENTS", _offsetof(abi.VcpuGuestContext, "gdt_ents"), ""),
        ("VGC_CTRLREG", _offsetof(abi.VcpuGuestContext, "ctrlreg"), "[8]"),
        ("VGC_SIZE", abi.VcpuGuestContext.sizeof(), ""),
    ]))
    return sections


def shim_layout() -> list[tuple[str, list[tuple[str, int, str]]]]:
    """(section, [(C name, value, comment)]) of the private layout."""
    def enum_defines(prefix, enum_):
        return [(prefix + m.name, m.value, "") for m in enum_]
    return [
        ("the VMM region (memory/vmm_region.py)", [
            ("REGION_VA", R.REGION_VA, "its linear mapping"),
            ("GLOBALS_OFF", R.GLOBALS_OFF, ""),
            ("PERCPU_BLOCK_SIZE", R.PERCPU_BLOCK_SIZE, "stack block, aligned to its size"),
            ("PERCPU_IN_BLOCK", R.PERCPU_IN_BLOCK, "the percpu pages in it"),
            ("VCPU_EVENTS_OFF", R.VCPU_EVENTS_OFF, "the events block, from the stack block"),
            ("VCPU_OFF", R.VCPU_OFF, "vCPU n's stack block: VCPU_OFF + n * VCPU_STRIDE"),
            ("PORT_MAP_OFF", R.PORT_MAP_OFF, "one byte per 2-level port: PORT_MAP_*"),
            ("PORT_MAP_VCPU", PORT_MAP_VCPU, "the vCPU the port notifies"),
            ("PORT_MAP_IPI", PORT_MAP_IPI, "an IPI port: the shim sends on it"),
            ("FIFO_OFF", R.FIFO_OFF, "the FIFO event channel block FF_*"),
            ("FIFO_PORTS", FIFO_PORTS, "ports the FIFO block covers"),
            ("VCPU_STRIDE", R.VCPU_STRIDE, ""),
            ("VCPU_GDT_OFF", R.VCPU_GDT_OFF, "its GDT pages, from the stack block"),
            ("MAX_VCPUS", R.MAX_VCPUS, ""),
            ("VCPU_LDT_FROM_GDT", R.VCPU_LDT_OFF - R.VCPU_GDT_OFF, "the LDT copy, from the GDT pages"),
            ("SHIM_LDT_SEL", R.SHIM_LDT, "the LDT descriptor the shim fills"),
            ("GUEST_REGION_FRAMES", R.GUEST_MAPPABLE_END // R.PAGE,
             "region frames a guest may map: shared_info, the grant and status frames"),
        ]),
        ("counted page types (memory/page_types.py)", [
            ("PGT_COUNT_MASK", PT.PGT_COUNT_MASK, "references of the current type"),
            ("PGT_TYPE_SHIFT", PT.PGT_TYPE_SHIFT, ""),
            ("PGT_TYPE_MASK", PT.PGT_TYPE_MASK, ""),
            ("PGT_NONE", PT.PGT_NONE, ""), ("PGT_L1", PT.PGT_L1, ""), ("PGT_L2", PT.PGT_L2, ""),
            ("PGT_L3", PT.PGT_L3, ""), ("PGT_L4", PT.PGT_L4, ""),
            ("PGT_WRITABLE", PT.PGT_WRITABLE, "mapped writable, or written by pyvmm"),
            ("PGT_PINNED", PT.PGT_PINNED, "the pin holds one of the count"),
        ]),
        (PERCPU.doc, PERCPU.c_defines()),
        (GLOBALS.doc, GLOBALS.c_defines()),
        ("CPUID policy table entries", [("CPUID_ENT_SIZE", CPUID_ENT.size, ""),
                                        ("CPUID_ANY_SUBLEAF", ANY_SUBLEAF, "")]),
        (MAILBOX.doc, MAILBOX.c_defines() + enum_defines("MBOP_", MailboxOp)
         + enum_defines("GRANT_PTE_", GrantPte) + enum_defines("CRASH_", CrashKind)),
        (FRAME.doc, FRAME.c_defines()),
        ("ports and pseudo vectors", [
            ("SHIM_EXIT_PORT", SHIM_EXIT_PORT, "`out` here: the exit to Python"),
            ("EV_SEND_PORT", EV_SEND_PORT, "`out` here: EVTCHNOP_send to a back-end"),
            ("VEC_SYSCALL", VEC_SYSCALL, ""), ("VEC_HYPERCALL", VEC_HYPERCALL, ""),
            ("VEC_HC_EVENTS", VEC_HC_EVENTS, ""),
        ]),
        (HC_FRAME.doc, HC_FRAME.c_defines()),
        (FIFO.doc, FIFO.c_defines()),
        (EVENTS.doc, EVENTS.c_defines() + enum_defines("EVF_", EventsFlag) + [
            ("EV_TIMER_VECTOR", EV_TIMER_VECTOR, ""), ("EV_CHECK_VECTOR", EV_CHECK_VECTOR, ""),
            ("EV_FLUSH_VECTOR", EV_FLUSH_VECTOR, ""), ("EV_NMI_VECTOR", EV_NMI_VECTOR, ""),
            ("EV_SPURIOUS_VECTOR", EV_SPURIOUS_VECTOR, "")]),
        (PRIV.doc, [("PRIV_OFF", PRIV_OFF, "into the percpu pages")] + PRIV.c_defines() + [
            ("PRIV_CNT_TRAPS", PRIV_CNT_TRAPS, ""), ("PRIV_CNT_IRQ", PRIV_CNT_IRQ, ""),
            ("PRIV_CNT_SYSCALL", PRIV_CNT_SYSCALL, ""), ("PRIV_CNT_HCALL", PRIV_CNT_HCALL, ""),
            ("PRIV_CNT_NR_HCALL", PRIV_CNT_NR_HCALL, ""), ("PRIV_CNT_N", PRIV_CNT_N, "")]),
    ]


def _header(guard: str, what: str, sections, tail: str = "") -> str:
    lines = [f"/* {what}", " * Generated by xen_abi/shim/layout.py at build time: do not edit. */",
             f"#ifndef {guard}", f"#define {guard}"]
    for title, defines in sections:
        lines += ["", f"/* {title} */"]
        for name, value, doc in defines:
            text = f"{value:#x}" if value >= 256 else str(value)
            if value > 0xFFFFFFFF:
                text += "UL"
            comment = f"   /* {doc} */" if doc else ""
            lines.append(f"#define {name:<28} {text}{comment}")
    if tail:
        lines += ["", tail]
    lines += ["", "#endif", ""]
    return "\n".join(lines)


def xen_numbers_header() -> str:
    """xen_numbers.h: for the shim and the test guests (asm- and C-safe)."""
    return _header("XEN_NUMBERS_H", "Xen's public ABI numbers (xen_abi/abi.py).", xen_numbers())


def shim_layout_header() -> str:
    """shim_layout.h: for the shim (asm- and C-safe)."""
    checks = "\n\n".join([PERCPU.c_layout_check(private_tail=True), GLOBALS.c_layout_check(),
                          MAILBOX.c_layout_check(), FRAME.c_layout_check(),
                          HC_FRAME.c_layout_check()])
    return _header("SHIM_LAYOUT_H", "What Python and the shim share: blocks, operations, ports, region.",
                   shim_layout(),
                   "/* Compile-time checks that a hand-written C struct has the layout\n"
                   " * above (shim.h), for C only: */\n#ifndef __ASSEMBLER__\n" + checks + "\n#endif")


def c_headers() -> dict[str, str]:
    """{file name: text} of the headers the shim is built with."""
    return {"xen_numbers.h": xen_numbers_header(), "shim_layout.h": shim_layout_header()}
