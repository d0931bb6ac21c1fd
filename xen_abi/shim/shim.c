/* pyvmm shim: the CPL0 part of "Xen" for one PV guest running at CPL3.
 *
 * Entered only through the IDT (exceptions/interrupts from the guest) and
 * the per-vCPU syscall trampoline; it owns no thread of its own.  Hot PV
 * operations are done here; everything else goes to Python through one
 * narrow exit (mailbox + `out` to SHIM_EXIT_PORT).
 *
 * Build-time constants from Python (-D): REGION_VA, GLOBALS_OFF,
 * PERCPU_BLOCK_SIZE, PERCPU_IN_BLOCK, SHIM_EXIT_PORT.
 *
 * On kvm_pvm every instruction here is interpreted (~1 us each): keep
 * paths short, no cmpxchg16b / rdtscp / int n. */
#include <stddef.h>
#include <stdint.h>
#include "xen_abi.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;

#define RFLAGS_CF   0x1UL
#define RFLAGS_TF   0x100UL
#define RFLAGS_IF   0x200UL
#define RFLAGS_DF   0x400UL
#define RFLAGS_IOPL 0x3000UL
#define RFLAGS_NT   0x4000UL
#define RFLAGS_RF   0x10000UL
#define RFLAGS_VM   0x20000UL
#define RFLAGS_AC   0x40000UL
#define RFLAGS_FIXED 0x2UL
/* bits a guest may set through iret (arithmetic + TF/DF/AC/ID) */
#define RFLAGS_GUEST_MASK 0x254dd5UL

#define PTE_P   0x1UL
#define PTE_RW  0x2UL
#define PTE_US  0x4UL
#define PTE_PS  0x80UL
#define PTE_ADDR 0x000ffffffffff000UL

#define PFEC_P  1
#define PFEC_W  2
#define PFEC_U  4
#define PFEC_RSVD 8

#define MSR_FS_BASE        0xc0000100
#define MSR_GS_BASE        0xc0000101
#define MSR_KERNEL_GS_BASE 0xc0000102

#define CR0_TS 0x8UL

#define VEC_DE 0
#define VEC_NMI 2
#define VEC_BP 3
#define VEC_UD 6
#define VEC_NM 7
#define VEC_DF 8
#define VEC_GP 13
#define VEC_PF 14
#define VEC_MC 18

/* Saved state, lowest address first (see shim_common in entry.S). */
struct frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vec, err;
	u64 rip, cs, rflags, rsp, ss;
};

struct trap_ent { u64 addr; u64 flags; };

struct percpu {
	/* boot block, written by Python (PC_* offsets) */
	u64 vcpu_id;
	u8 *vcpu_info;
	u64 lstar;
	u64 kernel_sp;
	u64 kernel_ss;
	u64 kernel_mode;
	u64 cr3_kernel;
	u64 cr3_user;
	u64 *mailbox;
	u64 syscall_rsp;
	/* shim-private */
	u64 event_cb, failsafe_cb, syscall_cb, nmi_cb;
	u64 cb_mask;           /* bit n: callback type n masks events */
	u64 vcr0_ts;
	struct trap_ent traps[256];
};

struct globals {
	u64 flags;
	u8 *shared_info;
	u8 *cpuid_table;
	u64 nr_cpuid;
	u8 *directmap;
	u64 ram_pages;
	u64 l4_slots[XEN_HV_L4_COUNT];
	u64 *m2p;
};

_Static_assert(offsetof(struct percpu, vcpu_info) == PC_VCPU_INFO, "pc");
_Static_assert(offsetof(struct percpu, lstar) == PC_LSTAR, "pc");
_Static_assert(offsetof(struct percpu, kernel_sp) == PC_KERNEL_SP, "pc");
_Static_assert(offsetof(struct percpu, kernel_ss) == PC_KERNEL_SS, "pc");
_Static_assert(offsetof(struct percpu, kernel_mode) == PC_KERNEL_MODE, "pc");
_Static_assert(offsetof(struct percpu, cr3_kernel) == PC_CR3_KERNEL, "pc");
_Static_assert(offsetof(struct percpu, cr3_user) == PC_CR3_USER, "pc");
_Static_assert(offsetof(struct percpu, mailbox) == PC_MAILBOX, "pc");
_Static_assert(offsetof(struct percpu, syscall_rsp) == PC_SYSCALL_RSP, "pc");
_Static_assert(sizeof(struct percpu) <= 2 * 4096, "percpu fits its 2 pages");
_Static_assert(offsetof(struct globals, shared_info) == SG_SHARED_INFO, "sg");
_Static_assert(offsetof(struct globals, cpuid_table) == SG_CPUID_TABLE, "sg");
_Static_assert(offsetof(struct globals, nr_cpuid) == SG_NR_CPUID, "sg");
_Static_assert(offsetof(struct globals, directmap) == SG_DIRECTMAP, "sg");
_Static_assert(offsetof(struct globals, ram_pages) == SG_RAM_PAGES, "sg");
_Static_assert(offsetof(struct globals, l4_slots) == SG_L4_SLOTS, "sg");
_Static_assert(offsetof(struct globals, m2p) == SG_M2P, "sg");

#define G ((struct globals *)(REGION_VA + GLOBALS_OFF))

long guest_copy(void *dst, const void *src, u64 n);
long guest_load_gs(u16 sel);
extern char shim_copy_insn[], shim_copy_fault[], shim_gs_insn[], shim_gs_fault[];
extern char shim_iret_insn[];

static inline struct percpu *pcpu(void)
{
	u64 sp;
	__asm__("mov %%rsp, %0" : "=r"(sp));
	return (struct percpu *)((sp & ~(u64)(PERCPU_BLOCK_SIZE - 1)) + PERCPU_IN_BLOCK);
}

static inline u64 read_cr2(void) { u64 v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" :: "r"(v) : "memory"); }
static inline u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline void write_cr0(u64 v) { __asm__ volatile("mov %0, %%cr0" :: "r"(v) : "memory"); }
static inline void invlpg(u64 va) { __asm__ volatile("invlpg (%0)" :: "r"(va) : "memory"); }
static inline void swapgs(void) { __asm__ volatile("swapgs" ::: "memory"); }
static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

static inline int canonical(u64 va) { return (u64)((s64)(va << 16) >> 16) == va; }

/* A guest pointer range is usable if canonical, not wrapping, and clear of
 * the hypervisor hole (where the shim itself lives). */
static int range_ok(u64 va, u64 n)
{
	u64 end = va + n;
	if (end < va || !canonical(va) || (n && !canonical(end - 1)))
		return 0;
	if (end > XEN_HV_VIRT_START && va < XEN_HV_VIRT_END)
		return 0;
	return 1;
}

static long from_guest(void *dst, u64 va, u64 n)
{
	return range_ok(va, n) ? guest_copy(dst, (const void *)va, n) : -XEN_EFAULT;
}

static long to_guest(u64 va, const void *src, u64 n)
{
	return range_ok(va, n) ? guest_copy((void *)va, src, n) : -XEN_EFAULT;
}

/* The one exit to Python.  The vCPU thread handles it synchronously and
 * resumes us right after the `out`. */
static void exit_to_python(void)
{
	__asm__ volatile("outl %%eax, %%dx" :: "a"(0), "d"(SHIM_EXIT_PORT) : "memory");
}

static __attribute__((noreturn)) void stop_here(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

static __attribute__((noreturn)) void panic(struct percpu *pc, struct frame *f, u64 code)
{
	u64 *mb = pc->mailbox;
	mb[MB_OP] = MBOP_PANIC;
	mb[MB_INFO] = code;
	mb[MB_RIP] = f->rip;
	mb[MB_INFO2] = f->vec == VEC_PF ? read_cr2() : f->err;
	exit_to_python();
	stop_here();
}

static __attribute__((noreturn)) void guest_crash(struct percpu *pc, struct frame *f, u64 why)
{
	u64 *mb = pc->mailbox;
	mb[MB_OP] = MBOP_CRASH;
	mb[MB_INFO] = why;
	mb[MB_RIP] = f->rip;
	mb[MB_INFO2] = f->err;
	exit_to_python();
	stop_here();
}

static u8 *vcpu_info(struct percpu *pc) { return pc->vcpu_info; }

/* Xen's toggle_guest_mode: swap the kernel/user GS bases (the inactive one
 * lives in MSR_KERNEL_GS_BASE, exactly as under Xen) and switch L4. */
static void toggle_mode(struct percpu *pc)
{
	swapgs();
	pc->kernel_mode ^= 1;
	write_cr3(pc->kernel_mode ? pc->cr3_kernel : pc->cr3_user);
}

/* Xen's create_bounce_frame: {rcx, r11, [err], rip, cs|mask<<32, rflags,
 * rsp, ss} on the guest kernel stack, then enter `handler` in kernel mode. */
static void bounce(struct percpu *pc, struct frame *f, u64 handler, int has_err,
		   u64 err, int mask_events)
{
	u8 *vi = vcpu_info(pc);
	u64 old_mask = vi[VI_UPCALL_MASK];
	u64 fr[8], n = 0, cs = f->cs, sp;

	if (!handler)
		guest_crash(pc, f, 0x100 + f->vec);
	if (pc->kernel_mode) {
		cs &= ~3UL;           /* "indicate kernel context to guest" */
		sp = f->rsp;
	} else {
		toggle_mode(pc);
		sp = pc->kernel_sp;
	}
	fr[n++] = f->rcx;
	fr[n++] = f->r11;
	if (has_err)
		fr[n++] = err;
	fr[n++] = f->rip;
	fr[n++] = (cs & 0xffff) | (old_mask << 32);
	fr[n++] = (f->rflags & ~(RFLAGS_IF | RFLAGS_IOPL)) | (old_mask ? 0 : RFLAGS_IF);
	fr[n++] = f->rsp;
	fr[n++] = f->ss & 0xffff;
	sp = (sp & ~15UL) - n * 8;
	if (to_guest(sp, fr, n * 8))
		guest_crash(pc, f, 0x200 + f->vec);
	f->rip = handler;
	f->cs = XEN_FLAT_RING3_CS64;
	f->ss = XEN_FLAT_RING3_SS;
	f->rsp = sp;
	f->rflags = (f->rflags & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM | RFLAGS_AC | RFLAGS_IOPL))
		    | RFLAGS_IF | RFLAGS_FIXED;
	if (mask_events)
		vi[VI_UPCALL_MASK] = 1;
}

static int has_error_code(u64 vec)
{
	return vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30;
}

static void bounce_trap(struct percpu *pc, struct frame *f, u64 vec)
{
	struct trap_ent *t = &pc->traps[vec];
	bounce(pc, f, t->addr, has_error_code(vec), f->err, (t->flags & XEN_TI_MASK_EVENTS) != 0);
}

static void check_events(struct percpu *pc, struct frame *f)
{
	u8 *vi = vcpu_info(pc);
	if (vi[VI_UPCALL_PENDING] && !vi[VI_UPCALL_MASK] && pc->event_cb) {
		f->vec = 0x1000;  /* for crash reports only */
		bounce(pc, f, pc->event_cb, 0, 0, 1);
	}
}

/* ---------------- the slow path ---------------- */

static long slow_hypercall(struct percpu *pc, struct frame *f, u64 nr, const u64 *a)
{
	u64 *mb = pc->mailbox;
	mb[MB_OP] = MBOP_HYPERCALL;
	mb[MB_NR] = nr;
	for (int i = 0; i < 6; i++)
		mb[MB_ARGS + i] = a[i];
	mb[MB_CR3] = read_cr3();
	mb[MB_KMODE] = pc->kernel_mode;
	mb[MB_RIP] = f->rip;
	mb[MB_RESULT] = (u64)-XEN_ENOSYS;
	exit_to_python();
	return (long)mb[MB_RESULT];
}

/* ---------------- page tables ---------------- */

static u64 *phys_ptr(u64 pa)
{
	return (pa >> 12) < G->ram_pages ? (u64 *)(G->directmap + pa) : 0;
}

static void install_hv_slots(u64 l4_pa)
{
	u64 *l4 = phys_ptr(l4_pa & PTE_ADDR);
	if (!l4)
		return;
	for (int i = 0; i < XEN_HV_L4_COUNT; i++)
		l4[XEN_HV_L4_FIRST + i] = G->l4_slots[i];
}

/* Xen's adjust_guest_l?e: a 64-bit PV kernel runs in ring 3, so its
 * present mappings get _PAGE_USER. */
static u64 adjust_pte(u64 v) { return (v & PTE_P) ? (v | PTE_US) : v; }

/* Walk the current tables for va; return the L1 (or leaf) entry pointer.
 * With fix_user, OR _PAGE_USER into present entries that lack it and
 * report whether anything changed (lazy adjust_guest_l?e). */
static u64 *walk(u64 cr3, u64 va, int fix_user, int *changed, int *level_out)
{
	u64 table = cr3 & PTE_ADDR;
	for (int level = 4; level >= 1; level--) {
		u64 *t = phys_ptr(table);
		if (!t)
			return 0;
		u64 *e = &t[(va >> (12 + 9 * (level - 1))) & 511];
		if (!(*e & PTE_P))
			return 0;
		if (fix_user && !(*e & PTE_US)) {
			*e |= PTE_US;
			*changed = 1;
		}
		if (level == 1 || (level <= 3 && (*e & PTE_PS))) {
			if (level_out)
				*level_out = level;
			return e;
		}
		table = *e & PTE_ADDR;
	}
	return 0;
}

static long do_mmu_update(u64 reqs, u64 count, u64 done_ptr)
{
	u64 i;
	for (i = 0; i < count; i++) {
		u64 r[2];
		if (from_guest(r, reqs + i * 16, 16))
			return -XEN_EFAULT;
		u64 cmd = r[0] & 3, pa = r[0] & ~7UL;
		if (cmd == XEN_MMU_NORMAL_PT_UPDATE || cmd == XEN_MMU_PT_UPDATE_PRESERVE_AD) {
			u64 *p = phys_ptr(pa);
			/* the hypervisor L4 slots are not the guest's to change */
			if (!p || ((pa & 0xfff) >= XEN_HV_L4_FIRST * 8 && (pa & 0xfff) < (XEN_HV_L4_FIRST + XEN_HV_L4_COUNT) * 8
				   && ((pa & ~0xfffUL) == (read_cr3() & PTE_ADDR))))
				return -XEN_EINVAL;
			*p = adjust_pte(r[1]);
		} else if (cmd == XEN_MMU_MACHPHYS_UPDATE) {
			if ((pa >> 12) >= G->ram_pages)
				return -XEN_EINVAL;
			G->m2p[pa >> 12] = r[1];
		} else {
			return -XEN_ENOSYS;
		}
	}
	if (done_ptr)
		to_guest(done_ptr, &i, 4);
	return 0;
}

static void flush_tlb(void) { write_cr3(read_cr3()); }

static long do_update_va_mapping(u64 va, u64 val, u64 flags)
{
	int level = 0, ch = 0;
	if (!range_ok(va, 1))
		return -XEN_EINVAL;
	u64 *e = walk(read_cr3(), va, 0, &ch, &level);
	if (!e || level != 1)
		return -XEN_EINVAL;
	*e = adjust_pte(val);
	switch (flags & XEN_UVMF_FLUSHTYPE_MASK) {
	case XEN_UVMF_INVLPG: invlpg(va); break;
	case XEN_UVMF_TLB_FLUSH: flush_tlb(); break;
	}
	return 0;
}

static long do_mmuext_op(struct percpu *pc, struct frame *f, u64 ops, u64 count, u64 done_ptr)
{
	u64 i;
	for (i = 0; i < count; i++) {
		u64 op[3];
		if (from_guest(op, ops + i * 24, 24))
			return -XEN_EFAULT;
		u64 cmd = op[0] & 0xffffffff, pa = op[1] << 12;
		switch (cmd) {
		case XEN_MMUEXT_PIN_L4_TABLE:
			if (!phys_ptr(pa))
				return -XEN_EINVAL;
			install_hv_slots(pa);
			break;
		case XEN_MMUEXT_PIN_L1_TABLE: case 1: case 2: case XEN_MMUEXT_UNPIN_TABLE:
			if (!phys_ptr(pa))
				return -XEN_EINVAL;
			break;
		case XEN_MMUEXT_NEW_BASEPTR:
			if (!phys_ptr(pa))
				return -XEN_EINVAL;
			install_hv_slots(pa);
			pc->cr3_kernel = pa;
			if (pc->kernel_mode)
				write_cr3(pa);
			break;
		case XEN_MMUEXT_NEW_USER_BASEPTR:
			if (op[1] && !phys_ptr(pa))
				return -XEN_EINVAL;
			if (op[1])
				install_hv_slots(pa);
			pc->cr3_user = op[1] ? pa : 0;
			break;
		case XEN_MMUEXT_TLB_FLUSH_LOCAL: case XEN_MMUEXT_TLB_FLUSH_MULTI: case XEN_MMUEXT_TLB_FLUSH_ALL:
			flush_tlb();
			break;
		case XEN_MMUEXT_INVLPG_LOCAL: case XEN_MMUEXT_INVLPG_MULTI: case XEN_MMUEXT_INVLPG_ALL:
			if (range_ok(op[1], 1))
				invlpg(op[1]);
			break;
		default: {
			u64 a[6] = { ops + i * 24, 1, 0, 0x7ff0, 0, 0 };
			long rc = slow_hypercall(pc, f, HC_mmuext_op, a);
			if (rc)
				return rc;
		}
		}
	}
	if (done_ptr)
		to_guest(done_ptr, &i, 4);
	return 0;
}

/* ---------------- hypercalls ---------------- */

static void do_iret(struct percpu *pc, struct frame *f)
{
	u64 c[9];  /* rax r11 rcx flags rip cs rflags rsp ss */
	if (from_guest(c, f->rsp, sizeof(c)))
		guest_crash(pc, f, 0x300);
	if ((c[5] & 3) == 3 && pc->kernel_mode) {
		if (!pc->cr3_user)
			guest_crash(pc, f, 0x301);
		toggle_mode(pc);
	}
	f->rax = c[0];
	if (!(c[3] & XEN_VGCF_IN_SYSCALL)) {
		f->r11 = c[1];
		f->rcx = c[2];
	}
	f->rip = c[4];
	f->cs = (c[5] | 3) & 0xffff;
	f->rflags = (c[6] & RFLAGS_GUEST_MASK) | RFLAGS_IF | RFLAGS_FIXED;
	f->rsp = c[7];
	f->ss = (c[8] | 3) & 0xffff;
	vcpu_info(pc)[VI_UPCALL_MASK] = !(c[6] & RFLAGS_IF);
}

static long do_set_trap_table(struct percpu *pc, u64 ptr)
{
	if (!ptr) {
		for (int i = 0; i < 256; i++)
			pc->traps[i].addr = 0;
		return 0;
	}
	for (;; ptr += XEN_TRAP_INFO_SIZE) {
		u64 t[2];  /* vector:8 flags:8 cs:16 pad:32, address */
		if (from_guest(t, ptr, sizeof(t)))
			return -XEN_EFAULT;
		if (!t[1])
			return 0;
		struct trap_ent *e = &pc->traps[t[0] & 0xff];
		e->addr = t[1];
		e->flags = (t[0] >> 8) & 0xff;
	}
}

static long do_callback_op(struct percpu *pc, u64 cmd, u64 ptr)
{
	u64 cb[2];  /* type:16 flags:16 pad:32, address */
	if (cmd != XEN_CALLBACKOP_register && cmd != XEN_CALLBACKOP_unregister)
		return -XEN_ENOSYS;
	if (from_guest(cb, ptr, cmd == XEN_CALLBACKOP_register ? 16 : 2))
		return -XEN_EFAULT;
	u64 type = cb[0] & 0xffff, flags = (cb[0] >> 16) & 0xffff;
	u64 addr = cmd == XEN_CALLBACKOP_register ? cb[1] : 0;
	u64 *slot;
	switch (type) {
	case XEN_CALLBACKTYPE_event: slot = &pc->event_cb; break;
	case XEN_CALLBACKTYPE_failsafe: slot = &pc->failsafe_cb; break;
	case XEN_CALLBACKTYPE_syscall: slot = &pc->syscall_cb; break;
	case XEN_CALLBACKTYPE_nmi: slot = &pc->nmi_cb; break;
	default: return -XEN_EINVAL;   /* sysenter/syscall32: no 32-bit support */
	}
	*slot = addr;
	if (flags & XEN_CALLBACKF_mask_events)
		pc->cb_mask |= 1UL << type;
	else
		pc->cb_mask &= ~(1UL << type);
	return 0;
}

static long do_set_segment_base(struct percpu *pc, u64 which, u64 val)
{
	switch (which) {
	case XEN_SEGBASE_FS:
		if (!canonical(val)) return -XEN_EINVAL;
		wrmsr(MSR_FS_BASE, val);
		return 0;
	case XEN_SEGBASE_GS_USER:  /* hypercalls come from kernel mode: user base is the shadow */
		if (!canonical(val)) return -XEN_EINVAL;
		wrmsr(MSR_KERNEL_GS_BASE, val);
		return 0;
	case XEN_SEGBASE_GS_KERNEL:
		if (!canonical(val)) return -XEN_EINVAL;
		wrmsr(MSR_GS_BASE, val);
		return 0;
	case XEN_SEGBASE_GS_USER_SEL: {
		long rc;
		swapgs();
		rc = guest_load_gs((u16)(val | 3));
		swapgs();
		return rc;
	}
	}
	(void)pc;
	return -XEN_EINVAL;
}

static long hypercall(struct percpu *pc, struct frame *f, u64 nr, const u64 *a);

static long do_multicall(struct percpu *pc, struct frame *f, u64 list, u64 count)
{
	for (u64 i = 0; i < count; i++) {
		u64 e[8];  /* op, result, args[6] */
		u64 va = list + i * XEN_MULTICALL_ENTRY_SIZE;
		if (from_guest(e, va, sizeof(e)))
			return -XEN_EFAULT;
		long rc = (e[0] == HC_iret || e[0] == HC_multicall) ? -XEN_EINVAL : hypercall(pc, f, e[0], &e[2]);
		if (to_guest(va + 8, &rc, 8))
			return -XEN_EFAULT;
	}
	return 0;
}

static long hypercall(struct percpu *pc, struct frame *f, u64 nr, const u64 *a)
{
	switch (nr) {
	case HC_set_trap_table: return do_set_trap_table(pc, a[0]);
	case HC_mmu_update: return do_mmu_update(a[0], a[1], a[2]);
	case HC_stack_switch:
		pc->kernel_ss = a[0];
		pc->kernel_sp = a[1];
		return 0;
	case HC_fpu_taskswitch:
		pc->vcr0_ts = a[0] != 0;
		write_cr0(a[0] ? (read_cr0() | CR0_TS) : (read_cr0() & ~CR0_TS));
		return 0;
	case HC_multicall: return do_multicall(pc, f, a[0], a[1]);
	case HC_update_va_mapping: return do_update_va_mapping(a[0], a[1], a[2]);
	case HC_set_segment_base: return do_set_segment_base(pc, a[0], a[1]);
	case HC_mmuext_op: return do_mmuext_op(pc, f, a[0], a[1], a[2]);
	case HC_callback_op: return do_callback_op(pc, a[0], a[1]);
	case HC_sched_op:
		if (a[0] == XEN_SCHEDOP_yield)
			return 0;
		break;
	}
	return slow_hypercall(pc, f, nr, a);
}

/* syscall from the guest (either lane). */
static void do_syscall(struct percpu *pc, struct frame *f)
{
	if (!pc->kernel_mode) {
		/* user syscall: Xen's switch_to_kernel + bounce to the syscall
		 * callback, frame CS/SS the flat kernel ones (ABI §5.6) */
		f->cs = XEN_FLAT_RING3_CS64;
		f->ss = XEN_FLAT_RING3_SS;
		if (!pc->syscall_cb) {
			/* Xen injects #UD at the syscall instruction */
			f->rip -= 2;
			f->vec = VEC_UD;
			bounce_trap(pc, f, VEC_UD);
			return;
		}
		f->rflags &= ~RFLAGS_DF;
		bounce(pc, f, pc->syscall_cb, 0, 0, (pc->cb_mask >> XEN_CALLBACKTYPE_syscall) & 1);
		return;
	}
	if (f->rax == HC_iret) {
		do_iret(pc, f);
		return;
	}
	u64 a[6] = { f->rdi, f->rsi, f->rdx, f->r10, f->r8, f->r9 };
	f->rax = (u64)hypercall(pc, f, f->rax, a);
	/* return like sysretq: to rcx with rflags from r11 */
	f->rip = f->rcx;
	f->rflags = (f->r11 & RFLAGS_GUEST_MASK) | RFLAGS_IF | RFLAGS_FIXED;
	f->cs = XEN_FLAT_RING3_CS64;
	f->ss = XEN_FLAT_RING3_SS;
}

/* ---------------- exceptions ---------------- */

static int is_forced_cpuid(struct frame *f)
{
	u8 b[7];
	static const u8 sig[7] = { 0x0f, 0x0b, 'x', 'e', 'n', 0x0f, 0xa2 };
	if (from_guest(b, f->rip, 7))
		return 0;
	for (int i = 0; i < 7; i++)
		if (b[i] != sig[i])
			return 0;
	return 1;
}

static void emulate_cpuid(struct frame *f)
{
	u32 leaf = (u32)f->rax, sub = (u32)f->rcx;
	u32 r[4] = { 0, 0, 0, 0 };
	const u8 *t = G->cpuid_table;
	for (u64 i = 0; i < G->nr_cpuid; i++, t += CPUID_ENT_SIZE) {
		const u32 *e = (const u32 *)t;
		if (e[0] == leaf && (e[1] == CPUID_ANY_SUBLEAF || e[1] == sub)) {
			r[0] = e[2]; r[1] = e[3]; r[2] = e[4]; r[3] = e[5];
			break;
		}
	}
	f->rax = r[0]; f->rbx = r[1]; f->rcx = r[2]; f->rdx = r[3];
	f->rip += 7;
}

static u64 *gpr(struct frame *f, int idx)
{
	static const u8 off[16] = { 14, 12, 11, 13, 255, 8, 10, 9, 7, 6, 5, 4, 3, 2, 1, 0 };
	return idx == 4 ? &f->rsp : &((u64 *)f)[off[idx]];
}

/* Privileged instructions a PV kernel executes directly (ABI §5.8); only
 * from guest-kernel mode.  Returns 1 if emulated. */
static int emulate_priv(struct percpu *pc, struct frame *f)
{
	u8 b[4];
	if (!pc->kernel_mode || from_guest(b, f->rip, 3))
		return 0;
	if (b[0] == 0x0f && (b[1] == 0x30 || b[1] == 0x32)) {
		u32 msr = (u32)f->rcx;
		int w = b[1] == 0x30;
		u64 v = (f->rdx << 32) | (u32)f->rax;
		if (msr == MSR_FS_BASE || msr == MSR_GS_BASE || msr == MSR_KERNEL_GS_BASE) {
			if (w) {
				if (!canonical(v))
					return 0;
				wrmsr(msr, v);
			} else {
				v = rdmsr(msr);
			}
		} else if (!w) {
			v = 0;   /* unknown MSRs read as 0 (TODO: policy table) */
		}
		if (!w) {
			f->rax = (u32)v;
			f->rdx = v >> 32;
		}
		f->rip += 2;
		return 1;
	}
	if (b[0] == 0xfa || b[0] == 0xfb) {  /* cli/sti: virtual IF is the mask byte */
		f->rip += 1;
		return 1;
	}
	if (b[0] == 0x0f && (b[1] == 0x06 || b[1] == 0x09)) {  /* clts, wbinvd */
		if (b[1] == 0x06) {
			pc->vcr0_ts = 0;
			write_cr0(read_cr0() & ~CR0_TS);
		}
		f->rip += 2;
		return 1;
	}
	if (b[0] == 0x0f && b[1] == 0x20 && (b[2] & 0xc0) == 0xc0) {  /* mov %crN, reg */
		int cr = (b[2] >> 3) & 7;
		u64 v;
		switch (cr) {
		case 0: v = read_cr0(); break;
		case 2: v = *(u64 *)(vcpu_info(pc) + VI_CR2); break;
		case 3: v = pc->cr3_kernel; break;
		case 4: { u64 c4; __asm__ volatile("mov %%cr4, %0" : "=r"(c4)); v = c4; break; }
		default: return 0;
		}
		*gpr(f, b[2] & 7) = v;
		f->rip += 3;
		return 1;
	}
	/* port I/O without permission: reads all-ones, writes dropped */
	if (b[0] == 0xe4 || b[0] == 0xe5 || b[0] == 0xe6 || b[0] == 0xe7) {
		if (b[0] == 0xe4) f->rax |= 0xff;
		if (b[0] == 0xe5) f->rax |= 0xffffffff;
		f->rip += 2;
		return 1;
	}
	if (b[0] >= 0xec && b[0] <= 0xef) {
		if (b[0] == 0xec) f->rax |= 0xff;
		if (b[0] == 0xed) f->rax |= 0xffffffff;
		f->rip += 1;
		return 1;
	}
	return 0;
}

static void do_gp(struct percpu *pc, struct frame *f)
{
	if (f->err & 2) {   /* IDT-sourced: software `int n` hit a DPL-0 gate */
		u64 v = (f->err >> 3) & 0xff;
		struct trap_ent *t = &pc->traps[v];
		u64 cpl = pc->kernel_mode ? 1 : 3;
		if (t->addr && (t->flags & XEN_TI_DPL_MASK) >= cpl) {
			f->rip += 2;
			f->vec = v;
			bounce(pc, f, t->addr, 0, 0, (t->flags & XEN_TI_MASK_EVENTS) != 0);
			return;
		}
	} else if (f->err == 0 && emulate_priv(pc, f)) {
		return;
	}
	bounce_trap(pc, f, VEC_GP);
}

static void do_pf(struct percpu *pc, struct frame *f)
{
	u64 cr2 = read_cr2();
	/* Lazy adjust_guest_l?e: a kernel-mode access to a present page the
	 * guest mapped without _PAGE_USER; fix the walk and retry. */
	if (pc->kernel_mode && (f->err & (PFEC_P | PFEC_RSVD)) == PFEC_P
	    && !(cr2 >= XEN_HV_VIRT_START && cr2 < XEN_HV_VIRT_END)) {
		int changed = 0;
		walk(read_cr3(), cr2, 1, &changed, 0);
		if (changed) {
			invlpg(cr2);
			return;
		}
	}
	*(u64 *)(vcpu_info(pc) + VI_CR2) = cr2;
	if (pc->kernel_mode)
		f->err &= ~(u64)PFEC_U;   /* hardware always sees CPL3 */
	bounce_trap(pc, f, VEC_PF);
}

static void cpl0_fault(struct percpu *pc, struct frame *f)
{
	if (f->rip == (u64)shim_copy_insn && (f->vec == VEC_PF || f->vec == VEC_GP)) {
		f->rip = (u64)shim_copy_fault;
		return;
	}
	if (f->rip == (u64)shim_gs_insn && f->vec < 32) {
		f->rip = (u64)shim_gs_fault;
		return;
	}
	if (f->rip == (u64)shim_iret_insn)
		guest_crash(pc, f, 0x400 + f->vec);  /* bad guest iret frame (Xen: failsafe) */
	if (f->vec >= 32)
		return;   /* interrupt while in the shim (e.g. in hlt) */
	panic(pc, f, f->vec);
}

void shim_trap(struct frame *f)
{
	struct percpu *pc = pcpu();

	if (f->vec == VEC_SYSCALL) {
		f->rsp = pc->syscall_rsp;
		f->cs = XEN_FLAT_RING3_CS64;
		f->ss = XEN_FLAT_RING3_SS;
		do_syscall(pc, f);
		check_events(pc, f);
		return;
	}
	if ((f->cs & 3) == 0) {
		cpl0_fault(pc, f);
		return;
	}
	switch (f->vec) {
	case VEC_GP:
		/* kvm_pvm: CPL3 `syscall` jumps to LSTAR without changing
		 * CPL; the `swapgs` there faults with RIP == LSTAR and
		 * RCX/R11 intact, so this #GP *is* the syscall. */
		if ((G->flags & SGF_PVM) && f->rip == pc->lstar) {
			f->rip = f->rcx;
			f->rflags = f->r11;
			do_syscall(pc, f);
		} else {
			do_gp(pc, f);
		}
		break;
	case VEC_UD:
		if (pc->kernel_mode && is_forced_cpuid(f))
			emulate_cpuid(f);
		else
			bounce_trap(pc, f, VEC_UD);
		break;
	case VEC_PF:
		do_pf(pc, f);
		break;
	default:
		if (f->vec < 32)
			bounce_trap(pc, f, f->vec);
		/* interrupts (>= 32): nothing to do yet */
		break;
	}
	check_events(pc, f);
}

/* gcc may emit calls to these even in freestanding code */
void *memset(void *d, int c, size_t n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}
