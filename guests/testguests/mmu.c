/* Page-table hypercalls: mmu_update (normal, PRESERVE_AD, MACHPHYS_UPDATE,
 * errors with the done count), mmuext_op (pin/unpin, NEW_BASEPTR with the
 * hypervisor slots installed, TLB flushes, invlpg, SET_LDT, CLEAR/COPY_PAGE,
 * FLUSH_CACHE, unknown ops), update_va_mapping with every flush flag and
 * its error cases, and the cost of each, timed with rdtsc. */
#include "mmutest.h"
const char tg_name[] = "mmu";

#define MARK0 0x1111222233334444UL
#define MARK1 0x5555666677778888UL
#define NTIME 8
#define M2P_TEST_VALUE 0x12345

static u64 l1a[512] __attribute__((aligned(4096)));
static u64 d0[512] __attribute__((aligned(4096)));
static u64 d1[512] __attribute__((aligned(4096)));
static u64 l4copy[512] __attribute__((aligned(4096)));
static u64 vmask = 1;
static u8 kstack[4096] __attribute__((aligned(16)));
#define tg_stack_top_va ((u64)kstack + sizeof(kstack))

u64 tg_expect_rip, tg_resume_rip, tg_expect_rsp;
void tg_trap(u64 vec, u64 *f, int has_err)
{
	(void)f; (void)has_err;
	tg_check(0, "unexpected trap", vec, 0);
	tg_finish();
}

static u64 rd(u64 va) { return *(volatile u64 *)va; }
static u64 pte_of(u64 *page) { return (va_to_pfn(page) << 12) | PTE_P | PTE_RW | PTE_A; }

static void test_mmu_update(void)
{
	u64 l1m = va_to_pfn(l1a) << 12;
	long rc = mmu_update1(l1m, pte_of(d0));
	tg_check(rc == 0, "mmu_update L1 entry", rc, 0);
	tg_check(rd(TEST_VA) == MARK0, "mapping made by mmu_update", rd(TEST_VA), MARK0);
	tg_check(l1a[0] & PTE_US, "mmu_update ORs _PAGE_USER in", l1a[0], pte_of(d0) | PTE_US);

	/* PRESERVE_AD keeps the A/D bits already in the entry */
	rc = mmu_update1(l1m + 8, pte_of(d1) | PTE_D);
	tg_check(rc == 0 && (l1a[1] & (PTE_A | PTE_D)) == (PTE_A | PTE_D), "entry with A|D", l1a[1], 0);
	rc = mmu_update1((l1m + 8) | MMU_PT_UPDATE_PRESERVE_AD, (pte_of(d0) & ~(PTE_A | PTE_D)) | PTE_NX);
	tg_check(rc == 0, "PRESERVE_AD update", rc, 0);
	tg_check(l1a[1] == (pte_of(d0) | PTE_D | PTE_US | PTE_NX), "PRESERVE_AD kept A|D, took the rest",
		 l1a[1], pte_of(d0) | PTE_D | PTE_US | PTE_NX);
	rc = mmu_update1(l1m + 8, pte_of(d0) & ~(PTE_A | PTE_D));
	tg_check(rc == 0 && !(l1a[1] & (PTE_A | PTE_D)), "NORMAL update drops A|D", l1a[1], 0);

	/* MACHPHYS_UPDATE: the host checks the M2P entry after the run
	 * (reading MACH2PHYS_VIRT_START from the guest is the mmu_m2p guest's job) */
	u64 pfn = va_to_pfn(d0);
	rc = mmu_update1((pfn << 12) | MMU_MACHPHYS_UPDATE, M2P_TEST_VALUE);
	tg_check(rc == 0, "MACHPHYS_UPDATE", rc, 0);
	tg_puts("m2p_pfn="); tg_dec(pfn); tg_puts("\n");
	rc = mmu_update1((0x7ffff000UL << 12) | MMU_MACHPHYS_UPDATE, 0);
	tg_check(rc == -XEN_EINVAL, "MACHPHYS_UPDATE outside RAM", rc, -XEN_EINVAL);

	/* a batch stops at the first bad entry; done counts the good ones */
	struct mmu_update b[3] = {
		{ l1m + 16, pte_of(d1) },
		{ 0x7ffff000UL << 12, 0 },             /* not RAM */
		{ l1m + 24, pte_of(d1) },
	};
	u32 done = 99;
	rc = mmu_update(b, 3, &done, DOMID_SELF);
	tg_check(rc == -XEN_EINVAL, "batch with a bad ptr", rc, -XEN_EINVAL);
	tg_check(done == 1, "done count after a failure", done, 1);
	tg_check(l1a[2] != 0 && l1a[3] == 0, "entries before/after the failure", l1a[3], 0);
	rc = mmu_update1((read_cr3() + HYPERVISOR_L4_FIRST_SLOT * 8 + 8), 0);
	tg_check(rc == -XEN_EINVAL, "write to a hypervisor L4 slot", rc, -XEN_EINVAL);
	rc = mmu_update1(l1m + 32, (0x7ffff000UL << 12) | PTE_P);
	tg_check(rc == -XEN_EINVAL, "L1 entry mapping a frame outside RAM", rc, -XEN_EINVAL);
	rc = mmu_update1(l1m | 3, 0);
	tg_check(rc == -XEN_ENOSYS, "unknown mmu_update command", rc, -XEN_ENOSYS);
	rc = mmu_update((struct mmu_update *)0x1000, 1, 0, DOMID_SELF);
	tg_check(rc == -XEN_EFAULT, "unreadable request list", rc, -XEN_EFAULT);
	rc = mmu_update(b, 1, 0, 5);
	tg_check(rc == -XEN_ESRCH, "foreign domain", rc, -XEN_ESRCH);
	/* a page that is not a page table takes a plain write, unadjusted */
	rc = mmu_update1((va_to_pfn(d1) << 12) + 8, 0x5);
	tg_check(rc == 0 && d1[1] == 0x5, "mmu_update into a data page", d1[1], 5);
	d1[1] = 0;
}

static void test_update_va_mapping(void)
{
	const u64 flags[] = {
		UVMF_INVLPG, UVMF_TLB_FLUSH, UVMF_INVLPG | UVMF_ALL, UVMF_TLB_FLUSH | UVMF_ALL,
		UVMF_INVLPG | (u64)&vmask, UVMF_TLB_FLUSH | (u64)&vmask,
	};
	for (unsigned i = 0; i < sizeof(flags) / sizeof(flags[0]); i++) {
		u64 *pg = (i & 1) ? d0 : d1;
		u64 want = (i & 1) ? MARK0 : MARK1;
		long rc = uvm(TEST_VA, pte_of(pg), flags[i]);
		tg_check(rc == 0, "update_va_mapping", rc, i);
		tg_check(rd(TEST_VA) == want, "new mapping visible after the flush", rd(TEST_VA), want);
	}
	/* no flush, then an explicit one */
	long rc = uvm(TEST_VA, pte_of(d1), UVMF_NONE);
	tg_check(rc == 0 && (l1a[0] & PTE_US), "update_va_mapping without flush", rc, 0);
	rc = mmuext1(MMUEXT_INVLPG_LOCAL, TEST_VA, 0);
	tg_check(rc == 0 && rd(TEST_VA) == MARK1, "INVLPG_LOCAL", rd(TEST_VA), MARK1);
	uvm(TEST_VA, pte_of(d0), UVMF_NONE);
	rc = mmuext1(MMUEXT_TLB_FLUSH_MULTI, 0, (u64)&vmask);
	tg_check(rc == 0 && rd(TEST_VA) == MARK0, "TLB_FLUSH_MULTI", rd(TEST_VA), MARK0);
	uvm(TEST_VA, pte_of(d1), UVMF_NONE);
	rc = mmuext1(MMUEXT_INVLPG_ALL, TEST_VA, 0);
	tg_check(rc == 0 && rd(TEST_VA) == MARK1, "INVLPG_ALL", rd(TEST_VA), MARK1);
	uvm(TEST_VA, pte_of(d0), UVMF_NONE);
	rc = mmuext1(MMUEXT_TLB_FLUSH_ALL, 0, 0);
	tg_check(rc == 0 && rd(TEST_VA) == MARK0, "TLB_FLUSH_ALL", rd(TEST_VA), MARK0);
	uvm(TEST_VA, pte_of(d1), UVMF_NONE);
	rc = mmuext1(MMUEXT_INVLPG_MULTI, TEST_VA, (u64)&vmask);
	tg_check(rc == 0 && rd(TEST_VA) == MARK1, "INVLPG_MULTI", rd(TEST_VA), MARK1);

	/* an empty slot of an existing L1 is a valid target */
	tg_check(l1a[6] == 0, "slot 6 empty", l1a[6], 0);
	rc = uvm(TEST_VA + 6 * 4096, pte_of(d1), UVMF_INVLPG);
	tg_check(rc == 0 && rd(TEST_VA + 6 * 4096) == MARK1, "update_va_mapping into an empty slot",
		 rd(TEST_VA + 6 * 4096), MARK1);

	/* errors */
	rc = uvm(TEST_VA + (2UL << 20), pte_of(d0), UVMF_INVLPG);
	tg_check(rc == -XEN_EINVAL, "update_va_mapping without an L1", rc, -XEN_EINVAL);
	rc = uvm(MACH2PHYS_VIRT_START, pte_of(d0), UVMF_INVLPG);
	tg_check(rc == -XEN_EINVAL, "update_va_mapping in the hypervisor hole", rc, -XEN_EINVAL);
	rc = uvm(TEST_VA, pte_of(d0), UVMF_INVLPG | 0x1000);
	tg_check(rc == -XEN_EFAULT, "update_va_mapping with an unreadable vCPU mask", rc, -XEN_EFAULT);
	/* as in Xen, the entry was written before the mask was read */
	tg_check((l1a[0] & PTE_ADDR) == va_to_pfn(d0) << 12, "entry written despite -EFAULT", l1a[0], 0);
	rc = mmuext1(MMUEXT_INVLPG_MULTI, TEST_VA, 0x1000);
	tg_check(rc == -XEN_EINVAL, "INVLPG_MULTI with an unreadable vCPU mask", rc, -XEN_EINVAL);
}

static void test_mmuext(void)
{
	u64 l1pfn = va_to_pfn(l1a);
	long rc = mmuext1(MMUEXT_PIN_L1_TABLE, l1pfn, 0);
	tg_check(rc == -XEN_EINVAL, "pinning twice", rc, -XEN_EINVAL);
	rc = mmuext1(MMUEXT_UNPIN_TABLE, va_to_pfn(d0), 0);
	tg_check(rc == -XEN_EINVAL, "unpinning an unpinned frame", rc, -XEN_EINVAL);
	rc = mmuext1(MMUEXT_PIN_L1_TABLE, 0x7ffff000UL, 0);
	tg_check(rc == -XEN_EINVAL, "pinning a frame outside RAM", rc, -XEN_EINVAL);
	rc = mmuext1(MMUEXT_FLUSH_CACHE, 0, 0);
	tg_check(rc == -XEN_EACCES, "FLUSH_CACHE without permission", rc, -XEN_EACCES);
	rc = mmuext1(MMUEXT_FLUSH_CACHE_GLOBAL, 0, 0);
	tg_check(rc == -XEN_EINVAL, "FLUSH_CACHE_GLOBAL without permission", rc, -XEN_EINVAL);
	rc = mmuext1(MMUEXT_SET_LDT, 0, 0);
	tg_check(rc == 0, "SET_LDT(0, 0)", rc, 0);
	rc = mmuext1(MMUEXT_SET_LDT, (u64)d0 + 8, 1);
	tg_check(rc == -XEN_EINVAL, "SET_LDT misaligned", rc, -XEN_EINVAL);
	rc = mmuext1(MMUEXT_SET_LDT, (u64)d0, 8193);
	tg_check(rc == -XEN_EINVAL, "SET_LDT too many entries", rc, -XEN_EINVAL);

	/* CLEAR_PAGE / COPY_PAGE on data pages; refused on a page table */
	d1[7] = MARK1;
	rc = mmuext1(MMUEXT_COPY_PAGE, va_to_pfn(d1), va_to_pfn(d0));
	tg_check(rc == 0 && d1[0] == MARK0 && d1[7] == 0, "COPY_PAGE", d1[0], MARK0);
	rc = mmuext1(MMUEXT_CLEAR_PAGE, va_to_pfn(d1), 0);
	tg_check(rc == 0 && d1[0] == 0, "CLEAR_PAGE", d1[0], 0);
	d1[0] = MARK1;
	rc = mmuext1(MMUEXT_CLEAR_PAGE, l1pfn, 0);
	tg_check(rc == -XEN_EINVAL, "CLEAR_PAGE on a page table", rc, -XEN_EINVAL);

	/* a batch with an unknown op: done counts the ops before it */
	struct mmuext_op ops[3] = {
		{ MMUEXT_TLB_FLUSH_ALL, 0, 0, 0 }, { 99, 0, 0, 0 }, { MMUEXT_TLB_FLUSH_ALL, 0, 0, 0 },
	};
	u32 done = 77;
	rc = HC4(HC_mmuext_op, ops, 3, &done, DOMID_SELF);
	tg_check(rc == -XEN_ENOSYS && done == 1, "unknown mmuext op stops the batch", rc, -XEN_ENOSYS);
	tg_check(done == 1, "mmuext done count", done, 1);

	/* NEW_BASEPTR: a copy of the current L4 with the hypervisor slots
	 * wiped; pinning must put them back, switching must keep us alive */
	u64 cur = read_cr3(), before = rd(TEST_VA);
	u64 *l4 = pfn_va(cur >> 12);
	const int hv = HYPERVISOR_L4_FIRST_SLOT;
	for (int i = 0; i < 512; i++)
		l4copy[i] = (i >= hv && i < hv + HYPERVISOR_L4_SLOTS) ? 0 : l4[i];
	u64 cpfn = va_to_pfn(l4copy);
	rc = uvm((u64)l4copy, (cpfn << 12) | PTE_P | PTE_A, UVMF_INVLPG);
	tg_check(rc == 0, "make the new L4 read-only", rc, 0);
	rc = mmuext1(MMUEXT_PIN_L4_TABLE, cpfn, 0);
	tg_check(rc == 0, "PIN_L4", rc, 0);
	tg_check(l4copy[hv] == l4[hv] && l4copy[hv + 1] != 0,
		 "PIN_L4 installs the hypervisor slots", l4copy[hv + 1], l4[hv + 1]);
	rc = mmuext1(MMUEXT_NEW_BASEPTR, cpfn, 0);
	tg_check(rc == 0 && read_cr3() == cpfn << 12, "NEW_BASEPTR switches CR3", read_cr3(), cpfn << 12);
	tg_check(rd(TEST_VA) == before, "same mappings through the new L4", rd(TEST_VA), before);
	rc = mmuext1(MMUEXT_NEW_BASEPTR, cur >> 12, 0);
	tg_check(rc == 0 && read_cr3() == cur, "NEW_BASEPTR back", read_cr3(), cur);
	rc = mmuext1(MMUEXT_UNPIN_TABLE, cpfn, 0);
	tg_check(rc == 0, "UNPIN", rc, 0);
	rc = mmuext1(MMUEXT_NEW_BASEPTR, 0x7ffff000UL, 0);
	tg_check(rc == -XEN_EINVAL, "NEW_BASEPTR outside RAM", rc, -XEN_EINVAL);
}

/* Linux batches MMU operations in multicalls */
static void test_multicall(void)
{
	struct mmuext_op op = { MMUEXT_INVLPG_LOCAL, 0, TEST_VA, 0 };
	struct { u64 op, result, args[6]; } mc[3] = {
		{ HC_update_va_mapping, 99, { TEST_VA, pte_of(d1), UVMF_NONE } },
		{ HC_mmuext_op, 99, { (u64)&op, 1, 0, DOMID_SELF } },
		{ HC_update_va_mapping, 99, { TEST_VA + (2UL << 20), pte_of(d0), UVMF_INVLPG } },
	};
	long rc = HC2(HC_multicall, mc, 3);
	tg_check(rc == 0, "multicall", rc, 0);
	tg_check(mc[0].result == 0 && mc[1].result == 0, "multicall results", mc[0].result, 0);
	tg_check(mc[2].result == (u64)-XEN_EINVAL, "multicall per-entry error", mc[2].result, -XEN_EINVAL);
	tg_check(rd(TEST_VA) == MARK1, "multicall mapping + invlpg", rd(TEST_VA), MARK1);
}

static void timings(void)
{
	u64 l1m = va_to_pfn(l1a) << 12, t0, t;
	t0 = rdtsc();
	for (int i = 0; i < NTIME; i++)
		mmu_update1(l1m + 8 * 4, pte_of((i & 1) ? d0 : d1));
	t = rdtsc() - t0;
	report_cycles("mmu_update", t, NTIME);
	t0 = rdtsc();
	for (int i = 0; i < NTIME; i++)
		uvm(TEST_VA, pte_of((i & 1) ? d0 : d1), UVMF_INVLPG);
	t = rdtsc() - t0;
	report_cycles("update_va_mapping", t, NTIME);
	t0 = rdtsc();
	for (int i = 0; i < NTIME; i++)
		HC2(HC_stack_switch, 0xe02b, tg_stack_top_va);
	t = rdtsc() - t0;
	report_cycles("null_hypercall", t, NTIME);
	t0 = rdtsc();
	for (int i = 0; i < NTIME; i++)
		mmuext1(MMUEXT_TLB_FLUSH_ALL, 0, 0);
	t = rdtsc() - t0;
	report_cycles("mmuext_tlb_flush", t, NTIME);
}

void tg_main(struct start_info *si)
{
	(void)si;
	for (int i = 0; i < 512; i++) {
		d0[i] = i ? 0 : MARK0;
		d1[i] = i ? 0 : MARK1;
	}
	long rc = hook_l1(l1a);
	tg_check(rc == 0, "hook a pinned L1 into the tables", rc, 0);
	if (tg_failures)
		return;
	test_mmu_update();
	test_update_va_mapping();
	test_mmuext();
	test_multicall();
	timings();
}
