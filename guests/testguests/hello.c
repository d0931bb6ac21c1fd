/* Step 1: console_io + SCHEDOP_shutdown through `syscall`. */
#include "tg.h"
const char tg_name[] = "hello";

void tg_main(struct start_info *si)
{
	tg_puts("hello\n");
	tg_check(si->magic[0] == 'x' && si->magic[4] == '3', "start_info magic", si->magic[0], 'x');
	tg_check(si->nr_pages > 0, "nr_pages", si->nr_pages, 1);
}
