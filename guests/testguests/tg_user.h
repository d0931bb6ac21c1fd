/* A user address space for the test guests that run user-mode snippets one
 * at a time (user_run.S's run_user): a code page holding a copy of the
 * snippets and a stack page at USER_CODE_VA, their page tables mapped
 * read-only and installed as the user base pointer, and the kernel stack
 * that bounces from user mode land on (softint, fsgsbase, userio). */
#ifndef TG_USER_H
#define TG_USER_H
#include "tg.h"

#define USER_CODE_VA 0x400000UL
#define USER_STACK_TOP 0x402000UL

struct tg_user_space {
	u64 pt[4][512];        /* user L4 L3 L2 L1 */
	u8 pages[2][4096];     /* code, stack */
} __attribute__((aligned(4096)));

/* 0, or the first failure's code (each is also a tg_check) */
static inline long tg_user_space_setup(struct tg_user_space *us, const char *code, const char *code_end,
				       void *kstack_top)
{
	struct { u32 cmd, _pad; u64 arg1, arg2; } op = { MMUEXT_NEW_USER_BASEPTR, 0, va_to_pfn(us->pt[0]), 0 };
	u64 U = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D;
	long rc;
	us->pt[0][0] = (va_to_pfn(us->pt[1]) << 12) | U;
	us->pt[1][0] = (va_to_pfn(us->pt[2]) << 12) | U;
	us->pt[2][USER_CODE_VA >> 21] = (va_to_pfn(us->pt[3]) << 12) | U;
	for (int i = 0; i < 2; i++)
		us->pt[3][((USER_CODE_VA >> 12) & 511) + i] = (va_to_pfn(us->pages[i]) << 12) | U;
	tg_memcpy(us->pages[0], code, code_end - code);
	for (int i = 0; i < 4; i++) {
		rc = tg_map_readonly(us->pt[i]);
		tg_check(rc == 0, "user page table mapped read-only", i, 0);
		if (rc)
			return rc;
	}
	rc = HC4(HC_mmuext_op, &op, 1, 0, 0x7ff0);
	tg_check(rc == 0, "NEW_USER_BASEPTR", rc, 0);
	if (rc)
		return rc;
	rc = HC2(HC_stack_switch, 0xe02b, kstack_top);
	tg_check(rc == 0, "stack_switch", rc, 0);
	return rc;
}
#endif
