/* Stale translations across a change of page type (issue 11, item 1).
 * Removing or write-protecting a mapping with mmu_update, or with
 * update_va_mapping without a flush flag, leaves the old translation in the
 * TLB: the guest's own business, until the frame becomes a page table (a
 * writable window on a table) or a page table becomes writable (walks
 * through it into what the guest then writes).  Xen flushes, before such a
 * change of type, every TLB that may still hold one (the shim: get_type ->
 * smp_flush_stale with the frame's TLB stamp).  The guest checks:
 *   a  F mapped writable at W (a slot of the tool L1, mmu_update), written
 *      through W, the entry cleared with mmu_update (no flush), F pinned as
 *      an L1 (it is all zeros): a forged PTE (the frame past RAM) written
 *      through W faults, not-present, and F still reads zero
 *   b  the same with update_va_mapping (flags 0) making W read-only: the
 *      write of a forged PTE (the live L4, writable) faults present|write,
 *      as writable-page-table emulation refuses it, and F reads zero
 *   c  the reverse: an L1 pinned and hooked into the live L2 (range R, its
 *      entry 0 mapping a data page writable), read and written through R,
 *      unhooked and unpinned (count 0, still an L1), then mapped writable
 *      and filled with forged entries (the live L4, writable): reads at R
 *      (the page touched while it was a table) and at R + 2 pages (never
 *      touched: only a stale walk through the old L1 could map it) fault
 * Stale translations exist on hardware and in the faithful lane (QEMU's
 * TLB); on kvm_pvm the shim's page-table writes (emulated at CPL0) reach
 * KVM's shadow tables at once, so there the checks hold even without the
 * flush.  c's never-touched page needs paging-structure caches (hardware;
 * QEMU has none) to show a missing flush.
 * Each check runs ROUNDS times (any exit to the VMM may flush the TLB as a
 * side effect and hide a missing flush in one round), uses frames and slots
 * of its own, and stops at its first wrong answer; a check whose forged
 * entry landed leaves its frame as it is (releasing it would give back
 * references it never held). */
#include "mmutest.h"
const char tg_name[] = "stalepte";

#define RO (PTE_P | PTE_A)
#define RW (PTE_P | PTE_RW | PTE_A | PTE_D)
#define PFEC_P 1UL
#define PFEC_W 2UL
#define MARK 0x57a1e0057a1e0000UL
#define ROUNDS 4
#define PAGE(name) static u64 name[512] __attribute__((aligned(4096)))

/* slots of the tool L1 (hooked at TEST_VA): W of checks a, b */
enum { T_A = 1, T_B };
/* a slot of the live L2 for check c's range R (500 is the tool L1's) */
enum { S_C = 501 };

PAGE(tool_l1);
PAGE(a_f); PAGE(b_f); PAGE(c_l1); PAGE(c_data);
static u8 shinfo_page[4096] __attribute__((aligned(4096)));
static volatile struct vcpu_info *vi;

extern char tg_trap_14[];
u64 tg_resume_rip;
static volatile struct faults_seen pf;
static volatile u64 pf_cr2;
static u64 l2m, nr_pages;

void tg_trap(u64 vec, u64 *f, int has_err)
{
	take_expected_fault(&pf, 14, vec, f, has_err);
	pf_cr2 = vi->cr2;
}

static u64 slot_va(int slot) { return TEST_VA + ((u64)slot << 12); }
static long tool_map(int slot, u64 val) { return mmu_update1((pfn(tool_l1) << 12) + 8 * slot, val); }
static long map(const void *p, u64 flags) { return uvm((u64)p, pte(p, flags), UVMF_INVLPG); }
static long pin(const void *p) { return mmuext1(MMUEXT_PIN_L1_TABLE, pfn(p), 0); }
static long unpin(const void *p) { return mmuext1(MMUEXT_UNPIN_TABLE, pfn(p), 0); }

/* The store or load at va; 1 if it faulted (error code in pf.err, address
 * in pf_cr2).  A load that does not fault leaves its value in *got. */
static int store_faults(u64 va, u64 val)
{
	u64 n = pf.count;
	EXPECT_FAULT("movq %1, (%0)", :: "r"(va), "r"(val) : "rax", "memory");
	return pf.count == n + 1;
}

static int load_faults(u64 va, u64 *got)
{
	u64 n = pf.count, v = 0;
	EXPECT_FAULT("movq (%1), %0", : "+d"(v) : "r"(va) : "rax", "memory");
	*got = v;
	return pf.count == n + 1;
}

/* a: writable at W, written, entry cleared with mmu_update, pinned */
static int check_a(void)
{
	u64 w = slot_va(T_A), forged = (nr_pages << 12) | RO;
	long rc = map(a_f, RO);
	EXPECT_RC(rc, 0, "a: make F's own mapping read-only");
	rc = tool_map(T_A, pte(a_f, RW));
	EXPECT_RC(rc, 0, "a: map F writable at W (mmu_update)");
	*(volatile u64 *)(w + 8 * 5) = 0;   /* the TLB now holds W -> F, writable */
	rc = tool_map(T_A, 0);
	EXPECT_RC(rc, 0, "a: clear W's entry (mmu_update, no flush)");
	rc = pin(a_f);
	EXPECT_RC(rc, 0, "a: PIN_L1 of F once its writable mapping is gone");
	int faulted = store_faults(w + 8 * 7, forged);
	EXPECT(faulted, "a: a forged PTE written through W after F became an L1 (stale TLB entry not flushed)",
	       a_f[7], 0);
	EXPECT(pf_cr2 == w + 8 * 7 && !(pf.err & PFEC_P), "a: that write faults not-present at W", pf_cr2, w + 8 * 7);
	EXPECT(a_f[7] == 0, "a: the pinned L1 F unchanged", a_f[7], 0);
	rc = unpin(a_f);
	EXPECT_RC(rc, 0, "a: UNPIN F");
	return 0;
}

/* b: writable at W, written, made read-only with update_va_mapping (no
 * flush flag), pinned */
static int check_b(void)
{
	u64 w = slot_va(T_B), forged = cr3() | RW;
	long rc = map(b_f, RO);
	EXPECT_RC(rc, 0, "b: make F's own mapping read-only");
	rc = uvm(w, pte(b_f, RW), 0);
	EXPECT_RC(rc, 0, "b: map F writable at W (update_va_mapping)");
	*(volatile u64 *)(w + 8 * 5) = 0;
	rc = uvm(w, pte(b_f, RO), 0);
	EXPECT_RC(rc, 0, "b: make W read-only (update_va_mapping, flags 0)");
	rc = pin(b_f);
	EXPECT_RC(rc, 0, "b: PIN_L1 of F once its writable mapping is gone");
	int faulted = store_faults(w + 8 * 7, forged);
	EXPECT(faulted, "b: the live L4 written writable into F through W after F became an L1 (stale TLB entry not flushed)",
	       b_f[7], 0);
	EXPECT(pf_cr2 == w + 8 * 7 && (pf.err & (PFEC_P | PFEC_W)) == (PFEC_P | PFEC_W),
	       "b: that write faults present|write at W (the forged PTE refused)", pf.err, PFEC_P | PFEC_W);
	EXPECT(b_f[7] == 0, "b: the pinned L1 F unchanged", b_f[7], 0);
	rc = unpin(b_f);
	EXPECT_RC(rc, 0, "b: UNPIN F");
	return 0;
}

/* c: an L1 walked through, released, then writable with forged entries */
static int check_c(void)
{
	u64 r = VIRT_BASE + ((u64)S_C << 21), l2e = l2m + 8 * S_C, got;
	c_data[0] = MARK;
	c_l1[0] = pte(c_data, RW);
	long rc = map(c_l1, RO);
	EXPECT_RC(rc, 0, "c: make the L1's own mapping read-only");
	rc = pin(c_l1);
	EXPECT_RC(rc, 0, "c: PIN_L1");
	rc = mmu_update1(l2e, pte(c_l1, RW));
	EXPECT_RC(rc, 0, "c: hook the L1 into the live L2");
	got = *(volatile u64 *)r;
	EXPECT(got == MARK, "c: a read through the L1 reaches its data page", got, MARK);
	*(volatile u64 *)(r + 8) = 1;       /* TLB and paging-structure caches now hold R */
	rc = mmu_update1(l2e, 0);
	EXPECT_RC(rc, 0, "c: unhook the L1 (mmu_update, no flush)");
	rc = unpin(c_l1);
	EXPECT_RC(rc, 0, "c: UNPIN (count 0: still an L1)");
	rc = map(c_l1, RW);
	EXPECT_RC(rc, 0, "c: map the released L1 writable");
	u64 forged = cr3() | RW;
	for (int i = 0; i < 512; i++)
		c_l1[i] = forged;
	int faulted = load_faults(r, &got);
	EXPECT(faulted, "c: a read through the released L1's range, at the page touched while it was a table, "
	       "got through (stale TLB entry not flushed)", got, 0);
	EXPECT(pf_cr2 == r && !(pf.err & PFEC_P), "c: that read faults not-present", pf_cr2, r);
	faulted = load_faults(r + 2 * 4096, &got);
	EXPECT(faulted, "c: a read through the released L1's range, at a page never touched, "
	       "got through a forged entry (stale walk not flushed)", got, 0);
	EXPECT(pf_cr2 == r + 2 * 4096 && !(pf.err & PFEC_P), "c: that read faults not-present", pf_cr2, r + 2 * 4096);
	for (int i = 0; i < 512; i++)
		c_l1[i] = 0;
	return 0;
}

void tg_main(struct start_info *si)
{
	static struct trap_info tt[] = { { 14, 0, 0xe030, 0, (u64)tg_trap_14 }, { 0, 0, 0, 0, 0 } };
	long rc = uvm((u64)shinfo_page, si->shared_info | RW, UVMF_INVLPG);
	tg_check(rc == 0, "map shared_info", rc, 0);
	vi = (volatile struct vcpu_info *)shinfo_page;
	rc = HC1(HC_set_trap_table, tt);
	tg_check(rc == 0, "set_trap_table", rc, 0);
	nr_pages = si->nr_pages;
	l2m = l2_maddr(TEST_VA);
	rc = hook_l1(tool_l1);
	tg_check(rc == 0, "hook the tool L1", rc, 0);
	if (tg_failures)
		return;
	static int (*const checks[])(void) = { check_a, check_b, check_c };
	for (unsigned i = 0; i < sizeof(checks) / sizeof(checks[0]); i++)
		for (int r = 0; r < ROUNDS && !checks[i](); r++)
			;
}
