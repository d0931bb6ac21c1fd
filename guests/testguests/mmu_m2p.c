/* The read-only M2P is where XENMEM_machphys_mapping says and readable by
 * the guest kernel: Linux translates every PTE it reads through it (ABI
 * §5.11).  Identity design: entry i == i for every RAM frame, and the
 * guest cannot write it. */
#include "mmutest.h"
const char tg_name[] = "mmu_m2p";

struct xen_machphys_mapping { u64 v_start, v_end, max_mfn; };

extern char tg_trap_14[];
u64 tg_expect_rip, tg_resume_rip, tg_expect_rsp;
static volatile struct faults_seen pf;
void tg_trap(u64 vec, u64 *f, int has_err)
{
	take_expected_fault(&pf, 14, vec, f, has_err);
}

void tg_main(struct start_info *si)
{
	static struct trap_info tt[] = { { 14, 0, 0xe030, 0, (u64)tg_trap_14 }, { 0, 0, 0, 0, 0 } };
	long rc = HC1(HC_set_trap_table, tt);
	tg_check(rc == 0, "set_trap_table", rc, 0);
	struct xen_machphys_mapping mp = { 0, 0, 0 };
	rc = HC2(HC_memory_op, XENMEM_machphys_mapping, &mp);
	tg_check(rc == 0, "XENMEM_machphys_mapping", rc, 0);
	tg_check(mp.v_start >= 0xffff800000000000UL && mp.v_end <= 0xffff880000000000UL,
		 "M2P inside the hypervisor hole", mp.v_start, 0xffff800000000000UL);
	tg_check(mp.max_mfn + 1 >= si->nr_pages, "M2P covers RAM", mp.max_mfn, si->nr_pages - 1);
	volatile u64 *m2p = (volatile u64 *)mp.v_start;
	u64 last = si->nr_pages - 1, pfn = va_to_pfn(si);
	tg_check(m2p[0] == 0, "M2P[0]", m2p[0], 0);
	tg_check(m2p[last] == last, "M2P[last RAM frame]", m2p[last], last);
	tg_check(m2p[pfn] == pfn, "M2P[start_info frame]", m2p[pfn], pfn);
	/* read-only for the guest */
	EXPECT_FAULT("movq $0, (%0)", :: "r"(&m2p[pfn]) : "rax", "memory");
	tg_check(pf.count == 1 && (pf.err & 3) == 3, "M2P write faults (write|present)", pf.err, 3);
	tg_check(m2p[pfn] == pfn, "M2P unchanged", m2p[pfn], pfn);
}
