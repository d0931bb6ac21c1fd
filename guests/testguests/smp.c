/* SMP for a 64-bit PV domU as Xen 4.17 gives it (issue #9), driven from
 * vCPU 0; the domain is built with nr_vcpus=N and the kernel command line
 * says "nr_vcpus=N".  Steps (numbered as in the issue; run in the order
 * 1, 3a, 2, 3b, 6, 4, 5, 7 so that the steps which can wedge a vCPU come
 * last):
 *  1  VCPUOP_is_up: 1 for vCPU 0, 0 for the others, -ENOENT for id N and
 *     huge ids.
 *  3a VCPUOP_up of a never-initialised vCPU -EINVAL; with nr_vcpus >= 3,
 *     VCPUOP_initialise of a spare not-yet-initialised vCPU with bad contexts
 *     (common/domain.c default_initialise_vcpu, arch/x86/domain.c
 *     arch_set_info_guest, pv/descriptor-tables.c pv_set_gdt): -EFAULT for
 *     an unreadable context, -EINVAL for non-canonical rip/rsp/kernel_sp/
 *     callbacks/gs_base/trap address, a misaligned or oversized LDT, too
 *     many GDT entries, a writable GDT frame, !VGCF_in_kernel without a
 *     user cr3, a cr3 that is not an L4 or not a frame, a GDT frame or a
 *     cr3 mapped writable (page types); each leaves the vCPU
 *     uninitialised (is_up 0, VCPUOP_up -EINVAL).
 *  2  Bring-up as Linux does (arch/x86/xen/smp_pv.c cpu_initialize_context):
 *     VGCF_IN_KERNEL, rip/rsp, FLAT_KERNEL_CS/SS, rflags 0x1000, the trap
 *     table, kernel_ss/sp, cr3 = the L4 of start_info.pt_base, callbacks,
 *     gs_base_kernel, a read-only GDT frame for vCPU 1 (gdt_ents 0 for the
 *     others); initialise leaves it down, VCPUOP_up runs it: it checks its
 *     registers (rdi/rsi from user_regs, GS base), its trap table (#UD),
 *     its vcpu_info time record, and sets a flag.
 *  3b -EEXIST for an initialised vCPU (before any check of the context;
 *     -EFAULT still first), -ENOENT for id N and huge ids.
 *  6  TLB shootdown: the other vCPUs read a page through TEST_VA in a loop;
 *     vCPU 0 points the PTE at another frame with update_va_mapping
 *     (UVMF_INVLPG/UVMF_TLB_FLUSH, UVMF_MULTI mask or UVMF_ALL) or
 *     mmu_update + MMUEXT_{INVLPG,TLB_FLUSH}_{MULTI,ALL}; once the call
 *     returns, their next read must see the new frame.
 *  4  Event channels across vCPUs: bind_ipi to vCPU 1 (-ENOENT for id N),
 *     delivered to vCPU 1's event callback while it spins and while it is
 *     blocked; VIRQ_TIMER bound to vCPU 1 and its singleshot timer there
 *     (-EINVAL when set from another vCPU); bind_vcpu (common/event_channel.c
 *     evtchn_bind_vcpu): unbound/interdomain ports move, IPI and per-vCPU
 *     VIRQ ports -EINVAL, bad port -EINVAL, bad vCPU -ENOENT first; a
 *     loopback interdomain port moved to vCPU 1 is delivered there.
 *  5  SCHEDOP_poll (common/sched/core.c do_poll): nr_ports > 128 -EINVAL,
 *     a port >= the 2-level limit -EINVAL, a pending port returns at once,
 *     a timeout returns; vCPU 1 polls a masked port with timeout 0 and
 *     returns when vCPU 0 sends on it.
 *  7  VCPUOP_down of vCPU 1 by itself: is_up 0, it stops, initialise is
 *     still -EEXIST; VCPUOP_up resumes it right after its down hypercall
 *     (rc 0, stack intact); down by vCPU 0 stops a running vCPU 1 too.
 * Each failure prints "check failed: step N: ..." with the values. */
#include "tg_events.h"
#include "mmutest.h"
#include "vcpu_ctx.h"
#include "tg_smp.h"

const char tg_name[] = "smp";

#define MAXCPU 8
#define STACK_SIZE 16384
#define MAGIC 0x5350b007c0ffee00UL
#define NONCANON 0x0000800000000000UL
#define FLAT_KERNEL_CS FLAT_RING3_CS64
#define FLAT_KERNEL_SS FLAT_RING3_SS64
#define MSR_GS_BASE 0xc0000101
#define NPORTS 256          /* ports this guest tracks */
#define WAIT_MS 10000       /* bound of every wait for another vCPU */

struct sched_poll { u64 ports; u32 nr_ports, _p; u64 timeout; };
struct evtchn_bind_vcpu { u32 port, vcpu; };
_Static_assert(sizeof(struct sched_poll) == 24, "sched_poll");

/* ---- state shared between the vCPUs ---- */
struct cpu {
	volatile u32 cmd_seq, done_seq, cmd, _p;
	volatile u64 arg[4];
	volatile s64 res[8];
	volatile u64 alive, heartbeat, upcalls, resumed;
	volatile u64 seen_rdi, seen_rsi, gs_base, time_mul, time_version;
	volatile u64 ud_expected, ud_seen;
	volatile u64 ready, reads, last_read;
	u64 self;            /* &cpus[i]: what %gs points at (gs_base_kernel) */
} __attribute__((aligned(64)));
static struct cpu cpus[MAXCPU];
/* hits[cpu][port]: per-vCPU upcall hits (below) */
static volatile u8 port_owner[NPORTS];         /* which vCPU's upcall takes a port */
static u8 sec_stack[MAXCPU][STACK_SIZE] __attribute__((aligned(4096)));
static volatile u64 tlb_after;                 /* step 6: "the flush has returned" */
static volatile u32 cur_step;
static int nr;                                 /* vCPUs the domain has */
static int sec_ok = 1;                          /* vCPU 1 answers commands */
static int up_ok[MAXCPU];                       /* brought up and answering */
#define ABORT_IF_STUCK(ok) do { if (!(ok)) {                                          \
	tg_puts("smp: vCPU 1 is stuck: the rest of this step and the later ones that need it are skipped\n"); \
	sec_ok = 0; step_end(); return; } } while (0)

static struct vcpu_guest_context ctx;
static struct trap_info traps[32];              /* vCPU 0's table, 0-terminated */
static u64 gdt1[512] __attribute__((aligned(4096)));    /* vCPU 1's GDT frame (made r/o) */
static u64 wpage[512] __attribute__((aligned(4096)));   /* a writable data page */
static u64 frames[3][512] __attribute__((aligned(4096)));  /* step 6 targets A, B, C */
static u64 l1page[512] __attribute__((aligned(4096)));
static u64 vcpumask __attribute__((aligned(8)));
static struct start_info *start;

enum { CMD_PING = 1, CMD_TLB_READ, CMD_IPI_SPIN, CMD_IPI_BLOCK, CMD_TIMER, CMD_POLL, CMD_DOWN };

static long vop(u64 cmd, u64 vcpu, const void *arg) { return HC3(HC_vcpu_op, cmd, vcpu, arg); }


static inline int this_cpu(void)
{
	u64 sp;
	__asm__ volatile("mov %%rsp, %0" : "=r"(sp));
	u64 base = (u64)sec_stack;
	if (sp > base && sp <= base + sizeof(sec_stack))
		return (sp - base - 1) / STACK_SIZE;
	return 0;
}
static u64 stack_top(int c) { return (u64)&sec_stack[c][STACK_SIZE]; }
static volatile struct vcpu_info *vinfo(int c) { return (volatile struct vcpu_info *)&si->vcpu_info[c]; }
static volatile u64 *pending_w(u32 port) { return (volatile u64 *)&si->evtchn_pending[port / 64]; }
static volatile u64 *mask_w(u32 port) { return (volatile u64 *)&si->evtchn_mask[port / 64]; }

/* With "fifo" on the command line the guest switches to the FIFO ABI
 * before step 4 (a control block per vCPU, one event array page), and
 * steps 4 and 5 run through the queues. */
static int want_fifo, fifo_mode;
static volatile u32 fwords[1024] __attribute__((aligned(4096)));
static u8 fcb_page[4096] __attribute__((aligned(4096)));
static u32 fhead[MAXCPU][EVTCHN_FIFO_MAX_QUEUES];
#define FCB_STRIDE 128
struct fifo_cb { u32 ready, _rsvd; u32 head[EVTCHN_FIFO_MAX_QUEUES]; };
static volatile struct fifo_cb *fcb(int cpu) { return (volatile struct fifo_cb *)(fcb_page + cpu * FCB_STRIDE); }
#define F_PENDING (1u << EVTCHN_FIFO_PENDING)
#define F_MASKED (1u << EVTCHN_FIFO_MASKED)
#define F_LINKED (1u << EVTCHN_FIFO_LINKED)

static int is_pending(u32 port)
{
	if (fifo_mode)
		return port < 1024 && (fwords[port] & F_PENDING) != 0;
	return (*pending_w(port) >> (port % 64)) & 1;
}
static void clear_pending(u32 port)
{
	if (fifo_mode)
		__atomic_fetch_and(&fwords[port], ~F_PENDING, __ATOMIC_SEQ_CST);
	else
		clear_bit_locked(pending_w(port), port % 64);
}
static void mask_port(u32 port)
{
	if (fifo_mode)
		__atomic_fetch_or(&fwords[port], F_MASKED, __ATOMIC_SEQ_CST);
	else
		set_bit_locked(mask_w(port), port % 64);
}

static volatile u32 hits[MAXCPU][NPORTS];

/* Linux's events_fifo.c walk of this vCPU's queues (bounded): whatever
 * is in them is this vCPU's, wherever the port is bound now */
static void fifo_consume(int cpu)
{
	volatile struct fifo_cb *cb = fcb(cpu);
	u32 ready = __atomic_exchange_n(&cb->ready, 0, __ATOMIC_SEQ_CST);
	for (int n = 0; ready && n < 1024; n++) {
		u32 q = __builtin_ctz(ready);
		u32 port = fhead[cpu][q] ? fhead[cpu][q] : cb->head[q], next = 0;
		if (port >= 1024)
			port = 0;
		if (port) {
			u32 old = fwords[port], seen;
			while ((seen = __sync_val_compare_and_swap(&fwords[port], old, old & ~(F_LINKED | EVTCHN_FIFO_LINK_MASK))) != old)
				old = seen;
			next = old & EVTCHN_FIFO_LINK_MASK;
			if (next >= 1024 || next == port)
				next = 0;
		}
		if (!next)
			ready &= ~(1u << q);
		if (port && port < NPORTS && !(fwords[port] & F_MASKED) &&
		    (__atomic_fetch_and(&fwords[port], ~F_PENDING, __ATOMIC_SEQ_CST) & F_PENDING))
			hits[cpu][port]++;
		fhead[cpu][q] = next;
		ready |= __atomic_exchange_n(&cb->ready, 0, __ATOMIC_SEQ_CST);
	}
}

static u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static void check(int ok, const char *what, u64 got, u64 want) { tg_check(ok, what, got, want); }
#define CHECK_EQ(what, got, want) do { s64 _g = (s64)(got), _w = (s64)(want); check(_g == _w, what, _g, _w); } while (0)

/* ---- assembly: trap stubs, event/failsafe/syscall callbacks, entry ---- */
__asm__(
	".text\n"
	".macro SMP_TRAP vec, err\n"
	"smp_trap_\\vec:\n"
	"	pushq %rax; pushq %rdi; pushq %rsi; pushq %rdx; pushq %r8; pushq %r9; pushq %r10\n"
	"	leaq 56(%rsp), %rsi\n"
	"	movl $\\vec, %edi\n"
	"	movl $\\err, %edx\n"
	"	call smp_trap\n"
	"	popq %r10; popq %r9; popq %r8; popq %rdx; popq %rsi; popq %rdi; popq %rax\n"
	"	popq %rcx\n"
	"	popq %r11\n"
	"	.if \\err\n"
	"	addq $8, %rsp\n"
	"	.endif\n"
	"	jmp smp_xen_iret\n"
	".endm\n"
	"SMP_TRAP 0, 0\n SMP_TRAP 1, 0\n SMP_TRAP 2, 0\n SMP_TRAP 3, 0\n SMP_TRAP 4, 0\n"
	"SMP_TRAP 5, 0\n SMP_TRAP 6, 0\n SMP_TRAP 7, 0\n SMP_TRAP 8, 1\n SMP_TRAP 10, 1\n"
	"SMP_TRAP 11, 1\n SMP_TRAP 12, 1\n SMP_TRAP 13, 1\n SMP_TRAP 14, 1\n SMP_TRAP 16, 0\n"
	"SMP_TRAP 17, 1\n SMP_TRAP 18, 0\n SMP_TRAP 19, 0\n"
	"smp_xen_iret:\n"
	"	pushq $0\n"
	"	pushq %rcx\n"
	"	pushq %r11\n"
	"	pushq %rax\n"
	"	movl $23, %eax\n"
	"	syscall\n"
	"	ud2\n"
	/* event callback of every vCPU: Xen's frame is rcx, r11, rip, cs, rflags, rsp, ss */
	".globl smp_upcall_entry\n"
	"smp_upcall_entry:\n"
	"	popq %rcx\n"
	"	popq %r11\n"
	"	pushq %rax; pushq %rcx; pushq %rdx; pushq %rsi; pushq %rdi\n"
	"	pushq %r8; pushq %r9; pushq %r10; pushq %r11\n"
	"	call smp_upcall\n"
	"	popq %r11; popq %r10; popq %r9; popq %r8\n"
	"	popq %rdi; popq %rsi; popq %rdx; popq %rcx; popq %rax\n"
	"	jmp smp_xen_iret\n"
	"smp_failsafe_entry:\n"
	"	movq %rsp, %rdi\n"
	"	andq $-16, %rsp\n"
	"	call smp_failsafe\n"
	"	ud2\n"
	"smp_syscall_entry:\n"
	"	movq %rsp, %rdi\n"
	"	andq $-16, %rsp\n"
	"	call smp_bad_syscall\n"
	"	ud2\n"
	/* a secondary vCPU starts here with user_regs: rsp = its stack,
	 * rdi = its id, rsi = MAGIC */
	"smp_secondary_entry:\n"
	"	call smp_secondary_main\n"
	"	ud2\n");
extern char smp_upcall_entry[], smp_failsafe_entry[], smp_syscall_entry[], smp_secondary_entry[];
extern char smp_trap_0[], smp_trap_1[], smp_trap_2[], smp_trap_3[], smp_trap_4[], smp_trap_5[],
	smp_trap_6[], smp_trap_7[], smp_trap_8[], smp_trap_10[], smp_trap_11[], smp_trap_12[],
	smp_trap_13[], smp_trap_14[], smp_trap_16[], smp_trap_17[], smp_trap_18[], smp_trap_19[];

static void die(int cpu, const char *what, u64 a, u64 b)
{
	tg_puts("check failed: step "); tg_dec(cur_step); tg_puts(": vCPU "); tg_dec(cpu);
	tg_puts(": "); tg_puts(what); tg_puts(" "); tg_hex(a); tg_puts(" "); tg_hex(b); tg_puts("\n");
	tg_puts("TESTGUEST smp: FAIL "); tg_puts(what); tg_puts("\n");
	tg_shutdown(SHUTDOWN_poweroff);
}

void smp_trap(u64 vec, u64 *f, int has_err);
void smp_trap(u64 vec, u64 *f, int has_err)
{
	int cpu = this_cpu();
	u64 *rip = &f[has_err ? 3 : 2];
	if (vec == 6 && cpus[cpu].ud_expected) {
		cpus[cpu].ud_expected = 0;
		cpus[cpu].ud_seen++;
		*rip += 2;           /* skip ud2 */
		return;
	}
	tg_puts("unexpected trap: vector "); tg_dec(vec); tg_puts(" err "); tg_hex(has_err ? f[2] : 0);
	tg_puts(" cr2 "); tg_hex(vinfo(cpu)->cr2); tg_puts("\n");
	die(cpu, "unexpected trap (rip, vector)", *rip, vec);
}

void smp_failsafe(u64 *f);
void smp_failsafe(u64 *f) { die(this_cpu(), "failsafe callback (rip, cs)", f[6], f[7]); }
void smp_bad_syscall(u64 *f);
void smp_bad_syscall(u64 *f) { die(this_cpu(), "syscall callback (rcx, rsp)", f[0], (u64)f); }

/* Linux's 2-level scan, taking only the ports this vCPU owns */
void smp_upcall(void);
void smp_upcall(void)
{
	int cpu = this_cpu();
	volatile struct vcpu_info *v = vinfo(cpu);
	cpus[cpu].upcalls++;
	v->upcall_pending = 0;
	if (fifo_mode) {
		fifo_consume(cpu);
		return;
	}
	u64 sel = __atomic_exchange_n(&((struct vcpu_info *)v)->pending_sel, 0, __ATOMIC_SEQ_CST);
	while (sel) {
		int w = __builtin_ctzll(sel);
		sel &= sel - 1;
		u64 pend = ((volatile u64 *)si->evtchn_pending)[w] & ~((volatile u64 *)si->evtchn_mask)[w];
		while (pend) {
			int b = __builtin_ctzll(pend);
			pend &= pend - 1;
			u32 port = w * 64 + b;
			if (port >= NPORTS || port_owner[port] != cpu)
				continue;
			if (test_and_clear((volatile u64 *)&si->evtchn_pending[w], b))
				hits[cpu][port]++;
		}
	}
}

static void events_on(int cpu)
{
	volatile struct vcpu_info *v = vinfo(cpu);
	v->upcall_mask = 0;
	barrier();
	if (v->upcall_pending)
		HC2(HC_xen_version, XENVER_version, 0);
}
static void events_off(int cpu) { vinfo(cpu)->upcall_mask = 1; barrier(); }

static u64 clock_ns(int cpu)
{
	volatile struct pvclock *t = (volatile struct pvclock *)vinfo(cpu)->time;
	if (!t->mul)
		t = (volatile struct pvclock *)vinfo(0)->time;
	return pvclock_read(t);
}
static long singleshot_on(int cpu, u64 abs_ns)
{
	struct vcpu_set_singleshot_timer t = { abs_ns, 0, 0 };
	return vop(VCPUOP_set_singleshot_timer, cpu, &t);
}
static long poll(u32 *ports, u32 n, u64 timeout)
{
	struct sched_poll p = { (u64)ports, n, 0, timeout };
	return HC2(HC_sched_op, SCHEDOP_poll, &p);
}

/* ---- the secondary vCPUs ---- */
static void sec_command(int cpu, struct cpu *p, u32 cmd)
{
	switch (cmd) {
	case CMD_PING:
		p->res[0] = cpu;
		break;
	case CMD_TLB_READ: {   /* arg0: round */
		volatile u64 *va = (volatile u64 *)TEST_VA;
		u64 round = p->arg[0];
		p->reads = 0;
		u64 d = rdtsc() + ms_ticks(WAIT_MS);
		p->res[0] = -1;
		for (;;) {
			int after = tlb_after == round;
			barrier();
			u64 v = *va;        /* loads are not reordered with loads */
			if (after) {
				p->res[0] = v;
				break;
			}
			p->last_read = v;
			p->reads++;
			if (rdtsc() > d)
				break;
		}
		break;
	}
	case CMD_IPI_SPIN: {   /* arg0: port, arg1: hits wanted; events on, no hypercalls */
		u32 port = p->arg[0];
		events_on(cpu);
		p->ready = 1;
		p->res[0] = SPIN_UNTIL(hits[cpu][port] >= p->arg[1], WAIT_MS);
		events_off(cpu);
		p->res[1] = hits[cpu][port];
		break;
	}
	case CMD_IPI_BLOCK: {  /* arg0: port, arg1: hits wanted, arg2: timer port (safety net) */
		u32 port = p->arg[0];
		long rc = singleshot_on(cpu, clock_ns(cpu) + 10000000000UL);
		p->res[2] = rc;
		u64 d = rdtsc() + ms_ticks(WAIT_MS), blocks = 0;
		p->ready = 1;
		for (;;) {
			events_off(cpu);
			if (hits[cpu][port] >= p->arg[1] || rdtsc() > d)
				break;
			HC2(HC_sched_op, SCHEDOP_block, 0);   /* re-enables delivery */
			blocks++;
		}
		vop(VCPUOP_stop_singleshot_timer, cpu, 0);
		p->res[0] = hits[cpu][port] >= p->arg[1];
		p->res[1] = hits[cpu][port];
		p->res[3] = blocks;
		break;
	}
	case CMD_TIMER: {      /* arg0: timer port */
		u32 port = p->arg[0];
		u32 before = hits[cpu][port];
		p->res[2] = singleshot_on(cpu, clock_ns(cpu) + 2000000);
		events_on(cpu);
		p->res[0] = SPIN_UNTIL(hits[cpu][port] > before, WAIT_MS);
		events_off(cpu);
		p->res[1] = hits[cpu][port] - before;
		break;
	}
	case CMD_POLL: {       /* arg0: the (masked) port, arg1: timer port (safety net) */
		u32 port = p->arg[0];
		events_off(cpu);
		p->res[3] = singleshot_on(cpu, clock_ns(cpu) + 10000000000UL);
		p->res[4] = 0;
		p->ready = 1;
		long rc = poll(&port, 1, 0);
		p->res[4] = 1;      /* returned */
		p->res[0] = rc;
		p->res[1] = is_pending(port);
		p->res[2] = is_pending(p->arg[1]);
		vop(VCPUOP_stop_singleshot_timer, cpu, 0);
		clear_pending(p->arg[1]);
		break;
	}
	case CMD_DOWN: {
		volatile u64 canary = MAGIC ^ cpu;
		p->resumed = 0;
		long rc = vop(VCPUOP_down, cpu, 0);
		p->res[0] = rc;
		p->res[1] = canary == (MAGIC ^ cpu);
		p->resumed = 1;
		break;
	}
	}
}

void smp_secondary_main(u64 rdi, u64 rsi);
void smp_secondary_main(u64 rdi, u64 rsi)
{
	int cpu = this_cpu();
	struct cpu *p = &cpus[cpu];
	events_off(cpu);
	p->seen_rdi = rdi;
	p->seen_rsi = rsi;
	p->gs_base = rdmsr(MSR_GS_BASE);
	volatile struct pvclock *t = (volatile struct pvclock *)vinfo(cpu)->time;
	p->time_mul = t->mul;
	p->time_version = t->version;
	p->ud_expected = 1;
	__asm__ volatile("ud2" ::: "memory");   /* through this vCPU's trap_ctxt */
	p->alive = 1;
	for (;;) {
		p->heartbeat++;
		u32 seq = p->cmd_seq;
		if (seq != p->done_seq) {
			barrier();
			sec_command(cpu, p, p->cmd);
			barrier();
			p->done_seq = seq;
			continue;
		}
		for (int i = 0; i < 64; i++)
			cpu_relax();
		yield();
	}
}

/* ---- vCPU 0's side ---- */
static void post(int c, u32 cmd, u64 a0, u64 a1, u64 a2)
{
	struct cpu *p = &cpus[c];
	p->cmd = cmd;
	p->arg[0] = a0; p->arg[1] = a1; p->arg[2] = a2;
	p->ready = 0;
	for (int i = 0; i < 8; i++) p->res[i] = -1;
	barrier();
	p->cmd_seq++;
}
static int wait_done(int c) { return WAIT_UNTIL(cpus[c].done_seq == cpus[c].cmd_seq, WAIT_MS); }
static int ping(int c)
{
	post(c, CMD_PING, 0, 0, 0);
	return wait_done(c) && cpus[c].res[0] == c;
}

static u64 mfn_of(const void *va) { return ((u64 *)start->mfn_list)[va_to_pfn(va)]; }
static u64 l4_maddr(void) { return mfn_of((void *)start->pt_base) << 12; }

static void build_ctx(struct vcpu_guest_context *c, int cpu, int with_gdt)
{
	tg_kernel_context(c, (u64)smp_secondary_entry, stack_top(cpu), l4_maddr());
	c->user_regs.rdi = cpu;
	c->user_regs.rsi = MAGIC;
	for (int i = 0; traps[i].address; i++)
		c->trap_ctxt[traps[i].vector] = traps[i];
	if (with_gdt) {
		c->gdt_frames[0] = mfn_of(gdt1);
		c->gdt_ents = 16;
	}
	c->event_callback_eip = (u64)smp_upcall_entry;
	c->failsafe_callback_eip = (u64)smp_failsafe_entry;
	c->syscall_callback_eip = (u64)smp_syscall_entry;
	c->gs_base_kernel = (u64)&cpus[cpu];
}

static void set_traps(void)
{
	static const struct { u8 vec; char *entry; } t[] = {
		{0, smp_trap_0}, {1, smp_trap_1}, {2, smp_trap_2}, {3, smp_trap_3}, {4, smp_trap_4},
		{5, smp_trap_5}, {6, smp_trap_6}, {7, smp_trap_7}, {8, smp_trap_8}, {10, smp_trap_10},
		{11, smp_trap_11}, {12, smp_trap_12}, {13, smp_trap_13}, {14, smp_trap_14},
		{16, smp_trap_16}, {17, smp_trap_17}, {18, smp_trap_18}, {19, smp_trap_19},
	};
	unsigned i;
	for (i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		traps[i].vector = t[i].vec;
		traps[i].flags = (t[i].vec == 3 || t[i].vec == 4) ? 3 : 0;
		traps[i].cs = FLAT_KERNEL_CS;
		traps[i].address = (u64)t[i].entry;
	}
	traps[i].address = 0;
	long rc = HC1(HC_set_trap_table, traps);
	CHECK_EQ("set_trap_table", rc, 0);
}

static u32 step_failures;
static void step_begin(u32 n, const char *name)
{
	cur_step = n;
	step_failures = tg_failures;
	tg_puts("smp: step "); tg_dec(n); tg_puts(" ("); tg_puts(name); tg_puts(")\n");
}
static void step_end(void)
{
	tg_puts("smp: step "); tg_dec(cur_step);
	if (tg_failures == (int)step_failures) tg_puts(": ok\n");
	else { tg_puts(": "); tg_dec(tg_failures - step_failures); tg_puts(" check(s) failed\n"); }
}
#define CK(what, got, want) CHECK_EQ(what, got, want)

static u32 ev_status(u32 port, struct evtchn_status *st)
{
	st->dom = DOMID_SELF;
	st->port = port;
	long rc = evtchn_op(EVTCHNOP_status, st);
	return rc ? 0xffffffff : st->status;
}
static long bind_vcpu(u32 port, u32 vcpu)
{
	struct evtchn_bind_vcpu b = { port, vcpu };
	return evtchn_op(EVTCHNOP_bind_vcpu, &b);
}

/* step 1 */
static void step_is_up(int want_nr)
{
	step_begin(1, "VCPUOP_is_up");
	nr = 0;
	while (nr < 64 && vop(VCPUOP_is_up, nr, 0) >= 0)
		nr++;
	tg_puts("smp: nr_vcpus probed "); tg_dec(nr); tg_puts(", expected "); tg_dec(want_nr); tg_puts("\n");
	CK("step 1: vCPUs found by is_up probing = nr_vcpus from the command line", nr, want_nr);
	if (nr > MAXCPU) nr = MAXCPU;
	CK("step 1: is_up(0)", vop(VCPUOP_is_up, 0, 0), 1);
	for (int c = 1; c < nr; c++)
		CK("step 1: is_up(secondary) before bring-up", vop(VCPUOP_is_up, c, 0), 0);
	CK("step 1: is_up(nr_vcpus)", vop(VCPUOP_is_up, want_nr, 0), -XEN_ENOENT);
	CK("step 1: is_up(0x7fffffff)", vop(VCPUOP_is_up, 0x7fffffffUL, 0), -XEN_ENOENT);
	CK("step 1: is_up(0xffffffff)", vop(VCPUOP_is_up, 0xffffffffUL, 0), -XEN_ENOENT);
	step_end();
}

/* step 3a: bad contexts for an uninitialised vCPU t */
/* A vCPU that accepted a bad context must never run: step 3a then goes on
 * with the next spare vCPU (nr-1 down to 2; none when nr == 2). */
static u8 tainted[MAXCPU];
static int bad_t;            /* the vCPU step 3a is using, 0: none left */
static void bad_init(const char *what, long want)
{
	if (!bad_t)
		return;
	long rc = vop(VCPUOP_initialise, bad_t, &ctx);
	CK(what, rc, want);
	if (rc == 0) {
		tainted[bad_t] = 1;
		tg_puts("smp: step 3: vCPU "); tg_dec(bad_t);
		tg_puts(" accepted that bad context: it is not brought up");
		bad_t = bad_t > 2 ? bad_t - 1 : 0;
		if (bad_t) { tg_puts("; going on with vCPU "); tg_dec(bad_t); tg_puts("\n"); }
		else tg_puts("; no spare vCPU left: the remaining bad contexts are skipped\n");
		return;
	}
	CK("step 3: is_up stays 0 after a refused initialise", vop(VCPUOP_is_up, bad_t, 0), 0);
	CK("step 3: VCPUOP_up still -EINVAL after a refused initialise", vop(VCPUOP_up, bad_t, 0), -XEN_EINVAL);
}
#define BAD(mutation, what, want) do { build_ctx(&ctx, bad_t, 0); mutation; bad_init(what, want); } while (0)
static void step_bad_uninitialised(void)
{
	step_begin(3, "bad input, not-yet-initialised vCPU");
	bad_t = nr - 1;
	tg_puts("smp: bad contexts for vCPU "); tg_dec(bad_t); tg_puts("\n");
	CK("step 3: VCPUOP_up of a never-initialised vCPU", vop(VCPUOP_up, bad_t, 0), -XEN_EINVAL);
	CK("step 3: VCPUOP_initialise with an unmapped context", vop(VCPUOP_initialise, bad_t, (void *)0x1000), -XEN_EFAULT);
	CK("step 3: is_up after -EFAULT", vop(VCPUOP_is_up, bad_t, 0), 0);
	if (nr < 3) {   /* one accepted by mistake would cost the only secondary vCPU */
		tg_puts("smp: step 3: the bad contexts need a spare vCPU (nr_vcpus >= 3)\n");
		bad_t = 0;
	}
	BAD(ctx.user_regs.rip = NONCANON, "step 3: non-canonical user_regs.rip", -XEN_EINVAL);
	BAD(ctx.user_regs.rsp = 0x8000000000000000UL, "step 3: non-canonical user_regs.rsp", -XEN_EINVAL);
	BAD(ctx.kernel_sp = NONCANON + 0x1000, "step 3: non-canonical kernel_sp", -XEN_EINVAL);
	BAD(ctx.event_callback_eip = NONCANON, "step 3: non-canonical event_callback_eip", -XEN_EINVAL);
	BAD(ctx.failsafe_callback_eip = 0xffff7fffffffffffUL, "step 3: non-canonical failsafe_callback_eip", -XEN_EINVAL);
	BAD(ctx.syscall_callback_eip = NONCANON, "step 3: non-canonical syscall_callback_eip", -XEN_EINVAL);
	BAD(ctx.gs_base_kernel = NONCANON, "step 3: non-canonical gs_base_kernel", -XEN_EINVAL);
	BAD(ctx.ldt_base = (u64)wpage + 8; ctx.ldt_ents = 1, "step 3: misaligned ldt_base", -XEN_EINVAL);
	BAD(ctx.ldt_base = (u64)wpage; ctx.ldt_ents = 8193, "step 3: ldt_ents 8193", -XEN_EINVAL);
	BAD(ctx.gdt_ents = 8193, "step 3: gdt_ents 8193 (17 frames)", -XEN_EINVAL);
	BAD(ctx.gdt_ents = FIRST_RESERVED_GDT_ENTRY + 1; for (int i = 0; i < 15; i++) ctx.gdt_frames[i] = mfn_of(gdt1),
	    "step 3: gdt_ents FIRST_RESERVED_GDT_ENTRY+1", -XEN_EINVAL);
	BAD(ctx.ctrlreg[3] = 1UL << 40, "step 3: cr3 = a frame the domain does not own", -XEN_EINVAL);
	BAD(ctx.trap_ctxt[14].address = NONCANON, "step 3: non-canonical trap_ctxt[14].address", -XEN_EINVAL);
	BAD(ctx.flags = 0, "step 3: not VGCF_in_kernel and no user cr3 (ctrlreg[1])", -XEN_EINVAL);
	/* page types: Xen refuses a frame mapped writable as a GDT or an L4 */
	BAD(ctx.gdt_ents = 16; ctx.gdt_frames[0] = mfn_of(wpage), "step 3: writable GDT frame", -XEN_EINVAL);
	BAD(ctx.ctrlreg[3] = mfn_of(wpage) << 12, "step 3: cr3 = a writable data page", -XEN_EINVAL);
	step_end();
}

/* step 2 */
static int bring_up(int c, int with_gdt)
{
	build_ctx(&ctx, c, with_gdt);
	long rc = vop(VCPUOP_initialise, c, &ctx);
	CK("step 2: VCPUOP_initialise", rc, 0);
	if (rc)
		return 0;
	CK("step 2: is_up after initialise, before up (no VGCF_online)", vop(VCPUOP_is_up, c, 0), 0);
	delay_ms(5);
	CK("step 2: vCPU does not run before VCPUOP_up", cpus[c].alive, 0);
	rc = vop(VCPUOP_up, c, 0);
	CK("step 2: VCPUOP_up", rc, 0);
	int ok = WAIT_UNTIL(cpus[c].alive, WAIT_MS);
	CK("step 2: secondary vCPU ran and set its flag", ok, 1);
	if (!ok) {
		tg_puts("smp: vCPU "); tg_dec(c); tg_puts(" did not run (is_up ");
		tg_dec(vop(VCPUOP_is_up, c, 0)); tg_puts(")\n");
		return 0;
	}
	CK("step 2: is_up after VCPUOP_up", vop(VCPUOP_is_up, c, 0), 1);
	CK("step 2: secondary rdi = user_regs.rdi", cpus[c].seen_rdi, c);
	CK("step 2: secondary rsi = user_regs.rsi", cpus[c].seen_rsi, MAGIC);
	CK("step 2: secondary GS base = gs_base_kernel", cpus[c].gs_base, (u64)&cpus[c]);
	CK("step 2: secondary #UD through trap_ctxt", cpus[c].ud_seen, 1);
	check(cpus[c].time_mul != 0 && (cpus[c].time_version & 1) == 0,
	      "step 2: secondary's vcpu_info time record filled (mul)", cpus[c].time_mul, 1);
	int answered = ping(c);
	CK("step 2: secondary answers a command", answered, 1);
	up_ok[c] = answered;
	return answered;
}
static void step_bring_up(void)
{
	step_begin(2, "VCPUOP_initialise + VCPUOP_up as Linux");
	CK("step 2: cr3 = machine address of start_info.pt_base", read_cr3() & PTE_ADDR, l4_maddr());
	/* vCPU 1's GDT frame: read-only first, as Linux's make_lowmem_page_readonly */
	long rc = uvm((u64)gdt1, (mfn_of(gdt1) << 12) | PTE_P | PTE_A, UVMF_INVLPG);
	CK("step 2: map the GDT frame read-only", rc, 0);
	for (int c = 1; c < nr; c++)
		if (!tainted[c])
			bring_up(c, c == 1);
	sec_ok = up_ok[1];
	step_end();
}

/* step 3b */
static void step_bad_initialised(int want_nr)
{
	step_begin(3, "bad input, initialised / absent vCPUs");
	build_ctx(&ctx, 1, 0);
	CK("step 3: VCPUOP_initialise of initialised vCPU 1", vop(VCPUOP_initialise, 1, &ctx), -XEN_EEXIST);
	ctx.user_regs.rip = NONCANON;
	CK("step 3: initialised vCPU 1, non-canonical rip: -EEXIST first", vop(VCPUOP_initialise, 1, &ctx), -XEN_EEXIST);
	CK("step 3: initialised vCPU 1, unmapped context: -EFAULT first", vop(VCPUOP_initialise, 1, (void *)0x1000), -XEN_EFAULT);
	build_ctx(&ctx, 0, 0);
	CK("step 3: VCPUOP_initialise of vCPU 0", vop(VCPUOP_initialise, 0, &ctx), -XEN_EEXIST);
	build_ctx(&ctx, 1, 0);
	CK("step 3: VCPUOP_initialise of vCPU nr_vcpus", vop(VCPUOP_initialise, want_nr, &ctx), -XEN_ENOENT);
	CK("step 3: VCPUOP_initialise of vCPU 0xffffffff", vop(VCPUOP_initialise, 0xffffffffUL, &ctx), -XEN_ENOENT);
	CK("step 3: VCPUOP_up of vCPU nr_vcpus", vop(VCPUOP_up, want_nr, 0), -XEN_ENOENT);
	CK("step 3: VCPUOP_down of vCPU nr_vcpus", vop(VCPUOP_down, want_nr, 0), -XEN_ENOENT);
	if (sec_ok) {   /* not a vCPU that accepted a bad context: it must never run */
		CK("step 3: VCPUOP_up of a running vCPU", vop(VCPUOP_up, 1, 0), 0);
		CK("step 3: is_up(1) undisturbed", vop(VCPUOP_is_up, 1, 0), 1);
		CK("step 3: vCPU 1 still answers", ping(1), 1);
	}
	step_end();
}

/* step 6 */
static const char *const tlb_how[] = {
	"update_va_mapping UVMF_INVLPG|UVMF_MULTI", "update_va_mapping UVMF_TLB_FLUSH|UVMF_MULTI",
	"update_va_mapping UVMF_INVLPG|UVMF_ALL", "update_va_mapping UVMF_TLB_FLUSH|UVMF_ALL",
	"mmu_update + MMUEXT_INVLPG_MULTI", "mmu_update + MMUEXT_TLB_FLUSH_MULTI",
	"mmu_update + MMUEXT_INVLPG_ALL", "mmu_update + MMUEXT_TLB_FLUSH_ALL",
};
static u64 frame_pte(int f) { return (mfn_of(frames[f]) << 12) | PTE_P | PTE_A; }
static u64 frame_marker(int f) { return 0xf00d0000UL + f; }

static void step_tlb(void)
{
	step_begin(6, "TLB shootdown");
	u64 pte_ma = mfn_of(l1page) << 12;     /* l1page[0] maps TEST_VA */
	for (int f = 0; f < 3; f++)
		for (int i = 0; i < 512; i++)
			frames[f][i] = frame_marker(f);
	long rc = hook_l1(l1page);
	CK("step 6: hook an L1 at TEST_VA", rc, 0);
	if (rc) { step_end(); return; }
	rc = mmu_update1(pte_ma, frame_pte(0));
	CK("step 6: map frame A at TEST_VA", rc, 0);
	rc = mmuext1(MMUEXT_INVLPG_ALL, TEST_VA, 0);
	CK("step 6: MMUEXT_INVLPG_ALL", rc, 0);
	CK("step 6: vCPU 0 reads frame A", *(volatile u64 *)TEST_VA, frame_marker(0));
	vcpumask = (1UL << nr) - 1;
	u64 badmask = 0x1000;
	struct mmuext_op op = { MMUEXT_TLB_FLUSH_MULTI, 0, 0, badmask };
	CK("step 6: MMUEXT_TLB_FLUSH_MULTI with an unreadable vcpumask", HC4(HC_mmuext_op, &op, 1, 0, DOMID_SELF), -XEN_EINVAL);

	/* round -1: no flush at all (observation only), then 8 flushing rounds */
	int cur = 0;
	for (int r = -1; r < 8; r++) {
		int next = r < 0 ? 2 : (cur == 1 ? 0 : 1);
		for (int c = 1; c < nr; c++) {
			if (!up_ok[c]) continue;
			cpus[c].reads = 0;
			post(c, CMD_TLB_READ, r + 100, 0, 0);
		}
		int ok = 1;
		for (int c = 1; c < nr; c++)
			if (up_ok[c]) ok &= WAIT_UNTIL(cpus[c].reads >= 2000, WAIT_MS);
		CK("step 6: secondaries read TEST_VA in a loop", ok, 1);
		for (int c = 1; c < nr && r > 0; c++)   /* round 0 may still see the stale frame */
			if (up_ok[c]) CK("step 6: secondaries read the current frame", cpus[c].last_read, frame_marker(cur));
		u64 pte = frame_pte(next);
		switch (r) {
		case -1: rc = mmu_update1(pte_ma, pte); break;
		case 0: rc = uvm(TEST_VA, pte, UVMF_INVLPG | (u64)&vcpumask); break;
		case 1: rc = uvm(TEST_VA, pte, UVMF_TLB_FLUSH | (u64)&vcpumask); break;
		case 2: rc = uvm(TEST_VA, pte, UVMF_INVLPG | UVMF_ALL); break;
		case 3: rc = uvm(TEST_VA, pte, UVMF_TLB_FLUSH | UVMF_ALL); break;
		case 4: case 5: case 6: case 7: {
			static const u32 cmd[] = { MMUEXT_INVLPG_MULTI, MMUEXT_TLB_FLUSH_MULTI,
						   MMUEXT_INVLPG_ALL, MMUEXT_TLB_FLUSH_ALL };
			rc = mmu_update1(pte_ma, pte);
			if (!rc) {
				struct mmuext_op o = { cmd[r - 4], 0, TEST_VA, (u64)&vcpumask };
				rc = HC4(HC_mmuext_op, &o, 1, 0, DOMID_SELF);
			}
			break;
		}
		}
		barrier();
		tlb_after = r + 100;
		if (r < 0) {
			CK("step 6: mmu_update without flush", rc, 0);
		} else {
			if (rc) {
				tg_puts("smp: step 6: "); tg_puts(tlb_how[r]); tg_puts(" failed\n");
			}
			CK("step 6: the flushing hypercall", rc, 0);
			CK("step 6: vCPU 0 reads the new frame after the flush", *(volatile u64 *)TEST_VA, frame_marker(next));
		}
		for (int c = 1; c < nr; c++) {
			if (!up_ok[c]) continue;
			int done = wait_done(c);
			CK("step 6: secondary reported its read after the flush", done, 1);
			if (!done) {
				up_ok[c] = 0;
				if (c == 1) sec_ok = 0;
				continue;
			}
			u64 got = cpus[c].res[0];
			if (r < 0) {
				tg_puts("smp: step 6: without a flush vCPU "); tg_dec(c); tg_puts(" read ");
				tg_puts(got == frame_marker(0) ? "the old frame (stale TLB: the flush rounds are meaningful)\n"
					: got == frame_marker(2) ? "the new frame (no stale entry observed)\n" : "something else\n");
			} else if (got != frame_marker(next)) {
				tg_puts("smp: step 6: after "); tg_puts(tlb_how[r]); tg_puts(" vCPU "); tg_dec(c);
				tg_puts(got == frame_marker(cur) ? " still reads the old frame (stale TLB)\n" : " read something else\n");
				CK("step 6: secondary's read after the shootdown is the new frame", got, frame_marker(next));
			}
		}
		if (r < 0) {   /* make vCPU 0's own view consistent again */
			mmuext1(MMUEXT_INVLPG_LOCAL, TEST_VA, 0);
		}
		cur = next;
	}
	step_end();
}

/* the switch to FIFO (fifo mode): every vCPU's control block, then the
 * array page; the ports bound so far are carried over */
static void fifo_setup(void)
{
	struct { u64 gfn; u32 offset, vcpu; u8 link_bits, _p[7]; } ic;
	for (int c = 0; c < nr; c++) {
		ic.gfn = va_to_pfn(fcb_page);
		ic.offset = c * FCB_STRIDE;
		ic.vcpu = c;
		ic.link_bits = 0;
		CK("fifo: init_control", evtchn_op(EVTCHNOP_init_control, &ic), 0);
		CK("fifo: link_bits", ic.link_bits, EVTCHN_FIFO_LINK_BITS);
	}
	u64 gfn = va_to_pfn((const void *)fwords);
	CK("fifo: expand_array", evtchn_op(EVTCHNOP_expand_array, &gfn), 0);
	fifo_mode = 1;   /* from here on the walks and helpers use the queues */
	fifo_consume(0);  /* whatever the switch carried over to vCPU 0 */
	tg_puts("smp: FIFO event channels on\n");
}

/* FIFO: port b, the tail of vCPU 0's queue 7, moves to vCPU 1 and is
 * linked there (vCPU 1 not taking events): vCPU 0's queue 7 must forget
 * it, so the next event there becomes its head instead of being linked
 * behind b into vCPU 1's queue (Xen's "old_q->tail = 0"). */
static void fifo_moved_tail(u32 b, u32 other_end)
{
	struct evtchn_bind_ipi bi = { 0, 0 };
	CK("step 4 fifo: bind_ipi for vCPU 0", evtchn_op(EVTCHNOP_bind_ipi, &bi), 0);
	u32 x = bi.port;
	CK("step 4 fifo: bind_vcpu back to vCPU 0", bind_vcpu(b, 0), 0);
	CK("step 4 fifo: send", ev_send(other_end), 0);
	CK("step 4 fifo: b heads vCPU 0's queue 7", fcb(0)->head[7], b);
	fifo_consume(0);
	CK("step 4 fifo: bind_vcpu to vCPU 1", bind_vcpu(b, 1), 0);
	CK("step 4 fifo: send", ev_send(other_end), 0);
	/* vCPU 1's shim links it on its way back to vCPU 1 (it yields) */
	CK("step 4 fifo: b linked on vCPU 1", WAIT_UNTIL(fwords[b] & F_LINKED, WAIT_MS), 1);
	CK("step 4 fifo: b heads vCPU 1's queue 7", fcb(1)->head[7], b);
	CK("step 4 fifo: send on vCPU 0's IPI", ev_send(x), 0);
	CK("step 4 fifo: vCPU 0's queue 7 starts afresh", fcb(0)->head[7], x);
	CK("step 4 fifo: nothing linked behind b", fwords[b] & EVTCHN_FIFO_LINK_MASK, 0);
	fifo_consume(0);
	CK("step 4 fifo: vCPU 0 took its IPI", hits[0][x], 1);
	post(1, CMD_IPI_SPIN, b, hits[1][b] + 1, 0);
	CK("step 4 fifo: vCPU 1 takes b", wait_done(1) && cpus[1].res[0], 1);
}

/* step 4 */
static u32 ipi1, timer1;
static void step_events(void)
{
	step_begin(4, "event channels across vCPUs");
	struct evtchn_status st;
	struct evtchn_bind_ipi bi = { 1, 0 };
	long rc = evtchn_op(EVTCHNOP_bind_ipi, &bi);
	CK("step 4: EVTCHNOP_bind_ipi for vCPU 1", rc, 0);
	ipi1 = bi.port;
	check(ipi1 > 0 && ipi1 < NPORTS, "step 4: bind_ipi port in range", ipi1, 1);
	port_owner[ipi1] = 1;
	CK("step 4: IPI port status", ev_status(ipi1, &st), EVTCHNSTAT_ipi);
	CK("step 4: IPI port status.vcpu", st.vcpu, 1);
	struct evtchn_bind_ipi bad = { nr, 0 };
	CK("step 4: bind_ipi for vCPU nr_vcpus", evtchn_op(EVTCHNOP_bind_ipi, &bad), -XEN_ENOENT);

	/* VIRQ_TIMER of vCPU 1 (the safety net of the blocking waits below) */
	struct evtchn_bind_virq bv = { VIRQ_TIMER, 1, 0 };
	rc = evtchn_op(EVTCHNOP_bind_virq, &bv);
	CK("step 4: bind_virq VIRQ_TIMER for vCPU 1", rc, 0);
	timer1 = bv.port;
	port_owner[timer1] = 1;
	CK("step 4: VIRQ port status", ev_status(timer1, &st), EVTCHNSTAT_virq);
	CK("step 4: VIRQ port status.vcpu", st.vcpu, 1);
	struct evtchn_bind_virq bv2 = { VIRQ_TIMER, 1, 0 };
	CK("step 4: bind_virq VIRQ_TIMER for vCPU 1 again", evtchn_op(EVTCHNOP_bind_virq, &bv2), -XEN_EEXIST);
	struct evtchn_bind_virq bv3 = { VIRQ_TIMER, nr, 0 };
	CK("step 4: bind_virq VIRQ_TIMER for vCPU nr_vcpus", evtchn_op(EVTCHNOP_bind_virq, &bv3), -XEN_ENOENT);
	CK("step 4: set_singleshot_timer for another vCPU", singleshot_on(1, clock_ns(0) + 1000000000UL), -XEN_EINVAL);

	if (!sec_ok) { step_end(); return; }

	/* an IPI to a running vCPU 1 that makes no hypercall */
	post(1, CMD_IPI_SPIN, ipi1, 1, 0);
	int ok = WAIT_UNTIL(cpus[1].ready, WAIT_MS);
	delay_ms(2);
	CK("step 4: EVTCHNOP_send to vCPU 1's IPI port", ev_send(ipi1), 0);
	ok &= wait_done(1);
	CK("step 4: vCPU 1 finished waiting (spinning)", ok, 1);
	ABORT_IF_STUCK(ok);
	CK("step 4: IPI delivered to vCPU 1's event callback while it spins", cpus[1].res[0], 1);
	CK("step 4: exactly one hit (spinning)", cpus[1].res[1], 1);
	CK("step 4: IPI port no longer pending", is_pending(ipi1), 0);

	/* an IPI to a blocked vCPU 1 */
	post(1, CMD_IPI_BLOCK, ipi1, 2, timer1);
	ok = WAIT_UNTIL(cpus[1].ready, WAIT_MS);
	delay_ms(20);
	CK("step 4: EVTCHNOP_send (vCPU 1 blocked)", ev_send(ipi1), 0);
	ok &= wait_done(1);
	CK("step 4: vCPU 1 finished waiting (blocked)", ok, 1);
	ABORT_IF_STUCK(ok);
	CK("step 4: vCPU 1 set its singleshot timer", cpus[1].res[2], 0);
	CK("step 4: IPI wakes a vCPU 1 blocked in SCHEDOP_block", cpus[1].res[0], 1);
	CK("step 4: hits after the blocked wait", cpus[1].res[1], 2);

	/* vCPU 1's own singleshot timer, delivered to vCPU 1 */
	post(1, CMD_TIMER, timer1, 0, 0);
	ok = wait_done(1);
	CK("step 4: vCPU 1 finished waiting for its timer", ok, 1);
	ABORT_IF_STUCK(ok);
	CK("step 4: set_singleshot_timer on vCPU 1", cpus[1].res[2], 0);
	CK("step 4: vCPU 1's VIRQ_TIMER reaches vCPU 1", cpus[1].res[0], 1);

	/* bind_vcpu */
	struct evtchn_alloc_unbound au = { DOMID_SELF, 0, 0 };
	rc = evtchn_op(EVTCHNOP_alloc_unbound, &au);
	CK("step 4: alloc_unbound", rc, 0);
	CK("step 4: bind_vcpu of an unbound port to vCPU 1", bind_vcpu(au.port, 1), 0);
	ev_status(au.port, &st);
	CK("step 4: unbound port status.vcpu after bind_vcpu", st.vcpu, 1);
	CK("step 4: bind_vcpu of an unbound port back to vCPU 0", bind_vcpu(au.port, 0), 0);
	CK("step 4: bind_vcpu of an IPI port", bind_vcpu(ipi1, 0), -XEN_EINVAL);
	CK("step 4: bind_vcpu of a VIRQ_TIMER port", bind_vcpu(timer1, 0), -XEN_EINVAL);
	CK("step 4: bind_vcpu to vCPU nr_vcpus", bind_vcpu(au.port, nr), -XEN_ENOENT);
	CK("step 4: bind_vcpu to vCPU 0xffffffff", bind_vcpu(au.port, 0xffffffffU), -XEN_ENOENT);
	CK("step 4: bind_vcpu of a bad port", bind_vcpu(EVTCHN_2L_NR_CHANNELS, 1), -XEN_EINVAL);
	CK("step 4: bind_vcpu of a bad port to a bad vCPU: -ENOENT first", bind_vcpu(EVTCHN_2L_NR_CHANNELS, nr), -XEN_ENOENT);
	ev_status(ipi1, &st);
	CK("step 4: IPI port still on vCPU 1 after the refused rebind", st.vcpu, 1);

	/* a loopback interdomain port moved to vCPU 1 is delivered there */
	struct evtchn_alloc_unbound lu = { DOMID_SELF, DOMID_SELF, 0 };
	rc = evtchn_op(EVTCHNOP_alloc_unbound, &lu);
	CK("step 4: alloc_unbound self", rc, 0);
	struct evtchn_bind_interdomain bd = { DOMID_SELF, 0, lu.port, 0 };
	rc = evtchn_op(EVTCHNOP_bind_interdomain, &bd);
	CK("step 4: bind_interdomain loopback", rc, 0);
	u32 b = bd.local_port;
	if (rc == 0 && b < NPORTS) {
		/* the bind raised it on vCPU 0, which takes no events: take
		 * it off vCPU 0's queue (FIFO: still linked there, it would
		 * not be linked on vCPU 1 -- Xen's "already on a queue") */
		if (fifo_mode)
			fifo_consume(0);
		else
			clear_pending(b);
		CK("step 4: bind_vcpu of an interdomain port to vCPU 1", bind_vcpu(b, 1), 0);
		ev_status(b, &st);
		CK("step 4: interdomain port status.vcpu", st.vcpu, 1);
		port_owner[b] = 1;
		post(1, CMD_IPI_SPIN, b, 1, 0);
		ok = WAIT_UNTIL(cpus[1].ready, WAIT_MS);
		CK("step 4: send on the other end", ev_send(lu.port), 0);
		ok &= wait_done(1);
		CK("step 4: vCPU 1 finished waiting (interdomain)", ok, 1);
		ABORT_IF_STUCK(ok);
		CK("step 4: interdomain port moved to vCPU 1 is delivered there", cpus[1].res[0], 1);
		if (fifo_mode && ok)
			fifo_moved_tail(b, lu.port);
	}
	step_end();
}

/* step 5 */
static void step_poll(void)
{
	step_begin(5, "SCHEDOP_poll");
	u32 ports[130];
	for (int i = 0; i < 130; i++) ports[i] = 1;
	CK("step 5: poll nr_ports 129", poll(ports, 129, 0), -XEN_EINVAL);
	u32 badp = EVTCHN_2L_NR_CHANNELS;
	CK("step 5: poll a port >= the 2-level limit", poll(&badp, 1, 0), -XEN_EINVAL);
	badp = 0xffffffff;
	CK("step 5: poll port 0xffffffff", poll(&badp, 1, 0), -XEN_EINVAL);

	/* vCPU 0 polls its own masked IPI port: pending -> at once; else the timeout */
	struct evtchn_bind_ipi bi = { 0, 0 };
	long rc = evtchn_op(EVTCHNOP_bind_ipi, &bi);
	CK("step 5: bind_ipi for vCPU 0", rc, 0);
	u32 q0 = bi.port;
	mask_port(q0);
	CK("step 5: send to the masked port", ev_send(q0), 0);
	u64 t0 = clock_ns(0);
	rc = poll(&q0, 1, t0 + 3000000000UL);
	u64 el = clock_ns(0) - t0;
	CK("step 5: poll of a pending port", rc, 0);
	check(el < 1000000000UL, "step 5: poll of a pending port returns at once (ns)", el, 0);
	clear_pending(q0);
	t0 = clock_ns(0);
	rc = poll(&q0, 1, t0 + 50000000UL);
	el = clock_ns(0) - t0;
	CK("step 5: poll with a timeout", rc, 0);
	check(el >= 40000000UL && el < 3000000000UL, "step 5: poll with a 50 ms timeout waits ~50 ms (ns)", el, 50000000);

	if (!sec_ok) { step_end(); return; }
	/* vCPU 1 polls a masked port with no timeout; vCPU 0 sends */
	struct evtchn_bind_ipi b1 = { 1, 0 };
	rc = evtchn_op(EVTCHNOP_bind_ipi, &b1);
	CK("step 5: bind_ipi for vCPU 1", rc, 0);
	u32 q = b1.port;
	port_owner[q] = 1;
	mask_port(q);
	post(1, CMD_POLL, q, timer1, 0);
	int ok = WAIT_UNTIL(cpus[1].ready, WAIT_MS);
	CK("step 5: vCPU 1 about to poll", ok, 1);
	delay_ms(50);
	CK("step 5: vCPU 1's singleshot timer (safety net)", cpus[1].res[3], 0);
	CK("step 5: vCPU 1 still in SCHEDOP_poll before the send", cpus[1].res[4], 0);
	CK("step 5: EVTCHNOP_send to the polled port", ev_send(q), 0);
	ok = wait_done(1);
	CK("step 5: vCPU 1 returned from SCHEDOP_poll after the send", ok, 1);
	ABORT_IF_STUCK(ok);
	CK("step 5: SCHEDOP_poll return value", cpus[1].res[0], 0);
	CK("step 5: the polled port is pending when poll returns", cpus[1].res[1], 1);
	CK("step 5: woken by the send, not by the timer safety net", cpus[1].res[2], 0);
	step_end();
}

/* step 7 */
static void step_down_up(void)
{
	step_begin(7, "VCPUOP_down / VCPUOP_up");
	if (!sec_ok) { step_end(); return; }
	post(1, CMD_DOWN, 0, 0, 0);
	int ok = WAIT_UNTIL(vop(VCPUOP_is_up, 1, 0) == 0, WAIT_MS);
	CK("step 7: is_up(1) becomes 0 after vCPU 1's VCPUOP_down", ok, 1);
	delay_ms(100);
	u64 hb = cpus[1].heartbeat;
	delay_ms(100);
	CK("step 7: vCPU 1 stopped (did not return from VCPUOP_down)", cpus[1].resumed, 0);
	CK("step 7: vCPU 1 stopped (heartbeat)", cpus[1].heartbeat, hb);
	build_ctx(&ctx, 1, 0);
	CK("step 7: VCPUOP_initialise of a down vCPU: still -EEXIST", vop(VCPUOP_initialise, 1, &ctx), -XEN_EEXIST);
	CK("step 7: VCPUOP_up", vop(VCPUOP_up, 1, 0), 0);
	ok = wait_done(1);
	CK("step 7: vCPU 1 resumed after its VCPUOP_down", ok, 1);
	CK("step 7: VCPUOP_down returned 0 to vCPU 1", cpus[1].res[0], 0);
	CK("step 7: vCPU 1's stack intact across down/up", cpus[1].res[1], 1);
	CK("step 7: is_up(1) after VCPUOP_up", vop(VCPUOP_is_up, 1, 0), 1);
	if (!ok) { sec_ok = 0; step_end(); return; }
	CK("step 7: vCPU 1 answers after down/up", ping(1), 1);

	/* down by vCPU 0 of a running vCPU 1 */
	CK("step 7: VCPUOP_down of vCPU 1 from vCPU 0", vop(VCPUOP_down, 1, 0), 0);
	CK("step 7: is_up(1) at once", vop(VCPUOP_is_up, 1, 0), 0);
	delay_ms(100);    /* a kick to a running vCPU may take a while in a slow lane */
	hb = cpus[1].heartbeat;
	delay_ms(100);
	CK("step 7: vCPU 1 downed by vCPU 0 stops (heartbeat)", cpus[1].heartbeat, hb);
	CK("step 7: VCPUOP_up", vop(VCPUOP_up, 1, 0), 0);
	ok = WAIT_UNTIL(cpus[1].heartbeat != hb, WAIT_MS);
	CK("step 7: vCPU 1 runs again", ok, 1);
	CK("step 7: vCPU 1 answers after remote down/up", ping(1), 1);
	step_end();
}

void tg_main(struct start_info *s)
{
	start = s;
	int want_nr = (int)tg_opt_num(s->cmd_line, "nr_vcpus", 0);
	want_fifo = tg_opt_num(s->cmd_line, "fifo", 0) > 0;
	u64 pte = s->shared_info | PTE_P | PTE_RW | PTE_A | PTE_D;
	long rc = HC3(HC_update_va_mapping, si_page, pte, UVMF_INVLPG);
	CHECK_EQ("map shared_info", rc, 0);
	si = (struct shared_info *)si_page;
	vi = (volatile struct vcpu_info *)&si->vcpu_info[0];
	struct callback_register cb = { CALLBACKTYPE_event, 0, 0, (u64)smp_upcall_entry };
	rc = HC2(HC_callback_op, CALLBACKOP_register, &cb);
	CHECK_EQ("register event callback", rc, 0);
	events_off(0);         /* vCPU 0 never takes events here */
	set_traps();
	for (int c = 0; c < MAXCPU; c++)
		cpus[c].self = (u64)&cpus[c];

	tg_calibrate_tsc();   /* from vCPU 0's pvclock */
	if (want_nr <= 0) {
		tg_check(0, "no nr_vcpus=N on the command line", 0, 2);
		return;
	}

	step_is_up(want_nr);
	if (nr < 2) {
		tg_check(0, "step 1: the domain has fewer than 2 vCPUs: no SMP steps run", nr, want_nr);
		return;
	}
	step_bad_uninitialised();
	step_bring_up();
	step_bad_initialised(want_nr);
	step_tlb();
	if (want_fifo)
		fifo_setup();
	step_events();
	step_poll();
	step_down_up();
}
