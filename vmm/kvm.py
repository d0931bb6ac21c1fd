"""KVM from Python: typed handles for the system, a VM and a vCPU.

In the spirit of rust-vmm's kvm-ioctls: every ioctl number is computed once
from the kernel's _IO/_IOR/_IOW/_IOWR encoding and its argument structure,
every structure is a ctypes declaration (declared once, reused), and each
handle (Kvm, Vm, Vcpu) only offers the ioctls that belong to its fd.

This module knows nothing about Xen.
"""
from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import mmap
import os
import signal
import struct
import threading
from ctypes import (
    Structure, Union, c_uint8, c_uint16, c_uint32, c_uint64, c_char, sizeof,
)

from .handles import FdHandle, unmap

__all__ = [
    "Kvm", "Vm", "Vcpu", "VcpuExit", "ExitReason", "KvmError", "KvmUnavailable",
    "CpuidEntry", "KvmRegs", "KvmSregs", "KvmSegment", "KvmDtable", "KvmFpu",
    "KvmXsave", "KvmXcrs", "KvmLapicState", "KvmVcpuEvents", "Cap",
    "KICK_SIGNAL",
]

# --------------------------------------------------------------------------
# ioctl number encoding (include/uapi/asm-generic/ioctl.h)
# --------------------------------------------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    return ((direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _IO(typ, nr):
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ, nr, struct):
    return _IOC(_IOC_READ, typ, nr, _size(struct))


def _IOW(typ, nr, struct):
    return _IOC(_IOC_WRITE, typ, nr, _size(struct))


def _IOWR(typ, nr, struct):
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, _size(struct))


def _size(struct) -> int:
    return struct if isinstance(struct, int) else sizeof(struct)


KVMIO = 0xAE
KVM_API_VERSION = 12          # the only stable API version there has ever been

# --------------------------------------------------------------------------
# Structures (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h)
# --------------------------------------------------------------------------


class KvmUserspaceMemoryRegion(Structure):
    _fields_ = [("slot", c_uint32), ("flags", c_uint32),
                ("guest_phys_addr", c_uint64), ("memory_size", c_uint64),
                ("userspace_addr", c_uint64)]


KVM_MEM_READONLY = 1 << 1


class KvmRegs(Structure):
    _fields_ = [(n, c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags")]

    def __repr__(self):
        return "KvmRegs(" + ", ".join(
            f"{n}={getattr(self, n):#x}" for n, _ in self._fields_) + ")"


class KvmSegment(Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint32), ("selector", c_uint16),
                ("type", c_uint8), ("present", c_uint8), ("dpl", c_uint8),
                ("db", c_uint8), ("s", c_uint8), ("l", c_uint8), ("g", c_uint8),
                ("avl", c_uint8), ("unusable", c_uint8), ("padding", c_uint8)]

    def __repr__(self):
        return (f"KvmSegment(sel={self.selector:#x}, base={self.base:#x}, "
                f"limit={self.limit:#x}, type={self.type}, dpl={self.dpl}, "
                f"p={self.present}, s={self.s}, l={self.l}, db={self.db}, g={self.g})")


class KvmDtable(Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class KvmSregs(Structure):
    _fields_ = ([(n, KvmSegment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
                + [("gdt", KvmDtable), ("idt", KvmDtable)]
                + [(n, c_uint64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
                + [("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64))])


class KvmFpu(Structure):
    _fields_ = [("fpr", (c_uint8 * 16) * 8), ("fcw", c_uint16), ("fsw", c_uint16),
                ("ftwx", c_uint8), ("pad1", c_uint8), ("last_opcode", c_uint16),
                ("last_ip", c_uint64), ("last_dp", c_uint64),
                ("xmm", (c_uint8 * 16) * 16), ("mxcsr", c_uint32), ("pad2", c_uint32)]


class KvmMsrEntry(Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class KvmMsrsHeader(Structure):
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


def _msrs_struct(n: int):
    class KvmMsrs(Structure):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", KvmMsrEntry * n)]
    return KvmMsrs


class KvmMsrListHeader(Structure):
    _fields_ = [("nmsrs", c_uint32)]


class CpuidEntry(Structure):
    """struct kvm_cpuid_entry2."""
    _fields_ = [("function", c_uint32), ("index", c_uint32), ("flags", c_uint32),
                ("eax", c_uint32), ("ebx", c_uint32), ("ecx", c_uint32), ("edx", c_uint32),
                ("padding", c_uint32 * 3)]

    def __repr__(self):
        return (f"CpuidEntry(fn={self.function:#x}, idx={self.index}, flags={self.flags}, "
                f"eax={self.eax:#x}, ebx={self.ebx:#x}, ecx={self.ecx:#x}, edx={self.edx:#x})")


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


class KvmCpuid2Header(Structure):
    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


def _cpuid2_struct(n: int):
    class KvmCpuid2(Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", CpuidEntry * n)]
    return KvmCpuid2


KVM_MAX_CPUID_ENTRIES = 256     # more than any current kernel returns


class KvmXsave(Structure):
    _fields_ = [("region", c_uint32 * 1024)]


KVM_MAX_XCRS = 16


class KvmXcr(Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class KvmXcrs(Structure):
    _fields_ = [("nr_xcrs", c_uint32), ("flags", c_uint32),
                ("xcrs", KvmXcr * KVM_MAX_XCRS), ("padding", c_uint64 * 16)]


KVM_APIC_REG_SIZE = 0x400


class KvmLapicState(Structure):
    _fields_ = [("regs", c_uint8 * KVM_APIC_REG_SIZE)]

    def reg(self, offset: int) -> int:
        """A 32-bit LAPIC register at its xAPIC MMIO offset."""
        return int.from_bytes(bytes(self.regs[offset:offset + 4]), "little")

    def set_reg(self, offset: int, value: int):
        self.regs[offset:offset + 4] = list(value.to_bytes(4, "little"))


class KvmVcpuEventsException(Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("has_error_code", c_uint8),
                ("pending", c_uint8), ("error_code", c_uint32)]


class KvmVcpuEventsInterrupt(Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class KvmVcpuEventsNmi(Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class KvmVcpuEventsSmi(Structure):
    _fields_ = [("smm", c_uint8), ("pending", c_uint8), ("smm_inside_nmi", c_uint8),
                ("latched_init", c_uint8)]


class KvmVcpuEvents(Structure):
    _fields_ = [("exception", KvmVcpuEventsException), ("interrupt", KvmVcpuEventsInterrupt),
                ("nmi", KvmVcpuEventsNmi), ("sipi_vector", c_uint32), ("flags", c_uint32),
                ("smi", KvmVcpuEventsSmi), ("triple_fault_pending", c_uint8),
                ("reserved", c_uint8 * 26), ("exception_has_payload", c_uint8),
                ("exception_payload", c_uint64)]


class KvmMpState(Structure):
    _fields_ = [("mp_state", c_uint32)]


class KvmInterrupt(Structure):
    _fields_ = [("irq", c_uint32)]


class KvmIrqLevel(Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class KvmIrqfd(Structure):
    _fields_ = [("fd", c_uint32), ("gsi", c_uint32), ("flags", c_uint32),
                ("resamplefd", c_uint32), ("pad", c_uint8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0


class KvmIoeventfd(Structure):
    _fields_ = [("datamatch", c_uint64), ("addr", c_uint64), ("len", c_uint32),
                ("fd", ctypes.c_int32), ("flags", c_uint32), ("pad", c_uint8 * 36)]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class KvmMsi(Structure):
    _fields_ = [("address_lo", c_uint32), ("address_hi", c_uint32), ("data", c_uint32),
                ("flags", c_uint32), ("devid", c_uint32), ("pad", c_uint8 * 12)]


class KvmIrqRoutingMsi(Structure):
    _fields_ = [("address_lo", c_uint32), ("address_hi", c_uint32), ("data", c_uint32),
                ("devid", c_uint32)]


class KvmIrqRoutingIrqchip(Structure):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class KvmIrqRoutingUnion(Union):
    _fields_ = [("irqchip", KvmIrqRoutingIrqchip), ("msi", KvmIrqRoutingMsi),
                ("pad", c_uint32 * 8)]


class KvmIrqRoutingEntry(Structure):
    _fields_ = [("gsi", c_uint32), ("type", c_uint32), ("flags", c_uint32),
                ("pad", c_uint32), ("u", KvmIrqRoutingUnion)]


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2


class KvmIrqRoutingHeader(Structure):
    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]


def _irq_routing_struct(n: int):
    class KvmIrqRouting(Structure):
        _fields_ = [("nr", c_uint32), ("flags", c_uint32), ("entries", KvmIrqRoutingEntry * n)]
    return KvmIrqRouting


class KvmEnableCap(Structure):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4),
                ("pad", c_uint8 * 64)]


KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1


class KvmMsrFilterRange(Structure):
    _fields_ = [("flags", c_uint32), ("nmsrs", c_uint32), ("base", c_uint32),
                ("bitmap", ctypes.c_void_p)]


class KvmMsrFilter(Structure):
    _fields_ = [("flags", c_uint32), ("ranges", KvmMsrFilterRange * KVM_MSR_FILTER_MAX_RANGES)]


# KVM_CAP_X86_USER_SPACE_MSR argument: which failed MSR accesses exit to user space
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2

# ---- struct kvm_run: the shared page of each vCPU ----


class KvmRunIo(Structure):
    _fields_ = [("direction", c_uint8), ("size", c_uint8), ("port", c_uint16),
                ("count", c_uint32), ("data_offset", c_uint64)]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class KvmRunMmio(Structure):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32),
                ("is_write", c_uint8)]


class KvmRunFailEntry(Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class KvmRunHw(Structure):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class KvmRunEx(Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class KvmRunDebug(Structure):
    _fields_ = [("exception", c_uint32), ("pad", c_uint32), ("pc", c_uint64),
                ("dr6", c_uint64), ("dr7", c_uint64)]


class KvmRunInternal(Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class KvmRunSystemEvent(Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class KvmRunMsr(Structure):
    _fields_ = [("error", c_uint8), ("pad", c_uint8 * 7), ("reason", c_uint32),
                ("index", c_uint32), ("data", c_uint64)]


KVM_RUN_EXIT_UNION_SIZE = 256


class KvmRunExit(Union):
    _fields_ = [("hw", KvmRunHw), ("fail_entry", KvmRunFailEntry), ("ex", KvmRunEx),
                ("io", KvmRunIo), ("debug", KvmRunDebug), ("mmio", KvmRunMmio),
                ("internal", KvmRunInternal), ("system_event", KvmRunSystemEvent),
                ("msr", KvmRunMsr), ("padding", c_char * KVM_RUN_EXIT_UNION_SIZE)]


KVM_SYNC_REGS_SIZE = 2048


class KvmRun(Structure):
    _fields_ = [("request_interrupt_window", c_uint8), ("immediate_exit", c_uint8),
                ("padding1", c_uint8 * 6), ("exit_reason", c_uint32),
                ("ready_for_interrupt_injection", c_uint8), ("if_flag", c_uint8),
                ("flags", c_uint16), ("cr8", c_uint64), ("apic_base", c_uint64),
                ("u", KvmRunExit), ("kvm_valid_regs", c_uint64), ("kvm_dirty_regs", c_uint64),
                ("s", c_char * KVM_SYNC_REGS_SIZE)]


_MMIO_DATA_OFFSET = KvmRun.u.offset + KvmRunMmio.data.offset
# The hot path (every exit) decodes kvm_run with precompiled structs rather
# than chains of ctypes attribute reads; offsets come from the declarations.
_EXIT_REASON = struct.Struct("<I")
_EXIT_REASON_OFFSET = KvmRun.exit_reason.offset
_IO_EXIT = struct.Struct("<BBHIQ")           # KvmRunIo
_IO_EXIT_OFFSET = KvmRun.u.offset
assert _IO_EXIT.size == sizeof(KvmRunIo)
_EXIT_IO = 2                                  # ExitReason.IO as a plain int

# --------------------------------------------------------------------------
# ioctl numbers
# --------------------------------------------------------------------------
# system (/dev/kvm)
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, KvmMsrListHeader)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, KvmCpuid2Header)
# VM
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, KvmIrqLevel)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6a, KvmIrqRoutingHeader)
KVM_IRQFD = _IOW(KVMIO, 0x76, KvmIrqfd)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, KvmIoeventfd)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xa3, KvmEnableCap)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xa5, KvmMsi)
KVM_SET_MSR_FILTER = _IOW(KVMIO, 0xc6, KvmMsrFilter)
# vCPU
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, KvmRegs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, KvmRegs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, KvmSregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, KvmSregs)
KVM_INTERRUPT = _IOW(KVMIO, 0x86, KvmInterrupt)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, KvmMsrsHeader)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, KvmMsrsHeader)
KVM_GET_FPU = _IOR(KVMIO, 0x8c, KvmFpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8d, KvmFpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8e, KvmLapicState)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8f, KvmLapicState)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, KvmCpuid2Header)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, KvmCpuid2Header)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, KvmMpState)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, KvmMpState)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9f, KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xa0, KvmVcpuEvents)
KVM_GET_XSAVE = _IOR(KVMIO, 0xa4, KvmXsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xa5, KvmXsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xa6, KvmXcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xa7, KvmXcrs)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xa3)   # vCPU ioctl; shares its number with KVM_ENABLE_CAP
KVM_GET_STATS_FD = _IO(KVMIO, 0xce)  # VM and vCPU ioctl (Linux 5.14+)

# --------------------------------------------------------------------------
# Capabilities (the subset this project asks about) and exit reasons
# --------------------------------------------------------------------------


class Cap(enum.IntEnum):
    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    SYNC_MMU = 16
    IRQ_ROUTING = 25
    IRQFD = 32
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    XEN_HVM = 38
    XSAVE = 55
    XCRS = 56
    MAX_VCPUS = 66
    TSC_DEADLINE_TIMER = 72
    SIGNAL_MSI = 77
    READONLY_MEM = 81
    X2APIC_API = 129
    IMMEDIATE_EXIT = 136
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189


class ExitReason(enum.IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37
    MEMORY_FAULT = 39

    @classmethod
    def _missing_(cls, value):
        # An exit reason newer than this table: keep the number, don't crash.
        member = int.__new__(cls, value)
        member._name_ = f"EXIT_{value}"
        member._value_ = value
        return member


class InternalErrorSub(enum.IntEnum):
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class MpState(enum.IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class KvmError(OSError):
    """A KVM ioctl failed: carries errno and the ioctl's name."""

    def __init__(self, what: str, err: int = 0):
        super().__init__(err, f"{what}: {os.strerror(err) if err else 'failed'}")
        self.what = what


class KvmUnavailable(KvmError):
    """/dev/kvm missing, inaccessible or speaking another API version."""

    def __init__(self, message: str, err: int = 0):
        OSError.__init__(self, err, message)
        self.what = message

    def __str__(self):
        return self.strerror


def _ioctl(fd: int, request: int, arg, what: str):
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise KvmError(what, e.errno) from None


def _whole_state_ioctls(name: str, struct_type, get_request: int, set_request: int):
    """The Vcpu methods get_<name> and set_<name> for a state structure that
    KVM_GET_<NAME> fills and KVM_SET_<NAME> takes: one body for all of them,
    which differ only in the ioctl numbers and the structure."""
    get_what, set_what = f"KVM_GET_{name.upper()}", f"KVM_SET_{name.upper()}"

    def get(self):
        state = struct_type()
        _ioctl(self.fd, get_request, state, get_what)
        return state

    def set_(self, state):
        _ioctl(self.fd, set_request, state, set_what)

    # what a hand-written method would show to help(), inspect and tracebacks
    get.__annotations__ = {"return": struct_type}
    set_.__annotations__ = {"state": struct_type}
    for method, prefix in ((get, "get_"), (set_, "set_")):
        method.__name__ = prefix + name
        method.__qualname__ = "Vcpu." + method.__name__
    return get, set_


def _read_cpuid(fd: int, request: int, what: str) -> list[CpuidEntry]:
    """A CPUID table from KVM_GET_SUPPORTED_CPUID (system) or KVM_GET_CPUID2 (vCPU)."""
    buf = _cpuid2_struct(KVM_MAX_CPUID_ENTRIES)()
    buf.nent = KVM_MAX_CPUID_ENTRIES
    _ioctl(fd, request, buf, what)
    return [CpuidEntry.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]


# --------------------------------------------------------------------------
# Kick signal: KVM_RUN returns EINTR when a signal with a handler hits the
# thread running it. Python's signal.signal installs without SA_RESTART.
# --------------------------------------------------------------------------
KICK_SIGNAL = signal.SIGUSR1
_kick_installed = False
_kick_lock = threading.Lock()


def _noop_handler(signum, frame):
    pass


def install_kick_handler() -> bool:
    """Install the no-op kick handler (main thread only). Returns success."""
    global _kick_installed
    with _kick_lock:
        if _kick_installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        current = signal.getsignal(KICK_SIGNAL)
        # Any Python-level handler interrupts KVM_RUN; only replace the
        # default (terminate) or ignore (would not interrupt).
        if current in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(KICK_SIGNAL, _noop_handler)
        _kick_installed = True
        return True


# --------------------------------------------------------------------------
# Handles
# --------------------------------------------------------------------------


class Kvm(FdHandle):
    """The KVM system handle (/dev/kvm)."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"KVM unavailable: {path} does not exist "
                                 "(no KVM module loaded?)", errno.ENOENT) from None
        except PermissionError:
            raise KvmUnavailable(f"KVM unavailable: no permission to open {path} "
                                 "(need rw access, e.g. the kvm group)", errno.EACCES) from None
        except OSError as e:
            raise KvmUnavailable(f"KVM unavailable: cannot open {path}: {e.strerror}",
                                 e.errno) from None
        self.path = path
        try:
            version = fcntl.ioctl(self.fd, KVM_GET_API_VERSION, 0)
        except OSError as e:
            os.close(self.fd)
            raise KvmUnavailable(f"KVM unavailable: {path} is not a KVM device "
                                 f"({e.strerror})", e.errno) from None
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"KVM unavailable: {path} speaks API version {version}, "
                                 f"need {KVM_API_VERSION}")
        self.api_version = version
        self.vcpu_mmap_size = _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0,
                                     "KVM_GET_VCPU_MMAP_SIZE")
        install_kick_handler()

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION")

    def supported_cpuid(self) -> list[CpuidEntry]:
        return _read_cpuid(self.fd, KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID")

    def msr_index_list(self) -> list[int]:
        n = 1024

        class _List(Structure):
            _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * n)]
        buf = _List(nmsrs=n)
        _ioctl(self.fd, KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
        return list(buf.indices[:buf.nmsrs])

    def create_vm(self) -> "Vm":
        fd = _ioctl(self.fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return Vm(self, fd)



class Vm(FdHandle):
    """A VM handle: memory slots, irqchip, eventfds, vCPUs."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self._slots: dict[int, tuple[int, object, bool]] = {}
        self.vcpus: list[Vcpu] = []
        self.has_irqchip = False

    # ---- memory ----
    def add_memory(self, gpa: int, mem, readonly: bool = False) -> int:
        """Register `mem` (a GuestMemory) at guest-physical `gpa`; returns the slot."""
        if gpa & (mmap.PAGESIZE - 1):
            raise ValueError(f"guest-physical address {gpa:#x} is not page aligned")
        slot = 0
        while slot in self._slots:
            slot += 1
        region = KvmUserspaceMemoryRegion(
            slot=slot, flags=KVM_MEM_READONLY if readonly else 0,
            guest_phys_addr=gpa, memory_size=mem.size, userspace_addr=mem.address)
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
        self._slots[slot] = (gpa, mem, readonly)
        return slot

    def remove_memory(self, slot: int):
        gpa, mem, ro = self._slots.pop(slot)
        region = KvmUserspaceMemoryRegion(slot=slot, guest_phys_addr=gpa, memory_size=0,
                                          userspace_addr=mem.address)
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def memory_slots(self) -> dict:
        """slot -> (gpa, GuestMemory, readonly)."""
        return dict(self._slots)

    def set_tss_addr(self, addr: int):
        _ioctl(self.fd, KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int):
        _ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, c_uint64(addr), "KVM_SET_IDENTITY_MAP_ADDR")

    # ---- interrupts ----
    def create_irqchip(self):
        """In-kernel PIC + IOAPIC + LAPICs. Must precede create_vcpu()."""
        _ioctl(self.fd, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
        self.has_irqchip = True

    def irq_line(self, irq: int, level: int):
        _ioctl(self.fd, KVM_IRQ_LINE, KvmIrqLevel(irq=irq, level=level), "KVM_IRQ_LINE")

    def irqfd(self, efd: int, gsi: int, deassign: bool = False):
        """Writing to eventfd `efd` raises `gsi` (route it with set_gsi_routing)."""
        arg = KvmIrqfd(fd=efd, gsi=gsi, flags=KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        _ioctl(self.fd, KVM_IRQFD, arg, "KVM_IRQFD")

    def ioeventfd(self, efd: int, addr: int, length: int = 4, datamatch: int | None = None,
                  pio: bool = True, deassign: bool = False):
        """A guest write of `length` bytes to `addr` (port or MMIO) signals `efd`
        inside the kernel, without an exit to user space."""
        flags = 0
        if pio:
            flags |= KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = KvmIoeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=efd, flags=flags)
        _ioctl(self.fd, KVM_IOEVENTFD, arg, "KVM_IOEVENTFD")

    def signal_msi(self, address: int, data: int) -> int:
        """Inject one MSI. Returns >0 delivered, 0 blocked by the guest."""
        arg = KvmMsi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return _ioctl(self.fd, KVM_SIGNAL_MSI, arg, "KVM_SIGNAL_MSI")

    def set_gsi_routing(self, msi_routes: dict[int, tuple[int, int]] | list,
                        irqchip_routes: list[tuple[int, int, int]] = ()):
        """Replace the whole GSI routing table.

        msi_routes: {gsi: (address, data)} (or a list of (gsi, address, data));
        irqchip_routes: [(gsi, irqchip, pin)] — the table replaces KVM's default
        one, so keep any legacy routes the guest still needs.
        """
        items = list(msi_routes.items()) if isinstance(msi_routes, dict) else \
            [(g, (a, d)) for g, a, d in msi_routes]
        n = len(items) + len(irqchip_routes)
        table = _irq_routing_struct(max(n, 1))()
        table.nr = n
        i = 0
        for gsi, (address, data) in items:
            e = table.entries[i]
            e.gsi, e.type = gsi, KVM_IRQ_ROUTING_MSI
            e.u.msi.address_lo, e.u.msi.address_hi = address & 0xFFFFFFFF, address >> 32
            e.u.msi.data = data
            i += 1
        for gsi, chip, pin in irqchip_routes:
            e = table.entries[i]
            e.gsi, e.type = gsi, KVM_IRQ_ROUTING_IRQCHIP
            e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
            i += 1
        _ioctl(self.fd, KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    # ---- capabilities / MSRs ----
    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION")

    def enable_cap(self, cap: int, *args: int):
        arg = KvmEnableCap(cap=int(cap))
        for i, a in enumerate(args):
            arg.args[i] = a
        _ioctl(self.fd, KVM_ENABLE_CAP, arg, f"KVM_ENABLE_CAP({int(cap)})")

    def enable_user_space_msr(self, reasons: int = KVM_MSR_EXIT_REASON_UNKNOWN
                              | KVM_MSR_EXIT_REASON_FILTER):
        """Unknown/filtered MSR accesses exit with X86_RDMSR/X86_WRMSR instead of #GP."""
        self.enable_cap(Cap.X86_USER_SPACE_MSR, reasons)

    # ---- vCPUs ----
    def create_vcpu(self, index: int) -> "Vcpu":
        fd = _ioctl(self.fd, KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        vcpu = Vcpu(self, fd, index)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self):
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        super().close()


class VcpuExit:
    """One KVM_RUN exit, decoded by reason.

    IO:   port, size, direction (KVM_EXIT_IO_IN/OUT), count, data (memoryview
          into kvm_run: read it for OUT, write it for IN), value (int).
    MMIO: phys_addr, len, is_write, data (memoryview, len bytes).
    INTERNAL_ERROR: suberror, internal_data (list of ints).
    FAIL_ENTRY: hardware_entry_failure_reason.
    X86_RDMSR / X86_WRMSR: msr_index, msr_data; set_msr_result(data, error).
    SYSTEM_EVENT: event_type, event_data.
    """
    __slots__ = ("reason", "port", "size", "direction", "count", "data", "phys_addr",
                 "len", "is_write", "suberror", "internal_data",
                 "hardware_entry_failure_reason", "msr_index", "msr_data", "_run",
                 "event_type", "event_data", "exception", "error_code")

    def __init__(self, reason):
        self.reason = reason

    @property
    def value(self) -> int:
        """IO/MMIO data as a little-endian integer (first element for string IO)."""
        n = self.size if self.reason == ExitReason.IO else self.len
        return int.from_bytes(self.data[:n], "little")

    def set_value(self, v: int):
        """Answer an IN / MMIO read."""
        n = self.size if self.reason == ExitReason.IO else self.len
        self.data[:n] = (v & ((1 << (8 * n)) - 1)).to_bytes(n, "little")

    @property
    def is_out(self) -> bool:
        return self.direction == KVM_EXIT_IO_OUT

    def set_msr_result(self, data: int = 0, error: bool = False):
        self._run.u.msr.data = data
        self._run.u.msr.error = 1 if error else 0

    def __repr__(self):
        r = self.reason
        if r == ExitReason.IO:
            d = "out" if self.direction == KVM_EXIT_IO_OUT else "in"
            return f"VcpuExit(IO {d} port={self.port:#x} size={self.size} count={self.count})"
        if r == ExitReason.MMIO:
            return (f"VcpuExit(MMIO {'write' if self.is_write else 'read'} "
                    f"addr={self.phys_addr:#x} len={self.len})")
        if r == ExitReason.INTERNAL_ERROR:
            return f"VcpuExit(INTERNAL_ERROR suberror={self.suberror} data={self.internal_data})"
        return f"VcpuExit({r.name})"


_STATS_HEADER = struct.Struct("<IIIIII")     # kvm_stats_header
_STATS_DESC = struct.Struct("<IhHII")         # kvm_stats_desc, before its name


class KvmStats(FdHandle):
    """A KVM binary-statistics fd (Documentation/virt/kvm/api.rst, 4.133).

    The descriptors are read once; read() returns {name: value} for the
    single-value counters, read with one pread of the data block, so it is
    cheap enough to call around every exit. On kvm_pvm, `insn_emulation`
    counts the CPL0 instructions the KVM interpreted: the shim's exact cost.
    """

    def __init__(self, fd: int):
        self.fd = fd
        _flags, name_size, count, _id_off, desc_off, self._data_off = _STATS_HEADER.unpack(
            os.pread(fd, _STATS_HEADER.size, 0))
        step = _STATS_DESC.size + name_size
        descs = os.pread(fd, step * count, desc_off)
        self._fields: list[tuple[str, int]] = []
        end = 0
        for i in range(count):
            _fl, _exp, size, offset, _bucket = _STATS_DESC.unpack_from(descs, i * step)
            name = descs[i * step + _STATS_DESC.size:(i + 1) * step].split(b"\0")[0].decode()
            end = max(end, offset + 8 * size)
            if size == 1:
                self._fields.append((name, offset))
        self._data_size = end

    def read(self) -> dict[str, int]:
        data = os.pread(self.fd, self._data_size, self._data_off)
        return {name: int.from_bytes(data[off:off + 8], "little") for name, off in self._fields}


class Vcpu(FdHandle):
    """A vCPU handle. Use each Vcpu from one thread; kick() from any thread."""

    def __init__(self, vm: Vm, fd: int, index: int):
        self.vm = vm
        self.fd = fd
        self.index = index
        self._mmap = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        self._mv = memoryview(self._mmap)
        self.kvm_run = KvmRun.from_buffer(self._mmap)
        self._thread: int | None = None
        self._thread_lock = threading.Lock()
        try:
            self._stats: KvmStats | None = KvmStats(
                _ioctl(fd, KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD"))
        except KvmError:
            self._stats = None

    # ---- running ----
    def run(self) -> VcpuExit:
        """One KVM_RUN. A signal (kick) turns into an INTR exit."""
        self._thread = threading.get_ident()
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except InterruptedError:
            self.kvm_run.immediate_exit = 0
            return VcpuExit(ExitReason.INTR)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return VcpuExit(ExitReason.INTR)
            raise KvmError("KVM_RUN", e.errno) from None
        mm = self._mmap
        reason = _EXIT_REASON.unpack_from(mm, _EXIT_REASON_OFFSET)[0]
        if reason == _EXIT_IO:
            ex = VcpuExit(ExitReason.IO)
            ex.direction, ex.size, ex.port, ex.count, off = _IO_EXIT.unpack_from(mm, _IO_EXIT_OFFSET)
            end = off + ex.size * ex.count
            if end > len(mm):
                raise KvmError("KVM_RUN: IO data outside kvm_run", errno.EFAULT)
            ex.data = self._mv[off:end]
            return ex
        ex = VcpuExit(ExitReason(reason))
        run = self.kvm_run
        if reason == ExitReason.MMIO:
            m = run.u.mmio
            ex.phys_addr, ex.len, ex.is_write = m.phys_addr, m.len, bool(m.is_write)
            ex.data = self._mv[_MMIO_DATA_OFFSET:_MMIO_DATA_OFFSET + min(m.len, 8)]
        elif reason == ExitReason.INTERNAL_ERROR:
            ie = run.u.internal
            ex.suberror = ie.suberror
            ex.internal_data = list(ie.data[:min(ie.ndata, 16)])
        elif reason == ExitReason.FAIL_ENTRY:
            ex.hardware_entry_failure_reason = run.u.fail_entry.hardware_entry_failure_reason
        elif reason in (ExitReason.X86_RDMSR, ExitReason.X86_WRMSR):
            ex.msr_index, ex.msr_data, ex._run = run.u.msr.index, run.u.msr.data, run
        elif reason == ExitReason.SYSTEM_EVENT:
            se = run.u.system_event
            ex.event_type, ex.event_data = se.type, list(se.data[:min(se.ndata, 16)])
        elif reason == ExitReason.EXCEPTION:
            ex.exception, ex.error_code = run.u.ex.exception, run.u.ex.error_code
        return ex

    def run_loop(self, handler) -> VcpuExit:
        """Run until handler(exit) returns False; returns that last exit."""
        try:
            while True:
                ex = self.run()
                if not handler(ex):
                    return ex
        finally:
            with self._thread_lock:
                self._thread = None

    def kick(self):
        """Make the thread in (or about to enter) KVM_RUN return INTR promptly.

        immediate_exit covers the window before KVM_RUN; the signal covers a
        vCPU already inside it."""
        run = self.kvm_run
        if run is None:          # closed
            return
        run.immediate_exit = 1
        with self._thread_lock:
            t = self._thread
            if t is not None and t != threading.get_ident():
                try:
                    signal.pthread_kill(t, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    # ---- registers and other state KVM reads and writes whole ----
    get_regs, set_regs = _whole_state_ioctls("regs", KvmRegs, KVM_GET_REGS, KVM_SET_REGS)
    get_sregs, set_sregs = _whole_state_ioctls("sregs", KvmSregs, KVM_GET_SREGS, KVM_SET_SREGS)
    get_fpu, set_fpu = _whole_state_ioctls("fpu", KvmFpu, KVM_GET_FPU, KVM_SET_FPU)
    get_xsave, set_xsave = _whole_state_ioctls("xsave", KvmXsave, KVM_GET_XSAVE, KVM_SET_XSAVE)
    get_xcrs, set_xcrs = _whole_state_ioctls("xcrs", KvmXcrs, KVM_GET_XCRS, KVM_SET_XCRS)
    get_lapic, set_lapic = _whole_state_ioctls("lapic", KvmLapicState,
                                               KVM_GET_LAPIC, KVM_SET_LAPIC)
    get_vcpu_events, set_vcpu_events = _whole_state_ioctls(
        "vcpu_events", KvmVcpuEvents, KVM_GET_VCPU_EVENTS, KVM_SET_VCPU_EVENTS)

    def stats(self) -> "KvmStats":
        """This vCPU's KVM binary statistics (KVM_GET_STATS_FD): readable from
        any thread.  Opened with the vCPU, because the ioctl waits for the
        vCPU's mutex, which a thread in KVM_RUN holds (an idle guest: for
        seconds)."""
        if self._stats is None:
            raise KvmError("KVM_GET_STATS_FD (Linux 5.14+)", errno.ENOTTY)
        return self._stats

    def get_tsc_khz(self) -> int:
        """The guest TSC frequency KVM gives this vCPU, in kHz."""
        return _ioctl(self.fd, KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def get_mp_state(self) -> int:
        s = KvmMpState()
        _ioctl(self.fd, KVM_GET_MP_STATE, s, "KVM_GET_MP_STATE")
        return s.mp_state

    def set_mp_state(self, state: int):
        _ioctl(self.fd, KVM_SET_MP_STATE, KvmMpState(mp_state=state), "KVM_SET_MP_STATE")

    def interrupt(self, vector: int):
        """KVM_INTERRUPT: queue an external interrupt (no in-kernel irqchip only)."""
        _ioctl(self.fd, KVM_INTERRUPT, KvmInterrupt(irq=vector), "KVM_INTERRUPT")

    # ---- MSRs / CPUID ----
    def get_msrs(self, indices) -> dict[int, int]:
        indices = list(indices)
        buf = _msrs_struct(len(indices))()
        buf.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            buf.entries[i].index = idx
        n = _ioctl(self.fd, KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        if n != len(indices):
            raise KvmError(f"KVM_GET_MSRS: MSR {indices[n]:#x} not readable", errno.EINVAL)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]):
        buf = _msrs_struct(len(values))()
        buf.nmsrs = len(values)
        items = list(values.items())
        for i, (idx, v) in enumerate(items):
            buf.entries[i].index, buf.entries[i].data = idx, v
        n = _ioctl(self.fd, KVM_SET_MSRS, buf, "KVM_SET_MSRS")
        if n != len(items):
            raise KvmError(f"KVM_SET_MSRS: MSR {items[n][0]:#x} rejected", errno.EINVAL)

    def set_cpuid(self, entries):
        entries = list(entries)
        buf = _cpuid2_struct(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        _ioctl(self.fd, KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_cpuid(self) -> list[CpuidEntry]:
        return _read_cpuid(self.fd, KVM_GET_CPUID2, "KVM_GET_CPUID2")

    def close(self):
        if self.fd >= 0:
            # kvm_run is a ctypes view over the mapping; drop views before unmapping
            # (a VcpuExit.data view still alive keeps the mapping until the GC)
            self.kvm_run = None
            unmap(self._mmap, self._mv)
            if self._stats is not None:
                self._stats.close()
        super().close()
