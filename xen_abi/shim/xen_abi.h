/* The few Xen public ABI numbers and layouts the shim needs, plus the
 * layout of the blocks Python shares with the shim.  The Xen numbers
 * mirror xen_abi/abi.py (tests/test_shim_build.py parses this header and
 * compares every XEN_* / HC_* / VI_* value with abi.py).  Region layout
 * constants (REGION_VA, ...) are NOT here: Python passes them with -D so the
 * layout lives in exactly one place (xen_abi/memory/vmm_region.py). */
#ifndef SHIM_XEN_ABI_H
#define SHIM_XEN_ABI_H

/* hypercall numbers */
#define HC_set_trap_table      0
#define HC_mmu_update          1
#define HC_set_gdt             2
#define HC_stack_switch        3
#define HC_fpu_taskswitch      5
#define HC_update_descriptor  10
#define HC_multicall          13
#define HC_update_va_mapping  14
#define HC_xen_version        17
#define HC_iret               23
#define HC_vcpu_op            24
#define HC_set_segment_base   25
#define HC_mmuext_op          26
#define HC_sched_op           29
#define HC_callback_op        30
#define HC_event_channel_op   32

/* sub-ops */
#define XEN_SEGBASE_FS          0
#define XEN_SEGBASE_GS_USER     1
#define XEN_SEGBASE_GS_KERNEL   2
#define XEN_SEGBASE_GS_USER_SEL 3
#define XEN_SCHEDOP_yield       0
#define XEN_SCHEDOP_block       1
#define XEN_CALLBACKOP_register   0
#define XEN_CALLBACKOP_unregister 1
#define XEN_CALLBACKTYPE_event    0
#define XEN_CALLBACKTYPE_failsafe 1
#define XEN_CALLBACKTYPE_syscall  2
#define XEN_CALLBACKTYPE_nmi      4
#define XEN_CALLBACKF_mask_events 1
#define XEN_MMUEXT_PIN_L1_TABLE   0
#define XEN_MMUEXT_PIN_L2_TABLE   1
#define XEN_MMUEXT_PIN_L3_TABLE   2
#define XEN_MMUEXT_PIN_L4_TABLE   3
#define XEN_MMUEXT_UNPIN_TABLE    4
#define XEN_MMUEXT_NEW_BASEPTR    5
#define XEN_MMUEXT_TLB_FLUSH_LOCAL 6
#define XEN_MMUEXT_INVLPG_LOCAL   7
#define XEN_MMUEXT_TLB_FLUSH_MULTI 8
#define XEN_MMUEXT_INVLPG_MULTI   9
#define XEN_MMUEXT_TLB_FLUSH_ALL 10
#define XEN_MMUEXT_INVLPG_ALL    11
#define XEN_MMUEXT_FLUSH_CACHE   12
#define XEN_MMUEXT_SET_LDT       13
#define XEN_MMUEXT_NEW_USER_BASEPTR 15
#define XEN_MMUEXT_CLEAR_PAGE    16
#define XEN_MMUEXT_COPY_PAGE     17
#define XEN_MMUEXT_FLUSH_CACHE_GLOBAL 18
#define XEN_MMU_NORMAL_PT_UPDATE  0
#define XEN_MMU_MACHPHYS_UPDATE   1
#define XEN_MMU_PT_UPDATE_PRESERVE_AD 2
#define XEN_UVMF_FLUSHTYPE_MASK   3
#define XEN_UVMF_TLB_FLUSH        1
#define XEN_UVMF_INVLPG           2
#define XEN_VGCF_IN_SYSCALL   0x100
#define XEN_TI_MASK_EVENTS        4
#define XEN_TI_DPL_MASK           3

/* errno (returned negated) */
#define XEN_EPERM    1
#define XEN_ENOENT   2
#define XEN_ESRCH    3
#define XEN_EACCES  13
#define XEN_EFAULT  14
#define XEN_EBUSY   16
#define XEN_EINVAL  22
#define XEN_ENOSYS  38

/* selectors and the hypervisor hole */
#define XEN_FLAT_RING3_CS32 0xe023
#define XEN_FLAT_RING3_SS   0xe02b
#define XEN_FLAT_RING3_CS64 0xe033
#define XEN_HV_VIRT_START  0xffff800000000000UL
#define XEN_HV_VIRT_END    0xffff880000000000UL
#define XEN_HV_L4_FIRST    256
#define XEN_HV_L4_COUNT    16

/* vcpu_info / shared_info byte offsets */
#define VI_UPCALL_PENDING 0
#define VI_UPCALL_MASK    1
#define VI_PENDING_SEL    8
#define VI_CR2           16
#define VI_SIZE          64

/* struct sizes */
#define XEN_TRAP_INFO_SIZE    16
#define XEN_IRET_CONTEXT_SIZE 72
#define XEN_MMU_UPDATE_SIZE   16
#define XEN_MMUEXT_OP_SIZE    24
#define XEN_MULTICALL_ENTRY_SIZE 64

/* ---- shim <-> Python shared blocks (not Xen ABI; mirrored in vmm_region.py) ---- */

/* per-vCPU block, at the bottom of the percpu page (found from the stack) */
#define PC_VCPU_ID      0
#define PC_VCPU_INFO    8    /* VA of this vCPU's vcpu_info */
#define PC_LSTAR       16    /* VA of this vCPU's syscall trampoline */
#define PC_KERNEL_SP   24
#define PC_KERNEL_SS   32
#define PC_KERNEL_MODE 40    /* 1 = guest kernel mode (Xen's TF_kernel_mode) */
#define PC_CR3_KERNEL  48
#define PC_CR3_USER    56
#define PC_MAILBOX     64    /* VA of the mailbox page */
#define PC_SYSCALL_RSP 72    /* trampoline saves the guest rsp here */
#define PC_BOOT_SIZE   80

/* globals page */
#define SG_FLAGS        0    /* SGF_* */
#define SG_SHARED_INFO  8    /* VA of shared_info */
#define SG_CPUID_TABLE 16    /* VA of the CPUID policy table */
#define SG_NR_CPUID    24
#define SG_DIRECTMAP   32    /* VA where guest RAM is mapped 1:1 (supervisor) */
#define SG_RAM_PAGES   40
#define SG_L4_SLOTS    48    /* 16 raw L4 entries for slots 256..271 */
#define SG_M2P       176    /* VA of the M2P table (writable alias) */
#define SG_FTYPE     184    /* VA of the frame-type map, 1 byte per RAM frame (mmu.c) */
#define SG_REGION_GPA 192   /* guest-physical base of the VMM region */
#define SG_SIZE      200
#define SGF_PVM        1     /* kvm_pvm: CPL3 syscall arrives as #GP at LSTAR */

/* CPUID policy entry (xen_abi/boot/cpuid.py pack_table): u32 leaf, subleaf
 * (CPUID_ANY_SUBLEAF = not significant), eax, ebx, ecx, edx */
#define CPUID_ENT_SIZE   24
#define CPUID_ANY_SUBLEAF 0xffffffffu

/* mailbox page (u64 slots) for the one narrow exit to Python */
#define MB_OP        0   /* MBOP_* */
#define MB_NR        1   /* hypercall number */
#define MB_ARGS      2   /* 6 args: slots 2..7 */
#define MB_CR3       8
#define MB_KMODE     9
#define MB_RESULT   10
#define MB_RIP      11
#define MB_INFO     12   /* free-form (panic code, vector, cr2, ...) */
#define MB_INFO2    13
#define MBOP_HYPERCALL 1
#define MBOP_PANIC     2   /* shim-internal fault: MB_INFO = vector, MB_RIP, MB_INFO2 = cr2 */
#define MBOP_CRASH     3   /* guest crashed (unhandled trap / bounce failed): MB_INFO = vector */
#define MBOP_BLOCK     4   /* SCHEDOP_block with nothing pending */
#define MBOP_SET_XCR0  5   /* emulated xsetbv: MB_ARGS = value; MB_RESULT 0 = set (KVM_SET_XCRS) */

/* pseudo vector the syscall trampoline reports */
#define VEC_SYSCALL 256
#define VEC_SYSCALL_GP 257   /* kvm_pvm: a CPL3 syscall that arrived as #GP at LSTAR (entry.S) */
#endif
