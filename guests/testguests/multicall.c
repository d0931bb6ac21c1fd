/* multicall as Xen 4.17's common/multicall.c runs it for a 64-bit PV guest:
 *   - each entry's result in its own slot, in order; a failing entry does
 *     not stop the later ones, and the multicall itself returns 0;
 *   - entries the shim finishes and entries Python finishes mix freely;
 *   - a nested multicall is refused with -EINVAL (Xen's "reentry"), an
 *     unknown hypercall is -ENOSYS, and the list goes on;
 *   - a list address outside the guest's half is -EFAULT before anything
 *     runs, even with no entries; an entry that cannot be read, or a
 *     result that cannot be written, ends the multicall with -EFAULT, the
 *     entries before it done;
 *   - nr_calls is an unsigned int: the upper half of the register is
 *     ignored. */
#include "mmutest.h"
const char tg_name[] = "multicall";

#define MSR_FS_BASE 0xc0000100

struct mc { u64 op, result, args[6]; };
_Static_assert(sizeof(struct mc) == XEN_MULTICALL_ENTRY_SIZE, "multicall_entry");

static struct mc list[16];
static u8 pages[2][4096] __attribute__((aligned(4096)));
static char extraversion[16];

static u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static void set(struct mc *e, u64 op, u64 a0, u64 a1, u64 a2)
{
	e->op = op;
	e->result = 0xdeadbeefUL;
	e->args[0] = a0; e->args[1] = a1; e->args[2] = a2;
	e->args[3] = e->args[4] = e->args[5] = 0;
}

static long multicall(void *l, u64 n)
{
	return HC2(HC_multicall, l, n);
}

void tg_main(struct start_info *si)
{
	(void)si;
	long rc;

	/* per-entry results; failures do not stop the list */
	struct mc inner[1];
	set(&inner[0], HC_set_segment_base, SEGBASE_FS, 0x1000, 0);
	set(&list[0], HC_set_segment_base, SEGBASE_FS, 0x2000, 0);
	set(&list[1], HC_set_segment_base, SEGBASE_FS, 0x0000800000000000UL, 0);
	set(&list[2], HC_xen_version, XENVER_extraversion, (u64)extraversion, 0);  /* Python */
	set(&list[3], HC_memory_op, XENMEM_current_reservation, 0x1000, 0);          /* Python, bad pointer */
	set(&list[4], HC_multicall, (u64)inner, 1, 0);
	set(&list[5], 60, 0, 0, 0);
	set(&list[6], HC_set_segment_base, 9, 0, 0);
	set(&list[7], HC_xen_version, XENVER_version, 0, 0);                         /* shim */
	set(&list[8], HC_set_segment_base, SEGBASE_FS, 0x3000, 0);
	rc = multicall(list, 9);
	tg_check(rc == 0, "multicall with failing entries returns 0", rc, 0);
	tg_check(list[0].result == 0, "entry 0: set FS", list[0].result, 0);
	tg_check(list[1].result == (u64)-XEN_EINVAL, "entry 1: non-canonical -EINVAL", list[1].result, -XEN_EINVAL);
	tg_check(list[2].result == 0 && extraversion[0] == '.', "entry 2: extraversion (Python)",
		 list[2].result, 0);
	tg_check(list[3].result == (u64)-XEN_EFAULT, "entry 3: bad pointer -EFAULT", list[3].result, -XEN_EFAULT);
	tg_check(list[4].result == (u64)-XEN_EINVAL, "entry 4: nested multicall -EINVAL", list[4].result, -XEN_EINVAL);
	tg_check(inner[0].result == 0xdeadbeefUL, "nested multicall's entry not run", inner[0].result, 0xdeadbeefUL);
	tg_check(list[5].result == (u64)-XEN_ENOSYS, "entry 5: unknown hypercall -ENOSYS", list[5].result, -XEN_ENOSYS);
	tg_check(list[6].result == (u64)-XEN_EINVAL, "entry 6: unknown which -EINVAL", list[6].result, -XEN_EINVAL);
	tg_check((list[7].result >> 16) == 4 && (list[7].result & 0xffff) == 17, "entry 7: XENVER_version 4.17",
		 list[7].result, 0x40011);
	tg_check(list[8].result == 0, "entry 8: set FS", list[8].result, 0);
	tg_check(rdmsr(MSR_FS_BASE) == 0x3000, "last entry ran", rdmsr(MSR_FS_BASE), 0x3000);

	/* no entries */
	tg_check(multicall(list, 0) == 0, "empty list: 0", multicall(list, 0), 0);
	static const u64 bad_lists[] = {
		0x0000800000000000UL, 0xffff800000000000UL - 64, 0xffff800000000000UL,
		HYPERVISOR_VIRT_START, HYPERVISOR_VIRT_END - 64,
	};
	for (unsigned i = 0; i < sizeof(bad_lists) / sizeof(bad_lists[0]); i++) {
		rc = multicall((void *)bad_lists[i], 0);
		tg_check(rc == -XEN_EFAULT, "empty list outside the guest's half: -EFAULT", rc, -XEN_EFAULT);
		rc = multicall((void *)bad_lists[i], 3);
		tg_check(rc == -XEN_EFAULT, "list outside the guest's half: -EFAULT", rc, -XEN_EFAULT);
	}
	rc = multicall((void *)0x1000, 1);
	tg_check(rc == -XEN_EFAULT, "unmapped list: -EFAULT", rc, -XEN_EFAULT);

	/* nr_calls: an unsigned int */
	set(&list[0], HC_set_segment_base, SEGBASE_FS, 0x4000, 0);
	set(&list[1], HC_set_segment_base, SEGBASE_FS, 0x5000, 0);
	rc = multicall(list, (1UL << 32) | 1);
	tg_check(rc == 0, "nr_calls 1<<32|1: 0", rc, 0);
	tg_check(rdmsr(MSR_FS_BASE) == 0x4000 && list[1].result == 0xdeadbeefUL, "nr_calls 1<<32|1: one entry",
		 rdmsr(MSR_FS_BASE), 0x4000);

	/* the list runs into an unmapped page: the entries before it done */
	struct mc *edge = (struct mc *)(pages[1]) - 2;
	u64 second = (u64)pages[1];
	set(&edge[0], HC_set_segment_base, SEGBASE_FS, 0x6000, 0);
	set(&edge[1], HC_set_segment_base, SEGBASE_FS, 0x7000, 0);
	rc = uvm(second, 0, UVMF_INVLPG);
	tg_check(rc == 0, "unmap the list's second page", rc, 0);
	rc = multicall(edge, 3);
	tg_check(rc == -XEN_EFAULT, "entry on an unmapped page: -EFAULT", rc, -XEN_EFAULT);
	tg_check(edge[0].result == 0 && edge[1].result == 0, "entries before it done", edge[1].result, 0);
	tg_check(rdmsr(MSR_FS_BASE) == 0x7000, "entries before it ran", rdmsr(MSR_FS_BASE), 0x7000);
	rc = uvm(second, (va_to_pfn(pages[1]) << 12) | PTE_P | PTE_RW | PTE_A | PTE_D, UVMF_INVLPG);
	tg_check(rc == 0, "map it again", rc, 0);

	/* a result slot that cannot be written: the entry runs, the list stops */
	struct mc *ro = (struct mc *)pages[1];
	set(&ro[0], HC_set_segment_base, SEGBASE_FS, 0x8000, 0);
	set(&ro[1], HC_set_segment_base, SEGBASE_FS, 0x9000, 0);
	rc = uvm(second, (va_to_pfn(pages[1]) << 12) | PTE_P | PTE_A, UVMF_INVLPG);
	tg_check(rc == 0, "map the list read-only", rc, 0);
	rc = multicall(ro, 2);
	tg_check(rc == -XEN_EFAULT, "read-only result slot: -EFAULT", rc, -XEN_EFAULT);
	tg_check(rdmsr(MSR_FS_BASE) == 0x8000, "the entry ran, the next did not", rdmsr(MSR_FS_BASE), 0x8000);
	rc = uvm(second, (va_to_pfn(pages[1]) << 12) | PTE_P | PTE_RW | PTE_A | PTE_D, UVMF_INVLPG);
	tg_check(rc == 0, "map it writable again", rc, 0);
	HC2(HC_set_segment_base, SEGBASE_FS, 0);
}
