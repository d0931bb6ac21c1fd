/* A hostile HYPERVISOR_iret: a frame whose rip is not canonical.  The
 * shim's iretq to it faults at CPL0; the domain must be crashed and
 * reported (bad iret frame, #GP), never the shim panicked nor the host
 * process hurt.  Xen sends such a guest to its failsafe callback; with none
 * registered, it crashes the domain too. */
#include "tg.h"
const char tg_name[] = "badiret";

void tg_main(struct start_info *si)
{
	(void)si;
	tg_puts("before iret\n");
	/* rax r11 rcx flags rip cs rflags rsp ss, as Linux's xen_iret pushes
	 * them; cs with RPL 0: back to kernel mode */
	__asm__ volatile("movq %%rsp, %%rax\n\t"
			 "pushq $0xe02b; pushq %%rax; pushq $0x202; pushq $0xe030\n\t"
			 "movabsq $0x8000000000001000, %%rax; pushq %%rax\n\t"
			 "pushq $0; pushq $0; pushq $0; pushq $0\n\t"
			 "movl $23, %%eax; syscall" ::: "rax", "rcx", "r11", "memory");
	tg_puts("after iret\n");
}
