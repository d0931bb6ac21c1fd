/* Privileged-instruction emulation, CPUID and MSRs for the PV guest
 * (priv.c): what Xen's pv/emul-priv-op.c and pv/emul-inv-op.c do.  Its
 * per-vCPU state and counters (PRIV_*, PRIV_CNT_*) are laid out in the
 * generated shim_layout.h (xen_abi/shim/layout.py); Python reads them
 * through xen_abi/shim/priv.py. */
#ifndef SHIM_PRIV_H
#define SHIM_PRIV_H

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
		((u32 *)((u8 *)pc + PRIV_OFF + PRIV_COUNTERS))[idx]++;
}
struct percpu;
struct frame;
/* #GP(0) from the guest: EMUL_DONE (rip advanced), EMUL_RAISE_UD (the
 * guest's #UD, as Xen's emulator raises it), EMUL_DONE_DEBUG (done, and
 * it hit an I/O breakpoint: the guest's #DB trap), else 0 (the guest's #GP) */
#define EMUL_DONE 1
#define EMUL_RAISE_UD 2
#define EMUL_DONE_DEBUG 3
int emulate_priv(struct percpu *pc, struct frame *f);
/* #UD: 1 if it was the forced-emulation CPUID prefix (answered, rip += 7) */
int emulate_forced_cpuid(struct percpu *pc, struct frame *f);
long do_set_debugreg(struct percpu *pc, u64 reg, u64 val);
long do_get_debugreg(struct percpu *pc, u64 reg);
/* #DB: the real DR6 (reset to its default for the next one) ... */
u64 priv_take_dr6(void);
/* ... and folded into the guest's DR6 as Xen does */
void priv_merge_dr6(struct percpu *pc, u64 dr6);
/* Xen's vcpu_op check: -ENOENT for a vCPU id the domain does not have.
 * Xen's id is an unsigned int; here an id with upper bits set is absent:
 * looking at the low half costs the timer hypercalls an instruction. */
static inline int priv_no_such_vcpu(void *pc, u64 vcpuid)
{
	u64 nr = *(u64 *)((u8 *)pc + PRIV_OFF + PRIV_NR_VCPUS);
	return nr && vcpuid >= nr;
}
/* PHYSDEVOP_set_iopl / set_iobitmap after Python accepted them (rc 0):
 * remember the level, the bitmap */
void priv_physdev_op(struct percpu *pc, u64 cmd, u64 arg_va);
#endif
#endif
