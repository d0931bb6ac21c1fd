/* set_segment_base as Xen 4.17 does it for a 64-bit PV guest
 * (pv/misc-hypercalls.c do_set_segment_base):
 *   - SEGBASE_FS / GS_USER / GS_KERNEL write the base; a non-canonical one
 *     is -EINVAL and changes nothing;
 *   - SEGBASE_GS_USER_SEL loads the user %gs from the GDT/LDT, RPL forced
 *     to 3 for a non-null selector; a null selector, or one whose load
 *     faults, leaves %gs null with the user GS base 0, and the call
 *     returns 0 all the same (Linux BUG()s on a failure);
 *   - `which` is an unsigned int: the upper half of the register is
 *     ignored; any other value is -EINVAL.
 * The bases are read back with rdmsr (FS_BASE, GS_BASE, SHADOW_GS_BASE =
 * the user GS base while in kernel mode), as a PV guest may. */
#include "mmutest.h"
const char tg_name[] = "segbase";

#define MSR_FS_BASE 0xc0000100
#define MSR_GS_BASE 0xc0000101
#define MSR_SHADOW_GS_BASE 0xc0000102
#define NONCANON 0x0000800000000000UL
#define SEL(i) (((i) << 3) | 3)
#define DESC(base, limit, access, flags)                                                 \
	(((u64)(limit) & 0xffff) | (((u64)(base) & 0xffffff) << 16) | ((u64)(access) << 40) | \
	 ((((u64)(limit) >> 16) & 0xf) << 48) | ((u64)(flags) << 52) | (((u64)(base) >> 24) << 56))
#define TLS_BASE 0x12345000u

static u64 gdtp[512] __attribute__((aligned(4096)));

static u64 rdmsr(u32 msr)   /* emulated by the shim, as by Xen */
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static u16 gs_sel(void)
{
	u16 s;
	__asm__ volatile("mov %%gs, %0" : "=r"(s));
	return s;
}

/* The selector read back from %gs: kvm_pvm does not keep a %gs the shim
 * loaded at CPL0 for the guest's CPL3 (README "Two test lanes"); the
 * test judges this by lane. */
static int sel_ok = 1;
static void check_sel(u16 now, u16 want, const char *what)
{
	if (now == want)
		return;
	sel_ok = 0;
	tg_puts("selector differs: "); tg_puts(what); tg_puts(" got "); tg_hex(now);
	tg_puts(" want "); tg_hex(want); tg_puts("\n");
}

static long segbase(u64 which, u64 base)
{
	return HC2(HC_set_segment_base, which, base);
}

/* GS_USER_SEL with the user GS base set to a marker first: the return
 * code, the selector now in %gs and the user GS base */
static long gs_user_sel(u64 sel, u16 *now, u64 *base)
{
	segbase(SEGBASE_GS_USER, 0x5555000UL);
	long rc = segbase(SEGBASE_GS_USER_SEL, sel);
	*now = gs_sel();
	*base = rdmsr(MSR_SHADOW_GS_BASE);
	return rc;
}

void tg_main(struct start_info *si)
{
	(void)si;
	long rc;

	/* the three bases */
	static const struct { u64 which; u32 msr; const char *name; } b[] = {
		{ SEGBASE_FS, MSR_FS_BASE, "FS" },
		{ SEGBASE_GS_USER, MSR_SHADOW_GS_BASE, "GS_USER" },
		{ SEGBASE_GS_KERNEL, MSR_GS_BASE, "GS_KERNEL" },
	};
	for (int i = 0; i < 3; i++) {
		u64 old = rdmsr(b[i].msr);
		u64 want = 0xffff888012345000UL + i;
		rc = segbase(b[i].which, want);
		tg_check(rc == 0, b[i].name, rc, 0);
		tg_check(rdmsr(b[i].msr) == want, "base written", rdmsr(b[i].msr), want);
		rc = segbase(b[i].which, NONCANON);
		tg_check(rc == -XEN_EINVAL, "non-canonical base: -EINVAL", rc, -XEN_EINVAL);
		rc = segbase(b[i].which, 0xfff0000000000000UL);
		tg_check(rc == -XEN_EINVAL, "non-canonical high base: -EINVAL", rc, -XEN_EINVAL);
		tg_check(rdmsr(b[i].msr) == want, "refused base leaves the old one", rdmsr(b[i].msr), want);
		rc = segbase(b[i].which, 0x00007ffffffff000UL);
		tg_check(rc == 0, "highest user half base", rc, 0);
		rc = segbase(b[i].which, old);
		tg_check(rc == 0 && rdmsr(b[i].msr) == old, "base restored", rdmsr(b[i].msr), old);
	}

	/* `which`: an unsigned int, the rest -EINVAL */
	rc = segbase((1UL << 32) | SEGBASE_FS, 0x4000);
	tg_check(rc == 0, "which: upper 32 bits ignored", rc, 0);
	tg_check(rdmsr(MSR_FS_BASE) == 0x4000, "which 1<<32|FS sets FS", rdmsr(MSR_FS_BASE), 0x4000);
	segbase(SEGBASE_FS, 0);
	static const u64 bad_which[] = { 4, 5, 0x100, 0xffffffffUL, ~0UL };
	for (unsigned i = 0; i < sizeof(bad_which) / sizeof(bad_which[0]); i++) {
		rc = segbase(bad_which[i], 0);
		tg_check(rc == -XEN_EINVAL, "unknown which: -EINVAL", rc, -XEN_EINVAL);
	}

	/* a GDT with a TLS-like data segment, an execute-only code segment
	 * and an empty slot */
	gdtp[1] = DESC(TLS_BASE, 0xfff, 0xf3, 0x4);   /* data RW, DPL 3 */
	gdtp[2] = DESC(0, 0xfffff, 0xf9, 0xa);         /* code64 execute-only, DPL 3 */
	gdtp[4] = DESC(0, 0xfffff, 0xf3, 0xc);         /* flat data */
	rc = uvm((u64)gdtp, (va_to_pfn(gdtp) << 12) | PTE_P | PTE_A, UVMF_INVLPG);
	tg_check(rc == 0, "map the GDT frame read-only", rc, 0);
	u64 mfn = va_to_pfn(gdtp);
	rc = HC2(HC_set_gdt, &mfn, 16);
	tg_check(rc == 0, "set_gdt", rc, 0);

	u16 now;
	u64 base;
	rc = gs_user_sel(SEL(1), &now, &base);
	tg_check(rc == 0, "GS_USER_SEL TLS selector", rc, 0);
	check_sel(now, SEL(1), "GS_USER_SEL TLS selector");
	tg_check(base == TLS_BASE, "GS_USER_SEL: user base from the descriptor", base, TLS_BASE);
	rc = gs_user_sel(1 << 3, &now, &base);
	tg_check(rc == 0 && base == TLS_BASE, "GS_USER_SEL RPL 0", base, TLS_BASE);
	check_sel(now, SEL(1), "GS_USER_SEL: RPL forced to 3");
	rc = gs_user_sel(0x123400000000UL | SEL(4), &now, &base);
	tg_check(rc == 0, "GS_USER_SEL: only the low 16 bits", rc, 0);
	check_sel(now, SEL(4), "GS_USER_SEL: only the low 16 bits");
	tg_check(base == 0, "GS_USER_SEL flat: base 0", base, 0);
	rc = gs_user_sel(FLAT_RING3_DS32, &now, &base);
	tg_check(rc == 0 && base == 0, "GS_USER_SEL FLAT_RING3_DS32", base, 0);
	check_sel(now, FLAT_RING3_DS32, "GS_USER_SEL FLAT_RING3_DS32");

	/* null selectors: loaded as given, base 0 */
	for (u64 s = 0; s < 4; s++) {
		rc = gs_user_sel(s, &now, &base);
		tg_check(rc == 0, "GS_USER_SEL null: 0", rc, 0);
		tg_check(now == 0 || now == s, "GS_USER_SEL null: null selector", now, s);
		tg_check(base == 0, "GS_USER_SEL null: base 0", base, 0);
	}
	rc = gs_user_sel(0, &now, &base);
	tg_check(now == 0, "GS_USER_SEL 0: %gs 0", now, 0);

	/* selectors whose load faults: null %gs, base 0, and 0 returned */
	static const u64 bad_sel[] = {
		SEL(2),            /* execute-only code */
		SEL(3),            /* empty descriptor */
		SEL(20),           /* beyond the GDT's 16 entries */
		SEL(1000),         /* far beyond */
		4 | 3,             /* LDT selector, no LDT */
		0xfffc | 3,        /* LDT, last index */
		0xe008 | 3,        /* the hypervisor's ring-0 code segment */
	};
	for (unsigned i = 0; i < sizeof(bad_sel) / sizeof(bad_sel[0]); i++) {
		rc = gs_user_sel(bad_sel[i], &now, &base);
		tg_check(rc == 0, "GS_USER_SEL faulting selector: 0", rc, 0);
		tg_check(now == 0, "GS_USER_SEL faulting selector: %gs null", now, 0);
		tg_check(base == 0, "GS_USER_SEL faulting selector: base 0", base, 0);
	}

	/* the TLS selector still loads after all that */
	rc = gs_user_sel(SEL(1), &now, &base);
	tg_check(rc == 0 && base == TLS_BASE, "GS_USER_SEL after faults", base, TLS_BASE);
	check_sel(now, SEL(1), "GS_USER_SEL after faults");
	gs_user_sel(0, &now, &base);
	tg_puts("OBSERVE gs_selector "); tg_puts(sel_ok ? "ok\n" : "differs\n");
}
