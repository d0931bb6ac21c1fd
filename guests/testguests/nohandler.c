/* A guest that takes #UD with no trap table: the domain must be crashed
 * (reported to the VMM), never the host process. */
#include "tg.h"
const char tg_name[] = "nohandler";

void tg_main(struct start_info *si)
{
	(void)si;
	tg_puts("before fault\n");
	__asm__ volatile("ud2");
	tg_puts("after fault\n");
}
