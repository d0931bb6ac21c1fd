/* Takes its only vCPU down (VCPUOP_down on itself), as a hostile or
 * broken guest may: nothing of it runs any more, yet the domain must
 * still time out, be stopped and be destroyed without a spinning thread. */
#include "tg.h"
const char tg_name[] = "downself";

void tg_main(struct start_info *si)
{
	(void)si;
	tg_puts("downself: taking vCPU 0 down\n");
	long rc = HC3(HC_vcpu_op, VCPUOP_down, 0, 0);
	tg_puts("downself: FAILURE: VCPUOP_down returned\n");
	(void)rc;
	for (;;)
		HC2(HC_sched_op, SCHEDOP_block, 0);
}
