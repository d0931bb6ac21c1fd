/* Asks for a reboot (SCHEDOP_shutdown, SHUTDOWN_reboot): the VMM must build
 * the domain again (or exit with its documented status). */
#include "tg.h"
const char tg_name[] = "reboot";

void tg_main(struct start_info *si)
{
	(void)si;
	tg_puts("reboot guest: asking for a reboot\n");
	tg_shutdown(SHUTDOWN_reboot);
}
