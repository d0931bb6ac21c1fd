/* Time and the one-shot timer: pvclock monotonic and consistent with
 * rdtsc, VIRQ_TIMER + set_singleshot_timer + SCHEDOP_block -> upcall, never
 * early; -ETIME with VCPU_SSHOTTMR_future; past deadlines fire at once;
 * set_timer_op, cancelled by 0, negative deadlines -> now + 100 ms;
 * stop_singleshot_timer; SCHEDOP_yield; the runstate area after a block;
 * everything again after
 * VCPUOP_register_vcpu_info moved vcpu_info. */
#include "tg_events.h"

const char tg_name[] = "timer";

#define SCHEDOP_yield 0

static u32 timer_port;
static int timer_fired(void) { return ev_hits[timer_port] != 0; }

static u8 vinfo_page[4096] __attribute__((aligned(4096)));

/* Arm at `deadline` (either API), block until the VIRQ_TIMER upcall;
 * returns the pvclock time the upcall was seen at. */
static u64 wait_timer(u64 deadline, int use_set_timer_op, const char *what)
{
	ev_hits[timer_port] = 0;
	long rc = use_set_timer_op ? HC1(HC_set_timer_op, deadline) : singleshot(deadline, 0);
	tg_check(rc == 0, what, rc, 0);
	int ok = ev_wait(timer_fired, 1000);
	u64 t = now_ns();
	tg_check(ok, what, ev_hits[timer_port], 1);
	tg_check(t >= deadline, "timer not early", t, deadline);
	return t;
}

void tg_main(struct start_info *s)
{
	ev_setup(s);
	volatile struct pvclock *pc = pvclock();
	tg_check(pc->version && !(pc->version & 1), "pvclock version even", pc->version, 2);
	tg_check(pc->mul >= (1u << 31), "tsc_to_system_mul normalised", pc->mul, 1u << 31);
	tg_check(si->wc_version && !(si->wc_version & 1), "wallclock version even", si->wc_version, 2);
	tg_check(si->wc_sec > 1600000000u, "wallclock plausible", si->wc_sec, 1600000000u);

	/* monotonic, and the rdtsc-derived delta agrees with the pvclock's */
	u64 prev = now_ns(), first = prev, tsc0 = rdtsc();
	int mono = 1;
	for (int i = 0; i < 2000; i++) {
		u64 t = now_ns();
		if (t < prev)
			mono = 0;
		prev = t;
	}
	tg_check(mono, "pvclock monotonic", prev, first);
	u64 dtsc = rdtsc() - tsc0, dns = prev - first;
	u64 expect = (u64)(((unsigned __int128)(pc->shift >= 0 ? dtsc << pc->shift : dtsc >> -pc->shift) * pc->mul) >> 32);
	tg_check(dns + 1000000 > expect && dns < expect + 1000000, "pvclock vs rdtsc", dns, expect);

	timer_port = bind_virq(VIRQ_TIMER);
	tg_check(HC3(HC_vcpu_op, VCPUOP_stop_periodic_timer, 0, 0) == 0, "stop_periodic_timer", 1, 0);
	ev_enable();

	/* 1 ms ahead, singleshot */
	u64 t0 = now_ns();
	u64 seen = wait_timer(t0 + 1000000, 0, "singleshot 1ms");
	tg_puts("timer_1ms_wake_ns="); tg_dec(seen - t0); tg_puts("\n");
	tg_puts("timer_upcall_latency_ns="); tg_dec(seen - (t0 + 1000000)); tg_puts("\n");

	/* -ETIME for a past deadline with the future flag; no event */
	ev_hits[timer_port] = 0;
	long rc = singleshot(now_ns() - 1000, VCPU_SSHOTTMR_future);
	tg_check(rc == -XEN_ETIME, "past deadline + future flag", rc, -XEN_ETIME);
	/* the same deadline without the flag fires at once */
	wait_timer(now_ns() - 1000, 0, "past deadline fires");

	/* set_timer_op, 2 ms */
	wait_timer(now_ns() + 2000000, 1, "set_timer_op 2ms");

	/* set_timer_op(0) cancels: a timer armed 50 ms ahead stays silent */
	ev_hits[timer_port] = 0;
	t0 = now_ns();
	singleshot(t0 + 50000000, 0);
	rc = HC1(HC_set_timer_op, 0);
	tg_check(rc == 0, "set_timer_op(0)", rc, 0);
	while (now_ns() < t0 + 100000000)
		;
	tg_check(ev_hits[timer_port] == 0, "set_timer_op(0) cancelled", ev_hits[timer_port], 0);

	/* Xen's workaround for Linux's bogus deadlines: negative is now + 100 ms */
	t0 = now_ns();
	rc = HC1(HC_set_timer_op, (u64)-5);
	tg_check(rc == 0, "set_timer_op(negative)", rc, 0);
	tg_check(ev_wait(timer_fired, 1000), "negative deadline fires", ev_hits[timer_port], 1);
	seen = now_ns();
	tg_check(seen >= t0 + 100000000, "negative deadline: now + 100 ms", seen - t0, 100000000);

	rc = HC2(HC_sched_op, SCHEDOP_yield, 0);
	tg_check(rc == 0, "SCHEDOP_yield", rc, 0);

	/* stop: an armed 1 ms timer is cancelled; a later one still works */
	t0 = now_ns();
	singleshot(t0 + 1000000, 0);
	rc = HC3(HC_vcpu_op, VCPUOP_stop_singleshot_timer, 0, 0);
	tg_check(rc == 0, "stop_singleshot_timer", rc, 0);
	seen = wait_timer(t0 + 20000000, 0, "after stop");
	tg_check(seen >= t0 + 20000000, "stopped timer did not fire early", seen - t0, 20000000);
	/* block/wake round trip with an immediate deadline */
	u64 b0 = rdtsc();
	wait_timer(now_ns(), 0, "immediate");
	u64 b1 = rdtsc();
	tg_puts("block_wake_immediate_cycles="); tg_dec(b1 - b0); tg_puts("\n");

	/* the runstate area: filled at registration; rewritten by the shim
	 * on the tick after time blocked (Xen writes it on a change of
	 * state), its times adding up to its entry time each time */
	static struct runstate rs;
	u64 area = (u64)&rs;
	rc = HC3(HC_vcpu_op, VCPUOP_register_runstate_memory_area, 0, &area);
	tg_check(rc == 0 && rs.state == 0 && rs.entry, "runstate area registered", rc, 0);
	u64 blocked0 = rs.time[2], entry0 = rs.entry;
	wait_timer(now_ns() + 5000000, 0, "timer with a runstate area");
	tg_check(rs.time[2] >= blocked0 + 4000000, "runstate: the 5 ms block counted as blocked",
		 rs.time[2] - blocked0, 4000000);
	tg_check(rs.entry > entry0 && rs.state == 0, "runstate rewritten after the block", rs.entry, entry0);
	tg_check(rs.time[0] + rs.time[1] + rs.time[2] + rs.time[3] == rs.entry, "runstate times add up",
		 rs.time[0] + rs.time[1] + rs.time[2] + rs.time[3], rs.entry);
	area = 0;
	HC3(HC_vcpu_op, VCPUOP_register_runstate_memory_area, 0, &area);

	/* move vcpu_info into our own page; time and timers follow it */
	struct vcpu_register_vcpu_info r = { va_to_pfn(vinfo_page), 64, 0 };
	ev_disable();           /* as Linux: masked while the upcall's vi is stale */
	rc = HC3(HC_vcpu_op, VCPUOP_register_vcpu_info, 0, &r);
	tg_check(rc == 0, "register_vcpu_info", rc, 0);
	vi = (volatile struct vcpu_info *)(vinfo_page + 64);
	tg_check(vi->upcall_mask == 1, "mask copied to the new vcpu_info", vi->upcall_mask, 1);
	ev_enable();            /* Xen marks everything pending: scan once */
	pc = pvclock();
	tg_check(pc->version && !(pc->version & 1), "moved pvclock version even", pc->version, 2);
	u64 t1 = now_ns();
	tg_check(t1 >= prev, "moved pvclock continues", t1, prev);
	wait_timer(now_ns() + 1000000, 0, "timer after vcpu_info move");

	tg_puts("system_time_ns="); tg_dec(now_ns()); tg_puts("\n");
}
