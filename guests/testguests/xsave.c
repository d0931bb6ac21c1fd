/* XSAVE for a PV guest kernel: CR4.OSXSAVE through the emulated `mov %cr4`,
 * XCR0 through the emulated `xsetbv`, then what Linux's signal frames do
 * at CPL3: xgetbv shows the XCR0 in force (printed), XSAVE/XRSTOR of a buffer whose
 * header has the x87/SSE bits forced on (save_xstate_epilog) must not
 * fault.  Prints "XSAVE absent" and passes when the PV CPUID hides XSAVE. */
#include "tg.h"
const char tg_name[] = "xsave";

extern char tg_trap_13[], tg_trap_6[];
u64 tg_resume_rip;
static u64 traps[32];

void tg_trap(u64 vec, u64 *f, int has_err)
{
	u64 *hw = &f[2 + (has_err ? 1 : 0)];
	traps[vec & 31]++;
	if (tg_resume_rip)
		hw[0] = tg_resume_rip;
}

static void cpuid_fep(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("ud2; .ascii \"xen\"; cpuid"
			 : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "0"(leaf), "2"(sub));
}

static u8 area[4096] __attribute__((aligned(64)));

void tg_main(struct start_info *si)
{
	(void)si;
	static struct trap_info tt[] = {
		{ 6, 0, 0xe030, 0, (u64)tg_trap_6 },
		{ 13, 0, 0xe030, 0, (u64)tg_trap_13 },
		{ 0, 0, 0, 0, 0 },
	};
	long rc = HC1(HC_set_trap_table, tt);
	tg_check(rc == 0, "set_trap_table", rc, 0);
	u32 a, b, c, d;
	cpuid_fep(1, 0, &a, &b, &c, &d);
	if (!((c >> 26) & 1)) {
		tg_puts("XSAVE absent\n");
		return;
	}
	cpuid_fep(0xd, 0, &a, &b, &c, &d);
	/* every component offered, as Linux does (on kvm_pvm guest code runs
	 * with the host's XCR0 whatever is set: the policy offers exactly that) */
	u64 want = ((u64)d << 32) | a;
	u64 cr4;
	__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
	cr4 |= 1UL << 18;
	__asm__ volatile("mov %0, %%cr4" :: "r"(cr4));
	__asm__ volatile("xsetbv" :: "c"(0), "a"((u32)want), "d"(0));
	tg_check(traps[13] == 0 && traps[6] == 0, "cr4/xsetbv emulated", traps[13] + traps[6], 0);
	/* xgetbv(0) at CPL3: printed for the test (kvm_pvm shows the host's XCR0) */
	u32 lo, hi;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	/* signal-frame round trip: XSAVE, header forced to FP|SSE, XRSTOR */
	for (int i = 0; i < 64; i++)
		area[512 + i] = 0;
	__asm__ volatile("xsave %0" : "+m"(area) : "a"(~0u), "d"(~0u) : "memory");
	*(u64 *)(area + 512) |= 3;
	__asm__ volatile("leaq 1f(%%rip), %%rcx; movq %%rcx, tg_resume_rip(%%rip)\n\t"
			 "xrstor %0\n1:" :: "m"(area), "a"(~0u), "d"(~0u) : "rcx", "memory");
	tg_resume_rip = 0;
	tg_check(traps[13] == 0 && traps[6] == 0, "xrstor of the signal-style frame", traps[13] * 100 + traps[6], 0);
	tg_puts("xsave: xcr0 "); tg_hex(want); tg_puts(" xgetbv "); tg_hex(((u64)hi << 32) | lo); tg_puts("\n");
}
