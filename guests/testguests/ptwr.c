/* Writable page tables (ABI §5.10): direct writes to a pinned, read-only
 * L1 of the current tables with the instruction forms Linux uses on PTEs
 * (mov r64 / imm32, 32-bit store to one half, xchg, lock cmpxchg, lock
 * bts/btr with immediate and register, lock and/or byte and qword) are
 * emulated: the mapping changes, _PAGE_USER is added, flags and registers
 * come out as the CPU would leave them.  Writes that Xen does not emulate
 * (misaligned, to a read-only page that is not a page table, or producing
 * an invalid PTE) are bounced to the guest's #PF handler with CR2. */
#include "mmutest.h"
const char tg_name[] = "ptwr";

#define MARK0 0xaaaa0000aaaa0000UL
#define MARK1 0xbbbb1111bbbb1111UL
#define NTIME 8

static u64 l1a[512] __attribute__((aligned(4096)));
static u64 d0[512] __attribute__((aligned(4096)));
static u64 d1[512] __attribute__((aligned(4096)));
static u64 ro_page[512] __attribute__((aligned(4096)));
static u8 shinfo_page[4096] __attribute__((aligned(4096)));
static volatile struct vcpu_info *vi;

extern char tg_trap_14[];
u64 tg_expect_rip, tg_resume_rip, tg_expect_rsp;
static volatile struct faults_seen pf;
static volatile u64 pf_cr2;

void tg_trap(u64 vec, u64 *f, int has_err)
{
	take_expected_fault(&pf, 14, vec, f, has_err);
	pf_cr2 = vi->cr2;
}

static u64 pte_of(u64 *page) { return (va_to_pfn(page) << 12) | PTE_P | PTE_RW | PTE_A; }
static u64 rd(u64 va) { return *(volatile u64 *)va; }
static void flush(void) { mmuext1(MMUEXT_INVLPG_LOCAL, TEST_VA, 0); }

static void test_stores(void)
{
	volatile u64 *e = &l1a[0];
	u64 n0 = pf.count;

	*e = pte_of(d0);                                   /* mov %reg, (mem) */
	tg_check(rd(TEST_VA) == MARK0, "mov r64: new mapping", rd(TEST_VA), MARK0);
	tg_check(*e == (pte_of(d0) | PTE_US), "mov r64: stored + _PAGE_USER", *e, pte_of(d0) | PTE_US);

	__asm__ volatile("movq $0, %0" : "=m"(l1a[0]));   /* mov $imm32, (mem) */
	tg_check(*e == 0, "mov imm32", *e, 0);
	flush();
	EXPECT_FAULT("movq (%0), %%rax", :: "r"(TEST_VA) : "rax", "memory");
	tg_check(pf.count == n0 + 1 && pf_cr2 == TEST_VA, "cleared entry: read faults", pf_cr2, TEST_VA);
	tg_check(!(pf.err & 1), "not-present error code", pf.err, 0);

	__asm__ volatile("movq %1, %0" : "=m"(l1a[0]) : "r"(pte_of(d1)));
	__asm__ volatile("movl %1, 4(%0)" :: "r"(e), "r"(0x80000000u) : "memory");   /* upper half: NX */
	tg_check(*e == (pte_of(d1) | PTE_US | PTE_NX), "32-bit store to the upper half", *e, pte_of(d1) | PTE_NX);
	flush();
	tg_check(rd(TEST_VA) == MARK1, "mapping after the 32-bit store", rd(TEST_VA), MARK1);
}

static void test_rmw(void)
{
	volatile u64 *e = &l1a[0];
	u64 v = pte_of(d0), cur;
	u8 zf, cf;

	/* xchg (Linux: ptep_get_and_clear) */
	cur = *e;
	__asm__ volatile("xchgq %0, %1" : "+r"(v), "+m"(l1a[0]) :: "memory");
	tg_check(v == cur, "xchg returns the old entry", v, cur);
	tg_check(*e == (pte_of(d0) | PTE_US), "xchg stores", *e, pte_of(d0) | PTE_US);
	flush();
	tg_check(rd(TEST_VA) == MARK0, "mapping after xchg", rd(TEST_VA), MARK0);

	/* lock cmpxchg, success and failure */
	u64 expect = *e, acc = expect;
	__asm__ volatile("lock cmpxchgq %3, %1; sete %0"
			 : "=d"(zf), "+m"(l1a[0]), "+a"(acc) : "c"(pte_of(d1)) : "memory", "cc");
	tg_check(zf == 1 && acc == expect, "lock cmpxchg success: ZF, rax kept", zf, 1);
	tg_check(*e == (pte_of(d1) | PTE_US), "lock cmpxchg stored", *e, pte_of(d1) | PTE_US);
	acc = 0x1234;
	__asm__ volatile("lock cmpxchgq %3, %1; sete %0"
			 : "=d"(zf), "+m"(l1a[0]), "+a"(acc) : "c"(pte_of(d0)) : "memory", "cc");
	tg_check(zf == 0 && acc == (pte_of(d1) | PTE_US), "lock cmpxchg failure: ZF=0, rax=old", acc, pte_of(d1) | PTE_US);
	tg_check(*e == (pte_of(d1) | PTE_US), "lock cmpxchg failure leaves the entry", *e, 0);

	/* lock btr / bts with an immediate (ptep_set_wrprotect, test_and_clear_young) */
	__asm__ volatile("lock btrq $1, %1; setc %0" : "=q"(cf), "+m"(l1a[0]) :: "memory", "cc");
	tg_check(cf == 1 && !(*e & PTE_RW), "lock btr $1: RW cleared, CF=1", *e, cf);
	__asm__ volatile("lock btsq $1, %1; setc %0" : "=q"(cf), "+m"(l1a[0]) :: "memory", "cc");
	tg_check(cf == 0 && (*e & PTE_RW), "lock bts $1: RW set, CF=0", *e, cf);
	u64 bit = 5;   /* _PAGE_ACCESSED, register bit offset */
	__asm__ volatile("lock btrq %2, %1; setc %0" : "=q"(cf), "+m"(l1a[0]) : "r"(bit) : "memory", "cc");
	tg_check(cf == 1 && !(*e & PTE_A), "lock btr %reg: A cleared", *e, cf);

	/* lock and/or, byte (clear_bit/set_bit) and qword */
	__asm__ volatile("lock andb $0xfd, %0" : "+m"(l1a[0]) :: "memory", "cc");
	tg_check(!(*e & PTE_RW) && (*e & PTE_P), "lock andb: RW cleared", *e, 0);
	__asm__ volatile("lock orb $0x22, %0" : "+m"(l1a[0]) :: "memory", "cc");
	tg_check((*e & (PTE_RW | PTE_A)) == (PTE_RW | PTE_A), "lock orb: RW|A set", *e, 0);
	u64 m = ~PTE_NX;
	__asm__ volatile("lock andq %1, %0; setz %2" : "+m"(l1a[0]), "+r"(m), "=q"(zf) :: "memory", "cc");
	tg_check(zf == 0 && *e == (pte_of(d1) | PTE_US), "lock andq: NX cleared, ZF=0", *e, pte_of(d1) | PTE_US);

	/* a PTE without _PAGE_PRESENT is stored as is */
	*e = 0x1234000;
	tg_check(*e == 0x1234000, "non-present value not adjusted", *e, 0x1234000);
	*e = pte_of(d0);
	flush();
	tg_check(rd(TEST_VA) == MARK0, "final mapping", rd(TEST_VA), MARK0);
}

static void test_not_emulated(void)
{
	u64 n0 = pf.count;
	/* misaligned 8-byte store into the L1 */
	u64 addr = (u64)&l1a[1] + 4;
	EXPECT_FAULT("movq %1, (%0)", :: "r"(addr), "r"(0UL) : "rax", "memory");
	tg_check(pf.count == n0 + 1 && pf_cr2 == addr, "misaligned store bounced", pf_cr2, addr);
	tg_check((pf.err & 3) == 3, "write|present error code", pf.err, 3);
	tg_check(l1a[1] == 0 && l1a[2] == 0, "misaligned store not done", l1a[1], 0);

	/* a read-only page that is not a page table */
	long rc = uvm((u64)ro_page, (va_to_pfn(ro_page) << 12) | PTE_P | PTE_A, UVMF_INVLPG);
	tg_check(rc == 0, "map a data page read-only", rc, 0);
	EXPECT_FAULT("movq %1, (%0)", :: "r"(ro_page + 3), "r"(MARK1) : "rax", "memory");
	tg_check(pf.count == n0 + 2 && pf_cr2 == (u64)(ro_page + 3), "write to a RO data page bounced",
		 pf_cr2, (u64)(ro_page + 3));
	tg_check(ro_page[3] == 0, "RO data page unchanged", ro_page[3], 0);

	/* a PTE that maps a frame outside the guest's memory fails validation */
	EXPECT_FAULT("movq %1, (%0)", :: "r"(&l1a[5]), "r"((0x7ffff000UL << 12) | PTE_P) : "rax", "memory");
	tg_check(pf.count == n0 + 3 && pf_cr2 == (u64)&l1a[5], "invalid new PTE bounced", pf_cr2, (u64)&l1a[5]);
	tg_check(l1a[5] == 0, "invalid PTE not written", l1a[5], 0);
}

/* The builder's bootstrap L1s are page tables too (Xen's builder pins the
 * initial L4): write-protect d1 by a direct `lock btr` on its PTE there. */
static void test_builder_l1(void)
{
	u64 va = (u64)d1, n0 = pf.count;
	u64 *l4 = pfn_va(read_cr3() >> 12);
	u64 *l3 = pfn_va((l4[(va >> 39) & 511] & PTE_ADDR) >> 12);
	u64 *l2 = pfn_va((l3[(va >> 30) & 511] & PTE_ADDR) >> 12);
	u64 *l1 = pfn_va((l2[(va >> 21) & 511] & PTE_ADDR) >> 12);
	u64 *pte = &l1[(va >> 12) & 511];
	u8 cf;
	__asm__ volatile("lock btrq $1, %1; setc %0" : "=d"(cf), "+m"(*pte) :: "memory", "cc");
	tg_check(cf == 1 && !(*pte & PTE_RW), "lock btr on a bootstrap L1 entry", *pte, cf);
	mmuext1(MMUEXT_INVLPG_LOCAL, va, 0);
	EXPECT_FAULT("movq %1, (%0)", :: "r"(va), "r"(0UL) : "rax", "memory");
	tg_check(pf.count == n0 + 1 && pf_cr2 == va, "write to the now read-only page faults", pf_cr2, va);
	__asm__ volatile("lock btsq $1, %1; setc %0" : "=d"(cf), "+m"(*pte) :: "memory", "cc");
	tg_check(cf == 0 && (*pte & PTE_RW), "lock bts restores RW", *pte, cf);
	mmuext1(MMUEXT_INVLPG_LOCAL, va, 0);
	d1[1] = 7;
	tg_check(d1[1] == 7, "page writable again", d1[1], 7);
	d1[1] = 0;
}

void tg_main(struct start_info *si)
{
	long rc = uvm((u64)shinfo_page, si->shared_info | PTE_P | PTE_RW | PTE_A | PTE_D, UVMF_INVLPG);
	tg_check(rc == 0, "map shared_info", rc, 0);
	vi = (volatile struct vcpu_info *)shinfo_page;
	static struct trap_info tt[] = { { 14, 0, 0xe030, 0, (u64)tg_trap_14 }, { 0, 0, 0, 0, 0 } };
	rc = HC1(HC_set_trap_table, tt);
	tg_check(rc == 0, "set_trap_table", rc, 0);
	for (int i = 0; i < 512; i++) {
		d0[i] = i ? 0 : MARK0;
		d1[i] = i ? 0 : MARK1;
	}
	rc = hook_l1(l1a);
	tg_check(rc == 0, "hook a pinned L1", rc, 0);
	if (tg_failures)
		return;
	test_stores();
	test_rmw();
	test_not_emulated();
	test_builder_l1();

	u64 t0 = rdtsc();
	for (int i = 0; i < NTIME; i++)
		*(volatile u64 *)&l1a[8] = pte_of((i & 1) ? d0 : d1);
	report_cycles("ptwr_mov", rdtsc() - t0, NTIME);
	t0 = rdtsc();
	for (int i = 0; i < NTIME; i++) {
		u64 v = pte_of(d0);
		__asm__ volatile("xchgq %0, %1" : "+r"(v), "+m"(l1a[8]) :: "memory");
	}
	report_cycles("ptwr_xchg", rdtsc() - t0, NTIME);
}
