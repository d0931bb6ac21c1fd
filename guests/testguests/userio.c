/* Port I/O from guest user mode, as Xen 4.17's guest_io_okay allows it to
 * a 64-bit PV guest (pv/emul-priv-op.c): user mode is virtual ring 3, so
 *   - PHYSDEVOP_set_iopl 3 lets it use every port, 1 and 2 do not (they
 *     are for the kernel's ring 1);
 *   - below that, PHYSDEVOP_set_iobitmap's bitmap decides, read through
 *     the guest *kernel's* page tables (the user ones need not map it):
 *     a port is allowed if port + size <= nr_ports and its bits are clear;
 *   - a refused access is #GP(0) at the instruction, bounced to the guest
 *     kernel with a user-mode frame; an allowed one reads all ones (a domU
 *     owns no ports) or is dropped.
 * (privio.c proves the kernel-mode half.) */
#include "tg_user.h"
const char tg_name[] = "userio";

#define NOERR 0xdeadUL

extern char tg_trap_3[], tg_trap_6[], tg_trap_13[], tg_trap_14[];
extern char user_code_start[], user_code_end[];
extern char u_inb60[], u_inb60_ok[], u_inb64[], u_inb64_at[], u_inb64_ok[];
extern char u_inw5f[], u_inw5f_at[], u_inw5f_ok[], u_inl[], u_inl_at[], u_inl_ok[];
extern char u_outb[], u_outb_ok[];
void run_user(u64 rip, u64 rsp, u64 rax, u64 rbx);
void tg_back_to_kernel(void) __attribute__((noreturn));

u64 tg_resume_rip;
static struct { u64 n, vec, err, rip, cs; } last;
static struct tg_user_space user_space;
static u8 kstack[16384] __attribute__((aligned(16)));
/* the I/O bitmap: kernel memory, not mapped in the user address space */
static u8 iobmp[8192] __attribute__((aligned(4096)));
static struct { u64 bitmap; u32 nr_ports, pad; } iobm_arg;

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
	tg_check(0, "unexpected trap in kernel mode", vec, hw[0]);
	tg_finish();
}

static u64 uva(const char *sym) { return USER_CODE_VA + (u64)(sym - user_code_start); }

/* run a snippet; it must end with #UD at ok (allowed) or #GP(0) at gp_at (refused) */
static void user_io(const char *what, const char *sym, const char *ok, const char *gp_at)
{
	last.n = 0;
	run_user(uva(sym), USER_STACK_TOP, 0, 0);
	u64 want_vec = ok ? 6 : 13, want_rip = uva(ok ? ok : gp_at), want_err = ok ? NOERR : 0;
	tg_check(last.n == 1 && last.vec == want_vec && last.rip == want_rip && last.err == want_err,
		 what, last.vec << 32 | (last.rip & 0xffffffff), want_vec << 32 | (want_rip & 0xffffffff));
	tg_check((last.cs & 3) == 3, what, last.cs, 0xe033);
}

static long set_iopl(u32 level)
{
	u32 v = level;
	return HC2(HC_physdev_op, PHYSDEVOP_set_iopl, &v);
}

static long set_iobitmap(u64 bitmap, u64 nr_ports)
{
	iobm_arg.bitmap = bitmap;
	iobm_arg.nr_ports = (u32)nr_ports;
	return HC2(HC_physdev_op, PHYSDEVOP_set_iobitmap, &iobm_arg);
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

	/* no IOPL, no bitmap: every user access is #GP(0) */
	user_io("user inb, IOPL 0: #GP(0)", u_inb60, 0, u_inb60);
	user_io("user outb, IOPL 0: #GP(0)", u_outb, 0, u_outb);
	/* IOPL 1 and 2 are the kernel's (ring 1): user mode still refused */
	for (u32 level = 1; level <= 2; level++) {
		rc = set_iopl(level);
		tg_check(rc == 0, "PHYSDEVOP_set_iopl(1, 2)", rc, 0);
		user_io("user inb, IOPL 1 or 2: #GP(0)", u_inb60, 0, u_inb60);
	}
	/* IOPL 3: every port, reads all ones, writes dropped */
	rc = set_iopl(3);
	tg_check(rc == 0, "PHYSDEVOP_set_iopl(3)", rc, 0);
	user_io("user inb $0x60, IOPL 3: 0xff", u_inb60, u_inb60_ok, 0);
	user_io("user inb (%dx) 0x64, IOPL 3: 0xff", u_inb64, u_inb64_ok, 0);
	user_io("user inw 0x5f, IOPL 3: 0xffff", u_inw5f, u_inw5f_ok, 0);
	user_io("user inl 0xcf8, IOPL 3: ~0", u_inl, u_inl_ok, 0);
	user_io("user outb 0x80, IOPL 3: dropped", u_outb, u_outb_ok, 0);

	/* IOPL 0 and a bitmap in kernel-only memory: ports 0x60 and 0x80
	 * allowed, nr_ports 0x100 */
	rc = set_iopl(0);
	tg_check(rc == 0, "PHYSDEVOP_set_iopl(0)", rc, 0);
	for (unsigned i = 0; i < sizeof(iobmp); i++)
		iobmp[i] = 0xff;
	iobmp[0x60 >> 3] &= ~1;
	iobmp[0x80 >> 3] &= ~1;
	rc = set_iobitmap((u64)iobmp, 0x100);
	tg_check(rc == 0, "set_iobitmap", rc, 0);
	user_io("user inb 0x60, bit clear: 0xff", u_inb60, u_inb60_ok, 0);
	user_io("user outb 0x80, bit clear: dropped", u_outb, u_outb_ok, 0);
	user_io("user inb 0x64, bit set: #GP(0)", u_inb64, 0, u_inb64_at);
	user_io("user inw 0x5f, 0x5f's bit set: #GP(0)", u_inw5f, 0, u_inw5f_at);
	iobmp[0x5f >> 3] &= ~(1 << (0x5f & 7));
	user_io("user inw 0x5f, both bits clear: 0xffff", u_inw5f, u_inw5f_ok, 0);
	user_io("user inl 0xcf8, beyond nr_ports: #GP(0)", u_inl, 0, u_inl_at);
	/* no bitmap again: refused */
	rc = set_iobitmap(0, 0);
	tg_check(rc == 0, "set_iobitmap(none)", rc, 0);
	user_io("user inb 0x60, no bitmap: #GP(0)", u_inb60, 0, u_inb60);
}
