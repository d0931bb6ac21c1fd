/* Privileged-instruction emulation, CPUID and MSRs for the PV guest
 * (priv.c): what Xen's pv/emul-priv-op.c and pv/emul-inv-op.c do.
 * Mirrored in xen_abi/shim/priv.py (tests compare). */
#ifndef SHIM_PRIV_H
#define SHIM_PRIV_H

#define HC_set_debugreg       8
#define HC_get_debugreg       9
#define HC_physdev_op        33
#define XEN_PHYSDEVOP_set_iopl 6

/* Per-vCPU emulation state: PRIV_OFF bytes into the percpu block (its
 * second page, past struct percpu; priv.c asserts they do not overlap).
 * u64 slots, byte offsets. */
#define PRIV_OFF          0x1e00
#define PRIV_VCR4            0   /* the CR4 the guest sees */
#define PRIV_IOPL            8   /* virtual IOPL (PHYSDEVOP_set_iopl), 0..3 */
#define PRIV_DR             16   /* dr0..dr7 (4, 5 unused) */
#define PRIV_TSC_AUX        80
#define PRIV_XCR0           88
#define PRIV_EMULATED       96   /* counters: instructions emulated */
#define PRIV_MSR_UNKNOWN   104   /* rdmsr/wrmsr of MSRs Xen refuses (#GP) */
#define PRIV_LAST_MSR      112   /* the last such MSR | 1<<32 for a write */
#define PRIV_CPUIDS        120   /* forced-emulation CPUIDs */
#define PRIV_NR_VCPUS      128   /* written by Python: vCPUs of the domain */
#define PRIV_FAST_IO       136   /* counters: in/out and iretq done by entry.S's */
#define PRIV_FAST_IRET     144   /* #GP fast paths */
#define PRIV_SIZE          152
/* u32 event counters for tracing (xen_abi/hypervisor/trace.py reads them): one per
 * exception vector 0..31, one per hypercall number 0..47, "other" slots */
#define PRIV_CNT_OFF       0x98  /* after the state above */
#define PRIV_CNT_TRAPS        0  /* index of vector 0 */
#define PRIV_CNT_IRQ         32  /* vectors >= 32 */
#define PRIV_CNT_SYSCALL     33  /* guest syscalls (hypercalls + user syscalls) */
#define PRIV_CNT_HCALL       34  /* index of hypercall 0 */
#define PRIV_CNT_NR_HCALL    48
#define PRIV_CNT_N         (PRIV_CNT_HCALL + PRIV_CNT_NR_HCALL)

/* Xen's CR4 split for PV guests (asm-x86/domain.h) */
#define CR4_TSD        (1UL << 2)
#define CR4_DE         (1UL << 3)
#define CR4_PAE        (1UL << 5)
#define CR4_MCE        (1UL << 6)
#define CR4_OSFXSR     (1UL << 9)
#define CR4_OSXMMEXCPT (1UL << 10)
#define CR4_FSGSBASE   (1UL << 16)
#define CR4_OSXSAVE    (1UL << 18)
#define PV_CR4_GUEST_MASK   (CR4_TSD | CR4_DE | CR4_FSGSBASE | CR4_OSXSAVE)
#define PV_CR4_GUEST_VISIBLE_MASK (CR4_PAE | CR4_MCE | CR4_OSFXSR | CR4_OSXMMEXCPT)

/* RFLAGS bits a guest may set through iret (shim.h: RFLAGS_GUEST_MASK) */
#define RFLAGS_GUEST_MASK_ASM 0x254dd5

#ifndef __ASSEMBLER__
/* bump a tracing counter (a few instructions: ~us on kvm_pvm) */
static inline void priv_count(void *pc, u64 idx)
{
	if (idx < PRIV_CNT_N)
		((u32 *)((u8 *)pc + PRIV_OFF + PRIV_CNT_OFF))[idx]++;
}
struct percpu;
struct frame;
/* #GP(0) from the guest: 1 if the instruction was emulated (rip advanced) */
int emulate_priv(struct percpu *pc, struct frame *f);
/* #UD: 1 if it was the forced-emulation CPUID prefix (answered, rip += 7) */
int emulate_forced_cpuid(struct percpu *pc, struct frame *f);
long do_set_debugreg(struct percpu *pc, u64 reg, u64 val);
long do_get_debugreg(struct percpu *pc, u64 reg);
/* Xen's vcpu_op check: -ENOENT for a vCPU id the domain does not have */
static inline int priv_no_such_vcpu(void *pc, u64 vcpuid)
{
	u64 nr = *(u64 *)((u8 *)pc + PRIV_OFF + PRIV_NR_VCPUS);
	return nr && vcpuid >= nr;
}
/* PHYSDEVOP_set_iopl after Python accepted it (rc 0): remember the level */
void priv_set_iopl(struct percpu *pc, u64 arg_va);
#endif
#endif
