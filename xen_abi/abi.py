"""The Xen public ABI (x86-64 PV) as numbers and binary layouts, declared once.

Values follow xen/include/public/*.h (interface version 0x040e00). Layouts are
`construct` structs so that Python code reads and writes guest memory through
one definition; the C code (the shim, the test guests) gets the numbers it
needs from a header generated from this module at build time (shim/layout.py).
"""
from __future__ import annotations

import ctypes
import enum
import struct

from construct import (
    Array,
    Bytes,
    Int8sl,
    Int8ul,
    Int16sl,
    Int16ul,
    Int32sl,
    Int32ul,
    Int64sl,
    Int64ul,
    Padding,
    PaddedString,
    Struct,
)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


def flat_struct(layout: Struct) -> struct.Struct:
    """The same layout as a struct.Struct, for hot paths: a construct Struct
    made only of little-endian integers and padding, its fields in order,
    the padding skipped.  One declaration (the construct one), parsed at
    struct's speed (~0.1 us a parse against construct's ~7)."""
    fmt = "<"
    for field in layout.subcons:
        inner = getattr(field, "subcon", field)
        code = getattr(inner, "fmtstr", None)
        if code and code[0] == "<":
            fmt += code[1:]
        elif type(field).__name__ == "Padded" and type(inner).__name__ == "Pass":
            fmt += f"{field.sizeof()}x"
        else:
            raise TypeError(f"flat_struct: {field!r} is not a little-endian integer or padding")
    packed = struct.Struct(fmt)
    assert packed.size == layout.sizeof()
    return packed

# ---------------------------------------------------------------------------
# Errno values returned by hypercalls (negated), xen/include/public/errno.h
# ---------------------------------------------------------------------------


class XenErrno(enum.IntEnum):
    EPERM = 1
    ENOENT = 2
    ESRCH = 3
    EINTR = 4
    EIO = 5
    ENXIO = 6
    E2BIG = 7
    ENOEXEC = 8
    EBADF = 9
    ECHILD = 10
    EAGAIN = 11
    ENOMEM = 12
    EACCES = 13
    EFAULT = 14
    EBUSY = 16
    EEXIST = 17
    EXDEV = 18
    ENODEV = 19
    EINVAL = 22
    ENFILE = 23
    EMFILE = 24
    ENOSPC = 28
    EROFS = 30
    EMLINK = 31
    EDOM = 33
    ERANGE = 34
    EDEADLK = 35
    ENAMETOOLONG = 36
    ENOLCK = 37
    ENOSYS = 38
    ENOTEMPTY = 39
    ENODATA = 61
    ETIME = 62
    EBADMSG = 74
    EOVERFLOW = 75
    EILSEQ = 84
    ENOTSOCK = 88
    EOPNOTSUPP = 95
    EADDRINUSE = 98
    EADDRNOTAVAIL = 99
    ENOBUFS = 105
    EISCONN = 106
    ENOTCONN = 107
    ETIMEDOUT = 110
    ECONNREFUSED = 111


class HypercallError(Exception):
    """Raised inside a hypercall handler; becomes -errno in the guest's rax."""

    def __init__(self, errno: XenErrno, why: str = ""):
        super().__init__(f"{errno.name}: {why}" if why else errno.name)
        self.errno = XenErrno(errno)


# ---------------------------------------------------------------------------
# Hypercall numbers
# ---------------------------------------------------------------------------


class Hypercall(enum.IntEnum):
    set_trap_table = 0
    mmu_update = 1
    set_gdt = 2
    stack_switch = 3
    set_callbacks = 4
    fpu_taskswitch = 5
    sched_op_compat = 6
    platform_op = 7
    set_debugreg = 8
    get_debugreg = 9
    update_descriptor = 10
    memory_op = 12
    multicall = 13
    update_va_mapping = 14
    set_timer_op = 15
    event_channel_op_compat = 16
    xen_version = 17
    console_io = 18
    physdev_op_compat = 19
    grant_table_op = 20
    vm_assist = 21
    update_va_mapping_otherdomain = 22
    iret = 23
    vcpu_op = 24
    set_segment_base = 25
    mmuext_op = 26
    xsm_op = 27
    nmi_op = 28
    sched_op = 29
    callback_op = 30
    xenoprof_op = 31
    event_channel_op = 32
    physdev_op = 33
    hvm_op = 34
    sysctl = 35
    domctl = 36
    kexec_op = 37
    tmem_op = 38
    argo_op = 39
    xenpmu_op = 40
    dm_op = 41
    hypfs_op = 42
    mca = 48


# Hypercall page: 32-byte slots, one per hypercall number.
HYPERCALL_PAGE_SLOT_SIZE = 32

# ---------------------------------------------------------------------------
# Sub-operations
# ---------------------------------------------------------------------------


class MmuUpdateCmd(enum.IntEnum):  # low 2 bits of mmu_update.ptr
    NORMAL_PT_UPDATE = 0
    MACHPHYS_UPDATE = 1
    PT_UPDATE_PRESERVE_AD = 2
    PT_UPDATE_NO_TRANSLATE = 3


class MmuextCmd(enum.IntEnum):
    PIN_L1_TABLE = 0
    PIN_L2_TABLE = 1
    PIN_L3_TABLE = 2
    PIN_L4_TABLE = 3
    UNPIN_TABLE = 4
    NEW_BASEPTR = 5
    TLB_FLUSH_LOCAL = 6
    INVLPG_LOCAL = 7
    TLB_FLUSH_MULTI = 8
    INVLPG_MULTI = 9
    TLB_FLUSH_ALL = 10
    INVLPG_ALL = 11
    FLUSH_CACHE = 12
    SET_LDT = 13
    NEW_USER_BASEPTR = 15
    CLEAR_PAGE = 16
    COPY_PAGE = 17
    FLUSH_CACHE_GLOBAL = 18
    MARK_SUPER = 19
    UNMARK_SUPER = 20


# update_va_mapping flags
UVMF_NONE = 0
UVMF_TLB_FLUSH = 1
UVMF_INVLPG = 2
UVMF_FLUSHTYPE_MASK = 3
UVMF_MULTI = 0
UVMF_LOCAL = 0
UVMF_ALL = 4


class VmAssistType(enum.IntEnum):
    FOUR_GB_SEGMENTS = 0
    FOUR_GB_SEGMENTS_NOTIFY = 1
    WRITABLE_PAGETABLES = 2
    PAE_EXTENDED_CR3 = 3
    ARCHITECTURAL_IOPL = 4
    RUNSTATE_UPDATE_FLAG = 5
    M2P_STRICT = 32


VMASST_CMD_ENABLE = 0
VMASST_CMD_DISABLE = 1


class SegBase(enum.IntEnum):
    FS = 0
    GS_USER = 1
    GS_KERNEL = 2
    GS_USER_SEL = 3


class CallbackType(enum.IntEnum):
    EVENT = 0
    FAILSAFE = 1
    SYSCALL = 2
    SYSCALL32 = 7
    SYSENTER = 5
    NMI = 4


CALLBACKF_MASK_EVENTS = 1
CALLBACKOP_REGISTER = 0
CALLBACKOP_UNREGISTER = 1


class VcpuOp(enum.IntEnum):
    initialise = 0
    up = 1
    down = 2
    is_up = 3
    get_runstate_info = 4
    register_runstate_memory_area = 5
    set_periodic_timer = 6
    stop_periodic_timer = 7
    set_singleshot_timer = 8
    stop_singleshot_timer = 9
    register_vcpu_info = 10
    send_nmi = 11
    get_physid = 12
    register_vcpu_time_memory_area = 13


VCPU_SSHOTTMR_FUTURE = 1


class SchedOp(enum.IntEnum):
    yield_ = 0
    block = 1
    shutdown = 2
    poll = 3
    remote_shutdown = 4
    shutdown_code = 5
    watchdog = 6


class ShutdownReason(enum.IntEnum):
    poweroff = 0
    reboot = 1
    suspend = 2
    crash = 3
    watchdog = 4
    soft_reset = 5


class EvtchnOp(enum.IntEnum):
    bind_interdomain = 0
    bind_virq = 1
    bind_pirq = 2
    close = 3
    send = 4
    status = 5
    alloc_unbound = 6
    bind_ipi = 7
    bind_vcpu = 8
    unmask = 9
    reset = 10
    init_control = 11
    expand_array = 12
    set_priority = 13


class EvtchnStatus(enum.IntEnum):
    closed = 0
    unbound = 1
    interdomain = 2
    pirq = 3
    virq = 4
    ipi = 5


class Virq(enum.IntEnum):
    TIMER = 0
    DEBUG = 1
    CONSOLE = 2
    DOM_EXC = 3
    TBUF = 4
    DEBUGGER = 6
    XENOPROF = 7
    CON_RING = 8
    PCPU_STATE = 9
    MEM_EVENT = 10
    ARGO = 11
    ENOMEM = 12
    XENPMU = 13


NR_VIRQS = 24
# 2-level event channels: 64 words of 64 bits in shared_info.
EVTCHN_2L_NR_CHANNELS = 64 * 64

# FIFO-based event channels (public/event_channel.h).  One event word
# (u32) per port in guest pages registered with EVTCHNOP_expand_array; a
# control block per vCPU (EVTCHNOP_init_control) with the READY bitmap of
# its 16 queues and each queue's head.
EVTCHN_FIFO_PRIORITY_MAX = 0
EVTCHN_FIFO_PRIORITY_DEFAULT = 7
EVTCHN_FIFO_PRIORITY_MIN = 15
EVTCHN_FIFO_MAX_QUEUES = EVTCHN_FIFO_PRIORITY_MIN + 1
EVTCHN_FIFO_PENDING = 31
EVTCHN_FIFO_MASKED = 30
EVTCHN_FIFO_LINKED = 29
EVTCHN_FIFO_BUSY = 28
EVTCHN_FIFO_LINK_BITS = 17
EVTCHN_FIFO_LINK_MASK = (1 << EVTCHN_FIFO_LINK_BITS) - 1
EVTCHN_FIFO_NR_CHANNELS = 1 << EVTCHN_FIFO_LINK_BITS
EVTCHN_FIFO_EVENT_WORDS_PER_PAGE = 4096 // 4
# Xen's event array holds at most this many pages (EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES);
# expand_array past it is -ENOSPC
EVTCHN_FIFO_MAX_EVENT_ARRAY_PAGES = EVTCHN_FIFO_NR_CHANNELS // EVTCHN_FIFO_EVENT_WORDS_PER_PAGE
# The domain's highest port (Xen's max_evtchn_port), xl's default
# max_event_channels: both ABIs allocate ports 1..1023; the FIFO event
# array then needs one page.
MAX_EVTCHN_PORT = 1023


class GnttabOp(enum.IntEnum):
    map_grant_ref = 0
    unmap_grant_ref = 1
    setup_table = 2
    dump_table = 3
    transfer = 4
    copy = 5
    query_size = 6
    unmap_and_replace = 7
    set_version = 8
    get_status_frames = 9
    get_version = 10
    swap_grant_ref = 11
    cache_flush = 12


# grant_entry_v1.flags
GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_transfer_completed = 3
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4
GTF_PWT = 1 << 5
GTF_PCD = 1 << 6
GTF_PAT = 1 << 7
GTF_sub_page = 1 << 8
GTF_transitive = 3           # v2 only: the type GTF_transfer_completed has in v1
GTF_transfer_committed = 1 << 2   # GTF_accept_transfer subflags
GTF_transfer_completed = 1 << 3

# GNTMAP_* (gnttab_map_grant_ref.flags)
GNTMAP_device_map = 1 << 0
GNTMAP_host_map = 1 << 1
GNTMAP_readonly = 1 << 2
GNTMAP_application_map = 1 << 3
GNTMAP_contains_pte = 1 << 4
# GNTCOPY_* (gnttab_copy.flags)
GNTCOPY_source_gref = 1 << 0
GNTCOPY_dest_gref = 1 << 1
# gnttab_cache_flush.op
GNTTAB_CACHE_CLEAN = 1 << 0
GNTTAB_CACHE_INVAL = 1 << 1
GNTTAB_CACHE_SOURCE_GREF = 1 << 31
# the hypercall's cmd: the op in the low bits, a continuation's progress
# above (accepted for cache_flush only)
GNTTABOP_CMD_MASK = (1 << 12) - 1

GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1
GNTTAB_NR_RESERVED_ENTRIES = 8

# gnttab status codes (GNTST_*)
GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_bad_virt_addr = -5
GNTST_bad_dev_addr = -6
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_address_too_big = -11
GNTST_eagain = -12
GNTST_no_space = -13


class MemoryOp(enum.IntEnum):
    increase_reservation = 0
    decrease_reservation = 1
    maximum_ram_page = 2
    current_reservation = 3
    maximum_reservation = 4
    machphys_mfn_list = 5
    populate_physmap = 6
    add_to_physmap = 7
    memory_map = 9
    machine_memory_map = 10
    exchange = 11
    machphys_mapping = 12
    set_memory_map = 13
    machphys_compat_mfn_list = 25
    get_sharing_freed_pages = 18
    get_sharing_shared_pages = 19


# XENMAPSPACE_* for add_to_physmap
XENMAPSPACE_shared_info = 0
XENMAPSPACE_grant_table = 1
XENMAPSPACE_gmfn = 2
XENMAPSPACE_gmfn_range = 3
XENMAPSPACE_gmfn_foreign = 4
XENMAPSPACE_dev_mmio = 5
XENMAPIDX_grant_table_status = 1 << 31

E820_RAM = 1
E820_RESERVED = 2


class XenVer(enum.IntEnum):
    version = 0
    extraversion = 1
    compile_info = 2
    capabilities = 3
    changeset = 4
    platform_parameters = 5
    get_features = 6
    pagesize = 7
    guest_handle = 8
    commandline = 9
    build_id = 10


class XenFeat(enum.IntEnum):
    writable_page_tables = 0
    writable_descriptor_tables = 1
    auto_translated_physmap = 2
    supervisor_mode_kernel = 3
    pae_pgdir_above_4gb = 4
    mmu_pt_update_preserve_ad = 5
    highmem_assist = 6
    gnttab_map_avail_bits = 7
    hvm_callback_vector = 8
    hvm_safe_pvclock = 9
    hvm_pirqs = 10
    dom0 = 11
    grant_map_identity = 12
    memory_op_vnode_supported = 13
    ARM_SMCCC_supported = 14
    linux_rsdp_unrestricted = 15
    not_direct_mapped = 16
    direct_mapped = 17
    runstate_phys_area = 18
    vcpu_time_phys_area = 19


# What Xen reports to a 64-bit PV domU in submap 0 (xen/common/kernel.c).
# Linux panics unless 5 and 7 are present.
PV_FEATURES_SUBMAP0 = (
    (1 << XenFeat.mmu_pt_update_preserve_ad)
    | (1 << XenFeat.highmem_assist)
    | (1 << XenFeat.gnttab_map_avail_bits)
    | (1 << XenFeat.memory_op_vnode_supported)
)


class ConsoleIoCmd(enum.IntEnum):
    write = 0
    read = 1


class PhysdevOp(enum.IntEnum):
    eoi = 12
    pirq_eoi_gmfn_v1 = 17
    pirq_eoi_gmfn_v2 = 28
    irq_status_query = 5
    set_iopl = 6
    set_iobitmap = 7
    apic_read = 8
    apic_write = 9
    alloc_irq_vector = 10
    free_irq_vector = 11
    map_pirq = 13
    unmap_pirq = 14
    manage_pci_add = 15
    manage_pci_remove = 16
    restore_msi = 19
    setup_gsi = 21
    get_free_pirq = 23
    pci_device_add = 25
    pci_device_remove = 26
    dbgp_op = 29


class XenPmuOp(enum.IntEnum):
    get_mode = 0
    set_mode = 1
    get_features = 2
    set_features = 3
    init = 4
    finish = 5


class XenbusState(enum.IntEnum):
    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8


DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_IDLE = 0x7FFF

# ---------------------------------------------------------------------------
# Virtual address space and selectors (64-bit PV)
# ---------------------------------------------------------------------------

HYPERVISOR_VIRT_START = 0xFFFF800000000000
HYPERVISOR_VIRT_END = 0xFFFF880000000000
HYPERVISOR_L4_FIRST_SLOT = 256
HYPERVISOR_L4_LAST_SLOT = 271
MACH2PHYS_VIRT_START = 0xFFFF800000000000
MACH2PHYS_VIRT_END = 0xFFFF804000000000

FIRST_RESERVED_GDT_PAGE = 14
FIRST_RESERVED_GDT_BYTE = FIRST_RESERVED_GDT_PAGE * PAGE_SIZE
FIRST_RESERVED_GDT_ENTRY = FIRST_RESERVED_GDT_BYTE // 8  # 7168

FLAT_RING3_CS32 = 0xE023
FLAT_RING3_DS32 = 0xE02B
FLAT_RING3_SS32 = 0xE02B
FLAT_RING3_CS64 = 0xE033
FLAT_RING3_DS64 = 0x0000
FLAT_RING3_SS64 = 0xE02B
FLAT_KERNEL_CS64 = FLAT_RING3_CS64
FLAT_KERNEL_DS64 = FLAT_RING3_DS64
FLAT_KERNEL_SS64 = FLAT_RING3_SS64
FLAT_KERNEL_CS = FLAT_KERNEL_CS64
FLAT_KERNEL_SS = FLAT_KERNEL_SS64
FLAT_USER_CS64 = FLAT_RING3_CS64
FLAT_USER_SS64 = FLAT_RING3_SS64

VGCF_I387_VALID = 1 << 0
VGCF_IN_KERNEL = 1 << 2
VGCF_FAILSAFE_DISABLES_EVENTS = 1 << 3
VGCF_SYSCALL_DISABLES_EVENTS = 1 << 4
VGCF_ONLINE = 1 << 5
VGCF_IN_SYSCALL = 1 << 8  # iret_context.flags

# Trap table entry flags
TI_DPL_MASK = 3
TI_MASK_EVENTS = 4  # "interrupt gate": set evtchn_upcall_mask on entry

# ---------------------------------------------------------------------------
# Start-of-day
# ---------------------------------------------------------------------------

START_INFO_MAGIC = b"xen-3.0-x86_64"
MAX_GUEST_CMDLINE = 1024

SIF_PRIVILEGED = 1 << 0
SIF_INITDOMAIN = 1 << 1
SIF_MULTIBOOT_MOD = 1 << 2
SIF_MOD_START_PFN = 1 << 3
SIF_VIRT_P2M_4TOOLS = 1 << 4


class ElfNote(enum.IntEnum):
    INFO = 0
    ENTRY = 1
    HYPERCALL_PAGE = 2
    VIRT_BASE = 3
    PADDR_OFFSET = 4
    XEN_VERSION = 5
    GUEST_OS = 6
    GUEST_VERSION = 7
    LOADER = 8
    PAE_MODE = 9
    FEATURES = 10
    BSD_SYMTAB = 11
    HV_START_LOW = 12
    L1_MFN_VALID = 13
    SUSPEND_CANCEL = 14
    INIT_P2M = 15
    MOD_START_PFN = 16
    SUPPORTED_FEATURES = 17
    PHYS32_ENTRY = 18


XEN_ELFNOTE_OWNER = b"Xen"

StartInfo = Struct(
    "magic" / PaddedString(32, "ascii"),
    "nr_pages" / Int64ul,
    "shared_info" / Int64ul,  # machine address of the shared_info frame
    "flags" / Int32ul,
    Padding(4),
    "store_mfn" / Int64ul,
    "store_evtchn" / Int32ul,
    Padding(4),
    "console_mfn" / Int64ul,  # console.domU.mfn
    "console_evtchn" / Int32ul,  # console.domU.evtchn
    Padding(4),
    "pt_base" / Int64ul,
    "nr_pt_frames" / Int64ul,
    "mfn_list" / Int64ul,
    "mod_start" / Int64ul,
    "mod_len" / Int64ul,
    "cmd_line" / Bytes(MAX_GUEST_CMDLINE),
    "first_p2m_pfn" / Int64ul,
    "nr_p2m_frames" / Int64ul,
)
assert StartInfo.sizeof() == 1168

VcpuTimeInfo = Struct(
    "version" / Int32ul,
    "pad0" / Int32ul,
    "tsc_timestamp" / Int64ul,
    "system_time" / Int64ul,
    "tsc_to_system_mul" / Int32ul,
    "tsc_shift" / Int8sl,
    "flags" / Int8ul,
    "pad1" / Bytes(2),
)
assert VcpuTimeInfo.sizeof() == 32
XEN_PVCLOCK_TSC_STABLE_BIT = 1 << 0
XEN_PVCLOCK_GUEST_STOPPED = 1 << 1

VcpuInfo = Struct(
    "evtchn_upcall_pending" / Int8ul,
    "evtchn_upcall_mask" / Int8ul,
    Padding(6),
    "evtchn_pending_sel" / Int64ul,
    "cr2" / Int64ul,
    "arch_pad" / Int64ul,
    "time" / VcpuTimeInfo,
)
assert VcpuInfo.sizeof() == 64

# Byte offsets Python pokes directly.
VCPU_INFO_SIZE = 64
VCPU_INFO_UPCALL_PENDING = 0
VCPU_INFO_UPCALL_MASK = 1
VCPU_INFO_PENDING_SEL = 8
VCPU_INFO_CR2 = 16
VCPU_INFO_TIME = 32

XEN_LEGACY_MAX_VCPUS = 32

SharedInfo = Struct(
    "vcpu_info" / Array(XEN_LEGACY_MAX_VCPUS, VcpuInfo),
    "evtchn_pending" / Array(64, Int64ul),
    "evtchn_mask" / Array(64, Int64ul),
    "wc_version" / Int32ul,
    "wc_sec" / Int32ul,
    "wc_nsec" / Int32ul,
    "wc_sec_hi" / Int32ul,
    "max_pfn" / Int64ul,
    "pfn_to_mfn_frame_list_list" / Int64ul,
    "nmi_reason" / Int64ul,
    "p2m_cr3" / Int64ul,
    "p2m_vaddr" / Int64ul,
    "p2m_generation" / Int64ul,
)
assert SharedInfo.sizeof() == 3136
SHARED_INFO_EVTCHN_PENDING = 2048
SHARED_INFO_EVTCHN_MASK = 2560
SHARED_INFO_WC_VERSION = 3072
SHARED_INFO_WC_SEC = 3076
SHARED_INFO_WC_NSEC = 3080
SHARED_INFO_WC_SEC_HI = 3084
SHARED_INFO_MAX_PFN = 3088       # arch.max_pfn, written by the guest

# ---------------------------------------------------------------------------
# Hypercall argument structures
# ---------------------------------------------------------------------------

TrapInfo = Struct("vector" / Int8ul, "flags" / Int8ul, "cs" / Int16ul, Padding(4), "address" / Int64ul)
assert TrapInfo.sizeof() == 16

MmuUpdate = Struct("ptr" / Int64ul, "val" / Int64ul)
MmuextOp = Struct("cmd" / Int32ul, Padding(4), "arg1" / Int64ul, "arg2" / Int64ul)
assert MmuextOp.sizeof() == 24

MulticallEntry = Struct("op" / Int64ul, "result" / Int64sl, "args" / Array(6, Int64ul))
assert MulticallEntry.sizeof() == 64

CallbackRegister = Struct("type" / Int16ul, "flags" / Int16ul, Padding(4), "address" / Int64ul)
CallbackUnregister = Struct("type" / Int16ul, Padding(2))

VcpuRegisterVcpuInfo = Struct("mfn" / Int64ul, "offset" / Int32ul, "rsvd" / Int32ul)
VcpuRunstateInfo = Struct("state" / Int32sl, Padding(4), "state_entry_time" / Int64ul, "time" / Array(4, Int64ul))
assert VcpuRunstateInfo.sizeof() == 48
VcpuSetSingleshotTimer = Struct("timeout_abs_ns" / Int64ul, "flags" / Int32ul, Padding(4))
VcpuSetPeriodicTimer = Struct("period_ns" / Int64ul)
VcpuRegisterRunstateMemoryArea = Struct("addr" / Int64ul)

RUNSTATE_running = 0
RUNSTATE_runnable = 1
RUNSTATE_blocked = 2
RUNSTATE_offline = 3

SchedShutdown = Struct("reason" / Int32ul)
SchedPoll = Struct("ports" / Int64ul, "nr_ports" / Int32ul, Padding(4), "timeout" / Int64ul)
SchedRemoteShutdown = Struct("domain_id" / Int16ul, Padding(2), "reason" / Int32ul)

EvtchnAllocUnbound = Struct("dom" / Int16ul, "remote_dom" / Int16ul, "port" / Int32ul)
EvtchnBindInterdomain = Struct("remote_dom" / Int16ul, Padding(2), "remote_port" / Int32ul, "local_port" / Int32ul)
EvtchnBindVirq = Struct("virq" / Int32ul, "vcpu" / Int32ul, "port" / Int32ul)
EvtchnBindIpi = Struct("vcpu" / Int32ul, "port" / Int32ul)
EvtchnPort = Struct("port" / Int32ul)  # send, close, unmask
EvtchnBindVcpu = Struct("port" / Int32ul, "vcpu" / Int32ul)
EvtchnInitControl = Struct("control_gfn" / Int64ul, "offset" / Int32ul, "vcpu" / Int32ul,
                           "link_bits" / Int8ul, Padding(7))  # link_bits: OUT
EvtchnExpandArray = Struct("array_gfn" / Int64ul)
EvtchnSetPriority = Struct("port" / Int32ul, "priority" / Int32ul)
EvtchnFifoControlBlock = Struct("ready" / Int32ul, Padding(4), "head" / Array(EVTCHN_FIFO_MAX_QUEUES, Int32ul))
EvtchnStatusArg = Struct(
    "dom" / Int16ul,
    Padding(2),
    "port" / Int32ul,
    "status" / Int32ul,
    "vcpu" / Int32ul,
    "u" / Bytes(8),  # unbound.dom | interdomain.{dom,port} | pirq | virq
)
assert EvtchnStatusArg.sizeof() == 24

GrantEntryV1 = Struct("flags" / Int16ul, "domid" / Int16ul, "frame" / Int32ul)
GNTTAB_V1_ENTRY_SIZE = 8
GnttabSetupTable = Struct("dom" / Int16ul, Padding(2), "nr_frames" / Int32ul, "status" / Int16sl, Padding(6), "frame_list" / Int64ul)
assert GnttabSetupTable.sizeof() == 24
GnttabQuerySize = Struct("dom" / Int16ul, Padding(2), "nr_frames" / Int32ul, "max_nr_frames" / Int32ul, "status" / Int16sl, Padding(2))
assert GnttabQuerySize.sizeof() == 16
GnttabSetVersion = Struct("version" / Int32ul)
GnttabGetVersion = Struct("dom" / Int16ul, Padding(2), "version" / Int32ul)
# v2: a 16-byte entry (header, then per type: full_page.frame u64 at 8;
# sub_page.page_off/length u16 at 4/6 and frame at 8; transitive.trans_domid
# u16 at 4 and gref u32 at 8) and a separate status word (GTF_reading/writing)
GrantEntryV2 = Struct("flags" / Int16ul, "domid" / Int16ul, "page_off" / Int16ul, "length" / Int16ul,
                      "frame" / Int64ul)
GNTTAB_V2_ENTRY_SIZE = 16
assert GrantEntryV2.sizeof() == GNTTAB_V2_ENTRY_SIZE
GrantTransitiveV2 = Struct("flags" / Int16ul, "domid" / Int16ul, "trans_domid" / Int16ul, Padding(2),
                           "gref" / Int32ul, Padding(4))
assert GrantTransitiveV2.sizeof() == GNTTAB_V2_ENTRY_SIZE
GNTTAB_STATUS_SIZE = 2       # grant_status_t
GnttabGetStatusFrames = Struct("nr_frames" / Int32ul, "dom" / Int16ul, "status" / Int16sl,
                               "frame_list" / Int64ul)
assert GnttabGetStatusFrames.sizeof() == 16
GnttabMapGrantRef = Struct("host_addr" / Int64ul, "flags" / Int32ul, "ref" / Int32ul, "dom" / Int16ul,
                           "status" / Int16sl, "handle" / Int32ul, "dev_bus_addr" / Int64ul)
assert GnttabMapGrantRef.sizeof() == 32
GnttabUnmapGrantRef = Struct("host_addr" / Int64ul, "dev_bus_addr" / Int64ul, "handle" / Int32ul,
                             "status" / Int16sl, Padding(2))
assert GnttabUnmapGrantRef.sizeof() == 24
GnttabUnmapAndReplace = Struct("host_addr" / Int64ul, "new_addr" / Int64ul, "handle" / Int32ul,
                               "status" / Int16sl, Padding(2))
assert GnttabUnmapAndReplace.sizeof() == 24
GnttabTransfer = Struct("mfn" / Int64ul, "domid" / Int16ul, Padding(2), "ref" / Int32ul,
                        "status" / Int16sl, Padding(6))
assert GnttabTransfer.sizeof() == 24
# gnttab_copy_ptr: u is a grant ref (u32) or a gmfn (u64), by the flags
GnttabCopyPtr = Struct("u" / Int64ul, "domid" / Int16ul, "offset" / Int16ul, Padding(4))
GnttabCopy = Struct("source" / GnttabCopyPtr, "dest" / GnttabCopyPtr, "len" / Int16ul,
                    "flags" / Int16ul, "status" / Int16sl, Padding(2))
assert GnttabCopy.sizeof() == 40
GnttabSwapGrantRef = Struct("ref_a" / Int32ul, "ref_b" / Int32ul, "status" / Int16sl, Padding(2))
assert GnttabSwapGrantRef.sizeof() == 12
GnttabCacheFlush = Struct("a" / Int64ul, "offset" / Int16ul, "length" / Int16ul, "op" / Int32ul)
assert GnttabCacheFlush.sizeof() == 16

XenMemoryMap = Struct("nr_entries" / Int32ul, Padding(4), "buffer" / Int64ul)
E820Entry = Struct("addr" / Int64ul, "size" / Int64ul, "type" / Int32ul)
assert E820Entry.sizeof() == 20
XenMachphysMapping = Struct("v_start" / Int64ul, "v_end" / Int64ul, "max_mfn" / Int64ul)
XenAddToPhysmap = Struct("domid" / Int16ul, "size" / Int16ul, "space" / Int32ul, "idx" / Int64ul, "gpfn" / Int64ul)
XenMemoryReservation = Struct(
    "extent_start" / Int64ul, "nr_extents" / Int64ul, "extent_order" / Int32ul, "mem_flags" / Int32ul, "domid" / Int16ul, Padding(6)
)

XenPlatformParameters = Struct("virt_start" / Int64ul)
XenFeatureInfo = Struct("submap_idx" / Int32ul, "submap" / Int32ul)

PhysdevSetIopl = Struct("iopl" / Int32ul)
# the bitmap is a guest handle, then nr_ports; 16 bytes with the padding
PhysdevSetIobitmap = Struct("bitmap" / Int64ul, "nr_ports" / Int32ul, "_pad" / Int32ul)

# vcpu_guest_context (x86-64), used by VCPUOP_initialise for secondary vCPUs.
CpuUserRegs = Struct(
    "r15" / Int64ul, "r14" / Int64ul, "r13" / Int64ul, "r12" / Int64ul,
    "rbp" / Int64ul, "rbx" / Int64ul, "r11" / Int64ul, "r10" / Int64ul,
    "r9" / Int64ul, "r8" / Int64ul, "rax" / Int64ul, "rcx" / Int64ul,
    "rdx" / Int64ul, "rsi" / Int64ul, "rdi" / Int64ul,
    "error_code" / Int32ul, "entry_vector" / Int32ul,
    "rip" / Int64ul, "cs" / Int16ul, Padding(2), "saved_upcall_mask" / Int8ul, Padding(3),
    "rflags" / Int64ul, "rsp" / Int64ul,
    "ss" / Int16ul, Padding(6), "es" / Int16ul, Padding(6), "ds" / Int16ul, Padding(6),
    "fs" / Int16ul, Padding(6), "gs" / Int16ul, Padding(6),
)
assert CpuUserRegs.sizeof() == 200

VcpuGuestContext = Struct(
    "fpu_ctxt" / Bytes(512),
    "flags" / Int64ul,
    "user_regs" / CpuUserRegs,
    "trap_ctxt" / Array(256, TrapInfo),
    "ldt_base" / Int64ul,
    "ldt_ents" / Int64ul,
    "gdt_frames" / Array(16, Int64ul),
    "gdt_ents" / Int64ul,
    "kernel_ss" / Int64ul,
    "kernel_sp" / Int64ul,
    "ctrlreg" / Array(8, Int64ul),
    "debugreg" / Array(8, Int64ul),
    "event_callback_eip" / Int64ul,
    "failsafe_callback_eip" / Int64ul,
    "syscall_callback_eip" / Int64ul,
    "vm_assist" / Int64ul,
    "fs_base" / Int64ul,
    "gs_base_kernel" / Int64ul,
    "gs_base_user" / Int64ul,
)
assert VcpuGuestContext.sizeof() == 5168

IretContext = Struct(
    "rax" / Int64ul, "r11" / Int64ul, "rcx" / Int64ul, "flags" / Int64ul,
    "rip" / Int64ul, "cs" / Int64ul, "rflags" / Int64ul, "rsp" / Int64ul, "ss" / Int64ul,
)
assert IretContext.sizeof() == 72

# ---------------------------------------------------------------------------
# Shared rings (io/xs_wire.h, io/console.h)
# ---------------------------------------------------------------------------

XENSTORE_RING_SIZE = 1024
XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

XenstoreRing = Struct(
    "req" / Bytes(XENSTORE_RING_SIZE),
    "rsp" / Bytes(XENSTORE_RING_SIZE),
    "req_cons" / Int32ul,
    "req_prod" / Int32ul,
    "rsp_cons" / Int32ul,
    "rsp_prod" / Int32ul,
    "server_features" / Int32ul,
    "connection" / Int32ul,
    "error" / Int32ul,
    "evtchn_port" / Int32ul,
)
XS_RING_REQ = 0
XS_RING_RSP = 1024
XS_RING_REQ_CONS = 2048
XS_RING_REQ_PROD = 2052
XS_RING_RSP_CONS = 2056
XS_RING_RSP_PROD = 2060
XS_RING_SERVER_FEATURES = 2064
XS_RING_CONNECTION = 2068
XS_RING_ERROR = 2072

XsdSockmsg = Struct("type" / Int32ul, "req_id" / Int32ul, "tx_id" / Int32ul, "len" / Int32ul)
XSD_SOCKMSG_SIZE = 16


class XsType(enum.IntEnum):
    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


CONSOLE_IN_SIZE = 1024
CONSOLE_OUT_SIZE = 2048
ConsoleRing = Struct(
    "in_" / Bytes(CONSOLE_IN_SIZE),
    "out" / Bytes(CONSOLE_OUT_SIZE),
    "in_cons" / Int32ul,
    "in_prod" / Int32ul,
    "out_cons" / Int32ul,
    "out_prod" / Int32ul,
)
CONS_RING_IN = 0
CONS_RING_OUT = 1024
CONS_RING_IN_CONS = 3072
CONS_RING_IN_PROD = 3076
CONS_RING_OUT_CONS = 3080
CONS_RING_OUT_PROD = 3084

# xenstore ring signalling (docs/misc/xenstore-ring.txt)
XS_RING_EVTCHN_PORT = 2076
XENSTORE_SERVER_FEATURE_RECONNECTION = 1 << 0
XENSTORE_SERVER_FEATURE_ERROR = 1 << 1
XENSTORE_CONNECTED = 0  # connection field
XENSTORE_RECONNECT = 1
XENSTORE_ERROR_NONE = 0  # error field
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3

# ---------------------------------------------------------------------------
# Appended for the hypercall layer (xen_abi/hypervisor/hypercalls/)
# ---------------------------------------------------------------------------

XENMEM_maximum_gpfn = 14
MEMOP_CMD_MASK = 0x3F  # memory_op: low bits = sub-op, higher bits = continuation extent
MEMOP_EXTENT_SHIFT = 6
XENMEM_set_pod_target = 16
XENMEM_get_pod_target = 17
XEN_POD_TARGET_SIZE = 40    # four u64 counts, then domid_t
XENFEAT_NR_SUBMAPS = 1
XEN_RUNSTATE_UPDATE = 1 << 63  # in state_entry_time while Xen updates a runstate area

XenCompileInfo = Struct(
    "compiler" / PaddedString(64, "ascii"),
    "compile_by" / PaddedString(16, "ascii"),
    "compile_domain" / PaddedString(32, "ascii"),
    "compile_date" / PaddedString(32, "ascii"),
)
assert XenCompileInfo.sizeof() == 144
XEN_EXTRAVERSION_LEN = 16  # xen_extraversion_t
XEN_CAPABILITIES_INFO_LEN = 1024  # xen_capabilities_info_t
XEN_CHANGESET_INFO_LEN = 64  # xen_changeset_info_t
XEN_DOMAIN_HANDLE_LEN = 16  # xen_domain_handle_t

# ---------------------------------------------------------------------------
# Split-driver rings (io/ring.h) and the block protocol (io/blkif.h)
#
# ctypes rather than construct here: back-ends overlay these on the shared
# ring page (from_buffer, no copy) and touch them once per request.
# ---------------------------------------------------------------------------


class SharedRingHeader(ctypes.LittleEndianStructure):
    """The start of every shared ring page; the entries follow it."""
    _fields_ = [("req_prod", ctypes.c_uint32), ("req_event", ctypes.c_uint32),
                ("rsp_prod", ctypes.c_uint32), ("rsp_event", ctypes.c_uint32),
                ("pad", ctypes.c_uint8 * 48)]       # private (4) + __pad (44)


SRING_HEADER_SIZE = ctypes.sizeof(SharedRingHeader)
SRING_REQ_PROD, SRING_REQ_EVENT = SharedRingHeader.req_prod.offset, SharedRingHeader.req_event.offset
SRING_RSP_PROD, SRING_RSP_EVENT = SharedRingHeader.rsp_prod.offset, SharedRingHeader.rsp_event.offset
assert SRING_HEADER_SIZE == 64


def ring_entries(ring_bytes: int, entry_size: int) -> int:
    """__RING_SIZE: whole entries after the header, rounded down to a power of 2."""
    n = (ring_bytes - SRING_HEADER_SIZE) // entry_size
    return 1 << (n.bit_length() - 1) if n > 0 else 0


class BlkifOp(enum.IntEnum):
    read = 0
    write = 1
    write_barrier = 2
    flush_diskcache = 3
    discard = 5
    indirect = 6


class BlkifStatus(enum.IntEnum):
    okay = 0
    error = -1
    eopnotsupp = -2


BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_SECTOR_SIZE = 512               # sector_number and first/last_sect are in 512-byte units
BLKIF_SECTORS_PER_PAGE = PAGE_SIZE // BLKIF_SECTOR_SIZE
BLKIF_DISCARD_SECURE = 1
VDISK_CDROM, VDISK_REMOVABLE, VDISK_READONLY = 0x1, 0x2, 0x4
XVD_MAJOR = 202                       # xvdX: (202 << 8) | 16 * disk index; xvda = 51712


class BlkifSegment(ctypes.LittleEndianStructure):
    _fields_ = [("gref", ctypes.c_uint32), ("first_sect", ctypes.c_uint8),
                ("last_sect", ctypes.c_uint8), ("pad", ctypes.c_uint16)]


#: The same layout for struct.iter_unpack: a list of 256 segments as tuples
#: (gref, first_sect, last_sect, pad) costs a tenth of as many ctypes objects.
BLKIF_SEGMENT_STRUCT = struct.Struct("<IBBH")
assert BLKIF_SEGMENT_STRUCT.size == ctypes.sizeof(BlkifSegment)


class BlkifRequest(ctypes.LittleEndianStructure):
    _fields_ = [("operation", ctypes.c_uint8), ("nr_segments", ctypes.c_uint8),
                ("handle", ctypes.c_uint16), ("pad", ctypes.c_uint32),
                ("id", ctypes.c_uint64), ("sector_number", ctypes.c_uint64),
                ("seg", BlkifSegment * BLKIF_MAX_SEGMENTS_PER_REQUEST)]


class BlkifRequestDiscard(ctypes.LittleEndianStructure):
    _fields_ = [("operation", ctypes.c_uint8), ("flag", ctypes.c_uint8),
                ("handle", ctypes.c_uint16), ("pad", ctypes.c_uint32),
                ("id", ctypes.c_uint64), ("sector_number", ctypes.c_uint64),
                ("nr_sectors", ctypes.c_uint64)]


BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
BLKIF_SEGMENTS_PER_INDIRECT_PAGE = PAGE_SIZE // 8      # blkif_request_segment entries


class BlkifRequestIndirect(ctypes.LittleEndianStructure):
    """BLKIF_OP_INDIRECT: the segments are in up to 8 granted pages."""
    _fields_ = [("operation", ctypes.c_uint8), ("indirect_op", ctypes.c_uint8),
                ("nr_segments", ctypes.c_uint16), ("pad", ctypes.c_uint32),
                ("id", ctypes.c_uint64), ("sector_number", ctypes.c_uint64),
                ("handle", ctypes.c_uint16), ("pad2", ctypes.c_uint16),
                ("indirect_grefs", ctypes.c_uint32 * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST),
                ("pad3", ctypes.c_uint32)]


class BlkifResponse(ctypes.LittleEndianStructure):
    _fields_ = [("id", ctypes.c_uint64), ("operation", ctypes.c_uint8), ("pad", ctypes.c_uint8),
                ("status", ctypes.c_int16), ("pad2", ctypes.c_uint32)]


assert ctypes.sizeof(BlkifRequest) == 112 and ctypes.sizeof(BlkifResponse) == 16
assert ctypes.sizeof(BlkifRequestIndirect) == 64 and BlkifRequestIndirect.indirect_grefs.offset == 28
BLKIF_RING_ENTRY_SIZE = 112           # the ring's entries are a union of request and response
BLKIF_RING_SIZE = ring_entries(PAGE_SIZE, BLKIF_RING_ENTRY_SIZE)   # 32 for one page

# ---------------------------------------------------------------------------
# The network protocol (io/netif.h): a transmit and a receive ring
# ---------------------------------------------------------------------------

NETTXF_csum_blank = 1 << 0        # the L4 checksum is to be filled in by the back-end
NETTXF_data_validated = 1 << 1
NETTXF_more_data = 1 << 2         # the packet goes on in the next slot
NETTXF_extra_info = 1 << 3        # a netif_extra_info slot follows
NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3
XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0
# netif_extra_info types (a slot after a packet's first, NETTXF/NETRXF_extra_info)
XEN_NETIF_EXTRA_TYPE_NONE = 0
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_TYPE_XDP = 5
XEN_NETIF_EXTRA_TYPE_MAX = 6
# the GSO extra's u.gso.type
XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2
XEN_NETIF_NR_SLOTS_MIN = 18       # data slots a frontend must accept for one packet


class NetifStatus(enum.IntEnum):
    dropped = -2
    error = -1
    okay = 0
    null = 1          # the response of an extra-info slot


class NetifTxRequest(ctypes.LittleEndianStructure):
    _fields_ = [("gref", ctypes.c_uint32), ("offset", ctypes.c_uint16), ("flags", ctypes.c_uint16),
                ("id", ctypes.c_uint16), ("size", ctypes.c_uint16)]


class NetifExtraInfo(ctypes.LittleEndianStructure):
    _fields_ = [("type", ctypes.c_uint8), ("flags", ctypes.c_uint8), ("u", ctypes.c_uint8 * 6)]


class NetifExtraGso(ctypes.LittleEndianStructure):
    """A netif_extra_info slot of type XEN_NETIF_EXTRA_TYPE_GSO (u.gso)."""
    _fields_ = [("type", ctypes.c_uint8), ("flags", ctypes.c_uint8), ("size", ctypes.c_uint16),
                ("gso_type", ctypes.c_uint8), ("pad", ctypes.c_uint8), ("features", ctypes.c_uint16)]


class NetifTxResponse(ctypes.LittleEndianStructure):
    _fields_ = [("id", ctypes.c_uint16), ("status", ctypes.c_int16)]


class NetifRxRequest(ctypes.LittleEndianStructure):
    _fields_ = [("id", ctypes.c_uint16), ("pad", ctypes.c_uint16), ("gref", ctypes.c_uint32)]


class NetifRxResponse(ctypes.LittleEndianStructure):
    _fields_ = [("id", ctypes.c_uint16), ("offset", ctypes.c_uint16), ("flags", ctypes.c_uint16),
                ("status", ctypes.c_int16)]


assert ctypes.sizeof(NetifTxRequest) == 12 and ctypes.sizeof(NetifExtraInfo) == 8
assert ctypes.sizeof(NetifExtraGso) == 8 and NetifExtraGso.size.offset == 2
assert ctypes.sizeof(NetifRxRequest) == 8 and ctypes.sizeof(NetifRxResponse) == 8
NETIF_TX_ENTRY_SIZE = 12          # union of tx request (12), extra info (8) and response (4)
NETIF_RX_ENTRY_SIZE = 8
NET_TX_RING_SIZE = ring_entries(PAGE_SIZE, NETIF_TX_ENTRY_SIZE)   # 256
NET_RX_RING_SIZE = ring_entries(PAGE_SIZE, NETIF_RX_ENTRY_SIZE)   # 256
ETH_MAX_FRAME = 1514              # MTU 1500 + the Ethernet header: what fits one rx page

# ---------------------------------------------------------------------------
# Linux's TAP device with IFF_VNET_HDR (include/uapi/linux/virtio_net.h,
# if_tun.h): each frame read or written is preceded by a virtio_net_hdr
# saying what the kernel left undone (checksum) or may split (GSO)
# ---------------------------------------------------------------------------

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1   # checksum over [csum_start, end) goes at csum_start + csum_offset
VIRTIO_NET_HDR_F_DATA_VALID = 2   # the checksums were verified
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80     # a flag on the type: the TCP segments carry ECN (CWR)
TUN_F_CSUM = 0x01                 # TUNSETOFFLOAD: what the reader of the TAP can take
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04


class VirtioNetHdr(ctypes.LittleEndianStructure):
    """struct virtio_net_hdr (the 10-byte legacy header; little-endian on x86)."""
    _fields_ = [("flags", ctypes.c_uint8), ("gso_type", ctypes.c_uint8), ("hdr_len", ctypes.c_uint16),
                ("gso_size", ctypes.c_uint16), ("csum_start", ctypes.c_uint16),
                ("csum_offset", ctypes.c_uint16)]


VIRTIO_NET_HDR_SIZE = 10
VIRTIO_NET_HDR_FORMAT = "<BBHHHH"   # the same fields for struct.Struct, on the per-packet paths
assert ctypes.sizeof(VirtioNetHdr) == VIRTIO_NET_HDR_SIZE == struct.calcsize(VIRTIO_NET_HDR_FORMAT)
