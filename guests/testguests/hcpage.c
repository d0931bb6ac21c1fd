/* Step 2: the same through the hypercall page (XEN_ELFNOTE_HYPERCALL_PAGE),
 * plus a look at the stubs the builder wrote. */
#include "tg.h"
const char tg_name[] = "hcpage";

void tg_main(struct start_info *si)
{
	const u8 *slot18 = (const u8 *)hypercall_page + 18 * 32;
	/* push %rcx; push %r11; mov $18, %eax; syscall */
	static const u8 want[] = { 0x51, 0x41, 0x53, 0xb8, 18, 0, 0, 0, 0x0f, 0x05 };
	for (unsigned i = 0; i < sizeof(want); i++)
		tg_check(slot18[i] == want[i], "console_io stub byte", slot18[i], want[i]);
	tg_puts("hello via hypercall page\n");
	/* XENVER_version, answered by the shim: Xen 4.17 (hypercalls/xen_version.py) */
	long v = HC2(HC_xen_version, 0, 0);
	tg_check(v == (4 << 16 | 17), "xen_version via page", v, 4 << 16 | 17);
	(void)si;
}
