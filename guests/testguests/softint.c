/* Software interrupts and exception frames from both guest modes, as Xen
 * delivers them to a 64-bit PV guest (x86/traps.c do_general_protection,
 * pv/emul-priv-op.c pv_emulate_sw_interrupt, x86_64/entry.S entry_int80,
 * do_device_not_available):
 *   - `int $n` reaches the guest's handler when its trap-table DPL allows
 *     the mode (kernel mode is virtual ring 1, user mode ring 3), resuming
 *     after the whole instruction (prefixes included); otherwise #GP with
 *     error code (n << 3) | 2 at the instruction;
 *   - int3, `int $3` and `int $4` are #BP / #OF traps whatever the guest's
 *     DPL; `int $0x80` is taken whenever a handler is registered (Xen's
 *     int80 fast path) and is #GP(0x402) when none is;
 *   - #UD, #GP (error codes 0 and a selector's), #PF (error code with the
 *     U bit of the guest mode, CR2 in vcpu_info), #NM (virtual CR0.TS
 *     cleared), #DB from TF: rip of the faulting or of the
 *     next instruction, CS 0xe030 / 0xe033, the interrupted rsp and ss;
 *   - a trap table with a non-canonical handler: -EINVAL (entries before
 *     it kept). */
#include "tg_user.h"
const char tg_name[] = "softint";

#define NOERR 0xdeadUL
#define UNMAPPED 0x10000000UL

extern char tg_trap_1[], tg_trap_3[], tg_trap_4[], tg_trap_6[], tg_trap_7[], tg_trap_13[], tg_trap_14[];
extern char tg_trap_0x21[], tg_trap_0x22[], tg_trap_0x24[], tg_trap_0x80[];
extern char user_code_start[], user_code_end[];
extern char u_int21[], u_int24[], u_int3[], u_int_3[], u_int4[], u_int80[], u_pf_read[], u_pf_write[];
extern char u_ud[], u_gp[], u_nm[], u_tf[], u_tf_nop[], u_sel[], u_sel_mov[], u_int24_pfx[];
void run_user(u64 rip, u64 rsp, u64 rax, u64 rbx);
void tg_back_to_kernel(void) __attribute__((noreturn));

u64 tg_resume_rip, k_at, k_after;
static struct { u64 n, vec, err, rip, cs, rflags, rsp, ss; } last;
static volatile struct vcpu_info *vi;
static u8 shinfo_page[4096] __attribute__((aligned(4096)));
static struct tg_user_space user_space;
static u8 kstack[16384] __attribute__((aligned(16)));

void tg_trap(u64 vec, u64 *f, int has_err)
{
	u64 *hw = &f[2 + (has_err ? 1 : 0)];
	last.n++;
	last.vec = vec;
	last.err = has_err ? f[2] : NOERR;
	last.rip = hw[0]; last.cs = hw[1]; last.rflags = hw[2]; last.rsp = hw[3]; last.ss = hw[4];
	if ((hw[1] & 3) == 3)
		tg_back_to_kernel();   /* from user mode: back to the case that ran it */
	hw[0] = tg_resume_rip;
	hw[2] &= ~0x100UL;         /* TF */
}

static void expect(const char *what, u64 vec, u64 err, u64 rip, int user)
{
	tg_check(last.n == 1, what, last.n, 1);
	tg_check(last.vec == vec, what, last.vec, vec);
	tg_check(last.err == err, what, last.err, err);
	tg_check(last.rip == rip, what, last.rip, rip);
	tg_check((last.cs & 0xffff) == (user ? 0xe033 : 0xe030), what, last.cs, user ? 0xe033 : 0xe030);
	tg_check(last.ss == 0xe02b, what, last.ss, 0xe02b);
	if (user)
		tg_check(last.rsp == USER_STACK_TOP, what, last.rsp, USER_STACK_TOP);
	last.n = 0;
}

/* run `insn` in kernel mode: k_at is its address, k_after the next one's */
#define KTRAP(insn)                                                             \
	__asm__ volatile("leaq 1f(%%rip), %%rax; movq %%rax, k_at(%%rip)\n\t"      \
			 "leaq 2f(%%rip), %%rax; movq %%rax, k_after(%%rip)\n\t"   \
			 "leaq 3f(%%rip), %%rax; movq %%rax, tg_resume_rip(%%rip)\n" \
			 "1: " insn "\n2: nop\n3:" ::: "rax", "rcx", "r11", "memory")

static u64 uva(const char *sym) { return USER_CODE_VA + (u64)(sym - user_code_start); }
static void user(const char *sym) { run_user(uva(sym), USER_STACK_TOP, 0, 0); }

/* A behaviour kvm_pvm does not give (README "Two test lanes"): printed
 * as "OBSERVE <name> ok|differs" for the test to judge by lane. */
static int observe(const char *name, int ok)
{
	tg_puts("OBSERVE "); tg_puts(name); tg_puts(ok ? " ok\n" : " differs\n");
	return ok;
}

static u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }

static void kernel_cases(int with_int80)
{
	KTRAP("int $0x21");
	expect("kernel int $0x21 (vDPL 1): delivered after it", 0x21, NOERR, k_after, 0);
	KTRAP("int $0x22");
	expect("kernel int $0x22 (vDPL 0): #GP((0x22<<3)|2) at it", 13, 0x112, k_at, 0);
	KTRAP(".byte 0x66, 0x2e, 0x40; int $0x21");
	expect("kernel prefixed int $0x21: after all of it", 0x21, NOERR, k_after, 0);
	KTRAP("int3");
	expect("kernel int3: #BP after it", 3, NOERR, k_after, 0);
	KTRAP(".byte 0xcd, 0x03");   /* int $3 (gas would write int3) */
	expect("kernel int $3 (vDPL 0 ignored): #BP after it", 3, NOERR, k_after, 0);
	KTRAP("int $4");
	expect("kernel int $4 (vDPL 0 ignored): #OF after it", 4, NOERR, k_after, 0);
	KTRAP("int $0x80");
	if (with_int80)
		expect("kernel int $0x80 (vDPL 0, handler): delivered", 0x80, NOERR, k_after, 0);
	else
		expect("kernel int $0x80 without handler: #GP(0x402) at it", 13, 0x402, k_at, 0);
	if (!with_int80)
		return;
	KTRAP("ud2");
	expect("kernel #UD", 6, NOERR, k_at, 0);
	KTRAP("hlt");
	expect("kernel #GP(0)", 13, 0, k_at, 0);
	KTRAP("movq 0x10000000, %%rax");
	expect("kernel #PF read: error code 0", 14, 0, k_at, 0);
	tg_check(vi->cr2 == UNMAPPED, "kernel #PF: cr2 in vcpu_info", vi->cr2, UNMAPPED);
	KTRAP("movq %%rax, 0x10000000");
	expect("kernel #PF write: error code W", 14, 2, k_at, 0);
	HC1(HC_fpu_taskswitch, 1);
	KTRAP("fnop");
	if (observe("kernel_nm", last.n == 1)) {
		expect("kernel #NM with CR0.TS", 7, NOERR, k_at, 0);
		tg_check(!(read_cr0() & 8), "#NM cleared the virtual CR0.TS", read_cr0(), 0);
		KTRAP("fnop");
		tg_check(last.n == 0, "no #NM once TS is clear", last.n, 0);
	}
	HC1(HC_fpu_taskswitch, 0);
	last.n = 0;
	__asm__ volatile("leaq 2f(%%rip), %%rax; movq %%rax, k_after(%%rip)\n\t"
			 "leaq 3f(%%rip), %%rax; movq %%rax, tg_resume_rip(%%rip)\n\t"
			 "pushfq; orq $0x100, (%%rsp); popfq\n"
			 "1: nop\n2: nop\n3:" ::: "rax", "memory", "cc");
	expect("kernel TF: #DB after the instruction after popf", 1, NOERR, k_after, 0);
}

static void selector_gp_case(void)
{
	__asm__ volatile("leaq 1f(%%rip), %%rax; movq %%rax, k_at(%%rip)\n\t"
			 "leaq 3f(%%rip), %%rax; movq %%rax, tg_resume_rip(%%rip)\n\t"
			 "movw $0x0f, %%ax\n"
			 "1: movw %%ax, %%fs\n3:" ::: "rax", "memory");
	expect("kernel #GP(0x0c): LDT selector without an LDT", 13, 0x0c, k_at, 0);
}

static void user_cases(int with_int80)
{
	user(u_int21);
	expect("user int $0x21 (vDPL 1): #GP((0x21<<3)|2) at it", 13, 0x10a, uva(u_int21), 1);
	user(u_int24);
	expect("user int $0x24 (vDPL 3): delivered after it", 0x24, NOERR, uva(u_int24) + 2, 1);
	user(u_int24_pfx);
	expect("user prefixed int $0x24: after all of it", 0x24, NOERR, uva(u_int24_pfx) + 4, 1);
	user(u_int3);
	expect("user int3: #BP after it", 3, NOERR, uva(u_int3) + 1, 1);
	user(u_int_3);
	expect("user int $3: #BP after it", 3, NOERR, uva(u_int_3) + 2, 1);
	user(u_int4);
	expect("user int $4: #OF after it", 4, NOERR, uva(u_int4) + 2, 1);
	user(u_int80);
	if (with_int80)
		expect("user int $0x80 (vDPL 0, handler): delivered", 0x80, NOERR, uva(u_int80) + 2, 1);
	else
		expect("user int $0x80 without handler: #GP(0x402) at it", 13, 0x402, uva(u_int80), 1);
	if (!with_int80)
		return;
	user(u_pf_read);
	expect("user #PF read: error code U", 14, 4, uva(u_pf_read), 1);
	tg_check(vi->cr2 == UNMAPPED, "user #PF: cr2 in vcpu_info", vi->cr2, UNMAPPED);
	user(u_pf_write);
	expect("user #PF write: error code U|W", 14, 6, uva(u_pf_write), 1);
	user(u_ud);
	expect("user #UD", 6, NOERR, uva(u_ud), 1);
	user(u_gp);
	expect("user #GP(0)", 13, 0, uva(u_gp), 1);
	user(u_sel);
	expect("user #GP(0x0c): LDT selector without an LDT", 13, 0x0c, uva(u_sel_mov), 1);
	HC1(HC_fpu_taskswitch, 1);
	user(u_nm);
	if (observe("user_nm", last.vec == 7)) {
		expect("user #NM with CR0.TS", 7, NOERR, uva(u_nm), 1);
		tg_check(!(read_cr0() & 8), "user #NM cleared the virtual CR0.TS", read_cr0(), 0);
	}
	HC1(HC_fpu_taskswitch, 0);
	last.n = 0;
	user(u_tf);
	expect("user TF: #DB after the instruction after popf", 1, NOERR, uva(u_tf_nop) + 1, 1);
}

void tg_main(struct start_info *si)
{
	long rc = HC3(HC_update_va_mapping, shinfo_page, si->shared_info | PTE_P | PTE_RW | PTE_A | PTE_D, UVMF_INVLPG);
	tg_check(rc == 0, "update_va_mapping(shared_info)", rc, 0);
	vi = (volatile struct vcpu_info *)shinfo_page;

	/* the user address space: code and stack pages at USER_CODE_VA */
	rc = tg_user_space_setup(&user_space, user_code_start, user_code_end, kstack + sizeof(kstack));

	/* a non-canonical handler: -EINVAL, the entries before it kept */
	static struct trap_info bad[] = {
		{ 0x25, 1, 0xe030, 0, (u64)tg_trap_0x22 },
		{ 0x26, 1, 0xe030, 0, 0x8000000000001000UL },
		{ 0, 0, 0, 0, 0 },
	};
	rc = HC1(HC_set_trap_table, bad);
	tg_check(rc == -XEN_EINVAL, "set_trap_table: non-canonical handler", rc, -XEN_EINVAL);
	static struct trap_info tt[] = {
		{ 1, 0, 0xe030, 0, (u64)tg_trap_1 },
		{ 3, 0, 0xe030, 0, (u64)tg_trap_3 },     /* DPL 0: Xen ignores it for #BP */
		{ 4, 0, 0xe030, 0, (u64)tg_trap_4 },
		{ 6, 0, 0xe030, 0, (u64)tg_trap_6 },
		{ 7, 0, 0xe030, 0, (u64)tg_trap_7 },
		{ 13, 0, 0xe030, 0, (u64)tg_trap_13 },
		{ 14, 0, 0xe030, 0, (u64)tg_trap_14 },
		{ 0x21, 1, 0xe030, 0, (u64)tg_trap_0x21 },
		{ 0x22, 0, 0xe030, 0, (u64)tg_trap_0x22 },
		{ 0x24, 3, 0xe030, 0, (u64)tg_trap_0x24 },
		{ 0x80, 0, 0xe030, 0, (u64)tg_trap_0x80 },
		{ 0, 0, 0, 0, 0 },
	};
	rc = HC1(HC_set_trap_table, tt);
	tg_check(rc == 0, "set_trap_table", rc, 0);
	KTRAP("int $0x25");
	expect("the entry before the bad one was kept", 0x22, NOERR, k_after, 0);
	if (tg_failures)
		return;

	kernel_cases(1);
	selector_gp_case();
	user_cases(1);

	/* a fresh table without 0x80: int $0x80 is the guest's #GP */
	rc = HC1(HC_set_trap_table, 0);
	tg_check(rc == 0, "set_trap_table(NULL)", rc, 0);
	tt[10].vector = 0x21;   /* 0x80's slot: a repeat of 0x21 */
	tt[10].address = (u64)tg_trap_0x21;
	tt[10].flags = 1;
	rc = HC1(HC_set_trap_table, tt);
	tg_check(rc == 0, "set_trap_table without 0x80", rc, 0);
	kernel_cases(0);
	user_cases(0);
}
