/* pyvmm shim: the CPL0 part of "Xen" for one PV guest running at CPL3.
 *
 * Entered only through the IDT (exceptions/interrupts from the guest) and
 * the per-vCPU syscall trampoline; it owns no thread of its own.  Hot PV
 * operations are done here; everything else goes to Python through one
 * narrow exit (mailbox + `out` to SHIM_EXIT_PORT).
 *
 * What it shares with Python (REGION_VA, the percpu/globals/mailbox
 * blocks, SHIM_EXIT_PORT, ...) is in shim_layout.h, generated at build
 * time from xen_abi/shim/layout.py.
 *
 * On kvm_pvm every instruction here is interpreted (~1 us each): keep
 * paths short, no cmpxchg16b / rdtscp / int n. */
#include "shim.h"
#include "events.h"   /* ev_hypercall, ev_interrupt */
#include "priv.h"     /* emulate_priv, emulate_forced_cpuid, debug registers */
#include "smp.h"      /* load_cr3 */

static __attribute__((noreturn)) void panic(struct percpu *pc, struct frame *f, u64 code)
{
	struct mailbox *mb = pc->mailbox;
	mb->op = MBOP_PANIC;
	mb->info = code;
	mb->rip = f->rip;
	mb->info2 = f->vec == VEC_PF ? read_cr2() : f->err;
	exit_to_python();
	stop_here();
}

__attribute__((noreturn)) void crash_at(struct percpu *pc, u64 rip, u64 err, u64 why)
{
	struct mailbox *mb = pc->mailbox;
	mb->op = MBOP_CRASH;
	mb->info = why;
	mb->rip = rip;
	mb->info2 = err;
	exit_to_python();
	stop_here();
}

static __attribute__((noreturn)) void guest_crash(struct percpu *pc, struct frame *f, u64 why)
{
	crash_at(pc, f->rip, f->err, why);
}

static u8 *vcpu_info(struct percpu *pc) { return pc->vcpu_info; }

/* Xen's toggle_guest_mode: swap the kernel/user GS bases (the inactive one
 * lives in MSR_KERNEL_GS_BASE, exactly as under Xen) and switch L4. */
static void toggle_mode(struct percpu *pc)
{
	swapgs();
	pc->kernel_mode ^= 1;
	load_cr3(pc->vcpu_id, pc->kernel_mode ? pc->cr3_kernel : pc->cr3_user);
}

/* Xen's create_bounce_frame: {rcx, r11, [err], rip, cs|mask<<32, rflags,
 * rsp, ss} on the guest kernel stack, then enter `handler` in kernel mode. */
static void bounce(struct percpu *pc, struct frame *f, u64 handler, int has_err,
		   u64 err, int mask_events)
{
	u8 *vi = vcpu_info(pc);
	u64 old_mask = vi[VI_UPCALL_MASK];
	u64 fr[8], cs = f->cs, sp;

	if (!handler)
		guest_crash(pc, f, CRASH_NO_HANDLER_VEC + f->vec);
	if (pc->kernel_mode) {
		cs &= ~3UL;           /* "indicate kernel context to guest" */
		sp = f->rsp;
	} else {
		toggle_mode(pc);
		sp = pc->kernel_sp;
	}
	/* fixed slots (indexed stores cost more instructions): without an
	 * error code the frame is fr[1..7], rcx and r11 one slot up */
	fr[3] = f->rip;
	fr[4] = (cs & 0xffff) | (old_mask << 32);
	fr[5] = (f->rflags & ~(RFLAGS_IF | RFLAGS_IOPL)) | (old_mask ? 0 : RFLAGS_IF);
	fr[6] = f->rsp;
	fr[7] = f->ss & 0xffff;
	if (has_err) {
		fr[0] = f->rcx;
		fr[1] = f->r11;
		fr[2] = err;
	} else {
		fr[1] = f->rcx;
		fr[2] = f->r11;
	}
	u64 n = has_err ? 8 : 7;
	sp = (sp & ~15UL) - n * 8;
	if (to_guest(sp, fr + 8 - n, n * 8))
		guest_crash(pc, f, CRASH_BOUNCE_UNWRITABLE_VEC + f->vec);
	f->rip = handler;
	f->cs = FLAT_RING3_CS64;
	f->ss = FLAT_RING3_SS64;
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

/* inlined: the hot traps pay no call for it */
static inline __attribute__((always_inline)) void bounce_trap(struct percpu *pc, struct frame *f, u64 vec)
{
	struct trap_ent *t = &pc->traps[vec];
	bounce(pc, f, t->addr, has_error_code(vec), f->err, (t->flags & TI_MASK_EVENTS) != 0);
}

/* one 16-bit compare: upcall_pending == 1 && upcall_mask == 0; FIFO
 * ports raised for this vCPU are linked first (one load when none) */
static int events_due(struct percpu *pc)
{
	if (*(volatile u64 *)((u8 *)pc - PERCPU_IN_BLOCK + VCPU_EVENTS_OFF + EVB_FIFO_LINK_SUM))
		ev_fifo_drain();
	return *(volatile u16 *)(vcpu_info(pc) + VI_UPCALL_PENDING) == 1 && pc->event_cb;
}

static void check_events(struct percpu *pc, struct frame *f)
{
	if (events_due(pc)) {
		f->vec = 0x1000;  /* for crash reports only */
		bounce(pc, f, pc->event_cb, 0, 0, 1);
		/* after a tick, in kernel mode now: the runstate area (events.c) */
		if (*(volatile u64 *)((u8 *)pc - PERCPU_IN_BLOCK + VCPU_EVENTS_OFF + EVB_RUNSTATE_DUE))
			ev_runstate_update();
	}
}

/* ---------------- virtual NMIs ----------------
 *
 * Xen's: VCPUOP_send_nmi sets the target's nmi_pending (once) and kicks
 * it; on its way back to guest code a pending NMI that is not masked is
 * taken (pending cleared), and with a callback (virtual IDT vector 2)
 * bounced to it like an exception without error code, NMIs then masked
 * until HYPERVISOR_iret; without one it is dropped.
 *
 * The kick is an IPI on EV_NMI_VECTOR, also to itself: the shim runs with
 * interrupts off, so it is taken right after the return to guest code, and
 * the bounce is made there (nmi_interrupt) -- the hot return paths never
 * look at NMIs.  The kick of a vCPU halted in SCHEDOP_block / poll wakes
 * it and is raised again, for its return.  HYPERVISOR_iret that unmasks
 * with one pending raises it the same way. */
extern char shim_halt_insn[];   /* events.c halt(): the one hlt the shim waits in */

static void nmi_kick(u64 vcpu)
{
	wrmsr(MSR_X2APIC_ICR, (vcpu << 32) | EV_NMI_VECTOR);   /* x2APIC ID = vCPU id */
}

/* VCPUOP_send_nmi (Xen's arch_do_vcpu_op): hypercall() answered -ENOENT
 * for a vCPU the domain does not have; the shim's own bound is kept here
 * too, since the id picks the block written.  A flood costs one IPI per
 * NMI the target takes. */
static NOINLINE long send_nmi(u64 vcpu, u64 arg)
{
	if (vcpu >= MAX_VCPUS)
		return -XEN_ENOENT;
	if (arg)
		return -XEN_EINVAL;
	struct percpu *t = (struct percpu *)(vcpu_block(vcpu) + PERCPU_IN_BLOCK);
	if (!__atomic_exchange_n(&t->nmi_pending, 1, __ATOMIC_SEQ_CST))
		nmi_kick(vcpu);
	return 0;
}

static NOINLINE void nmi_unmask(struct percpu *pc)
{
	pc->nmi_masked = 0;
	if (pc->nmi_pending)
		nmi_kick(pc->vcpu_id);
}

/* The kick arrived (entry.S: shim_common_cold).  Guest code was
 * interrupted: take the NMI now.  The shim was (its hlt, the one place
 * where it runs with interrupts on): wake, and raise the kick again so
 * that the NMI is taken on the way back to the guest. */
static NOINLINE void nmi_interrupt(struct percpu *pc, struct frame *f)
{
	priv_count(pc, PRIV_CNT_IRQ);
	wrmsr(MSR_X2APIC_EOI, 0);
	if ((f->cs & 3) == 0) {
		if (f->rip == (u64)shim_halt_insn)
			f->rip++;   /* taken before the hlt: do not sleep through it */
		/* back to the hlt's `cli` with interrupts off already: the
		 * kick raised again must wait for the guest, not come back
		 * here at once (and again, for ever: the faithful lane does) */
		f->rflags &= ~RFLAGS_IF;
		if (pc->nmi_pending && !pc->nmi_masked)
			nmi_kick(pc->vcpu_id);
		return;
	}
	if (pc->nmi_pending && !pc->nmi_masked) {
		struct trap_ent *t = &pc->traps[VEC_NMI];
		pc->nmi_pending = 0;
		if (t->addr) {
			priv_count(pc, VEC_NMI);   /* "trap 2": NMIs bounced */
			pc->nmi_masked = 1;
			f->vec = VEC_NMI;   /* for crash reports */
			bounce(pc, f, t->addr, 0, 0, (t->flags & TI_MASK_EVENTS) != 0);
		}
	}
	check_events(pc, f);
}

/* ---------------- the slow path ---------------- */

static long slow_hypercall(struct percpu *pc, u64 rip, u64 nr, const u64 *a)
{
	struct mailbox *mb = pc->mailbox;
	mmu_type_boot_tables(pc);   /* Python reads frame types (reservation.py) */
	mb->op = MBOP_HYPERCALL;
	mb->nr = nr;
	for (int i = 0; i < 6; i++)
		mb->args[i] = a[i];
	mb->cr3 = read_cr3();
	mb->kmode = pc->kernel_mode;
	mb->rip = rip;
	mb->result = (u64)-XEN_ENOSYS;
	exit_to_python();
	/* Python may ask for grant PTEs before it answers (mmu_grant_pte) */
	while (mb->op == MBOP_GRANT_PTE) {
		mb->info = (u64)mmu_grant_pte(pc, mb->args);
		exit_to_python();
	}
	return (long)mb->result;
}

/* ---------------- hypercalls ---------------- */

/* VCPUOP_initialise of another vCPU: the shim takes the context's GDT and
 * base pointers (mmu_vcpu_context), then Python checks the rest and takes
 * the registers, callbacks and trap table (vcpu_op.py).  The target's init
 * lock keeps two vCPUs initialising the same one from mixing contexts; an
 * initialised target is never touched (Python answers -EEXIST). */
static NOINLINE long vcpu_initialise(struct percpu *pc, u64 rip, const u64 *a)
{
	u8 *blk = vcpu_block(a[1]);
	volatile u64 *ev = (volatile u64 *)(blk + VCPU_EVENTS_OFF);
	u64 *lock = (u64 *)(blk + VCPU_EVENTS_OFF + EVB_INIT_LOCK);
	long rc;
	while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE))
		smp_serve((u8 *)pc - PERCPU_IN_BLOCK + VCPU_EVENTS_OFF);
	if (ev[EVB_INITIALISED / 8])
		rc = slow_hypercall(pc, rip, HC_vcpu_op, a);
	else {
		struct percpu *t = (struct percpu *)(blk + PERCPU_IN_BLOCK);
		rc = mmu_vcpu_context(pc, t, (u64 *)(blk + VCPU_GDT_OFF), a[2]);
		if (!rc && (rc = slow_hypercall(pc, rip, HC_vcpu_op, a)))
			mmu_vcpu_context_undo(t);
	}
	__atomic_store_n(lock, 0, __ATOMIC_RELEASE);
	return rc;
}

static void do_iret(struct percpu *pc, struct hc_frame *h)
{
	u64 c[9];  /* rax r11 rcx flags rip cs rflags rsp ss */
	if (from_guest(c, h->rsp, sizeof(c)))
		crash_at(pc, h->rip, 0, CRASH_IRET_FRAME_UNREADABLE);
	if ((c[5] & 3) == 3 && pc->kernel_mode) {
		if (!pc->cr3_user)
			crash_at(pc, h->rip, 0, CRASH_IRET_TO_USER_WITHOUT_L4);
		toggle_mode(pc);
	}
	h->rax = c[0];
	if (!(c[3] & VGCF_IN_SYSCALL)) {
		h->r11 = c[1];
		h->rcx = c[2];
	}
	h->rip = c[4];
	h->cs = (c[5] | 3) & 0xffff;
	h->rflags = (c[6] & RFLAGS_GUEST_MASK) | RFLAGS_IF | RFLAGS_FIXED;
	h->rsp = c[7];
	h->ss = (c[8] | 3) & 0xffff;
	vcpu_info(pc)[VI_UPCALL_MASK] = !(c[6] & RFLAGS_IF);
	if (pc->nmi_masked)   /* Xen's async_exception_cleanup */
		nmi_unmask(pc);
}

static NOINLINE long do_set_trap_table(struct percpu *pc, u64 ptr)
{
	if (!ptr) {   /* Xen clears the whole virtual IDT, DPLs included */
		for (int i = 0; i < 256; i++)
			pc->traps[i].addr = pc->traps[i].flags = 0;
		return 0;
	}
	for (;; ptr += XEN_TRAP_INFO_SIZE) {
		u64 t[2];  /* vector:8 flags:8 cs:16 pad:32, address */
		if (hc_preempt_check(pc)) {   /* a list can be as long as memory */
			hc_continue(pc, HC_set_trap_table, ptr, 0, 0, 0);
			return 0;
		}
		if (from_guest(t, ptr, sizeof(t)))
			return -XEN_EFAULT;
		if (!t[1])
			return 0;
		if (!canonical(t[1]))   /* entries before it stay set, as in Xen */
			return -XEN_EINVAL;
		struct trap_ent *e = &pc->traps[t[0] & 0xff];
		e->addr = t[1];
		e->flags = (t[0] >> 8) & 0xff;
	}
}

/* Xen's register/unregister_guest_callback for a 64-bit PV guest: every
 * type is accepted (syscall32 and sysenter are kept, though a guest without
 * 32-bit code never gets them), a non-canonical NMI callback is refused,
 * and only the NMI callback can be unregistered (-EINVAL for the others,
 * -ENOSYS for unknown types).  The NMI callback is the virtual IDT's
 * vector 2 (Xen's register_guest_nmi_callback writes trap_ctxt[2], events
 * masked, whatever the flags say; set_trap_table can set it too). */
static NOINLINE long do_callback_op(struct percpu *pc, u64 cmd, u64 ptr)
{
	u64 cb[2];  /* register: type:16 flags:16 pad:32, address; unregister: type:16 pad:16 */
	if (cmd != CALLBACKOP_register && cmd != CALLBACKOP_unregister)
		return -XEN_ENOSYS;
	if (from_guest(cb, ptr, cmd == CALLBACKOP_register ? 16 : 4))
		return -XEN_EFAULT;
	u64 type = cb[0] & 0xffff, flags = (cb[0] >> 16) & 0xffff;
	if (cmd == CALLBACKOP_unregister) {
		switch (type) {
		case CALLBACKTYPE_event: case CALLBACKTYPE_failsafe: case CALLBACKTYPE_syscall:
		case CALLBACKTYPE_syscall32: case CALLBACKTYPE_sysenter:
			return -XEN_EINVAL;
		case CALLBACKTYPE_nmi:
			pc->traps[VEC_NMI].addr = pc->traps[VEC_NMI].flags = 0;
			return 0;
		}
		return -XEN_ENOSYS;
	}
	u64 *slot;
	switch (type) {
	case CALLBACKTYPE_event: slot = &pc->event_cb; break;
	case CALLBACKTYPE_failsafe: slot = &pc->failsafe_cb; break;
	case CALLBACKTYPE_syscall: slot = &pc->syscall_cb; break;
	case CALLBACKTYPE_syscall32: slot = &pc->syscall32_cb; break;
	case CALLBACKTYPE_sysenter: slot = &pc->sysenter_cb; break;
	case CALLBACKTYPE_nmi:
		if (!canonical(cb[1]))
			return -XEN_EINVAL;
		pc->traps[VEC_NMI].addr = cb[1];
		pc->traps[VEC_NMI].flags = TI_MASK_EVENTS;
		return 0;
	default: return -XEN_ENOSYS;
	}
	*slot = cb[1];
	if (flags & CALLBACKF_mask_events)
		pc->cb_mask |= 1UL << type;
	else
		pc->cb_mask &= ~(1UL << type);
	return 0;
}

static NOINLINE long do_set_segment_base(struct percpu *pc, u64 which, u64 val)
{
	switch ((u32)which) {   /* Xen's is an unsigned int */
	case SEGBASE_FS:
		if (!canonical(val)) return -XEN_EINVAL;
		wrmsr(MSR_FS_BASE, val);
		return 0;
	case SEGBASE_GS_USER:  /* hypercalls come from kernel mode: user base is the shadow */
		if (!canonical(val)) return -XEN_EINVAL;
		wrmsr(MSR_KERNEL_GS_BASE, val);
		return 0;
	case SEGBASE_GS_KERNEL:
		if (!canonical(val)) return -XEN_EINVAL;
		wrmsr(MSR_GS_BASE, val);
		return 0;
	case SEGBASE_GS_USER_SEL: {
		/* Xen 4.17: RPL 3 for a non-null selector; a null one (0-3) or
		 * one that faults leaves %gs null with base 0, and the call
		 * succeeds either way (Linux BUG()s on a failure) */
		u16 sel = (u16)val;
		swapgs();
		guest_load_gs(sel > 3 ? sel | 3 : sel);
		swapgs();
		return 0;
	}
	}
	(void)pc;
	return -XEN_EINVAL;
}

static long hypercall(struct percpu *pc, u64 rip, u64 nr, const u64 *a);

/* Xen's common/multicall.c: each entry's result in its slot; an entry
 * that cannot be read or a result that cannot be written ends it with
 * -EFAULT.  Nested multicalls are Xen's -EINVAL "reentry".  hypercall()
 * takes the rare counts (no entries, upper bits set) to multicall_odd, so
 * that this loop's code stays as it was (noipa: no range from there). */
static NOIPA long do_multicall(struct percpu *pc, u64 rip, u64 list, u64 count)
{
	for (u64 i = 0; i < count; i++) {
		u64 e[8];  /* op, result, args[6] */
		u64 va = list + i * XEN_MULTICALL_ENTRY_SIZE;
		if (i && hc_preempt_check(pc)) {
			hc_continue(pc, HC_multicall, va, count - i, 0, 0);
			return 0;
		}
		if (from_guest(e, va, sizeof(e)))
			return -XEN_EFAULT;
		long rc = (e[0] == HC_iret || e[0] == HC_multicall) ? -XEN_EINVAL : hypercall(pc, rip, e[0], &e[2]);
		if (pc->cont_set) {
			/* the entry itself was preempted (Xen's multicall
			 * continuation): its rest goes back into the entry, and
			 * the multicall resumes there; no result yet */
			if (to_guest(va + 16, pc->cont_args, 4 * 8))
				return -XEN_EFAULT;
			hc_continue(pc, HC_multicall, va, count - i, 0, 0);
			return 0;
		}
		if (to_guest(va + 8, &rc, 8))
			return -XEN_EFAULT;
	}
	return 0;
}

/* Xen's nr_calls is an unsigned int; with none, a list outside the
 * guest's half is still -EFAULT (guest_handle_okay checks its start) */
static NOINLINE long multicall_odd(struct percpu *pc, u64 rip, u64 list, u64 count)
{
	if (!(u32)count)
		return range_ok(list, 0) ? 0 : -XEN_EFAULT;
	return do_multicall(pc, rip, list, (u32)count);
}

/* What neither the switch below nor events.c finishes: the exit to Python.
 * Kept out of line so that the hot cases of hypercall() need no stack
 * frame (each saved register is two interpreted instructions). */
static NOINLINE long events_or_python(struct percpu *pc, u64 rip, u64 nr, const u64 *a)
{
	long rc;
	if (ev_hypercall(nr, a, &rc))
		return rc;
	if (nr == HC_vcpu_op && a[0] == VCPUOP_send_nmi)   /* hypercall() checked the id */
		return send_nmi(a[1], a[2]);
	if (nr == HC_physdev_op) {
		/* set_iopl, set_iobitmap: Python validates, priv.c remembers */
		rc = slow_hypercall(pc, rip, nr, a);
		if (!rc)
			priv_physdev_op(pc, a[0], a[1]);
		return rc;
	}
	return slow_hypercall(pc, rip, nr, a);
}

/* rip: where the guest made it (the multicall's, for its entries), for
 * the mailbox of the slow path */
static long hypercall(struct percpu *pc, u64 rip, u64 nr, const u64 *a)
{
	priv_count(pc, PRIV_CNT_HCALL + nr);
	switch (nr) {
	case HC_vcpu_op:   /* Linux probes VCPUOP_is_up for all NR_CPUS (8192) */
		if ((a[0] | a[1]) >> 32) {   /* int cmd, unsigned int vcpuid: Xen drops the upper halves */
			((u64 *)a)[0] = (u32)a[0];
			((u64 *)a)[1] = (u32)a[1];
		}
		if (priv_no_such_vcpu(pc, a[1]))
			return -XEN_ENOENT;
		if (a[0] == VCPUOP_initialise)
			return vcpu_initialise(pc, rip, a);
		break;
	case HC_set_trap_table: return do_set_trap_table(pc, a[0]);
	case HC_mmu_update: return do_mmu_update(pc, a[0], a[1], a[2], a[3]);
	case HC_set_gdt: return do_set_gdt(pc, a[0], a[1]);
	case HC_update_descriptor: return do_update_descriptor(pc, a[0], a[1]);
	case HC_stack_switch:
		pc->kernel_ss = a[0];
		pc->kernel_sp = a[1];
		return 0;
	case HC_fpu_taskswitch:
		pc->vcr0_ts = a[0] != 0;
		write_cr0(a[0] ? (read_cr0() | CR0_TS) : (read_cr0() & ~CR0_TS));
		return 0;
	case HC_multicall:
		if (a[1] - 1 >= 0xffffffffUL)   /* 0, or upper bits set */
			return multicall_odd(pc, rip, a[0], a[1]);
		return do_multicall(pc, rip, a[0], a[1]);
	case HC_update_va_mapping: return do_update_va_mapping(pc, a[0], a[1], a[2]);
	case HC_set_segment_base: return do_set_segment_base(pc, a[0], a[1]);
	case HC_mmuext_op: return do_mmuext_op(pc, a[0], a[1], a[2], a[3]);
	case HC_callback_op: return do_callback_op(pc, a[0], a[1]);
	case HC_sched_op:
		if (a[0] == SCHEDOP_yield)
			return 0;
		break;
	case HC_set_debugreg: return do_set_debugreg(pc, a[0], a[1]);
	case HC_get_debugreg: return do_get_debugreg(pc, a[0]);
	}
	return events_or_python(pc, rip, nr, a);
}

/* A syscall from guest user mode: Xen's switch_to_kernel + bounce to the
 * syscall callback, frame CS/SS the flat kernel ones (ABI §5.6). */
static void bounce_user_syscall(struct percpu *pc, struct frame *f)
{
	if (!pc->syscall_cb) {
		/* Xen injects #UD at the syscall instruction */
		f->rip -= 2;
		f->vec = VEC_UD;
		bounce_trap(pc, f, VEC_UD);
		return;
	}
	f->rflags &= ~RFLAGS_DF;
	bounce(pc, f, pc->syscall_cb, 0, 0, (pc->cb_mask >> CALLBACKTYPE_syscall) & 1);
}

/* A syscall from the guest, either lane (entry.S shim_syscall).  From
 * kernel mode it is a hypercall, finished here.  Returns 0 to go straight
 * back to the guest (the parameter registers clobbered, as Xen's ABI
 * allows), 2 to go back with every register as saved (HYPERVISOR_iret),
 * or 1 for the full path (shim_trap), with h->vec saying why: a syscall
 * from user mode, or an event to deliver on the way out. */
int shim_hypercall(struct hc_frame *h)
{
	struct percpu *pc = pcpu();
	int back = 0;
	priv_count(pc, PRIV_CNT_SYSCALL);
	if (!pc->kernel_mode) {
		h->vec = VEC_SYSCALL;
		return 1;
	}
	if (h->rax == HC_iret) {
		priv_count(pc, PRIV_CNT_HCALL + HC_iret);
		do_iret(pc, h);
		back = 2;
	} else {
		pc->hc_work_left = HYPERCALL_WORK_BUDGET;
		long rc = hypercall(pc, h->rip, h->rax, h->args);
		if (pc->cont_set) {
			/* preempted: the guest re-executes the syscall with the
			 * rest of the work (Xen: regs->rip -= 2), events first */
			pc->cont_set = 0;
			h->rax = pc->cont_nr;
			for (int i = 0; i < 4; i++)
				h->args[i] = pc->cont_args[i];
			h->rip -= 2;
			back = 2;
		} else {
			h->rax = (u64)rc;
		}
	}
	if (events_due(pc)) {
		h->vec = VEC_HC_EVENTS;
		return 1;
	}
	return back;
}

/* ---------------- exceptions ---------------- */

/* privileged instructions, forced CPUID, MSRs: priv.c */

/* `int $n` at rip, legacy and REX prefixes allowed: n, and its length in
 * *len; -1 if the bytes there are something else.  No LOCK: a locked
 * `int` is #UD. */
static NOINLINE long int_insn(u64 rip, u64 *len)
{
	for (u64 n = 0; n < 14; n++) {
		u8 b[2];
		if (from_guest(b, rip + n, 2))
			return -1;
		if (b[0] == 0xcd) {
			*len = n + 2;
			return b[1];
		}
		if (!(b[0] == 0x66 || b[0] == 0x67 || b[0] == 0xf2 || b[0] == 0xf3 || b[0] == 0x2e
		      || b[0] == 0x36 || b[0] == 0x3e || b[0] == 0x26 || b[0] == 0x64 || b[0] == 0x65
		      || (b[0] & 0xf0) == 0x40))
			return -1;
	}
	return -1;
}

/* `int $vec` (len bytes) the IDT refused (its gates are DPL 0 but for
 * #BP and #OF): Xen's do_general_protection + pv_emulate_sw_interrupt.
 * The guest's own DPL decides (kernel mode is virtual ring 1), the trap
 * resumes after the instruction; else it is the #GP the CPU raised,
 * ((vec << 3) | 2) at the instruction.  Vector 0x80 is Xen's int80 direct
 * trap: taken whenever a handler is registered, whatever its DPL.  The
 * vector comes from the instruction, not the error code: QEMU/TCG (the
 * faithful lane) reports vec * 16 + 2. */
static NOINLINE void soft_int(struct percpu *pc, struct frame *f, u64 vec, u64 len)
{
	struct trap_ent *t = &pc->traps[vec];
	u64 cpl = pc->kernel_mode ? 1 : 3;
	f->err = (vec << 3) | 2;
	if ((t->flags & TI_DPL_MASK) >= cpl || (vec == 0x80 && t->addr)) {
		f->rip += len;
		f->vec = vec;
		bounce(pc, f, t->addr, 0, 0, (t->flags & TI_MASK_EVENTS) != 0);  /* no handler: crash, as Xen */
		return;
	}
	f->vec = VEC_GP;
	bounce_trap(pc, f, VEC_GP);
}

/* #UD.  kvm_pvm raises it for every `int $n` at CPL3 (README "Two test
 * lanes"), so an `int` here is taken as the CPU would have: $3 and $4
 * through their DPL-3 gates as #BP / #OF traps, the others as soft_int.
 * On a faithful CPU an `int` never raises #UD, so this costs nothing. */
static NOINLINE void do_ud(struct percpu *pc, struct frame *f)
{
	u64 len = 0;
	long vec;
	if (emulate_forced_cpuid(pc, f))
		return;
	vec = int_insn(f->rip, &len);
	if (vec == VEC_BP || vec == VEC_OF) {
		f->rip += len;
		f->vec = vec;
		bounce_trap(pc, f, vec);
	} else if (vec >= 0) {
		soft_int(pc, f, vec, len);
	} else {
		bounce_trap(pc, f, VEC_UD);
	}
}

static NOINLINE void do_gp(struct percpu *pc, struct frame *f)
{
	if ((f->err & 3) == 2) {   /* IDT-sourced: software `int n` hit a DPL-0 gate */
		u64 len = 0;
		u8 b[2];
		long vec = int_insn(f->rip, &len);
		/* QEMU 7.2's TCG (the faithful lane) reports n * 16 + 2 (its
		 * issue 1382), at times with the rip after a plain `int $n` */
		if (vec >= 0 && (f->err == ((u64)vec << 3 | 2) || f->err == ((u64)vec << 4 | 2))) {
			soft_int(pc, f, vec, len);
			return;
		}
		if (f->err < 0x1000 && !from_guest(b, f->rip - 2, 2) && b[0] == 0xcd && b[1] == f->err >> 4) {
			f->rip -= 2;
			soft_int(pc, f, b[1], 2);
			return;
		}
	}
	if (f->err == 0) {
		int r = emulate_priv(pc, f);
		if (r == EMUL_DONE)
			return;
		if (r == EMUL_RAISE_UD) {   /* e.g. mov %dr4 with CR4.DE (Xen: -ENODEV) */
			f->vec = VEC_UD;
			bounce_trap(pc, f, VEC_UD);
			return;
		}
		if (r == EMUL_DONE_DEBUG) {   /* an I/O breakpoint: #DB after the in/out */
			f->vec = VEC_DB;
			bounce_trap(pc, f, VEC_DB);
			return;
		}
	}
	bounce_trap(pc, f, VEC_GP);
}

static void do_pf(struct percpu *pc, struct frame *f)
{
	u64 cr2 = read_cr2();
	/* lazy _PAGE_USER fix-up and writable page tables (mmu.c) */
	if (mmu_page_fault(pc, f, cr2))
		return;
	*(u64 *)(vcpu_info(pc) + VI_CR2) = cr2;
	if (pc->kernel_mode)
		f->err &= ~(u64)PFEC_U;   /* hardware always sees CPL3 */
	bounce_trap(pc, f, VEC_PF);
}

/* entry.S: the #GP fast paths read guest memory in [start, end) */
extern char shim_fast_start[], shim_fast_end[], shim_fast_fault[];

static void cpl0_fault(struct percpu *pc, struct frame *f)
{
	if (f->rip >= (u64)shim_fast_start && f->rip < (u64)shim_fast_end
	    && (f->vec == VEC_PF || f->vec == VEC_GP)) {
		f->rip = (u64)shim_fast_fault;   /* let the C path decide */
		return;
	}
	if ((f->rip == (u64)shim_copy_insn || f->rip == (u64)shim_copy_tail_insn)
	    && (f->vec == VEC_PF || f->vec == VEC_GP)) {
		f->rip = (u64)shim_copy_fault;
		return;
	}
	if (f->rip == (u64)shim_gs_insn && f->vec < 32) {
		f->rip = (u64)shim_gs_fault;
		return;
	}
	if (f->rip == (u64)shim_iret_insn || f->rip == (u64)shim_hc_iret_insn)
		guest_crash(pc, f, CRASH_BAD_IRET_FRAME_VEC + f->vec);  /* bad guest iret frame (Xen: failsafe) */
	if (f->vec >= 32) {
		if (f->rip == (u64)shim_halt_insn)
			f->rip++;   /* taken before the hlt (events.c halt): do not sleep through it */
		ev_interrupt(f->vec);   /* interrupt while in the shim (SCHEDOP_block's hlt) */
		return;
	}
	panic(pc, f, f->vec);
}

void shim_trap(struct frame *f)
{
	struct percpu *pc = pcpu();

	/* the full path of a syscall (counted in shim_hypercall) */
	if (f->vec == VEC_SYSCALL) {
		bounce_user_syscall(pc, f);
		check_events(pc, f);
		return;
	}
	if (f->vec == VEC_HC_EVENTS) {
		f->vec = VEC_SYSCALL;   /* for crash reports */
		check_events(pc, f);
		return;
	}
	priv_count(pc, f->vec < 32 ? f->vec : PRIV_CNT_IRQ);
	if ((f->cs & 3) == 0) {
		cpl0_fault(pc, f);
		return;
	}
	switch (f->vec) {
	case VEC_GP:
		do_gp(pc, f);   /* kvm_pvm's syscalls never get here (entry.S) */
		break;
	case VEC_UD:
		do_ud(pc, f);
		break;
	case VEC_PF:
		do_pf(pc, f);
		break;
	default:
		if (f->vec < 32)
			bounce_trap(pc, f, f->vec);
		else
			ev_interrupt(f->vec);   /* timer / event check: delivered below */
		break;
	}
	check_events(pc, f);
}

/* Xen's do_device_not_available: a PV guest's #NM always clears its
 * virtual CR0.TS (classic Xen Linux relies on it); the shim sets the real
 * TS only with the virtual one, so #NM without it is a broken state. */
static void do_nm(struct percpu *pc, struct frame *f)
{
	if (!pc->vcr0_ts)
		guest_crash(pc, f, CRASH_NO_HANDLER_VEC + VEC_NM);
	pc->vcr0_ts = 0;
	write_cr0(read_cr0() & ~CR0_TS);
	bounce_trap(pc, f, VEC_NM);
}

/* #DB, #NM and the NMI kick (entry.S shim_common_cold).  #DB in the shim itself (a
 * guest data breakpoint on memory the shim touched, the single-step trap
 * of a `syscall`) is dropped, as Xen drops a #DB in its own context;
 * kvm_pvm delivers that last one at the syscall's landing point, at CPL3. */
void shim_trap_cold(struct frame *f)
{
	struct percpu *pc = pcpu();
	if (f->vec == EV_NMI_VECTOR) {
		nmi_interrupt(pc, f);
		return;
	}
	priv_count(pc, f->vec);
	if (f->vec == VEC_DB) {
		u64 dr6 = priv_take_dr6();
		if ((f->cs & 3) == 0 || f->rip == pc->lstar)
			return;
		priv_merge_dr6(pc, dr6);
		bounce_trap(pc, f, VEC_DB);
	} else if ((f->cs & 3) == 0) {
		cpl0_fault(pc, f);
		return;
	} else {
		do_nm(pc, f);
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
