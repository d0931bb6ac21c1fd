/* Xen's vcpu_guest_context for VCPUOP_initialise, x86_64
 * (public/arch-x86/xen-x86_64.h): the test guests that bring up vCPUs
 * (smp, pgrace). */
#ifndef VCPU_CTX_H
#define VCPU_CTX_H
#include "tg.h"

#ifndef VGCF_IN_KERNEL
#define VGCF_IN_KERNEL (1UL << 2)
#endif

struct cpu_user_regs {
	u64 r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi;
	u32 error_code, entry_vector;
	u64 rip;
	u16 cs, _p0;
	u8 saved_upcall_mask, _p1[3];
	u64 rflags, rsp;
	u16 ss, _p2[3], es, _p3[3], ds, _p4[3], fs, _p5[3], gs, _p6[3];
};
struct vcpu_guest_context {
	u8 fpu_ctxt[512];
	u64 flags;
	struct cpu_user_regs user_regs;
	struct trap_info trap_ctxt[256];
	u64 ldt_base, ldt_ents;
	u64 gdt_frames[16], gdt_ents;
	u64 kernel_ss, kernel_sp;
	u64 ctrlreg[8];
	u64 debugreg[8];
	u64 event_callback_eip, failsafe_callback_eip, syscall_callback_eip;
	u64 vm_assist;
	u64 fs_base, gs_base_kernel, gs_base_user;
};
_Static_assert(sizeof(struct cpu_user_regs) == 200, "cpu_user_regs");
_Static_assert(offsetof(struct vcpu_guest_context, user_regs) == 520, "user_regs");
_Static_assert(offsetof(struct vcpu_guest_context, trap_ctxt) == 720, "trap_ctxt");
_Static_assert(sizeof(struct vcpu_guest_context) == 5168, "vcpu_guest_context");

void *memset(void *d, int c, size_t n);   /* tg.c */

/* A kernel-mode context as Linux's cpu_initialize_context starts one:
 * cleared, then rip on its own stack (also the kernel stack), the flat
 * kernel selectors, IOPL 1 (Linux's IOPL_RING1), the base pointer l4.
 * Callers add their trap table, callbacks, GDT or LDT. */
static inline void tg_kernel_context(struct vcpu_guest_context *c, u64 rip, u64 stack_top, u64 l4)
{
	memset(c, 0, sizeof(*c));
	c->flags = VGCF_IN_KERNEL;
	c->user_regs.rip = rip;
	c->user_regs.rsp = stack_top;
	c->user_regs.cs = FLAT_RING3_CS64;
	c->user_regs.ss = FLAT_RING3_SS64;
	c->user_regs.rflags = 0x1000;
	c->kernel_ss = FLAT_RING3_SS64;
	c->kernel_sp = stack_top;
	c->ctrlreg[3] = l4;
}
#endif
