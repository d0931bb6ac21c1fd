/* Debug registers as Xen 4.17 gives them to a 64-bit PV guest
 * (pv/misc-hypercalls.c set_debugreg, x86emul_read_dr, traps.c do_debug):
 *   - set_debugreg / get_debugreg: -ENODEV for no such register (and for
 *     DR4/DR5 once CR4.DE is set; before, they alias DR6/DR7), -EPERM for
 *     a breakpoint address in the hypervisor's range (non-canonical ones
 *     included), -EINVAL for the upper halves of DR6/DR7, -EPERM for
 *     DR7.GD and for I/O breakpoints without CR4.DE; reserved bits read as
 *     Xen fixes them; DR6 starts 0xffff0ff0, DR7 0x400;
 *   - `mov %dr4` with CR4.DE: #UD;
 *   - the registers are live: an address set while DR7 is off fires once
 *     DR7 enables it (an instruction breakpoint: #DB at it, RF through
 *     HYPERVISOR_iret resumes), a data breakpoint traps after the write,
 *     TF single-steps; DR6 shows B0-3 / BS and accumulates until written;
 *   - a data breakpoint on memory the hypervisor writes (a multicall's
 *     result) is not the guest's #DB;
 *   - I/O breakpoints (CR4.DE): checked on every in/out the hypervisor
 *     emulates, #DB after the instruction with their B bits in DR6. */
/* kvm_pvm loads no guest breakpoints at CPL3: the guest reports those
 * cases as OBSERVE lines.  In the faithful lane (nested KVM on QEMU 7.2's
 * TCG) a breakpoint does not survive the vCPU's next exit to the VMM, so
 * each one here fires before anything is printed. */
#include "tg.h"
const char tg_name[] = "debugreg";

extern char tg_trap_1[], tg_trap_6[], tg_trap_13[], bp_insn[];
void bp_target(void);
u64 tg_resume_rip;
static struct { u64 n, vec, rip, dr6; } last;
static volatile u32 watched[4] __attribute__((aligned(16)));

static int use_rf;

void tg_trap(u64 vec, u64 *f, int has_err)
{
	u64 *hw = &f[2 + (has_err ? 1 : 0)];
	last.n++;
	last.vec = vec;
	last.rip = hw[0];
	if (vec == 1) {
		last.dr6 = HC1(HC_get_debugreg, 6);   /* as Linux's #DB handler reads it */
		hw[2] &= ~0x100UL;                   /* TF */
		if (use_rf)
			hw[2] |= 0x10000UL;          /* RF: past the instruction breakpoint */
	} else if (tg_resume_rip) {
		hw[0] = tg_resume_rip;
	}
}

static int observe(const char *name, int ok)
{
	tg_puts("OBSERVE "); tg_puts(name); tg_puts(ok ? " ok\n" : " differs\n");
	return ok;
}

static long setdr(long r, u64 v) { return HC2(HC_set_debugreg, r, v); }
static long getdr(long r) { return HC1(HC_get_debugreg, r); }

static void expect_rc(long rc, long want, const char *what) { tg_check(rc == want, what, (u64)rc, (u64)want); }

static u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" :: "r"(v)); }

struct multicall_entry { u64 op, result, args[6]; };

/* I/O breakpoints (CR4.DE set by the caller): Xen checks them on each
 * in/out it emulates -- every one, for a PV guest -- and raises #DB after
 * the instruction, the matching B bits added to DR6. */
static void io_breakpoints(void)
{
	u32 iopl = 1;
	u64 after, r = 0;
	expect_rc(HC2(HC_physdev_op, PHYSDEVOP_set_iopl, &iopl), 0, "set_iopl(1) for kernel-mode I/O");
	expect_rc(setdr(6, 0), 0, "DR6 cleared");
	expect_rc(setdr(0, 0x80), 0, "DR0 = port 0x80");
	expect_rc(setdr(1, 0x60), 0, "DR1 = port 0x60");
	/* L0: I/O, 1 byte; L1: I/O, 4 bytes (0x60-0x63) */
	expect_rc(setdr(7, 0x1 | (2UL << 16) | 0x4 | (2UL << 20) | (3UL << 22)), 0, "DR7: two I/O breakpoints");
	last.n = 0;
	__asm__ volatile("leaq 1f(%%rip), %0; outb %%al, $0x80\n1:" : "=&r"(after) : "a"(0) : "memory");
	tg_check(last.n == 1 && last.vec == 1, "outb 0x80: #DB", last.n, 1);
	tg_check(last.rip == after, "I/O breakpoint: #DB after the instruction", last.rip, after);
	tg_check((last.dr6 & 0xf) == 1, "outb 0x80: DR6.B0", last.dr6, 0xffff0ff1);
	last.n = 0;
	__asm__ volatile("inb $0x81, %%al" : "+a"(r) :: "memory");
	__asm__ volatile("inb $0x64, %%al" : "+a"(r) :: "memory");
	__asm__ volatile("outb %%al, $0x5f" :: "a"(0) : "memory");
	tg_check(last.n == 0, "ports beside the breakpoints: no #DB", last.n, 0);
	__asm__ volatile("leaq 1f(%%rip), %0; inb $0x63, %%al\n1:" : "=&r"(after), "+a"(r) :: "memory");
	tg_check(last.n == 1 && last.rip == after, "inb 0x63, inside DR1's 4 bytes: #DB", last.n, 1);
	tg_check((last.dr6 & 0xf) == 3, "DR6: B1 added to B0 (accumulates until written)", last.dr6, 0xffff0ff3);
	expect_rc(setdr(6, 0), 0, "DR6 cleared");
	last.n = 0;
	__asm__ volatile("inw %%dx, %%ax" : "+a"(r) : "d"(0x5f) : "memory");
	tg_check(last.n == 1, "inw 0x5f overlaps 0x60: #DB", last.n, 1);
	tg_check((last.dr6 & 0xf) == 2, "inw 0x5f overlaps 0x60: DR6.B1", last.dr6, 0xffff0ff2);
	expect_rc(setdr(6, 0), 0, "DR6 cleared");
	last.n = 0;
	static const u8 two[2] = { 1, 2 };
	const u8 *src = two;
	u64 count = 2;
	__asm__ volatile("leaq 1f(%%rip), %0; rep outsb\n1:"
			 : "=&r"(after), "+S"(src), "+c"(count) : "d"(0x80) : "memory");
	tg_check(last.n == 1 && last.rip == after, "rep outsb to 0x80: one #DB after it", last.n, 1);
	tg_check((last.dr6 & 0xf) == 1 && count == 0, "rep outsb: DR6.B0, all done", last.dr6, 0xffff0ff1);
	/* without CR4.DE Xen does not look at them */
	write_cr4(read_cr4() & ~8UL);
	last.n = 0;
	__asm__ volatile("outb %%al, $0x80" :: "a"(0) : "memory");
	tg_check(last.n == 0, "CR4.DE clear: I/O breakpoints ignored", last.n, 0);
	write_cr4(read_cr4() | 8);
	iopl = 0;
	HC2(HC_physdev_op, PHYSDEVOP_set_iopl, &iopl);
	setdr(6, 0);
	setdr(0, 0);
	setdr(1, 0);
}

void tg_main(struct start_info *si)
{
	(void)si;
	static struct trap_info tt[] = {
		{ 1, 0, 0xe030, 0, (u64)tg_trap_1 },
		{ 6, 0, 0xe030, 0, (u64)tg_trap_6 },
		{ 13, 0, 0xe030, 0, (u64)tg_trap_13 },
		{ 0, 0, 0, 0, 0 },
	};
	long rc = HC1(HC_set_trap_table, tt);
	tg_check(rc == 0, "set_trap_table", rc, 0);

	/* initial values and register numbers */
	expect_rc(getdr(6), 0xffff0ff0, "initial DR6");
	expect_rc(getdr(7), 0x400, "initial DR7");
	for (int i = 0; i < 4; i++)
		expect_rc(getdr(i), 0, "initial DR0-3");
	expect_rc(getdr(8), -XEN_ENODEV, "get_debugreg(8)");
	expect_rc(setdr(8, 0), -XEN_ENODEV, "set_debugreg(8)");
	expect_rc(getdr(-1), -XEN_ENODEV, "get_debugreg(-1)");
	expect_rc(setdr(0x100000000L, 0), -XEN_ENODEV, "set_debugreg(1 << 32)");

	/* breakpoint addresses: the hypervisor's range is refused */
	static const u64 refused[] = { 0x800000000000UL, 0x8000000000000000UL, 0xffff800000000000UL,
				       0xffff830000000000UL, 0xffff87ffffffffffUL };
	for (unsigned i = 0; i < sizeof(refused) / sizeof(refused[0]); i++)
		expect_rc(setdr(1, refused[i]), -XEN_EPERM, "DR1 in the hypervisor's range");
	static const u64 taken[] = { 0, 0x7fffffffffffUL, 0xffff880000000000UL, 0xffffffffffffffffUL };
	for (unsigned i = 0; i < sizeof(taken) / sizeof(taken[0]); i++) {
		expect_rc(setdr(2, taken[i]), 0, "DR2 outside the hypervisor's range");
		expect_rc(getdr(2), (long)taken[i], "DR2 read back");
	}
	expect_rc(getdr(1), 0, "a refused DR1 left it alone");

	/* DR6 and DR7: upper halves, reserved and privileged bits */
	expect_rc(setdr(6, 1UL << 32), -XEN_EINVAL, "DR6 upper half");
	expect_rc(setdr(7, 1UL << 40), -XEN_EINVAL, "DR7 upper half");
	expect_rc(setdr(6, 0x500f), 0, "DR6 B0-3, BS and bit 12");
	expect_rc(getdr(6), 0xffff4fff, "DR6: bit 12 reads 0, reserved ones 1");
	expect_rc(setdr(6, 0), 0, "DR6 = 0");
	expect_rc(getdr(6), 0xffff0ff0, "DR6 = 0 reads as its default");
	expect_rc(setdr(7, 0x2000), -XEN_EPERM, "DR7.GD");
	expect_rc(setdr(7, 0xd800), 0, "DR7 reserved bits");
	expect_rc(getdr(7), 0x400, "DR7: bits 11, 12, 14, 15 read 0, bit 10 reads 1");
	expect_rc(setdr(7, 0x20001), -XEN_EPERM, "an enabled I/O breakpoint without CR4.DE");
	expect_rc(setdr(7, 0x20000), 0, "a disabled I/O breakpoint without CR4.DE");
	expect_rc(getdr(7), 0x20400, "the disabled I/O breakpoint reads back");

	/* DR4/DR5: DR6/DR7 until CR4.DE, then no such register */
	expect_rc(setdr(4, 0x1), 0, "DR4 (alias of DR6)");
	expect_rc(getdr(6), 0xffff0ff1, "DR4 wrote DR6");
	expect_rc(getdr(5), 0x20400, "DR5 reads DR7");
	setdr(6, 0);
	setdr(7, 0);
	write_cr4(read_cr4() | 8);
	tg_check(read_cr4() & 8, "CR4.DE set", read_cr4(), 8);
	expect_rc(getdr(4), -XEN_ENODEV, "DR4 with CR4.DE");
	expect_rc(setdr(5, 0), -XEN_ENODEV, "DR5 with CR4.DE");
	last.n = 0;
	__asm__ volatile("leaq 1f(%%rip), %%rax; movq %%rax, tg_resume_rip(%%rip); mov %%dr4, %%rax; 1:"
			 ::: "rax", "memory");
	tg_check(last.n == 1 && last.vec == 6, "mov %dr4 with CR4.DE: #UD", last.vec, 6);
	expect_rc(setdr(7, 0x20001), 0, "an enabled I/O breakpoint with CR4.DE");
	expect_rc(getdr(7), 0x20401, "the I/O breakpoint's enable reads back");
	tg_resume_rip = 0;
	io_breakpoints();
	setdr(7, 0);
	write_cr4(read_cr4() & ~8UL);

	/* an instruction breakpoint set while DR7 is off fires once it is on */
	last.n = 0;
	expect_rc(setdr(0, (u64)bp_insn), 0, "DR0 = bp_insn");
	bp_target();
	tg_check(last.n == 0, "no #DB while DR7 is off", last.n, 0);
	use_rf = 1;
	expect_rc(setdr(7, 0x1), 0, "DR7.L0, execute");
	bp_target();
	use_rf = 0;
	if (observe("instruction_breakpoint", last.n == 1)) {
		tg_check(last.vec == 1, "instruction breakpoint: #DB", last.vec, 1);
		tg_check(last.rip == (u64)bp_insn, "instruction breakpoint: rip at it", last.rip, (u64)bp_insn);
		tg_check((last.dr6 & 0xf) == 1, "instruction breakpoint: DR6.B0", last.dr6, 0xffff0ff1);
	}

	/* a data breakpoint traps after the write; DR6 accumulates (B0 | B1) */
	last.n = 0;
	expect_rc(setdr(1, (u64)&watched[1]), 0, "DR1 = &watched[1]");
	expect_rc(setdr(7, 0x1 | 0x4 | (1UL << 20) | (3UL << 22)), 0, "DR7.L1, write, 4 bytes");
	u64 after;
	__asm__ volatile("leaq 1f(%%rip), %0; movl $5, %1\n1:" : "=&r"(after), "=m"(watched[1]) :: "memory");
	if (observe("data_breakpoint", last.n == 1)) {
		tg_check(last.vec == 1, "data breakpoint: #DB", last.vec, 1);
		tg_check(last.rip == after, "data breakpoint: rip after the write", last.rip, after);
		tg_check((last.dr6 & 0xf) == 3, "DR6 B0 | B1: accumulated until written", last.dr6, 0xffff0ff3);
	}

	/* the hypervisor writing a watched word (a multicall's result) is
	 * not the guest's #DB; the guest's own write is */
	static struct multicall_entry mc __attribute__((aligned(64)));
	u64 sp;
	__asm__ volatile("movq %%rsp, %0" : "=r"(sp));
	mc.op = HC_stack_switch;
	mc.args[0] = 0xe02b;
	mc.args[1] = sp;
	mc.result = 1;
	expect_rc(setdr(6, 0), 0, "DR6 cleared");
	expect_rc(setdr(1, (u64)&mc.result), 0, "DR1 = a multicall's result");
	expect_rc(setdr(7, 0x4 | (1UL << 20) | (2UL << 22)), 0, "DR7.L1, write, 8 bytes");
	last.n = 0;
	rc = HC2(HC_multicall, &mc, 1);
	u64 n_mc = last.n, result = mc.result;
	mc.result = 7;   /* before any console output: see the note at the top */
	tg_check(rc == 0 && result == 0, "multicall under a data breakpoint", rc, 0);
	tg_check(n_mc == 0, "the hypervisor's write is not the guest's #DB", n_mc, 0);
	observe("data_breakpoint_guest_write", last.n == 1);   /* the shim's write was not */
	expect_rc(setdr(7, 0), 0, "DR7 off");
	expect_rc(setdr(6, 0), 0, "DR6 cleared");

	/* single step: BS */
	last.n = 0;
	__asm__ volatile("leaq 2f(%%rip), %0\n\t"
			 "pushfq; orq $0x100, (%%rsp); popfq\n"
			 "nop\n2: nop" : "=&r"(after) :: "memory", "cc");
	tg_check(last.n == 1 && last.vec == 1, "single step: #DB", last.n, 1);
	tg_check(last.rip == after, "single step: after the instruction after popf", last.rip, after);
	tg_check((last.dr6 & 0xffffffff) == 0xffff4ff0, "single step: DR6.BS", last.dr6, 0xffff4ff0);
	setdr(6, 0);
	expect_rc(setdr(0, 0), 0, "DR0 = 0");
}
