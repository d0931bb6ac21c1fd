/* Prints one line, then blocks forever with events masked off and nothing
 * bound: a guest that never ends by itself (for the console's escape key
 * and for destroy). */
#include "tg.h"
#include "tg_events.h"
const char tg_name[] = "idle";

void tg_main(struct start_info *si)
{
	(void)si;
	tg_puts("idle guest: waiting forever\n");
	for (;;)
		HC2(HC_sched_op, SCHEDOP_block, 0);
}
