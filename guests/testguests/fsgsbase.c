/* The FSGSBASE instructions in a 64-bit PV guest, as Xen 4.17 gives them
 * (pv/emul-priv-op.c write_cr via pv_fixup_guest_cr4, x86_64 swapgs on
 * each change of guest mode):
 *   - CR4.FSGSBASE is the guest kernel's to set and clear when its CPUID
 *     policy offers FSGSBASE, and is dropped silently when it does not;
 *   - with it set, rd/wr{fs,gs}base work in both guest modes on the live
 *     bases: the FS base is one for both modes, wrgsbase in user mode
 *     writes the user GS base (the kernel sees it in SHADOW_GS_BASE), in
 *     kernel mode the kernel's; a non-canonical base is #GP(0) at the
 *     instruction and changes nothing;
 *   - with it clear (or not offered) the instructions are #UD.
 * kvm_pvm offers no FSGSBASE (its CR4 bit is KVM's, test_cpuid.py), so
 * there only the not-offered half runs, and the #UD is not seen (below). */
#include "tg_user.h"
const char tg_name[] = "fsgsbase";

#define NOERR 0xdeadUL
#define CR4_FSGSBASE (1UL << 16)
#define MSR_FS_BASE 0xc0000100
#define MSR_GS_BASE 0xc0000101
#define MSR_SHADOW_GS_BASE 0xc0000102
#define NONCANON 0x0000800000000000UL
#define USER_FS 0x00007f0011223000UL   /* what u_wrfs / u_wrgs write (fsgsbase_entry.S) */
#define USER_GS 0x00007f0044556000UL

extern char tg_trap_3[], tg_trap_6[], tg_trap_13[], tg_trap_14[];
extern char user_code_start[], user_code_end[];
extern char u_wrfs[], u_wrfs_ok[], u_wrgs[], u_wrgs_ok[], u_wrfs_bad[], u_wrgs_bad[];
extern char u_rdfs[], u_rdfs_ok[], u_rdgs[], u_rdgs_ok[];
void run_user(u64 rip, u64 rsp, u64 rax, u64 rbx);
void tg_back_to_kernel(void) __attribute__((noreturn));

u64 tg_resume_rip, k_at;
static struct { u64 n, vec, err, rip, cs; } last;
static struct tg_user_space user_space;
static u8 kstack[16384] __attribute__((aligned(16)));

void tg_trap(u64 vec, u64 *f, int has_err)
{
	u64 *hw = &f[2 + (has_err ? 1 : 0)];
	last.n++;
	last.vec = vec;
	last.err = has_err ? f[2] : NOERR;
	last.rip = hw[0];
	last.cs = hw[1];
	if ((hw[1] & 3) == 3)
		tg_back_to_kernel();
	hw[0] = tg_resume_rip;
}

static void expect(const char *what, u64 vec, u64 err, u64 rip)
{
	tg_check(last.n == 1, what, last.n, 1);
	tg_check(last.vec == vec, what, last.vec, vec);
	tg_check(last.err == err, what, last.err, err);
	tg_check(last.rip == rip, what, last.rip, rip);
	last.n = 0;
}

/* run one instruction in kernel mode with rax = val; a trap resumes after it */
#define KINSN(insn, val)                                                         \
	__asm__ volatile("leaq 1f(%%rip), %%rdx; movq %%rdx, k_at(%%rip)\n\t"       \
			 "leaq 2f(%%rip), %%rdx; movq %%rdx, tg_resume_rip(%%rip)\n" \
			 "1: " insn "\n2:" :: "a"(val) : "rdx", "rcx", "r11", "memory")

static u64 uva(const char *sym) { return USER_CODE_VA + (u64)(sym - user_code_start); }
static void user(const char *sym, u64 rax, u64 rbx) { run_user(uva(sym), USER_STACK_TOP, rax, rbx); }

static int observe(const char *name, int ok)
{
	tg_puts("OBSERVE "); tg_puts(name); tg_puts(ok ? " ok\n" : " differs\n");
	return ok;
}

static u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}
static u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" :: "r"(v)); }
static long segbase(u64 which, u64 base) { return HC2(HC_set_segment_base, which, base); }

static int fsgsbase_offered(void)
{
	u32 a = 7, b, c = 0, d;
	__asm__ volatile("ud2; .ascii \"xen\"; cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
	return b & 1;
}

/* A non-canonical base: #GP(0) at the instruction, the base unchanged.
 * The CPU checks this, not Xen; QEMU 7.2's TCG does not (it loads the
 * base), so the faithful lane prints "differs" and the bases are put back. */
static void noncanonical_cases(u64 kgs)
{
	int gp = 1;
	KINSN("wrfsbase %%rax", NONCANON);
	gp &= last.n == 1 && last.vec == 13 && last.err == 0 && last.rip == k_at;
	gp &= rdmsr(MSR_FS_BASE) == USER_FS;
	last.n = 0;
	KINSN("wrgsbase %%rax", 0xfff0000000000000UL);
	gp &= last.n == 1 && last.vec == 13 && last.err == 0 && last.rip == k_at;
	gp &= rdmsr(MSR_GS_BASE) == kgs;
	last.n = 0;
	user(u_wrfs_bad, NONCANON, 0);
	gp &= last.vec == 13 && last.err == 0 && last.rip == uva(u_wrfs_bad);
	gp &= rdmsr(MSR_FS_BASE) == USER_FS;
	user(u_wrgs_bad, 0x8000000000000000UL, 0);
	gp &= last.vec == 13 && last.err == 0 && last.rip == uva(u_wrgs_bad);
	gp &= rdmsr(MSR_SHADOW_GS_BASE) == USER_GS;
	last.n = 0;
	segbase(SEGBASE_FS, USER_FS);
	segbase(SEGBASE_GS_USER, USER_GS);
	segbase(SEGBASE_GS_KERNEL, kgs);
	observe("noncanonical_gp", gp);
}

/* With CR4.FSGSBASE set: both modes read and write the live bases. */
static void enabled_cases(void)
{
	u64 kgs = rdmsr(MSR_GS_BASE), v;

	/* kernel mode */
	KINSN("wrfsbase %%rax", 0x00007f0000001000UL);
	tg_check(last.n == 0, "kernel wrfsbase: no trap", last.vec, 0);
	tg_check(rdmsr(MSR_FS_BASE) == 0x00007f0000001000UL, "kernel wrfsbase: FS base",
		 rdmsr(MSR_FS_BASE), 0x00007f0000001000UL);
	__asm__ volatile("rdfsbase %0" : "=r"(v));
	tg_check(v == 0x00007f0000001000UL, "kernel rdfsbase", v, 0x00007f0000001000UL);
	KINSN("wrgsbase %%rax", 0xffff888000002000UL);
	tg_check(rdmsr(MSR_GS_BASE) == 0xffff888000002000UL, "kernel wrgsbase: the kernel's GS base",
		 rdmsr(MSR_GS_BASE), 0xffff888000002000UL);
	__asm__ volatile("rdgsbase %0" : "=r"(v));
	tg_check(v == 0xffff888000002000UL, "kernel rdgsbase", v, 0xffff888000002000UL);
	KINSN("wrgsbase %%rax", kgs);
	/* user mode writes: the FS base is shared, the GS base is the user's */
	user(u_wrfs, 0, 0);
	expect("user wrfsbase/rdfsbase", 6, NOERR, uva(u_wrfs_ok));
	tg_check(rdmsr(MSR_FS_BASE) == USER_FS, "user wrfsbase: FS base in kernel mode",
		 rdmsr(MSR_FS_BASE), USER_FS);
	user(u_wrgs, 0, 0);
	expect("user wrgsbase/rdgsbase", 6, NOERR, uva(u_wrgs_ok));
	tg_check(rdmsr(MSR_SHADOW_GS_BASE) == USER_GS, "user wrgsbase: the user GS base",
		 rdmsr(MSR_SHADOW_GS_BASE), USER_GS);
	tg_check(rdmsr(MSR_GS_BASE) == kgs, "user wrgsbase: kernel GS base untouched",
		 rdmsr(MSR_GS_BASE), kgs);
	noncanonical_cases(kgs);

	/* user mode reads what the kernel set with set_segment_base */
	tg_check(segbase(SEGBASE_FS, 0x00007e0000003000UL) == 0, "set_segment_base FS", 0, 0);
	tg_check(segbase(SEGBASE_GS_USER, 0x00007e0000004000UL) == 0, "set_segment_base GS_USER", 0, 0);
	user(u_rdfs, 0x00007e0000003000UL, 0);
	expect("user rdfsbase sees set_segment_base(FS)", 6, NOERR, uva(u_rdfs_ok));
	user(u_rdgs, 0, 0x00007e0000004000UL);
	expect("user rdgsbase sees set_segment_base(GS_USER)", 6, NOERR, uva(u_rdgs_ok));
	segbase(SEGBASE_FS, 0);
	segbase(SEGBASE_GS_USER, 0);
}

/* With CR4.FSGSBASE clear: #UD in both modes.  kvm_pvm runs the guest's
 * code (both modes) under the host's CR4, which has FSGSBASE: there the
 * instructions work, so this is an OBSERVE line. */
static int disabled_cases(const char *what)
{
	int ud = 1;
	KINSN("rdfsbase %%rax", 0);
	ud &= last.n == 1 && last.vec == 6 && last.rip == k_at;
	last.n = 0;
	KINSN("wrgsbase %%rax", rdmsr(MSR_GS_BASE));   /* the same base, should it not trap */
	ud &= last.n == 1 && last.vec == 6 && last.rip == k_at;
	last.n = 0;
	user(u_rdfs, 0, 0);
	ud &= last.n == 1 && last.vec == 6 && last.rip == uva(u_rdfs);
	last.n = 0;
	if (!ud)
		tg_puts(what), tg_puts(": not #UD\n");
	observe("fsgsbase_ud", ud);
	return ud;
}

void tg_main(struct start_info *si)
{
	(void)si;
	long rc = tg_user_space_setup(&user_space, user_code_start, user_code_end, kstack + sizeof(kstack));
	static struct trap_info tt[] = {
		{ 3, 3, 0xe030, 0, (u64)tg_trap_3 },
		{ 6, 0, 0xe030, 0, (u64)tg_trap_6 },
		{ 13, 0, 0xe030, 0, (u64)tg_trap_13 },
		{ 14, 0, 0xe030, 0, (u64)tg_trap_14 },
		{ 0, 0, 0, 0, 0 },
	};
	rc = HC1(HC_set_trap_table, tt);
	tg_check(rc == 0, "set_trap_table", rc, 0);
	if (tg_failures)
		return;

	u64 cr4 = read_cr4();
	tg_check(!(cr4 & CR4_FSGSBASE), "CR4.FSGSBASE clear at start", cr4, 0);
	int ud = disabled_cases("CR4.FSGSBASE clear at start");
	int offered = fsgsbase_offered();
	write_cr4(cr4 | CR4_FSGSBASE);
	u64 now = read_cr4() & CR4_FSGSBASE;
	tg_check(now == (offered ? CR4_FSGSBASE : 0), "CR4.FSGSBASE as the CPUID policy allows",
		 now, offered ? CR4_FSGSBASE : 0);
	observe("fsgsbase_offered", offered);
	/* kvm_pvm: not offered, but working all the same; check what they do there too */
	if (offered || !ud)
		enabled_cases();
	write_cr4(read_cr4() & ~CR4_FSGSBASE);
	tg_check(!(read_cr4() & CR4_FSGSBASE), "CR4.FSGSBASE cleared", read_cr4(), 0);
	disabled_cases("CR4.FSGSBASE cleared (or refused)");
}
