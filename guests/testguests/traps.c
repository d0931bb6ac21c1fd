/* Step 3: trap bounce.  Registers a trap table, triggers #UD/#GP/#PF/int3
 * from guest-kernel mode, checks Xen's bounce frame ({rcx, r11, [err], rip,
 * cs|mask<<32, rflags, rsp, ss}, CS 0xe030, CR2 in vcpu_info, mask
 * save/restore), the forced-emulation CPUID, and times fast and slow
 * hypercalls with rdtsc. */
#include "tg.h"
const char tg_name[] = "traps";

extern char tg_trap_3[], tg_trap_6[], tg_trap_13[], tg_trap_14[];
void tg_iret_to_self(void);

u64 tg_expect_rip, tg_resume_rip, tg_expect_rsp;
struct rec { u64 n, rip, cs, rflags, rsp, ss, err, rcx, r11, mask_in_handler; } recs[32];
static volatile struct vcpu_info *vi;
static u8 shinfo_page[4096] __attribute__((aligned(4096)));

void tg_trap(u64 vec, u64 *f, int has_err)
{
	struct rec *r = &recs[vec & 31];
	int i = 2;
	r->n++;
	r->rcx = f[0];
	r->r11 = f[1];
	r->err = has_err ? f[i++] : 0;
	u64 *hw = &f[i];
	r->rip = hw[0]; r->cs = hw[1]; r->rflags = hw[2]; r->rsp = hw[3]; r->ss = hw[4];
	r->mask_in_handler = vi ? vi->upcall_mask : 0xff;
	if (tg_resume_rip)
		hw[0] = tg_resume_rip;
}

#define TRIGGER(insn)                                                          \
	__asm__ volatile("leaq 1f(%%rip), %%rax; movq %%rax, tg_expect_rip(%%rip);" \
			 "leaq 2f(%%rip), %%rax; movq %%rax, tg_resume_rip(%%rip);"  \
			 "movq %%rsp, tg_expect_rsp(%%rip);"                         \
			 "movq $0x1111, %%rcx; movq $0x2222, %%r11;"                 \
			 "1: " insn "; 2:" ::: "rax", "rcx", "r11", "memory")

/* Load 0x1000 + i into the i-th of rax rbx rbp rdi rsi rdx r10 r8 r9 r12
 * r13 r14 r15 rcx r11, run `what` ("int3", or "hc": stack_switch through
 * `syscall`), and store the registers into out[] in that order.  After
 * "hc", rcx and r11 are reloaded: `syscall` itself takes them. */
static void tg_regs_across(const char *what, u64 *out)
{
	int hc = what[0] == 'h';
	u64 sp;
	__asm__ volatile("movq %%rsp, %0" : "=r"(sp));
	__asm__ volatile(
		"pushq %%rbx; pushq %%rbp; pushq %%r12; pushq %%r13; pushq %%r14; pushq %%r15\n"
		"pushq %[out]; pushq %[sp]\n"
		"testl %[hc], %[hc]\n"       /* the flags survive the moves below */
		"movq $0x1000, %%rax; movq $0x1001, %%rbx; movq $0x1002, %%rbp\n"
		"movq $0x1003, %%rdi; movq $0x1004, %%rsi; movq $0x1005, %%rdx\n"
		"movq $0x1006, %%r10; movq $0x1007, %%r8; movq $0x1008, %%r9\n"
		"movq $0x1009, %%r12; movq $0x100a, %%r13; movq $0x100b, %%r14\n"
		"movq $0x100c, %%r15; movq $0x100d, %%rcx; movq $0x100e, %%r11\n"
		"jnz 1f\n"
		"int3\n"
		"jmp 2f\n"
		"1: movq $0xe02b, %%rdi; movq (%%rsp), %%rsi; movq %[nr], %%rax; syscall\n"
		"movq $0x100d, %%rcx; movq $0x100e, %%r11\n"
		"2: xchgq %%rax, 8(%%rsp)\n"   /* out -> rax, the guest rax kept on the stack */
		"movq %%rbx, 8(%%rax); movq %%rbp, 16(%%rax); movq %%rdi, 24(%%rax)\n"
		"movq %%rsi, 32(%%rax); movq %%rdx, 40(%%rax); movq %%r10, 48(%%rax)\n"
		"movq %%r8, 56(%%rax); movq %%r9, 64(%%rax); movq %%r12, 72(%%rax)\n"
		"movq %%r13, 80(%%rax); movq %%r14, 88(%%rax); movq %%r15, 96(%%rax)\n"
		"movq %%rcx, 104(%%rax); movq %%r11, 112(%%rax)\n"
		"movq 8(%%rsp), %%rbx; movq %%rbx, (%%rax)\n"
		"addq $16, %%rsp\n"
		"popq %%r15; popq %%r14; popq %%r13; popq %%r12; popq %%rbp; popq %%rbx\n"
		:
		: [out] "r"(out), [sp] "r"(sp), [hc] "r"(hc), [nr] "i"(HC_stack_switch)
		: "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory", "cc");
}

static void check_frame(u64 vec, const char *what, u64 mask)
{
	struct rec *r = &recs[vec];
	tg_check(r->n == 1, what, r->n, 1);
	tg_check(r->rip == (vec == 3 ? tg_resume_rip : tg_expect_rip), "frame rip", r->rip, tg_expect_rip);
	tg_check((r->cs & 0xffff) == 0xe030, "frame cs (kernel mode => RPL 0)", r->cs & 0xffff, 0xe030);
	tg_check((r->cs >> 32) == mask, "saved upcall mask in cs[39:32]", r->cs >> 32, mask);
	tg_check(((r->rflags >> 9) & 1) == !mask, "frame rflags.IF = !mask", r->rflags, !mask);
	tg_check(r->rsp == tg_expect_rsp, "frame rsp", r->rsp, tg_expect_rsp);
	tg_check(r->ss == 0xe02b, "frame ss", r->ss, 0xe02b);
	tg_check(r->rcx == 0x1111 && r->r11 == 0x2222, "frame rcx/r11", r->rcx, 0x1111);
}

static void cpuid_fep(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("ud2; .ascii \"xen\"; cpuid"
			 : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "0"(leaf), "2"(0));
}

void tg_main(struct start_info *si)
{
	long rc = HC3(HC_update_va_mapping, shinfo_page, si->shared_info | PTE_P | PTE_RW | PTE_A | PTE_D, UVMF_INVLPG);
	tg_check(rc == 0, "update_va_mapping(shared_info)", rc, 0);
	vi = (volatile struct vcpu_info *)shinfo_page;
	tg_check(vi->upcall_mask == 1, "events start masked", vi->upcall_mask, 1);

	static struct trap_info tt[] = {
		{ 3, 3, 0xe030, 0, (u64)tg_trap_3 },
		{ 6, 0, 0xe030, 0, (u64)tg_trap_6 },
		{ 13, 0, 0xe030, 0, (u64)tg_trap_13 },
		{ 14, 4, 0xe030, 0, (u64)tg_trap_14 },   /* "interrupt gate": masks events */
		{ 0, 0, 0, 0, 0 },
	};
	rc = HC1(HC_set_trap_table, tt);
	tg_check(rc == 0, "set_trap_table", rc, 0);

	TRIGGER("ud2");
	check_frame(6, "#UD delivered once", 1);

	TRIGGER("hlt");
	check_frame(13, "#GP delivered once", 1);
	tg_check(recs[13].err == 0, "#GP error code", recs[13].err, 0);

	TRIGGER("movq 0x12345678, %%rax");
	check_frame(14, "#PF delivered once", 1);
	tg_check(recs[14].err == 0, "#PF error code (read, not present, kernel)", recs[14].err, 0);
	tg_check(vi->cr2 == 0x12345678, "CR2 in vcpu_info", vi->cr2, 0x12345678);

	/* with events unmasked: frame shows mask 0 / IF 1, the handler runs
	 * masked (interrupt-gate entry), iret restores mask 0 */
	recs[14].n = 0;
	vi->upcall_mask = 0;
	TRIGGER("movq 0x2468a000, %%rax");
	u8 mask_after = vi->upcall_mask;
	vi->upcall_mask = 1;
	check_frame(14, "#PF (unmasked) delivered once", 0);
	tg_check(recs[14].mask_in_handler == 1, "interrupt-gate trap masks events", recs[14].mask_in_handler, 1);
	tg_check(mask_after == 0, "iret restored mask from IF", mask_after, 0);
	tg_check(vi->cr2 == 0x2468a000, "CR2 updated", vi->cr2, 0x2468a000);

	TRIGGER("int3");
	check_frame(3, "int3 delivered once", 1);

	/* a trap and HYPERVISOR_iret give back every register (only rcx and
	 * r11 go through the frame); a hypercall keeps r9 and the callee-saved
	 * ones (Xen may clobber only its parameter registers) */
	static u64 regs_out[15];
	tg_resume_rip = 0;
	tg_regs_across("int3", regs_out);
	for (int i = 0; i < 15; i++)
		tg_check(regs_out[i] == 0x1000 + i, "register kept across int3 + HYPERVISOR_iret",
			 regs_out[i], 0x1000 + i);
	tg_regs_across("hc", regs_out);
	for (int i = 0; i < 15; i++)
		if (!(i >= 3 && i <= 7))   /* rdi rsi rdx r10 r8: a hypercall's parameters */
			tg_check(regs_out[i] == (i == 0 ? 0 : 0x1000 + i),
				 "register kept across a hypercall (rax: its result)", regs_out[i], 0x1000 + i);

	u32 a, b, c, d;
	cpuid_fep(0x40000000, &a, &b, &c, &d);
	tg_check(b == 0x566e6558 && c == 0x65584d4d && d == 0x4d4d566e, "FEP cpuid signature XenVMMXenVMM", b, 0x566e6558);
	tg_check(a >= 0x40000002, "FEP cpuid max hypervisor leaf", a, 0x40000002);

	/* timings (cycles) */
	enum { N_FAST = 2000, N_SLOW = 200 };
	u64 sp;
	__asm__ volatile("movq %%rsp, %0" : "=r"(sp));
	u64 t0 = rdtsc();
	for (int i = 0; i < N_FAST; i++)
		HC2(HC_stack_switch, 0xe02b, sp);
	u64 t1 = rdtsc();
	for (int i = 0; i < N_FAST; i++)
		tg_iret_to_self();
	u64 t2 = rdtsc();
	for (int i = 0; i < N_SLOW; i++)
		HC2(HC_xen_version, 16, 0);   /* XENVER_pagesize: Python (version 0 is fast in the shim) */
	u64 t3 = rdtsc();
	tg_resume_rip = 0;
	for (int i = 0; i < N_SLOW; i++)
		__asm__ volatile("int3" ::: "memory");
	u64 t4 = rdtsc();
	tg_puts("PERF stack_switch_cycles="); tg_dec((t1 - t0) / N_FAST);
	tg_puts(" iret_cycles="); tg_dec((t2 - t1) / N_FAST);
	tg_puts(" slow_xen_version_cycles="); tg_dec((t3 - t2) / N_SLOW);
	tg_puts(" int3_bounce_iret_cycles="); tg_dec((t4 - t3) / N_SLOW);
	tg_puts("\n");
}
