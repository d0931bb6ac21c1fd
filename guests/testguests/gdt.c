/* Descriptor tables (ABI §5.9): set_gdt with a frame holding code/data and
 * TLS-like segments (Xen's check_descriptor: DPL raised to 3, call gates
 * forced to DPL 0 with the old DPL in the target RPL, system descriptors
 * refused), segment loads into %ds/%fs from the guest kernel (the FS base
 * comes from the descriptor), update_descriptor (TLS), bad descriptors and
 * arguments rejected without disturbing the live GDT. */
#include "mmutest.h"
const char tg_name[] = "gdt";

#define NTIME 8
#define SEL(i) (((i) << 3) | 3)
/* descriptor: base 31:0, limit 19:0, access byte, flags nibble (G D/B L AVL) */
#define DESC(base, limit, access, flags)                                                 \
	(((u64)(limit) & 0xffff) | (((u64)(base) & 0xffffff) << 16) | ((u64)(access) << 40) | \
	 ((((u64)(limit) >> 16) & 0xf) << 48) | ((u64)(flags) << 52) | (((u64)(base) >> 24) << 56))
#define ACC_DATA_DPL3 0xf3     /* present, DPL 3, data RW accessed */
#define ACC_DATA_DPL0 0x93
#define ACC_CODE64_DPL0 0x9b
#define ACC_TSS 0x89
#define ACC_CALLGATE_DPL3 0xec
#define TLS_BASE 0x12345000u
#define TLS_LIMIT 0x00fff

static u64 gdtp[512] __attribute__((aligned(4096)));
static u64 badp[512] __attribute__((aligned(4096)));
static u64 ldtp[512] __attribute__((aligned(4096)));
#define LDT_BASE 0x23456000u
#define LDT_SEL(i) (((i) << 3) | 4 | 3)

static u64 rdmsr(u32 msr)   /* emulated by the shim */
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

extern char tg_trap_13[];
u64 tg_expect_rip, tg_resume_rip, tg_expect_rsp;
static volatile struct faults_seen gp;
void tg_trap(u64 vec, u64 *f, int has_err)
{
	take_expected_fault(&gp, 13, vec, f, has_err);
}

/* load %fs with sel; the FS base it produced, or ~0 if the load faulted */
static u64 fs_base_of(u16 sel)
{
	u64 n = gp.count;
	EXPECT_FAULT("mov %0, %%fs", :: "r"(sel) : "rax", "memory");
	u64 b = gp.count != n ? ~0UL : rdmsr(0xc0000100);
	__asm__ volatile("mov %0, %%fs" :: "r"((u16)0));
	return b;
}

static long set_gdt(u64 *frame, u64 entries)
{
	u64 mfn = va_to_pfn(frame);
	return HC2(HC_set_gdt, &mfn, entries);
}

static long update_desc(u64 *slot, u64 d)
{
	u64 ma = (va_to_pfn(slot) << 12) | ((u64)slot & 0xfff);
	return HC2(HC_update_descriptor, ma, d);
}

void tg_main(struct start_info *si)
{
	(void)si;
	static struct trap_info tt[] = { { 13, 0, 0xe030, 0, (u64)tg_trap_13 }, { 0, 0, 0, 0, 0 } };
	long rc = HC1(HC_set_trap_table, tt);
	tg_check(rc == 0, "set_trap_table", rc, 0);
	gdtp[1] = DESC(0, 0xfffff, ACC_CODE64_DPL0, 0xa);     /* like __KERNEL_CS */
	gdtp[2] = DESC(0, 0xfffff, ACC_DATA_DPL0, 0xc);       /* like __KERNEL_DS */
	gdtp[3] = DESC(TLS_BASE, TLS_LIMIT, ACC_DATA_DPL3, 0x4); /* TLS-like */
	gdtp[4] = DESC(0, 0xfffff, ACC_DATA_DPL3, 0xc);       /* like __USER_DS */
	/* 64-bit call gate to the flat kernel CS, DPL 3 (two slots) */
	gdtp[6] = 0x1000 | ((u64)0xe033 << 16) | ((u64)ACC_CALLGATE_DPL3 << 40) | (0x8000UL << 48);
	gdtp[7] = 0xffffffff;
	rc = uvm((u64)gdtp, (va_to_pfn(gdtp) << 12) | PTE_P | PTE_A, UVMF_INVLPG);
	tg_check(rc == 0, "map the GDT frame read-only", rc, 0);

	rc = set_gdt(gdtp, 16);
	tg_check(rc == 0, "set_gdt", rc, 0);
	tg_check(((gdtp[2] >> 45) & 3) == 3, "DPL 0 data segment raised to DPL 3", gdtp[2], 3);
	tg_check(((gdtp[1] >> 45) & 3) == 3, "DPL 0 code segment raised to DPL 3", gdtp[1], 3);
	tg_check(((gdtp[6] >> 45) & 3) == 0, "call gate forced to DPL 0", gdtp[6], 0);
	tg_check(((gdtp[6] >> 16) & 0xffff) == 0xe033, "call gate keeps its DPL in the target RPL",
		 (gdtp[6] >> 16) & 0xffff, 0xe033);

	/* segment loads through the new GDT */
	u16 s3 = SEL(3), s2 = SEL(2), s0 = 0;
	__asm__ volatile("mov %0, %%ds" :: "r"(s2));
	__asm__ volatile("mov %0, %%fs" :: "r"(s3));
	u64 fsbase = rdmsr(0xc0000100);
	tg_check(fsbase == TLS_BASE, "FS base from the TLS descriptor", fsbase, TLS_BASE);
	__asm__ volatile("mov %0, %%ds; mov %0, %%fs" :: "r"(s0));
	tg_check(fs_base_of(SEL(4)) == 0, "DPL-fixed data segment loads", 0, 0);

	/* update_descriptor: the live GDT and the guest frame change */
	rc = update_desc(&gdtp[3], DESC(TLS_BASE + 0x1000, 0x2fff, ACC_DATA_DPL3, 0x4));
	tg_check(rc == 0, "update_descriptor", rc, 0);
	fsbase = fs_base_of(s3);
	tg_check(fsbase == TLS_BASE + 0x1000, "FS base after update_descriptor", fsbase, TLS_BASE + 0x1000);
	tg_check(((gdtp[3] >> 16) & 0xffffff) == ((TLS_BASE + 0x1000) & 0xffffff), "guest frame updated", gdtp[3], 0);
	rc = update_desc(&gdtp[5], DESC(0, 0xfffff, ACC_DATA_DPL0, 0xc));
	tg_check(rc == 0 && ((gdtp[5] >> 45) & 3) == 3, "update_descriptor raises DPL", gdtp[5], 3);
	tg_check(fs_base_of(SEL(5)) == 0, "new slot usable", gp.err, 0);

	/* refused */
	rc = HC2(HC_update_descriptor, ((va_to_pfn(gdtp) << 12) | 0x1c), 0);
	tg_check(rc == -XEN_EINVAL, "misaligned update_descriptor", rc, -XEN_EINVAL);
	rc = update_desc(&gdtp[8], DESC(0x1000, 0x67, ACC_TSS, 0));
	tg_check(rc == -XEN_EINVAL, "TSS descriptor refused", rc, -XEN_EINVAL);
	rc = HC2(HC_update_descriptor, 0x7ffff000UL << 12, 0);
	tg_check(rc == -XEN_EINVAL, "update_descriptor outside RAM", rc, -XEN_EINVAL);
	rc = HC2(HC_update_descriptor, read_cr3() + 8, 0);
	tg_check(rc == -XEN_EINVAL, "update_descriptor into a page table", rc, -XEN_EINVAL);
	tg_check(gdtp[8] == 0, "refused descriptor not written", gdtp[8], 0);

	badp[1] = DESC(0, 0xfffff, ACC_DATA_DPL3, 0xc);
	badp[9] = DESC(0x1000, 0x67, ACC_TSS, 0);   /* beyond `entries`, still checked */
	rc = set_gdt(badp, 4);
	tg_check(rc == -XEN_EINVAL, "set_gdt with a TSS descriptor in the frame", rc, -XEN_EINVAL);
	rc = set_gdt(gdtp, 7169);
	tg_check(rc == -XEN_EINVAL, "set_gdt with too many entries", rc, -XEN_EINVAL);
	rc = HC2(HC_set_gdt, 0x1000, 16);
	tg_check(rc == -XEN_EFAULT, "set_gdt with an unreadable frame list", rc, -XEN_EFAULT);
	tg_check(fs_base_of(s3) == TLS_BASE + 0x1000, "live GDT unchanged by refused calls", fs_base_of(s3), 0);

	/* a non-empty LDT (MMUEXT_SET_LDT): its selectors load, update_descriptor
	 * reaches it, a bad page is refused */
	ldtp[1] = DESC(LDT_BASE, 0xfffff, ACC_DATA_DPL0, 0xc);   /* DPL raised to 3 */
	rc = uvm((u64)ldtp, (va_to_pfn(ldtp) << 12) | PTE_P | PTE_A, UVMF_INVLPG);
	tg_check(rc == 0, "map the LDT page read-only", rc, 0);
	rc = mmuext1(MMUEXT_SET_LDT, (u64)ldtp, 4);
	tg_check(rc == 0, "SET_LDT", rc, 0);
	tg_check(((ldtp[1] >> 45) & 3) == 3, "LDT descriptor DPL raised to 3", ldtp[1], 3);
	tg_check(fs_base_of(LDT_SEL(1)) == LDT_BASE, "FS base from the LDT", fs_base_of(LDT_SEL(1)), LDT_BASE);
	rc = update_desc(&ldtp[1], DESC(LDT_BASE + 0x2000, 0xfffff, ACC_DATA_DPL3, 0xc));
	tg_check(rc == 0 && fs_base_of(LDT_SEL(1)) == LDT_BASE + 0x2000, "update_descriptor into the LDT",
		 fs_base_of(LDT_SEL(1)), LDT_BASE + 0x2000);
	rc = mmuext1(MMUEXT_SET_LDT, (u64)badp, 16);
	tg_check(rc == -XEN_EINVAL, "SET_LDT on a page with a TSS descriptor", rc, -XEN_EINVAL);
	rc = mmuext1(MMUEXT_SET_LDT, 0, 0);
	tg_check(rc == 0, "SET_LDT(0, 0)", rc, 0);

	/* timings */
	u64 t0 = rdtsc();
	for (int i = 0; i < NTIME; i++)
		update_desc(&gdtp[3], DESC(TLS_BASE + i * 0x1000, TLS_LIMIT, ACC_DATA_DPL3, 0x4));
	report_cycles("update_descriptor", rdtsc() - t0, NTIME);
	t0 = rdtsc();
	for (int i = 0; i < NTIME; i++)
		set_gdt(gdtp, 16);
	report_cycles("set_gdt", rdtsc() - t0, NTIME);
	tg_check(fs_base_of(s3) == TLS_BASE + (NTIME - 1) * 0x1000, "GDT after the timing loops", fs_base_of(s3), 0);
}
