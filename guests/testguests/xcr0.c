/* The XCR0 in force while a PV guest runs, before its kernel writes XCR0.
 * User space picks its routines from the *native* CPUID (OSXSAVE, AVX,
 * AVX-512 ...) and `xgetbv`; the guest kernel context-switches only the
 * state its PV CPUID offered (FXSAVE: x87 and SSE when XSAVE is hidden,
 * else the leaf-0xD components).  Any wider XCR0 lets glibc use registers
 * (ymm upper halves, ymm16-31 of the EVEX routines, opmasks) that no
 * context switch preserves: their contents leak between processes.
 * Prints xgetbv(0) and what the PV CPUID lets the kernel save ("xcr0 0x..
 * kernel-saved 0x..") for the test, which knows what each lane should show
 * (Xen: x87|SSE until xsetbv), and checks it is unchanged by exits to the VMM. */
#include "tg.h"
const char tg_name[] = "xcr0";

#define CPUID1_ECX_XSAVE   (1u << 26)
#define CPUID1_ECX_OSXSAVE (1u << 27)
#define XSTATE_FP_SSE 3UL

static u64 xgetbv0(void)
{
	u32 lo, hi;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	return ((u64)hi << 32) | lo;
}

static void cpuid_fep(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("ud2; .ascii \"xen\"; cpuid"
			 : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "0"(leaf), "2"(sub));
}

void tg_main(struct start_info *si)
{
	(void)si;
	u32 a, b, c, d;
	/* native CPUID: what a user process sees (no forced-emulation prefix) */
	__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "0"(1), "2"(0));
	if (!(c & CPUID1_ECX_OSXSAVE)) {
		tg_puts("native OSXSAVE off: xgetbv unusable, FXSAVE covers all\n");
		return;
	}
	/* what the kernel can context-switch: the PV policy's XSAVE components */
	u64 saved = XSTATE_FP_SSE;
	cpuid_fep(1, 0, &a, &b, &c, &d);
	if (c & CPUID1_ECX_XSAVE) {
		cpuid_fep(0xd, 0, &a, &b, &c, &d);
		saved = ((u64)d << 32) | a;
	}
	u64 x = xgetbv0();
	/* the test judges it: on kvm_pvm the host's AMX components may be in
	 * force too (test_testguests_priv.py) */
	tg_puts("xcr0 "); tg_hex(x); tg_puts(" kernel-saved "); tg_hex(saved); tg_puts("\n");
	for (int i = 0; i < 3; i++)   /* each console write is an exit to the VMM */
		tg_puts(".");
	tg_puts("\n");
	u64 y = xgetbv0();
	tg_check(y == x, "XCR0 unchanged by exits to the VMM", y, x);
}
