/* Port I/O and same-privilege iretq from guest kernel mode (the latter
 * tens of thousands of times at boot: sync_core's iret_to_self while
 * patching alternatives).  The shim answers the byte forms in entry.S's
 * #GP fast path and the rest in priv.c; both must give Xen's answers (for
 * ports other than the emulated PIT, see pit.c):
 *   - a domU owns no ports: `in` reads all ones (upper register bits kept
 *     for 8/16-bit reads, zero-extended for 32-bit), `out` is dropped;
 *   - only with the virtual IOPL (PHYSDEVOP_set_iopl >= 1 for the kernel),
 *     or for ports PHYSDEVOP_set_iobitmap's bitmap allows, else #GP is
 *     bounced to the guest;
 *   - iretq to the same privilege returns where the frame says, with its
 *     flags; an iretq frame with a ring-0 CS is the guest's own #GP.
 * cli/sti from kernel mode are no-ops, as Xen leaves them.
 * Timings (cycles) of the fast and the C path are printed for the test. */
#include "tg.h"
const char tg_name[] = "privio";

extern char tg_trap_13[];
u64 tg_resume_rip;
static u64 gp_count, gp_rip, gp_err;

void tg_trap(u64 vec, u64 *f, int has_err)
{
	u64 *hw = &f[2 + (has_err ? 1 : 0)];
	if (vec == 13) {
		gp_count++;
		gp_rip = hw[0];
		gp_err = has_err ? f[2] : 0;
	}
	if (tg_resume_rip)
		hw[0] = tg_resume_rip;
}

static long set_iopl(u32 level)
{
	u32 v = level;
	return HC2(HC_physdev_op, PHYSDEVOP_set_iopl, &v);
}

static u64 inb_imm(u64 r) { __asm__ volatile("inb $0x60, %%al" : "+a"(r)); return r; }
static u64 inb_dx(u64 r) { __asm__ volatile("inb %%dx, %%al" : "+a"(r) : "d"(0x64)); return r; }
static u64 inw_dx(u64 r) { __asm__ volatile("inw %%dx, %%ax" : "+a"(r) : "d"(0x64)); return r; }
static u64 inl_dx(u64 r) { __asm__ volatile("inl %%dx, %%eax" : "+a"(r) : "d"(0xcf8)); return r; }

/* sync_core's iret_to_self with chosen flags; returns the flags after it
 * and checks that rsp came back */
static u64 iretq_self(u64 flags, u64 *rsp_delta)
{
	u64 after, before, now;
	__asm__ volatile("movq %%rsp, %[before]\n\t"
			 "movq %%rsp, %%rax\n\t"
			 "pushq $0xe02b\n\t"
			 "pushq %%rax\n\t"
			 "pushq %[fl]\n\t"
			 "pushq $0xe033\n\t"
			 "leaq 1f(%%rip), %%rax\n\t"
			 "pushq %%rax\n\t"
			 "iretq\n"
			 "1:\tpushfq\n\t"
			 "popq %[after]\n\t"
			 "movq %%rsp, %[now]"
			 : [after] "=r"(after), [before] "=&r"(before), [now] "=r"(now)
			 : [fl] "r"(flags) : "rax", "memory", "cc");
	*rsp_delta = now - before;
	return after;
}

#define EXPECT_GP(label, insn, ...)                                              \
	do {                                                                     \
		u64 n0 = gp_count;                                               \
		__asm__ volatile("leaq 2f(%%rip), %%rcx; movq %%rcx, tg_resume_rip(%%rip)\n\t" \
				 "1: " insn "\n2:" __VA_ARGS__);                 \
		tg_resume_rip = 0;                                               \
		tg_check(gp_count == n0 + 1, label, gp_count - n0, 1);           \
	} while (0)

/* PHYSDEVOP_set_iobitmap as Xen's physdev.c checks it and guest_io_okay
 * uses it (IOPL 0 here): a port is allowed if it lies below nr_ports and
 * its bits in the guest's bitmap are clear; bytes of the bitmap that
 * cannot be read count as all ones. */
static u8 iobmp[8192 + 4096] __attribute__((aligned(4096)));
static struct { u64 bitmap; u32 nr_ports, pad; } iobm_arg;

static long set_iobitmap(u64 bitmap, u64 nr_ports)
{
	iobm_arg.bitmap = bitmap;
	iobm_arg.nr_ports = (u32)nr_ports;
	return HC2(HC_physdev_op, PHYSDEVOP_set_iobitmap, &iobm_arg);
}

static void iobitmap_checks(void)
{
	long rc;
	/* Xen's answers */
	rc = HC2(HC_physdev_op, PHYSDEVOP_set_iobitmap, 0x1000);
	tg_check(rc == -XEN_EFAULT, "set_iobitmap: unreadable argument -EFAULT", rc, -XEN_EFAULT);
	rc = HC2(HC_physdev_op, PHYSDEVOP_set_iobitmap, 0x8000000000000000UL);
	tg_check(rc == -XEN_EFAULT, "set_iobitmap: non-canonical argument -EFAULT", rc, -XEN_EFAULT);
	rc = set_iobitmap(0x0000800000000000UL, 16);
	tg_check(rc == -XEN_EINVAL, "set_iobitmap: non-canonical bitmap -EINVAL", rc, -XEN_EINVAL);
	rc = set_iobitmap(HYPERVISOR_VIRT_START, 16);
	tg_check(rc == -XEN_EINVAL, "set_iobitmap: bitmap in the hypervisor's range -EINVAL", rc, -XEN_EINVAL);
	rc = set_iobitmap((u64)iobmp, 65537);
	tg_check(rc == -XEN_EINVAL, "set_iobitmap: 65537 ports -EINVAL", rc, -XEN_EINVAL);
	rc = set_iobitmap(0x00007ffffffff000UL, 65536);
	tg_check(rc == 0, "set_iobitmap: unmapped lower-half bitmap accepted", rc, 0);
	u64 r = 0;
	EXPECT_GP("unmapped bitmap: #GP", "inb %%dx, %%al", : "+a"(r) : "d"(0x60) : "rcx", "memory");

	/* ports 0x60 and 0x70-0x73 allowed; nr_ports 0x80 */
	for (unsigned i = 0; i < sizeof(iobmp); i++)
		iobmp[i] = 0xff;
	iobmp[0x60 >> 3] &= ~1;
	iobmp[0x70 >> 3] &= ~0xf;
	rc = set_iobitmap((u64)iobmp, 0x80);
	tg_check(rc == 0, "set_iobitmap", rc, 0);
	u64 gp0 = gp_count;
	r = 0x1100;
	__asm__ volatile("inb $0x60, %%al" : "+a"(r));
	tg_check(r == 0x11ff && gp_count == gp0, "bitmap allows inb 0x60", r, 0x11ff);
	r = 0;
	__asm__ volatile("inl %%dx, %%eax" : "+a"(r) : "d"(0x70));
	tg_check(r == 0xffffffffUL && gp_count == gp0, "bitmap allows inl 0x70", r, 0xffffffffUL);
	__asm__ volatile("outw %%ax, %%dx" :: "a"(0), "d"(0x72));
	tg_check(gp_count == gp0, "bitmap allows outw 0x72", gp_count - gp0, 0);
	EXPECT_GP("bitmap: inb 0x61 refused", "inb $0x61, %%al", : "+a"(r) :: "rcx", "memory");
	EXPECT_GP("bitmap: inw 0x60 refused (0x61 set)", "inw %%dx, %%ax", : "+a"(r) : "d"(0x60) : "rcx", "memory");
	EXPECT_GP("bitmap: inl 0x71 refused (0x74 set)", "inl %%dx, %%eax", : "+a"(r) : "d"(0x71) : "rcx", "memory");
	EXPECT_GP("bitmap: outb 0x64 refused", "outb %%al, %%dx", :: "a"(0), "d"(0x64) : "rcx", "memory");
	/* nr_ports: ports + size beyond it are refused whatever the bitmap */
	iobmp[0x80 >> 3] = 0;
	EXPECT_GP("bitmap: port 0x80 beyond nr_ports", "outb %%al, $0x80", :: "a"(0) : "rcx", "memory");
	rc = set_iobitmap((u64)iobmp, 0x81);
	tg_check(rc == 0, "set_iobitmap 0x81 ports", rc, 0);
	gp0 = gp_count;
	__asm__ volatile("outb %%al, $0x80" :: "a"(0));
	tg_check(gp_count == gp0, "bitmap allows port 0x80 below nr_ports", gp_count - gp0, 0);
	EXPECT_GP("bitmap: outw 0x80 crosses nr_ports", "outw %%ax, %%dx", :: "a"(0), "d"(0x80) : "rcx", "memory");
	/* a bitmap whose second byte is on an unmapped page: read as all ones */
	u64 third = (u64)(iobmp + 8192);
	u8 *edge = iobmp + 8191 - (0x78 >> 3);   /* the byte of ports 0x78..0x7f: the page's last */
	edge[0x78 >> 3] = 0;
	rc = HC3(HC_update_va_mapping, third, 0, UVMF_INVLPG);
	tg_check(rc == 0, "unmap the page after the bitmap", rc, 0);
	rc = set_iobitmap((u64)edge, 0x100);
	tg_check(rc == 0, "set_iobitmap at a page end", rc, 0);
	gp0 = gp_count;
	__asm__ volatile("inb $0x7f, %%al" : "+a"(r));
	tg_check(gp_count == gp0, "bitmap byte before an unmapped page allows 0x7f", gp_count - gp0, 0);
	EXPECT_GP("bitmap: inw 0x7f reads the unmapped byte as ones", "inw %%dx, %%ax", : "+a"(r) : "d"(0x7f) : "rcx", "memory");
	rc = HC3(HC_update_va_mapping, third, (va_to_pfn((void *)third) << 12) | PTE_P | PTE_RW | PTE_A | PTE_D,
		 UVMF_INVLPG);
	tg_check(rc == 0, "map it again", rc, 0);
	/* no bitmap again */
	rc = set_iobitmap(0, 0);
	tg_check(rc == 0, "set_iobitmap(NULL, 0)", rc, 0);
	EXPECT_GP("no bitmap: inb 0x60 refused", "inb $0x60, %%al", : "+a"(r) :: "rcx", "memory");
}

void tg_main(struct start_info *si)
{
	(void)si;
	static struct trap_info tt[] = {
		{ 13, 0, 0xe030, 0, (u64)tg_trap_13 },
		{ 0, 0, 0, 0, 0 },
	};
	long rc = HC1(HC_set_trap_table, tt);
	tg_check(rc == 0, "set_trap_table", rc, 0);

	/* no virtual IOPL yet: port I/O is the guest's #GP */
	u64 r = 0x1234567812345678UL;
	EXPECT_GP("inb without IOPL: #GP", "inb $0x60, %%al", : "+a"(r) :: "rcx", "memory");
	tg_check(r == 0x1234567812345678UL, "inb without IOPL leaves rax", r, 0x1234567812345678UL);

	/* Xen's answers: iopl above 3 -EINVAL (and nothing granted), an
	 * unreadable argument -EFAULT */
	rc = set_iopl(4);
	tg_check(rc == -XEN_EINVAL, "PHYSDEVOP_set_iopl(4): -EINVAL", rc, -XEN_EINVAL);
	rc = set_iopl(0xffffffffu);
	tg_check(rc == -XEN_EINVAL, "PHYSDEVOP_set_iopl(~0): -EINVAL", rc, -XEN_EINVAL);
	rc = HC2(HC_physdev_op, PHYSDEVOP_set_iopl, 0x1000);
	tg_check(rc == -XEN_EFAULT, "PHYSDEVOP_set_iopl, unreadable: -EFAULT", rc, -XEN_EFAULT);
	rc = HC2(HC_physdev_op, PHYSDEVOP_set_iopl, HYPERVISOR_VIRT_START);
	tg_check(rc == -XEN_EFAULT, "PHYSDEVOP_set_iopl, hypervisor's range: -EFAULT", rc, -XEN_EFAULT);
	r = 0;
	EXPECT_GP("inb after a refused set_iopl: #GP", "inb $0x60, %%al", : "+a"(r) :: "rcx", "memory");
	/* 2 and 3 grant kernel mode (ring 1) as 1 does */
	for (u32 level = 3; level >= 1; level--) {
		rc = set_iopl(level);
		tg_check(rc == 0, "PHYSDEVOP_set_iopl(1..3)", rc, level);
		u64 g = gp_count;
		__asm__ volatile("inb %%dx, %%al" : "+a"(r) : "d"(0x64));
		tg_check(gp_count == g, "IOPL 1..3 grants kernel-mode I/O", level, 0);
	}

	rc = set_iopl(1);
	tg_check(rc == 0, "PHYSDEVOP_set_iopl(1)", rc, 0);
	u64 gp0 = gp_count;
	r = inb_imm(0x1111222233334400UL);
	tg_check(r == 0x11112222333344ffUL, "inb $imm: al = 0xff, rest kept", r, 0x11112222333344ffUL);
	r = inb_dx(0xaaaabbbbccccdd00UL);
	tg_check(r == 0xaaaabbbbccccddffUL, "inb (%dx): al = 0xff", r, 0xaaaabbbbccccddffUL);
	r = inw_dx(0x5555666677770000UL);
	tg_check(r == 0x555566667777ffffUL, "inw (%dx): ax = 0xffff", r, 0x555566667777ffffUL);
	r = inl_dx(0x9999888800000000UL);
	tg_check(r == 0xffffffffUL, "inl (%dx): eax = ~0, zero-extended", r, 0xffffffffUL);
	__asm__ volatile("outb %%al, $0x80" :: "a"(0x12));
	__asm__ volatile("outb %%al, %%dx" :: "a"(0x34), "d"(0x64));
	__asm__ volatile("outw %%ax, %%dx" :: "a"(0x5678), "d"(0x64));
	tg_check(gp_count == gp0, "granted port I/O raises no guest #GP", gp_count - gp0, 0);

	/* cli and sti with the IOPL granted: no-ops, as under Xen (the event
	 * mask is the guest's own business); the plain forms take entry.S's
	 * fast path, a prefixed one priv.c */
	__asm__ volatile("cli; sti; cli; sti" ::: "memory");
	__asm__ volatile(".byte 0x3e; cli; .byte 0x3e; sti" ::: "memory");
	tg_check(gp_count == gp0, "granted cli/sti raise no guest #GP", gp_count - gp0, 0);

	/* iretq to the same privilege: flags from the frame (CF, ZF), rsp back */
	u64 delta = 1;
	u64 fl = iretq_self(0x202 | 0x1 | 0x40, &delta);
	tg_check((fl & 0x41) == 0x41, "iretq: CF and ZF from the frame", fl, 0x243);
	tg_check(delta == 0, "iretq: rsp from the frame", delta, 0);
	fl = iretq_self(0x202, &delta);
	tg_check((fl & 0x41) == 0, "iretq: CF and ZF clear from the frame", fl, 0x202);
	tg_check(gp_count == gp0, "same-privilege iretq raises no guest #GP", gp_count - gp0, 0);

	/* an iretq frame with a ring-0 CS: the guest's own #GP (resumed past
	 * it, dropping the frame it left, inside the same asm) */
	u64 n0 = gp_count;
	__asm__ volatile("leaq 2f(%%rip), %%rcx; movq %%rcx, tg_resume_rip(%%rip)\n\t"
			 "movq %%rsp, %%rax; pushq $0xe02b; pushq %%rax; pushfq; pushq $0xe030\n\t"
			 "leaq 3f(%%rip), %%rax; pushq %%rax; iretq\n"
			 "3:\tud2\n"
			 "2:\taddq $40, %%rsp" ::: "rax", "rcx", "memory");
	tg_resume_rip = 0;
	tg_check(gp_count == n0 + 1, "iretq to RPL 0 CS: #GP", gp_count - n0, 1);

	/* back to IOPL 0: #GP again */
	rc = set_iopl(0);
	tg_check(rc == 0, "PHYSDEVOP_set_iopl(0)", rc, 0);
	r = 0;
	EXPECT_GP("inb after IOPL 0: #GP", "inb %%dx, %%al", : "+a"(r) : "d"(0x64) : "rcx", "memory");
	tg_check(r == 0, "inb after IOPL 0 leaves rax", r, 0);
	u64 gp_iopl0 = gp_count;
	__asm__ volatile("cli; sti" ::: "memory");   /* priv.c: still no-ops in kernel mode */
	tg_check(gp_count == gp_iopl0, "cli/sti after IOPL 0: no guest #GP", gp_count - gp_iopl0, 0);

	iobitmap_checks();
	set_iopl(1);

	/* timings: fast paths (inb, iretq) against the C path (inw) */
	enum { N_FAST = 2000, N_C = 200 };
	u64 t0 = rdtsc();
	for (int i = 0; i < N_FAST; i++)
		inb_imm(0);
	u64 t1 = rdtsc();
	for (int i = 0; i < N_FAST; i++)
		iretq_self(0x202, &delta);
	u64 t2 = rdtsc();
	for (int i = 0; i < N_C; i++)
		inw_dx(0);
	u64 t3 = rdtsc();
	tg_puts("PERF fast_inb_cycles="); tg_dec((t1 - t0) / N_FAST);
	tg_puts(" iretq_self_cycles="); tg_dec((t2 - t1) / N_FAST);
	tg_puts(" c_path_inw_cycles="); tg_dec((t3 - t2) / N_C);
	tg_puts("\n");
}
