/* Long hypercalls are preempted as Xen preempts them (issue 11, item 6): a
 * batch of mmu_update or mmuext_op requests, a multicall, or a trap table
 * longer than the shim's work budget stops part-way; the guest takes its
 * pending events; the hypercall resumes from its continuation until done.
 * Each check leaves a timer event pending, unmasked, just before the long
 * call: its upcall must run *during* it (it sees part of the work done).  In the end
 * every piece of work is done once: the done count adds up across the
 * pieces, a failing request still stops its batch with its error, and a
 * multicall entry preempted in the middle keeps its place; a count the
 * guest itself marks preempted resumes from its *done. */
#include "tg_events.h"
#include "mmutest.h"

const char tg_name[] = "preempt";

#define BATCH 2048        /* several times the shim's budget (HYPERCALL_WORK_BUDGET) */
#define CALLS 1024
#define TRAPS 1024
#define XENVER_VERSION_WANT 0x40011   /* 4.17, as the hcpage guest checks */

struct mc { u64 op, result, args[6]; };
_Static_assert(sizeof(struct mc) == XEN_MULTICALL_ENTRY_SIZE, "multicall_entry");

static struct mmu_update reqs[BATCH];
static struct mmuext_op ops[BATCH];
static struct mc calls[CALLS];
static struct trap_info traps[TRAPS + 1];

static u32 timer_port;
static volatile u32 done;          /* the batch's done count, as the shim keeps it */
static volatile long seen = -1;    /* progress when the timer's upcall ran */
static volatile long (*progress)(void);

static long batch_progress(void) { return done; }

static long calls_progress(void)
{
	long n = 0;
	for (int i = 0; i < CALLS; i++)
		n += calls[i].result != 0xdeadbeefUL;
	return n;
}

static void on_event(u32 port)
{
	if (port == timer_port && seen < 0)
		seen = progress();
}

/* Make the timer's event pending but not yet delivered, whatever the
 * machine's speed: masked, a deadline already past, then unmasked without
 * a hypercall.  The next way out of the shim delivers it: the long call's
 * first continuation, if there is one, else its end (then seen is all). */
static void arm(long (*p)(void))
{
	progress = (volatile long (*)(void))p;
	seen = -1;
	ev_disable();
	tg_check(singleshot(1, 0) == 0, "timer armed in the past", 1, 0);
	for (int i = 0; i < 1000000 && !(si->evtchn_pending[timer_port / 64] >> (timer_port % 64) & 1); i++)
		barrier();
	tg_check(vi->upcall_pending, "timer event pending", 0, 1);
	vi->upcall_mask = 0;
	barrier();
}

static void landed_inside(const char *what, long total)
{
	tg_check(seen > 0 && seen < total, what, (u64)seen, (u64)total);
}

void tg_main(struct start_info *s)
{
	ev_setup(s);
	timer_port = bind_virq(VIRQ_TIMER);
	ev_hook = on_event;
	ev_enable();
	u64 pfn = va_to_pfn(reqs);

	/* mmu_update: BATCH M2P writes, the last value wins, done adds up */
	for (int i = 0; i < BATCH; i++) {
		reqs[i].ptr = (pfn << 12) | MMU_MACHPHYS_UPDATE;
		reqs[i].val = 0x1000 + i;
	}
	done = 0;
	arm(batch_progress);
	long rc = mmu_update(reqs, BATCH, (u32 *)&done, DOMID_SELF);
	tg_check(rc == 0, "mmu_update batch", rc, 0);
	tg_check(done == BATCH, "mmu_update done count across the pieces", done, BATCH);
	landed_inside("mmu_update: the timer's upcall ran inside the batch", BATCH);

	/* a failing request still ends the batch, with its error and count */
	reqs[BATCH - 1].ptr = (pfn << 12) | 7;   /* no such command */
	done = 0;
	rc = mmu_update(reqs, BATCH, (u32 *)&done, DOMID_SELF);
	tg_check(rc == -XEN_ENOSYS, "mmu_update batch ending in a bad request", rc, -XEN_ENOSYS);
	tg_check(done == BATCH - 1, "done count up to the bad request", done, BATCH - 1);

	/* a guest may set MMU_UPDATE_PREEMPTED itself (Xen takes it as a
	 * resumption): *done is read and added to; an unreadable or unwritable
	 * done pointer changes nothing but the count (Xen ignores the copy) */
	reqs[BATCH - 1].ptr = (pfn << 12) | MMU_MACHPHYS_UPDATE;
	done = 5;
	rc = mmu_update(reqs, 8 | (1U << 31), (u32 *)&done, DOMID_SELF);
	tg_check(rc == 0 && done == 13, "PREEMPTED from the guest: done read and added to", done, 13);
	rc = mmu_update(reqs, 8 | (1U << 31), (u32 *)0x1000, DOMID_SELF);
	tg_check(rc == 0, "PREEMPTED with an unmapped done pointer", rc, 0);

	/* mmuext_op: BATCH local invlpgs */
	for (int i = 0; i < BATCH; i++) {
		ops[i].cmd = MMUEXT_INVLPG_LOCAL;
		ops[i].arg1 = (u64)reqs;
	}
	done = 0;
	arm(batch_progress);
	rc = HC4(HC_mmuext_op, ops, BATCH, &done, DOMID_SELF);
	tg_check(rc == 0, "mmuext_op batch", rc, 0);
	tg_check(done == BATCH, "mmuext_op done count across the pieces", done, BATCH);
	landed_inside("mmuext_op: the timer's upcall ran inside the batch", BATCH);

	/* multicall: CALLS xen_version entries, each result written once */
	for (int i = 0; i < CALLS; i++)
		calls[i] = (struct mc){ HC_xen_version, 0xdeadbeefUL, { XENVER_version } };
	arm(calls_progress);
	rc = HC2(HC_multicall, calls, CALLS);
	tg_check(rc == 0, "multicall", rc, 0);
	landed_inside("multicall: the timer's upcall ran inside it", CALLS);
	long bad = 0;
	for (int i = 0; i < CALLS; i++)
		bad += calls[i].result != XENVER_VERSION_WANT;
	tg_check(bad == 0, "every multicall entry's result", bad, 0);

	/* a multicall whose first entry is itself a long batch: preempted
	 * inside the entry, resumed there, the next entry run once after it */
	reqs[BATCH - 1].ptr = (pfn << 12) | MMU_MACHPHYS_UPDATE;
	done = 0;
	calls[0] = (struct mc){ HC_mmu_update, 0xdeadbeefUL, { (u64)reqs, BATCH, (u64)&done, DOMID_SELF } };
	calls[1] = (struct mc){ HC_xen_version, 0xdeadbeefUL, { XENVER_version } };
	arm(batch_progress);
	rc = HC2(HC_multicall, calls, 2);
	tg_check(rc == 0, "multicall of a long batch", rc, 0);
	tg_check(calls[0].result == 0 && done == BATCH, "the nested batch, all of it", done, BATCH);
	tg_check(calls[1].result == XENVER_VERSION_WANT, "the entry after it", calls[1].result,
		 XENVER_VERSION_WANT);
	landed_inside("nested batch: the timer's upcall ran inside it", BATCH);

	/* set_trap_table: a list longer than the budget (vectors the guest
	 * does not use, each entry valid), then the terminator */
	for (int i = 0; i < TRAPS; i++)
		traps[i] = (struct trap_info){ 200 + i % 50, 0, FLAT_RING3_CS64, 0, (u64)tg_main };
	traps[TRAPS].address = 0;
	rc = HC1(HC_set_trap_table, traps);
	tg_check(rc == 0, "set_trap_table longer than the budget", rc, 0);
}
