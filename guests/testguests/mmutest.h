/* Shared helpers for the page-table / descriptor-table test guests
 * (mmu.c, ptwr.c, gdt.c): Xen MMU structures, and a way to
 * hook a fresh L1 into the builder's tables. */
#ifndef MMUTEST_H
#define MMUTEST_H
#include "tg.h"

struct mmu_update { u64 ptr, val; };
struct mmuext_op { u32 cmd, _pad; u64 arg1, arg2; };
_Static_assert(sizeof(struct mmu_update) == XEN_MMU_UPDATE_SIZE, "mmu_update");
_Static_assert(sizeof(struct mmuext_op) == XEN_MMUEXT_OP_SIZE, "mmuext_op");

#define PTE_NX (1UL << 63)
#define PTE_ADDR 0x000ffffffffff000UL
/* a 2 MiB slot of the kernel half with no L1 in the builder's tables */
#define TEST_VA (VIRT_BASE + 500 * (2UL << 20))

/* Guest frames are mapped linearly from VIRT_BASE by the builder. */
static inline u64 *pfn_va(u64 pfn) { return (u64 *)(VIRT_BASE + (pfn << 12)); }

static inline u64 read_cr3(void)   /* emulated by the shim */
{
	u64 v;
	__asm__ volatile("mov %%cr3, %0" : "=r"(v));
	return v;
}

/* The guest frame of p, a PTE mapping it with flags, and CR3's frame address. */
static inline u64 pfn(const void *p) { return va_to_pfn(p); }
static inline u64 pte(const void *p, u64 flags) { return (pfn(p) << 12) | flags; }
static inline u64 cr3(void) { return read_cr3() & PTE_ADDR; }

/* In a check function returning int: report and leave it (returning 1) at
 * the first wrong answer. */
#define EXPECT(ok, what, got, want)                                     \
	do {                                                            \
		if (!(ok)) {                                            \
			tg_check(0, what, (u64)(got), (u64)(want));     \
			return 1;                                       \
		}                                                       \
	} while (0)
#define EXPECT_RC(rc, want, what) EXPECT((rc) == (want), what, rc, want)

static inline long mmu_update(struct mmu_update *r, u64 n, u32 *done, u64 dom)
{
	return HC4(HC_mmu_update, r, n, done, dom);
}

static inline long mmu_update1(u64 ptr, u64 val)
{
	struct mmu_update r = { ptr, val };
	return mmu_update(&r, 1, 0, DOMID_SELF);
}

static inline long mmuext1(u32 cmd, u64 a1, u64 a2)
{
	struct mmuext_op op = { cmd, 0, a1, a2 };
	return HC4(HC_mmuext_op, &op, 1, 0, DOMID_SELF);
}

static inline long uvm(u64 va, u64 val, u64 flags)
{
	return HC3(HC_update_va_mapping, va, val, flags);
}

/* Machine address of the L2 table covering kernel-half address va. */
static inline u64 l2_maddr(u64 va)
{
	u64 *l4 = pfn_va(read_cr3() >> 12);
	u64 *l3 = pfn_va((l4[(va >> 39) & 511] & PTE_ADDR) >> 12);
	return l3[(va >> 30) & 511] & PTE_ADDR;
}

/* Make `page` an L1 (read-only mapping, PIN_L1) and hook it into the
 * current tables so it maps [TEST_VA, TEST_VA + 2 MiB). */
static inline long hook_l1(u64 *page)
{
	u64 pfn = va_to_pfn(page);
	long rc = uvm((u64)page, (pfn << 12) | PTE_P | PTE_A, UVMF_INVLPG);
	if (rc)
		return rc;
	rc = mmuext1(MMUEXT_PIN_L1_TABLE, pfn, 0);
	if (rc)
		return rc;
	return mmu_update1(l2_maddr(TEST_VA) + ((TEST_VA >> 21) & 511) * 8,
			   (pfn << 12) | PTE_P | PTE_RW | PTE_A);
}

/* Guests that expect one kind of fault (gdt.c #GP; mmu_m2p.c, ptwr.c #PF)
 * run the instruction that should fault under EXPECT_FAULT; their tg_trap
 * hands the trap to take_expected_fault, which counts it, keeps its error
 * code and resumes after the instruction. Any other trap ends the test. */
#define EXPECT_FAULT(insn, ...)                                                  \
	__asm__ volatile("leaq 1f(%%rip), %%rax; movq %%rax, tg_resume_rip(%%rip);" \
			 insn "\n1:" __VA_ARGS__)

extern u64 tg_resume_rip;   /* where the fault resumes; 0: no fault expected */
struct faults_seen { u64 count, err; };

static inline void take_expected_fault(volatile struct faults_seen *seen, u64 expected_vec,
				       u64 vec, u64 *f, int has_err)
{
	if (vec != expected_vec || !has_err || !tg_resume_rip) {
		tg_check(0, "unexpected trap", vec, expected_vec);
		tg_finish();
	}
	seen->count++;
	seen->err = f[2];
	f[3] = tg_resume_rip;   /* skip the faulting instruction */
	tg_resume_rip = 0;
}

/* print "name_cycles=N" (cycles per op, averaged over n) */
static inline void report_cycles(const char *name, u64 total, u64 n)
{
	tg_puts(name);
	tg_puts("_cycles=");
	tg_dec(total / n);
	tg_puts("\n");
}
#endif
