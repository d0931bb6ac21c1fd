/* Page-type races between two vCPUs (issue 11, item 1).  One frame F,
 * fought over:
 *   vCPU 1, NR_ROUNDS times: PIN_L1 F; when that succeeds, look (through
 *     read-only mappings) HOLD times that F is still all zeros, as pinned,
 *     and that vCPU 0's slot S of the tool L1 is no present writable
 *     mapping of F; UNPIN.  A refusal (-EINVAL: F is writable) is counted.
 *   vCPU 0, NR_ROUNDS times: map F writable in slot S (mmu_update); when
 *     that succeeds, write a forged PTE (the live L4, writable) through it
 *     into F, zero it again, clear the slot (mmu_update, no flush).  A
 *     refusal (-EBUSY: F is a page table) is counted, and then a store of
 *     a forged PTE (the frame past RAM) through the slot's address must
 *     fault: vCPU 1's pin, the change of type, flushed the translation
 *     vCPU 0's TLB may have kept from its last successful round (Xen's
 *     rule; the shim's smp_flush_stale reaching another vCPU).
 * Xen's rule is that never both at once: a pinned F has no writable
 * mapping and nothing forged appears in it; PIN_L1 answers 0 or -EINVAL,
 * never what a forged entry would get.
 *
 * First, LOCKSTEP rounds in a fixed order (each side waits for the other's
 * step): pin (0), map (-EBUSY, and the stale store faults), unpin, map (0),
 * pin (-EINVAL), unmap -- so that both answers on both sides are checked
 * whatever the scheduling.  Then the racing rounds, which check only the
 * invariants above; how often they met is reported, not required (under
 * single-threaded TCG one side may win every round).
 *
 * Meeting: on two host CPUs the vCPUs run side by side, but a KVM under
 * single-threaded TCG (the faithful lane) runs one at a time, switching on
 * an interrupt between its CPUs, else every 100 ms -- time enough for all
 * of one side's rounds.  So each side kicks the other (an event-channel
 * IPI on a masked port: an interrupt, no TLB flush) after each attempt,
 * holding F or not, and after giving F back.  Only vCPU 0 expects faults
 * (both vCPUs share tg_resume_rip).
 *
 * A missing remote flush shows only on hardware: on kvm_pvm the shim's
 * page-table writes (emulated at CPL0) reach KVM's shadow tables at once,
 * and in the faithful lane each switch between the vCPUs is a VM exit,
 * which QEMU carries out with a full TLB flush. */
#include "mmutest.h"
#include "vcpu_ctx.h"
const char tg_name[] = "pgrace";

#define NR_ROUNDS 200       /* each side: at most 6 hypercalls (or 5 and a fault) a round */
#define HOLD 16             /* looks by vCPU 1 while F is pinned */
#define LOCKSTEP 4          /* rounds in a fixed order first */
#define PROBE 7             /* F's entry vCPU 0's stale store aims at */
#define WAIT_TICKS (1UL << 35)   /* bound of a wait for the other vCPU (~10 s) */
#define RO (PTE_P | PTE_A)
#define RW (PTE_P | PTE_RW | PTE_A | PTE_D)
#define PAGE(name) static u64 name[512] __attribute__((aligned(4096)))
enum { S = 3 };             /* slot of the tool L1 (hooked at TEST_VA) */

PAGE(tool_l1);
PAGE(f);
static u8 si_page[4096] __attribute__((aligned(4096)));   /* shared_info */
static u32 kick_port[2];    /* the IPI port that kicks vCPU n */
static u8 stack1[16384] __attribute__((aligned(4096)));
static struct vcpu_guest_context ctx;

extern char tg_trap_14[];
u64 tg_resume_rip;
static volatile struct faults_seen pf;
void tg_trap(u64 vec, u64 *frame, int has_err) { take_expected_fault(&pf, 14, vec, frame, has_err); }
static const struct trap_info pf_trap = { 14, 0, FLAT_RING3_CS64, 0, (u64)tg_trap_14 };

/* what each side saw; the first bad value of each kind kept */
static volatile struct side {
	u64 ok, refused, other, other_rc;
	u64 forged_seen, forged_val, slot_seen, slot_val, unpin_bad;   /* vCPU 1 */
	u64 probes, stale, unmap_bad;                                   /* vCPU 0 */
} side[2];
static volatile u64 started1, go, done1;
static volatile u64 step;            /* lockstep: whose turn (see lockstep0/1) */
static volatile u64 lockstep_bad, lockstep_what, lockstep_rc;

static long tool_map(u64 val) { return mmu_update1((pfn(tool_l1) << 12) + 8 * S, val); }
#define cpu_relax() __asm__ volatile("pause" ::: "memory")

/* Between rounds: 0 to 2 hypercalls' time (a hypercall's cost is the unit
 * on any KVM), drawn per side, so that the two loops, of about the same
 * period, cannot lock into one phase where one side always finds F taken. */
static void breathe(u64 *seed)
{
	*seed = *seed * 6364136223846793005UL + 1442695040888963407UL;
	for (u64 n = (*seed >> 33) % 3; n; n--)
		HC2(HC_xen_version, XENVER_version, 0);
}

struct evtchn_bind_ipi { u32 vcpu, port; };

/* Kick vCPU n: its port's pending bit cleared first, so that every send
 * raises it anew (a masked port that becomes pending kicks its vCPU). */
static void kick(int n)
{
	u32 port = kick_port[n];
	__atomic_and_fetch((u64 *)(si_page + SI_EVTCHN_PENDING) + port / 64, ~(1UL << (port % 64)),
			   __ATOMIC_SEQ_CST);
	HC2(HC_event_channel_op, EVTCHNOP_send, &port);
}

static long bind_kick_port(int n)
{
	struct evtchn_bind_ipi b = { (u32)n, 0 };
	long rc = HC2(HC_event_channel_op, EVTCHNOP_bind_ipi, &b);
	if (rc)
		return rc;
	kick_port[n] = b.port;
	__atomic_or_fetch((u64 *)(si_page + SI_EVTCHN_MASK) + b.port / 64, 1UL << (b.port % 64),
			  __ATOMIC_SEQ_CST);
	return 0;
}

static int wait_for(volatile u64 *flag)
{
	u64 end = rdtsc() + WAIT_TICKS;
	while (!*flag && rdtsc() < end)
		cpu_relax();
	return *flag != 0;
}

/* Lockstep: wait for step `n` (the other side kicks after each), note an
 * answer that is not Xen's. */
static int wait_step(u64 n)
{
	u64 end = rdtsc() + WAIT_TICKS;
	while (step != n && rdtsc() < end)
		cpu_relax();
	return step == n;
}

static void expect_rc(u64 what, long rc, long want)
{
	if (rc != want && !lockstep_bad++) {
		lockstep_what = what;
		lockstep_rc = (u64)rc;
	}
}

static void next_step(int other)
{
	step++;
	kick(other);
}

/* vCPU 1 */
static void hold_pinned(volatile struct side *me)
{
	u64 mapped = pte(f, PTE_P | PTE_RW);
	for (int k = 0; k < HOLD; k++) {
		for (int i = 0; i < 512; i++)
			if (f[i] && !me->forged_seen++)
				me->forged_val = f[i];
		u64 e = tool_l1[S];
		if ((e & (PTE_ADDR | PTE_P | PTE_RW)) == mapped && !me->slot_seen++)
			me->slot_val = e;
		cpu_relax();
	}
}

void vcpu1_main(void);
void vcpu1_main(void)
{
	volatile struct side *me = &side[1];
	u64 seed = 1;
	started1 = 1;
	if (wait_for(&go))
		for (u64 r = 0; r < LOCKSTEP; r++) {
			u64 b = 6 * r;
			if (!wait_step(b))
				break;
			expect_rc(1, mmuext1(MMUEXT_PIN_L1_TABLE, pfn(f), 0), 0);   /* F free */
			next_step(0);
			if (!wait_step(b + 2))
				break;
			expect_rc(3, mmuext1(MMUEXT_UNPIN_TABLE, pfn(f), 0), 0);
			next_step(0);
			if (!wait_step(b + 4))
				break;
			expect_rc(5, mmuext1(MMUEXT_PIN_L1_TABLE, pfn(f), 0), -XEN_EINVAL);   /* mapped */
			next_step(0);
		}
	if (go)
		for (int n = 0; n < NR_ROUNDS; n++, breathe(&seed)) {
			long rc = mmuext1(MMUEXT_PIN_L1_TABLE, pfn(f), 0);
			kick(0);
			if (rc == 0) {
				me->ok++;
				hold_pinned(me);
				if (mmuext1(MMUEXT_UNPIN_TABLE, pfn(f), 0))
					me->unpin_bad++;
				kick(0);
			} else if (rc == -XEN_EINVAL) {
				me->refused++;
			} else if (!me->other++) {
				me->other_rc = rc;
			}
		}
	done1 = 1;
	HC3(HC_vcpu_op, VCPUOP_down, 1, 0);
	for (;;)
		cpu_relax();
}
__asm__(".text\n"
	"vcpu1_entry:\n"
	"	call vcpu1_main\n"
	"	ud2\n");
extern char vcpu1_entry[];

/* vCPU 0 */
static void vcpu0_lockstep(u64 nr_pages)
{
	volatile u64 *w = (volatile u64 *)(TEST_VA + ((u64)S << 12));
	u64 oob = (nr_pages << 12) | RO;
	for (u64 r = 0; r < LOCKSTEP; r++) {
		u64 b = 6 * r;
		if (!wait_step(b + 1)) {
			expect_rc(0, -1, 0);   /* vCPU 1 did not take its step */
			return;
		}
		expect_rc(2, tool_map(pte(f, RW)), -XEN_EBUSY);   /* F pinned */
		u64 seen = pf.count;
		EXPECT_FAULT("movq %1, (%0)", :: "r"(&w[PROBE]), "r"(oob) : "rax", "memory");
		expect_rc(2, pf.count - seen, 1);   /* the stale store faults */
		next_step(1);
		if (!wait_step(b + 3))
			return;
		expect_rc(4, tool_map(pte(f, RW)), 0);   /* F free again */
		next_step(1);
		if (!wait_step(b + 5))
			return;
		expect_rc(6, tool_map(0), 0);
		next_step(1);
	}
	wait_step(6 * LOCKSTEP);
}

static void vcpu0_rounds(u64 nr_pages)
{
	volatile struct side *me = &side[0];
	volatile u64 *w = (volatile u64 *)(TEST_VA + ((u64)S << 12));
	u64 forged = (read_cr3() & PTE_ADDR) | RW, oob = (nr_pages << 12) | RO, seed = 2;
	for (int n = 0; n < NR_ROUNDS; n++, breathe(&seed)) {
		long rc = tool_map(pte(f, RW));
		kick(1);
		if (rc == 0) {
			me->ok++;
			w[n & 511] = forged;
			w[n & 511] = 0;
			if (tool_map(0))
				me->unmap_bad++;
			kick(1);
		} else if (rc == -XEN_EBUSY) {
			me->refused++;
			if (me->stale)
				continue;   /* one landing says it; more would only fill vCPU 1's table */
			me->probes++;
			u64 seen = pf.count;
			EXPECT_FAULT("movq %1, (%0)", :: "r"(&w[PROBE]), "r"(oob) : "rax", "memory");
			if (pf.count == seen) {
				me->stale++;
				w[PROBE] = 0;
			}
		} else if (!me->other++) {
			me->other_rc = rc;
		}
	}
}

static long start_vcpu1(void)
{
	tg_kernel_context(&ctx, (u64)vcpu1_entry, (u64)stack1 + sizeof(stack1), read_cr3() & PTE_ADDR);
	ctx.trap_ctxt[14] = pf_trap;
	long rc = HC3(HC_vcpu_op, VCPUOP_initialise, 1, &ctx);
	return rc ? rc : HC3(HC_vcpu_op, VCPUOP_up, 1, 0);
}

static void report(const char *what, u64 v)
{
	tg_puts(what);
	tg_dec(v);
}

void tg_main(struct start_info *si)
{
	static struct trap_info tt[2];
	tt[0] = pf_trap;
	long rc = HC1(HC_set_trap_table, tt);
	tg_check(rc == 0, "set_trap_table", rc, 0);
	rc = hook_l1(tool_l1);
	tg_check(rc == 0, "hook the tool L1", rc, 0);
	rc = uvm((u64)f, pte(f, RO), UVMF_INVLPG);   /* F's only writable mapping: slot S */
	tg_check(rc == 0, "make F's own mapping read-only", rc, 0);
	rc = uvm((u64)si_page, si->shared_info | RW, UVMF_INVLPG);
	tg_check(rc == 0, "map shared_info", rc, 0);
	if (tg_failures)
		return;
	rc = start_vcpu1();
	tg_check(rc == 0, "VCPUOP_initialise + VCPUOP_up of vCPU 1", rc, 0);
	if (rc)
		return;
	for (int n = 0; n < 2; n++) {
		rc = bind_kick_port(n);
		tg_check(rc == 0, "EVTCHNOP_bind_ipi", rc, 0);
	}
	if (tg_failures)
		return;
	if (!wait_for(&started1)) {
		tg_check(0, "vCPU 1 runs", 0, 1);
		return;
	}
	go = 1;
	vcpu0_lockstep(si->nr_pages);
	tg_check(!lockstep_bad, "lockstep: an answer that is not Xen's (what = its step; 0: a step never came)",
		 lockstep_what, lockstep_rc);
	vcpu0_rounds(si->nr_pages);
	if (!wait_for(&done1)) {
		tg_check(0, "vCPU 1 finishes its rounds", 0, 1);
		return;
	}

	report("pgrace: vCPU0 maps ok ", side[0].ok);
	report(" refused ", side[0].refused);
	report(" stale probes ", side[0].probes);
	report(" (not faulting ", side[0].stale);
	report("); vCPU1 pins ok ", side[1].ok);
	report(" refused ", side[1].refused);
	tg_puts("\n");
	tg_check(!side[0].stale, "vCPU 0 stored through its slot after vCPU 1 pinned F (stale TLB entry not flushed)",
		 side[0].stale, 0);
	tg_check(!side[1].forged_seen, "vCPU 1 saw a non-zero entry in F while it had F pinned",
		 side[1].forged_val, 0);
	tg_check(!side[1].slot_seen, "vCPU 1 saw vCPU 0's slot map F writable while it had F pinned",
		 side[1].slot_val, 0);
	tg_check(!side[1].other, "PIN_L1 answered neither 0 nor -EINVAL (a forged entry validated?)",
		 side[1].other_rc, -XEN_EINVAL);
	tg_check(!side[0].other, "the writable mapping of F answered neither 0 nor -EBUSY",
		 side[0].other_rc, -XEN_EBUSY);
	tg_check(!side[1].unpin_bad, "UNPIN of the F vCPU 1 had pinned", side[1].unpin_bad, 0);
	tg_check(!side[0].unmap_bad, "clearing vCPU 0's slot", side[0].unmap_bad, 0);
}
