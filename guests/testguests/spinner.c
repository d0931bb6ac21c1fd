/* A guest that burns its vCPU at CPL3 forever (after one line), for CPU
 * limits and isolation: whatever it gets is what its cgroup allows. */
#include "tg.h"

const char tg_name[] = "spinner";

void tg_main(struct start_info *si)
{
	(void)si;
	tg_puts("spinner: spinning\n");
	for (volatile u64 n = 0;; n++)
		;
}
