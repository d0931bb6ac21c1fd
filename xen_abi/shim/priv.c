/* Privileged instructions, CPUID and MSRs of a PV guest (Xen's
 * pv/emul-priv-op.c and pv/emul-inv-op.c, for a domU without I/O or MSR
 * privileges).
 *
 * The guest kernel runs at CPL3, so every privileged instruction it still
 * executes directly raises #GP(0) and lands in emulate_priv():
 *   rdmsr/wrmsr, mov to/from %cr0/%cr2/%cr3/%cr4, mov to/from %drN,
 *   clts, wbinvd/invd, xsetbv, in/out/ins/outs, cli/sti, rdtscp,
 *   iretq to the same privilege.
 * Anything else (or a bad operand) is left to the caller, which bounces
 * #GP to the guest exactly as Xen injects it.
 *
 * Every instruction here runs interpreted on kvm_pvm (~1 us each): the
 * decoder looks at a few bytes and does no table walks it can avoid. */
#include "shim.h"
#include "priv.h"
#include "pit.h"

#define CR0_TS_BIT 0x8UL
#define EFER_SCE   (1UL << 0)
#define EFER_LME   (1UL << 8)
#define EFER_LMA   (1UL << 10)
#define EFER_NXE   (1UL << 11)

/* MSR numbers Linux touches on a PV domU */
#define MSR_IA32_TSC            0x10
#define MSR_IA32_PLATFORM_ID    0x17
#define MSR_IA32_APIC_BASE      0x1b
#define MSR_IA32_FEAT_CTL       0x3a
#define MSR_IA32_UCODE_REV      0x8b
#define MSR_PLATFORM_INFO       0xce
#define MSR_MISC_FEATURES_EN    0x140
#define MSR_IA32_SYSENTER_CS    0x174
#define MSR_IA32_SYSENTER_EIP   0x176
#define MSR_IA32_MCG_CAP        0x179
#define MSR_IA32_MCG_STATUS     0x17a
#define MSR_IA32_MISC_ENABLE    0x1a0
#define MSR_IA32_DEBUGCTL       0x1d9
#define MSR_IA32_CR_PAT         0x277
#define MSR_EFER                0xc0000080
#define MSR_STAR                0xc0000081
#define MSR_LSTAR_NR            0xc0000082
#define MSR_CSTAR_NR            0xc0000083
#define MSR_SYSCALL_MASK        0xc0000084
#define MSR_TSC_AUX             0xc0000103
#define MSR_K7_HWCR             0xc0010015
#define MSR_AMD64_DE_CFG        0xc0011029

/* MISC_ENABLE as Xen's guest_misc_enable() shows it: fast strings, BTS and
 * PEBS unavailable, xTPR disabled; no PERF_AVAIL, no MONITOR_ENABLE. */
#define MISC_ENABLE_PV ((1UL << 0) | (1UL << 11) | (1UL << 12) | (1UL << 23))
#define FEAT_CTL_LOCKED 1UL                 /* locked, VMX off */
#define DE_CFG_LFENCE_SERIALISE (1UL << 1)  /* what Xen reports on AMD */

#define PRIV(pc, off) (*(u64 *)((u8 *)(pc) + PRIV_OFF + (off)))

_Static_assert(sizeof(struct percpu) <= PRIV_OFF, "priv state overlaps struct percpu");
_Static_assert(PRIV_OFF + PRIV_SIZE <= 2 * 4096, "priv state inside the percpu pages");

static inline u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" :: "r"(v) : "memory"); }
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/* ---------------- CPUID ---------------- */

/* The guest policy entry for leaf/subleaf (0 if none: all-zero leaf). */
static const u32 *cpuid_policy(u32 leaf, u32 sub)
{
	const u8 *t = G->cpuid_table;
	for (u64 i = 0; i < G->nr_cpuid; i++, t += CPUID_ENT_SIZE) {
		const u32 *e = (const u32 *)t;
		if (e[0] == leaf && (e[1] == CPUID_ANY_SUBLEAF || e[1] == sub))
			return e;
	}
	return 0;
}

/* Xen's emulate_forced_invalid_op: `ud2; .ascii "xen"; cpuid`. */
int emulate_forced_cpuid(struct percpu *pc, struct frame *f)
{
	static const u8 sig[7] = { 0x0f, 0x0b, 'x', 'e', 'n', 0x0f, 0xa2 };
	u8 b[7];
	if (!pc->kernel_mode || from_guest(b, f->rip, 7))
		return 0;
	for (int i = 0; i < 7; i++)
		if (b[i] != sig[i])
			return 0;
	const u32 *e = cpuid_policy((u32)f->rax, (u32)f->rcx);
	f->rax = e ? e[2] : 0;
	f->rbx = e ? e[3] : 0;
	f->rcx = e ? e[4] : 0;
	f->rdx = e ? e[5] : 0;
	f->rip += 7;
	PRIV(pc, PRIV_CPUIDS)++;
	return 1;
}

static int policy_has(u32 leaf, int reg, int bit)
{
	const u32 *e = cpuid_policy(leaf, 0);
	return e && ((e[2 + reg] >> bit) & 1);
}

/* ---------------- control and debug registers ---------------- */

static u64 guest_cr4(struct percpu *pc)
{
	return (read_cr4() & PV_CR4_GUEST_VISIBLE_MASK) | (PRIV(pc, PRIV_VCR4) & PV_CR4_GUEST_MASK);
}

/* Xen's pv_fixup_guest_cr4 + write: the guest controls TSD, DE, FSGSBASE
 * and OSXSAVE (as far as its CPUID policy allows); the rest is read-only.
 * DE and FSGSBASE also go to the real CR4 (they change what CPL3 code may
 * do); TSD is only remembered (rdtsc stays native); OSXSAVE stays as the
 * VMM set it (Xen runs with it on and leaks it, see cpuid.py). */
static void write_guest_cr4(struct percpu *pc, u64 val)
{
	u64 allowed = CR4_TSD | CR4_DE;
	if (policy_has(7, 1, 0))
		allowed |= CR4_FSGSBASE;
	if (policy_has(1, 2, 26))
		allowed |= CR4_OSXSAVE;
	val &= allowed;
	PRIV(pc, PRIV_VCR4) = val;
	u64 real = read_cr4(), want = (real & ~(CR4_DE | CR4_FSGSBASE)) | (val & (CR4_DE | CR4_FSGSBASE));
	if (want != real)
		write_cr4(want);
}

/* Debug registers, as Xen 4.17's set_debugreg / x86emul_read_dr for a PV
 * vCPU.  The guest's values are loaded into the real registers (KVM keeps
 * them per vCPU), so its breakpoints and DR6 work in both guest modes;
 * the shim's own addresses cannot be breakpoints, and I/O breakpoints
 * (Xen emulates those) are kept but never loaded: the shim's own `out`
 * would hit them. */
#define DR6_DEFAULT    0xffff0ff0UL    /* reads-as-one bits: the value at rest */
#define DR6_KEEP       0xffffefffUL    /* bit 12 and the upper half read as zero */
#define DR7_DEFAULT    0x400UL
#define DR7_KEEP       0xffff27ffUL    /* bits 11, 12, 14, 15 read as zero */
#define DR7_GD         0x2000UL
#define DR7_ACTIVE     0xffUL          /* L0-3, G0-3 */
#define DR7_RW_IO      2UL

static inline void write_dr(int n, u64 v)
{
	switch (n) {
	case 0: __asm__ volatile("mov %0, %%dr0" :: "r"(v)); break;
	case 1: __asm__ volatile("mov %0, %%dr1" :: "r"(v)); break;
	case 2: __asm__ volatile("mov %0, %%dr2" :: "r"(v)); break;
	case 3: __asm__ volatile("mov %0, %%dr3" :: "r"(v)); break;
	case 7: __asm__ volatile("mov %0, %%dr7" :: "r"(v)); break;
	}
}

/* DR4/DR5 alias DR6/DR7 unless CR4.DE; -1 for no such register (Xen:
 * -ENODEV, #UD for the instruction) */
static int dr_index(struct percpu *pc, u64 reg)
{
	if (reg == 4 || reg == 5)
		return (guest_cr4(pc) & CR4_DE) ? -1 : (int)reg + 2;
	return reg <= 7 && reg != 4 && reg != 5 ? (int)reg : -1;
}

long do_set_debugreg(struct percpu *pc, u64 reg, u64 val)
{
	int n = dr_index(pc, reg);
	if (n < 0)
		return -XEN_ENODEV;
	if (n <= 3) {
		/* Xen's access_ok: below the upper half, or above the hypervisor hole */
		if (val >= LOWER_HALF_END && val < HYPERVISOR_VIRT_END)
			return -XEN_EPERM;
		write_dr(n, val);
	} else if (n == 6) {
		if (val >> 32)
			return -XEN_EINVAL;
		val = (val & DR6_KEEP) | DR6_DEFAULT;
	} else {   /* 7 */
		u64 io = 0;
		if (val >> 32)
			return -XEN_EINVAL;
		val = (val & DR7_KEEP) | DR7_DEFAULT;
		if (val & DR7_GD)
			return -XEN_EPERM;
		if (val & DR7_ACTIVE) {
			for (int i = 0; i < 4; i++) {
				if (((val >> (16 + 4 * i)) & 3) != DR7_RW_IO)
					continue;
				if (!(guest_cr4(pc) & CR4_DE))
					return -XEN_EPERM;
				io |= val & (3UL << (2 * i));
			}
		}
		PRIV(pc, PRIV_DR7_EMUL) = io;
		val &= ~io;
		write_dr(7, val);
	}
	PRIV(pc, PRIV_DR + n * 8) = val;
	return 0;
}

long do_get_debugreg(struct percpu *pc, u64 reg)
{
	int n = dr_index(pc, reg);
	if (n < 0)
		return -XEN_ENODEV;
	u64 v = PRIV(pc, PRIV_DR + n * 8);
	if (n == 6)
		v |= DR6_DEFAULT;        /* the block starts zeroed: Xen's initial DR6 */
	if (n == 7)
		v |= DR7_DEFAULT | PRIV(pc, PRIV_DR7_EMUL);
	return (long)v;
}

u64 priv_take_dr6(void)
{
	u64 v;
	__asm__ volatile("mov %%dr6, %0" : "=r"(v));
	__asm__ volatile("mov %0, %%dr6" :: "r"(DR6_DEFAULT));
	return v;
}

/* Xen 4.17's do_debug: the bits the CPU set accumulate in the guest's DR6
 * until the guest writes it (4.20 replaces B0-3 instead); the inverted
 * ones (bit 16) clear. */
void priv_merge_dr6(struct percpu *pc, u64 dr6)
{
	u64 v = PRIV(pc, PRIV_DR + 6 * 8) | DR6_DEFAULT;
	v |= dr6 & ~DR6_DEFAULT;
	v &= dr6 | ~DR6_DEFAULT;
	PRIV(pc, PRIV_DR + 6 * 8) = v & DR6_KEEP & 0xffffffffUL;
}

/* PHYSDEVOP_set_iopl / set_iobitmap once Python has validated them (the
 * guest may have changed the argument since: checked again) */
void priv_physdev_op(struct percpu *pc, u64 cmd, u64 arg_va)
{
	u64 a[2];   /* set_iopl: u32 iopl; set_iobitmap: u64 bitmap, u32 nr_ports */
	if ((u32)cmd == PHYSDEVOP_set_iopl) {
		if (!from_guest(a, arg_va, 4) && (u32)a[0] <= 3)
			PRIV(pc, PRIV_IOPL) = (u32)a[0];
	} else if ((u32)cmd == PHYSDEVOP_set_iobitmap) {
		if (!from_guest(a, arg_va, 12) && (u32)a[1] <= 65536) {
			PRIV(pc, PRIV_IOBMP) = a[0];
			PRIV(pc, PRIV_IOBMP_LIMIT) = (u32)a[1];
		}
	}
}

/* ---------------- MSRs ---------------- */

static int read_msr(struct percpu *pc, u32 msr, u64 *v)
{
	switch (msr) {
	case MSR_FS_BASE: case MSR_GS_BASE: case MSR_KERNEL_GS_BASE:
		*v = rdmsr(msr);
		return 1;
	case MSR_TSC_AUX:
		*v = PRIV(pc, PRIV_TSC_AUX);
		return 1;
	case MSR_IA32_TSC:
		*v = rdtsc();
		return 1;
	case MSR_EFER:
		*v = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
		return 1;
	case MSR_IA32_CR_PAT:       /* the PAT really in force (Xen: its own) */
		*v = rdmsr(MSR_IA32_CR_PAT);
		return 1;
	case MSR_IA32_MISC_ENABLE:
		*v = MISC_ENABLE_PV;
		return 1;
	case MSR_IA32_FEAT_CTL:
		*v = FEAT_CTL_LOCKED;
		return 1;
	case MSR_AMD64_DE_CFG:
		*v = DE_CFG_LFENCE_SERIALISE;
		return 1;
	case MSR_IA32_PLATFORM_ID: case MSR_IA32_UCODE_REV: case MSR_PLATFORM_INFO:
	case MSR_MISC_FEATURES_EN: case MSR_IA32_MCG_CAP: case MSR_IA32_MCG_STATUS:
	case MSR_IA32_DEBUGCTL: case MSR_K7_HWCR:
	case MSR_STAR: case MSR_LSTAR_NR: case MSR_CSTAR_NR: case MSR_SYSCALL_MASK:
	case MSR_IA32_SYSENTER_CS: case MSR_IA32_SYSENTER_CS + 1: case MSR_IA32_SYSENTER_EIP:
		*v = 0;
		return 1;
	}
	return 0;
}

static int write_msr(struct percpu *pc, u32 msr, u64 v)
{
	switch (msr) {
	case MSR_FS_BASE: case MSR_GS_BASE: case MSR_KERNEL_GS_BASE:
		if (!canonical(v))
			return 0;
		wrmsr(msr, v);
		return 1;
	case MSR_TSC_AUX:           /* rdtscp/rdpid in the guest read it natively */
		if (v >> 32)
			return 0;
		PRIV(pc, PRIV_TSC_AUX) = v;
		wrmsr(MSR_TSC_AUX, v);
		return 1;
	case MSR_EFER:              /* no bit may change */
		return v == (EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE);
	case MSR_IA32_UCODE_REV: case MSR_MISC_FEATURES_EN: case MSR_IA32_DEBUGCTL:
		return v == 0;       /* Xen accepts the no-op write only */
	case MSR_IA32_CR_PAT: case MSR_IA32_MISC_ENABLE: case MSR_AMD64_DE_CFG:
	case MSR_STAR: case MSR_LSTAR_NR: case MSR_CSTAR_NR: case MSR_SYSCALL_MASK:
	case MSR_IA32_SYSENTER_CS: case MSR_IA32_SYSENTER_CS + 1: case MSR_IA32_SYSENTER_EIP:
		return 1;            /* silently dropped, as Xen does for a domU */
	}
	return 0;
}

/* ---------------- the decoder ---------------- */

static u64 *gpr(struct frame *f, int idx)
{
	static const u8 off[16] = { 14, 12, 11, 13, 255, 8, 10, 9, 7, 6, 5, 4, 3, 2, 1, 0 };
	return idx == 4 ? &f->rsp : &((u64 *)f)[off[idx]];
}

/* Xen's guest_io_okay: the virtual IOPL (iopl_ok: kernel mode is virtual
 * ring 1, user mode ring 3), else the guest's I/O bitmap (set_iobitmap)
 * for ports below its limit, read through the kernel's page tables; a
 * byte that cannot be read counts as all ones (no access). */
static int io_ok(struct percpu *pc, u16 port, int size)
{
	u8 b[2];
	int user = !pc->kernel_mode;
	if (PRIV(pc, PRIV_IOPL) >= (pc->kernel_mode ? 1 : 3))
		return 1;
	if ((u64)port + size > PRIV(pc, PRIV_IOBMP_LIMIT))
		return 0;
	if (user)
		write_cr3(pc->cr3_kernel);
	for (int k = 0; k < 2; k++)
		if (from_guest(&b[k], PRIV(pc, PRIV_IOBMP) + (port >> 3) + k, 1))
			b[k] = 0xff;
	if (user)
		write_cr3(pc->cr3_user);
	return ((b[0] | (u32)b[1] << 8) & (((1u << size) - 1) << (port & 7))) == 0;
}

/* A domU owns no I/O ports: reads return all ones, writes are dropped --
 * but for the PIT's channel 2, which Xen emulates for every PV guest.  As
 * Xen does, a wider access is taken byte by byte. */
static void io_read(struct frame *f, u16 port, int size)
{
	u64 v = 0;
	for (int k = 0; k < size; k++) {
		u16 p = (u16)(port + k);
		v |= (u64)(pit_port(p) ? pit_read(p) : 0xff) << (8 * k);
	}
	if (size == 4)
		f->rax = v;                     /* 32-bit result zero-extends */
	else
		f->rax = (f->rax & ~((1UL << (8 * size)) - 1)) | v;
}

static void io_write(u16 port, int size, u64 value)
{
	for (int k = 0; k < size; k++) {
		u16 p = (u16)(port + k);
		if (pit_port(p))
			pit_write(p, (u8)(value >> (8 * k)));
	}
}

static int emulate_string_io(struct percpu *pc, struct frame *f, u8 op, int size, int rep, int len)
{
	u64 n = rep ? f->rcx : 1;
	long step = (f->rflags & RFLAGS_DF) ? -size : size;
	u64 ones = ~0UL;
	for (u64 i = 0; i < n; i++) {
		if (op == 0x6c || op == 0x6d) {   /* ins: store all-ones at rdi */
			if (to_guest(f->rdi, &ones, size))
				return 0;
			f->rdi += step;
		} else {
			f->rsi += step;
		}
		if (rep)
			f->rcx--;
	}
	(void)pc;
	f->rip += len;
	return 1;
}

/* Xen's check_guest_io_breakpoint: with CR4.DE, the enabled I/O
 * breakpoints (kept in dr7_emul, never loaded) whose [DRi, DRi + len)
 * overlaps [port, port + size): their DR6 B bits. */
static u64 io_breakpoints(struct percpu *pc, u16 port, int size)
{
	static const u8 len_bytes[4] = { 1, 2, 8, 4 };   /* DR7 LEN 00, 01, 10, 11 */
	u64 enabled = PRIV(pc, PRIV_DR7_EMUL), match = 0;
	if (!enabled || !(guest_cr4(pc) & CR4_DE))
		return 0;
	u64 dr7 = PRIV(pc, PRIV_DR + 7 * 8);
	for (int i = 0; i < 4; i++) {
		if (!(enabled >> (2 * i) & 3))
			continue;
		u64 start = PRIV(pc, PRIV_DR + i * 8), width = len_bytes[(dr7 >> (18 + 4 * i)) & 3];
		if (start < (u64)port + size && start + width > port)
			match |= 1UL << i;
	}
	return match;
}

/* An emulated in/out (or ins/outs) done: EMUL_DONE, or EMUL_DONE_DEBUG
 * with DR6 updated when it hit an I/O breakpoint (Xen: dr6 |= bpmatch,
 * then #DB as a trap, after the instruction). */
static int io_done(struct percpu *pc, u16 port, int size)
{
	u64 hit = io_breakpoints(pc, port, size);
	if (!hit)
		return EMUL_DONE;
	PRIV(pc, PRIV_DR + 6 * 8) = (PRIV(pc, PRIV_DR + 6 * 8) | hit) & DR6_KEEP & 0xffffffffUL;
	return EMUL_DONE_DEBUG;
}

static int decode(struct percpu *pc, struct frame *f)
{
	u8 b[16] = { 0 };
	int i = 0, opsize = 4, rep = 0, rex = 0;
	if (from_guest(b, f->rip, sizeof(b)) && from_guest(b, f->rip, 4))
		return 0;
	/* prefixes: operand size, rep, segment overrides, one REX */
	for (; i < 4; i++) {
		if (b[i] == 0x66)
			opsize = 2;
		else if (b[i] == 0xf3 || b[i] == 0xf2)
			rep = 1;
		else if (b[i] == 0x2e || b[i] == 0x3e || b[i] == 0x26 || b[i] == 0x36 || b[i] == 0x64 || b[i] == 0x65)
			;
		else
			break;
	}
	if ((b[i] & 0xf0) == 0x40) {
		rex = b[i];
		i++;
	}
	u8 op = b[i];

	/* port I/O: allowed by the virtual IOPL only */
	if (op == 0xe4 || op == 0xe5 || op == 0xe6 || op == 0xe7 || (op >= 0xec && op <= 0xef)
	    || (op >= 0x6c && op <= 0x6f)) {
		int size = (op & 1) ? opsize : 1;
		u16 port = (op >= 0xe4 && op <= 0xe7) ? b[i + 1] : (u16)f->rdx;
		if (!io_ok(pc, port, size))
			return 0;
		if (op >= 0x6c && op <= 0x6f) {
			if (!emulate_string_io(pc, f, op, size, rep, i + 1))
				return 0;
			return io_done(pc, port, size);
		}
		if (op == 0xe4 || op == 0xe5 || op == 0xec || op == 0xed)
			io_read(f, port, size);
		else
			io_write(port, size, f->rax);
		f->rip += i + (op <= 0xe7 ? 2 : 1);   /* e4-e7 carry an imm8 port */
		return io_done(pc, port, size);
	}
	if (op == 0xfa || op == 0xfb) {   /* cli/sti: IF is the upcall mask */
		if (!pc->kernel_mode)
			return 0;
		f->rip += i + 1;
		return 1;
	}
	/* iretq to the same privilege (sync_core's iret_to_self) */
	if (op == 0xcf && (rex & 8)) {
		u64 c[5];   /* rip cs rflags rsp ss */
		if (from_guest(c, f->rsp, sizeof(c)) || (c[1] & 3) != 3 || (c[4] & 3) != 3 || !canonical(c[0]))
			return 0;
		f->rip = c[0];
		f->cs = c[1] & 0xffff;
		f->rflags = (c[2] & RFLAGS_GUEST_MASK) | RFLAGS_IF | RFLAGS_FIXED;
		f->rsp = c[3];
		f->ss = c[4] & 0xffff;
		return 1;
	}
	if (!pc->kernel_mode || op != 0x0f)
		return 0;
	u8 op2 = b[i + 1], modrm = b[i + 2];
	int len = i + 2;   /* bytes up to and including op2 */

	switch (op2) {
	case 0x30: case 0x32: {   /* wrmsr, rdmsr */
		u32 msr = (u32)f->rcx;
		u64 v = (f->rdx << 32) | (u32)f->rax;
		int ok = op2 == 0x30 ? write_msr(pc, msr, v) : read_msr(pc, msr, &v);
		if (!ok) {
			PRIV(pc, PRIV_MSR_UNKNOWN)++;
			PRIV(pc, PRIV_LAST_MSR) = msr | (op2 == 0x30 ? 1UL << 32 : 0);
			return 0;         /* Xen: #GP for MSRs a domU may not touch */
		}
		if (op2 == 0x32) {
			f->rax = (u32)v;
			f->rdx = v >> 32;
		}
		f->rip += len;
		return 1;
	}
	case 0x06:   /* clts */
		pc->vcr0_ts = 0;
		write_cr0(read_cr0() & ~CR0_TS_BIT);
		f->rip += len;
		return 1;
	case 0x08: case 0x09:   /* invd, wbinvd: no cache-flush rights, ignored */
		f->rip += len;
		return 1;
	case 0x01:
		if (modrm == 0xd1) {   /* xsetbv */
			u64 v = (f->rdx << 32) | (u32)f->rax;
			const u32 *e = cpuid_policy(0xd, 0);
			u64 ok = e ? ((u64)e[5] << 32) | e[2] : 1;
			if ((u32)f->rcx != 0 || !(v & 1) || (v & ~ok) || ((v & 4) && !(v & 2))
			    || !(read_cr4() & CR4_OSXSAVE))
				return 0;
			/* The VMM sets XCR0 (KVM_SET_XCRS) rather than an `xsetbv`
			 * here: KVM learns of a guest xsetbv through its intercept,
			 * which QEMU/TCG's nested SVM (the faithful lane) lacks, so
			 * the value was lost at the next exit (XRSTOR of Linux's
			 * signal frames then #GPs).  Once per boot. */
			struct mailbox *mb = pc->mailbox;
			mb->op = MBOP_SET_XCR0;
			mb->args[0] = v;
			mb->result = 1;
			exit_to_python();
			if (mb->result)
				return 0;
			PRIV(pc, PRIV_XCR0) = v;
			f->rip += len + 1;
			return 1;
		}
		if (modrm == 0xf9) {   /* rdtscp: TSC_AUX from the guest's value */
			u64 t = rdtsc();
			f->rax = (u32)t;
			f->rdx = t >> 32;
			f->rcx = PRIV(pc, PRIV_TSC_AUX);
			f->rip += len + 1;
			return 1;
		}
		return 0;
	case 0x20: case 0x22: {   /* mov %crN, r64 / mov r64, %crN */
		if ((modrm & 0xc0) != 0xc0)
			return 0;
		int cr = ((modrm >> 3) & 7) | ((rex & 4) << 1);
		u64 *r = gpr(f, (modrm & 7) | ((rex & 1) << 3));
		if (op2 == 0x20) {
			switch (cr) {
			case 0: *r = (read_cr0() & ~CR0_TS_BIT) | (pc->vcr0_ts ? CR0_TS_BIT : 0); break;
			case 2: *r = *(u64 *)(pc->vcpu_info + VI_CR2); break;
			case 3: *r = pc->cr3_kernel; break;
			case 4: *r = guest_cr4(pc); break;
			default: return 0;
			}
		} else {
			switch (cr) {
			case 0:   /* only TS may change (Xen: fpu_taskswitch) */
				if ((*r ^ read_cr0()) & ~CR0_TS_BIT)
					return 0;
				pc->vcr0_ts = (*r & CR0_TS_BIT) != 0;
				write_cr0((read_cr0() & ~CR0_TS_BIT) | (*r & CR0_TS_BIT));
				break;
			case 2:
				*(u64 *)(pc->vcpu_info + VI_CR2) = *r;
				break;
			case 4:
				write_guest_cr4(pc, *r);
				break;
			default:
				return 0;    /* cr3 goes through mmuext_op, cr8 does not exist */
			}
		}
		f->rip += len + 1;
		return 1;
	}
	case 0x21: case 0x23: {   /* mov %drN, r64 / mov r64, %drN */
		if ((modrm & 0xc0) != 0xc0)
			return 0;
		int dr = ((modrm >> 3) & 7) | ((rex & 4) << 1);
		u64 *r = gpr(f, (modrm & 7) | ((rex & 1) << 3));
		if (op2 == 0x21) {
			if (dr_index(pc, dr) < 0)
				return EMUL_RAISE_UD;
			*r = (u64)do_get_debugreg(pc, dr);
		} else {
			long rc = do_set_debugreg(pc, dr, *r);
			if (rc)   /* Xen: -ENODEV is #UD, -EINVAL and -EPERM #GP */
				return rc == -XEN_ENODEV ? EMUL_RAISE_UD : 0;
		}
		f->rip += len + 1;
		return 1;
	}
	}
	return 0;
}

int emulate_priv(struct percpu *pc, struct frame *f)
{
	int done = decode(pc, f);
	if (done == EMUL_DONE || done == EMUL_DONE_DEBUG)
		PRIV(pc, PRIV_EMULATED)++;
	return done;
}
