/* A guest that never ends by itself and shows its clock: every 100 ms of
 * its own system time (VIRQ_TIMER + set_singleshot_timer + SCHEDOP_block)
 * it prints "tick N at T ms".  For pause/unpause: no ticks while paused,
 * and T continues where it stopped (the clock stops with the guest).  A
 * pvclock reading below an earlier one prints "BACKWARDS". */
#include "tg_events.h"

const char tg_name[] = "ticker";

#define TICK_NS 100000000ull

static u32 timer_port;
static int timer_fired(void) { return ev_hits[timer_port] != 0; }

void tg_main(struct start_info *s)
{
	ev_setup(s);
	timer_port = bind_virq(VIRQ_TIMER);
	ev_enable();
	u64 prev = now_ns();
	for (u64 n = 1;; n++) {
		ev_hits[timer_port] = 0;
		singleshot(prev + TICK_NS, 0);
		ev_wait(timer_fired, 1 << 30);
		u64 t = now_ns();
		if (t < prev) {
			tg_puts("BACKWARDS ");
			tg_dec(prev);
			tg_puts(" -> ");
			tg_dec(t);
			tg_puts("\n");
		}
		prev = t;
		tg_puts("tick ");
		tg_dec(n);
		tg_puts(" at ");
		tg_dec(t / 1000000);
		tg_puts(" ms\n");
	}
}
