/* A hostile guest against Xen's counted page types (issue 11, item 1):
 * every frame has a type (none, L1..L4, writable) and a count of the
 * references of that type; it changes type only at count 0, and becomes a
 * page table only after every entry validates.  The guest forges tables,
 * maps tables writable, pins, unpins and drops references one at a time,
 * and checks each of Xen's answers:
 *   a  forged L1s (an entry past RAM; an entry mapping itself, the live L4,
 *      or the L2 it would live under writable) cannot be pinned or hooked
 *      into the live L2, which keeps its old entry; a refused frame is left
 *      untyped (it can be mapped writable afterwards)
 *   b  a frame mapped writable (twice) cannot be pinned, nor become a base
 *      pointer, until its last writable mapping is gone
 *   c  a pinned L1, or one referenced from the live L2, cannot be mapped
 *      writable (mmu_update, update_va_mapping); read-only is fine
 *   d  UNPIN of the L4 in CR3 succeeds (the builder pinned it) but the CR3
 *      reference keeps it an L4: no writable mapping, Xen's slots 256..271
 *      still refused; it can be pinned again
 *   e  an L1 in two L2 slots and pinned stays a table until its last
 *      reference goes, and then releases the writable reference its entry
 *      held (a leaked count would keep either refused)
 *   f  UNPIN of an unpinned frame, pinning twice, CLEAR_PAGE and COPY_PAGE
 *      onto a page table are refused
 * A "tool" L1 (pinned, in the L2 slot of TEST_VA) makes second mappings.
 * Each check uses frames and slots of its own and stops at its first wrong
 * answer (the state is then not Xen's and later steps would build on it);
 * the guest goes on with the next check, so every failure gets its
 * "check failed" line, and the verdict names the first.  d runs last: a
 * shim that fails it leaves the live L4 untyped.
 *
 * Xen 4.17's errors (xen/arch/x86/mm.c): a type conflict is -EINVAL
 * (_get_page_type: pinning a frame mapped writable, pinning twice, a base
 * pointer of the wrong type, CLEAR/COPY_PAGE onto a table); a writable
 * mapping of a page table is -EBUSY (get_page_from_l1e), also when found
 * while validating a table being pinned or hooked, the error passed up
 * unchanged.  A frame past the guest's RAM is -EINVAL, as in the mmu guest
 * (Xen: -EPERM for MMIO a domU may not map). */
#include "mmutest.h"
const char tg_name[] = "pgtypes";

#define E_TYPE     (-XEN_EINVAL)
#define E_WRITABLE (-XEN_EBUSY)
#define E_NOT_RAM  (-XEN_EINVAL)

#define RO (PTE_P | PTE_A)
#define RW (PTE_P | PTE_RW | PTE_A)
#define PAGE(name) static u64 name[512] __attribute__((aligned(4096)))

/* slots of the kernel L2 (the 2 MiB slot of TEST_VA is 500, the tool L1's) */
enum { S_A_OOB = 501, S_A_SELF, S_A_L4, S_C_LIVE, S_E1, S_E2, S_F };
/* slots of the tool L1, for second mappings */
enum { T_B = 1, T_C, T_E };

PAGE(tool_l1);
PAGE(a_oob); PAGE(a_self); PAGE(a_l4); PAGE(a_l2); PAGE(a_l2_l1);
PAGE(b_page); PAGE(b_l4);
PAGE(c_pinned); PAGE(c_live);
PAGE(e_l1); PAGE(e_data);
PAGE(f_data); PAGE(f_ref);

static u64 l2m, nr_pages;

static u64 *l2(void) { return pfn_va(l2m >> 12); }
static long hook(int slot, const void *l1) { return mmu_update1(l2m + 8 * slot, pte(l1, RW)); }
static long unhook(int slot) { return mmu_update1(l2m + 8 * slot, 0); }
static long tool_map(int slot, u64 val) { return mmu_update1((pfn(tool_l1) << 12) + 8 * slot, val); }
static long map(const void *p, u64 flags) { return uvm((u64)p, pte(p, flags), UVMF_INVLPG); }
static long pin(u32 cmd, const void *p) { return mmuext1(cmd, pfn(p), 0); }
static long unpin(const void *p) { return mmuext1(MMUEXT_UNPIN_TABLE, pfn(p), 0); }

/* the builder's L1 entry mapping kernel address p */
static u64 linear_pte(const void *p)
{
	u64 va = (u64)p, *t = pfn_va(cr3() >> 12);
	for (int shift = 39; shift > 12; shift -= 9)
		t = pfn_va((t[(va >> shift) & 511] & PTE_ADDR) >> 12);
	return t[(va >> 12) & 511];
}

/* a: a page whose entry 7 is `bad` cannot be pinned as an L1, nor hooked
 * into L2 slot `slot` (which keeps its entry) */
static int forged_l1(u64 *f, u64 bad, int slot, long want, const char *pin_what, const char *hook_what)
{
	f[7] = bad;
	long rc = map(f, RO);
	EXPECT_RC(rc, 0, "a: make the forged L1 read-only");
	rc = pin(MMUEXT_PIN_L1_TABLE, f);
	EXPECT_RC(rc, want, pin_what);
	u64 before = l2()[slot];
	rc = hook(slot, f);
	EXPECT_RC(rc, want, hook_what);
	EXPECT(l2()[slot] == before, "a: a refused L2 update leaves the entry as it was", l2()[slot], before);
	return 0;
}

static int check_a_oob(void)
{
	return forged_l1(a_oob, (nr_pages << 12) | RO, S_A_OOB, E_NOT_RAM,
			 "a: PIN_L1 of a page mapping the frame past RAM",
			 "a: L2 entry -> a page mapping the frame past RAM");
}

static int check_a_l4(void)
{
	return forged_l1(a_l4, cr3() | RW, S_A_L4, E_WRITABLE,
			 "a: PIN_L1 of a page mapping the live L4 writable",
			 "a: L2 entry -> a page mapping the live L4 writable");
}

static int check_a_self(void)
{
	if (forged_l1(a_self, pte(a_self, RW), S_A_SELF, E_WRITABLE,
		      "a: PIN_L1 of a page mapping itself writable",
		      "a: L2 entry -> a page mapping itself writable"))
		return 1;
	long rc = map(a_self, RW);
	EXPECT_RC(rc, 0, "a: a refused L1 is left untyped (writable mapping of it)");
	return 0;
}

/* a: validation is recursive: an L2 whose L1 maps that L2 writable */
static int check_a_l2(void)
{
	a_l2[0] = pte(a_l2_l1, RW);
	a_l2_l1[0] = pte(a_l2, RW);
	long rc = map(a_l2, RO);
	EXPECT_RC(rc, 0, "a: make the forged L2 read-only");
	rc = map(a_l2_l1, RO);
	EXPECT_RC(rc, 0, "a: make the forged L1 read-only");
	rc = pin(MMUEXT_PIN_L2_TABLE, a_l2);
	EXPECT_RC(rc, E_WRITABLE, "a: PIN_L2 whose L1 maps that L2 writable");
	rc = map(a_l2, RW);
	EXPECT_RC(rc, 0, "a: the refused L2 is left untyped (writable mapping of it)");
	rc = map(a_l2_l1, RW);
	EXPECT_RC(rc, 0, "a: the L1 below a refused L2 is left untyped (writable mapping of it)");
	return 0;
}

static int check_b(void)
{
	/* the builder maps b_page writable; a second writable mapping */
	long rc = tool_map(T_B, pte(b_page, RW));
	EXPECT_RC(rc, 0, "b: second writable mapping of a data page");
	rc = pin(MMUEXT_PIN_L1_TABLE, b_page);
	EXPECT_RC(rc, E_TYPE, "b: PIN_L1 of a frame mapped writable twice");
	rc = map(b_page, RO);
	EXPECT_RC(rc, 0, "b: first writable mapping made read-only");
	rc = pin(MMUEXT_PIN_L1_TABLE, b_page);
	EXPECT_RC(rc, E_TYPE, "b: PIN_L1 of a frame still mapped writable once");
	rc = tool_map(T_B, 0);
	EXPECT_RC(rc, 0, "b: second writable mapping removed");
	rc = pin(MMUEXT_PIN_L1_TABLE, b_page);
	EXPECT_RC(rc, 0, "b: PIN_L1 once no writable mapping is left");
	return 0;
}

/* b: a copy of the live L4, mapped writable, as a base pointer */
static int check_b_baseptr(void)
{
	u64 cur = cr3(), *l4 = pfn_va(cur >> 12);
	for (int i = 0; i < 512; i++)
		b_l4[i] = l4[i];
	long rc = mmuext1(MMUEXT_NEW_BASEPTR, pfn(b_l4), 0);
	if (rc == 0)
		mmuext1(MMUEXT_NEW_BASEPTR, cur >> 12, 0);   /* back to the table Xen accepted */
	EXPECT_RC(rc, E_TYPE, "b: NEW_BASEPTR to an L4 copy mapped writable");
	EXPECT(cr3() == cur, "b: CR3 unchanged", cr3(), cur);
	return 0;
}

static int check_c(void)
{
	long rc = map(c_pinned, RO);
	EXPECT_RC(rc, 0, "c: make an empty L1 read-only");
	rc = pin(MMUEXT_PIN_L1_TABLE, c_pinned);
	EXPECT_RC(rc, 0, "c: pin an empty L1");
	rc = tool_map(T_C, pte(c_pinned, RW));
	EXPECT_RC(rc, E_WRITABLE, "c: mmu_update mapping a pinned L1 writable");
	EXPECT(tool_l1[T_C] == 0, "c: the refused L1 entry is left as it was", tool_l1[T_C], 0);
	rc = map(c_pinned, RW);
	EXPECT_RC(rc, E_WRITABLE, "c: update_va_mapping a pinned L1 writable");
	EXPECT(!(linear_pte(c_pinned) & PTE_RW), "c: its mapping stays read-only", linear_pte(c_pinned), 0);
	rc = tool_map(T_C, pte(c_pinned, RO));
	EXPECT_RC(rc, 0, "c: a read-only mapping of a pinned L1");
	return 0;
}

/* c: an L1 that only the live L2 references */
static int check_c_live(void)
{
	long rc = map(c_live, RO);
	EXPECT_RC(rc, 0, "c: make an empty L1 read-only");
	rc = hook(S_C_LIVE, c_live);
	EXPECT_RC(rc, 0, "c: hook an empty L1 into the live L2");
	rc = map(c_live, RW);
	EXPECT_RC(rc, E_WRITABLE, "c: update_va_mapping an L1 of the live L2 writable");
	return 0;
}

/* e: references of an L1 dropped one at a time; the probe is a writable
 * mapping of it through the tool L1 */
static int check_e(void)
{
	e_l1[0] = pte(e_data, RW);   /* a writable ref on e_data while e_l1 is a table */
	long rc = map(e_data, RO);
	EXPECT_RC(rc, 0, "e: make the data page read-only");
	rc = map(e_l1, RO);
	EXPECT_RC(rc, 0, "e: make the L1 read-only");
	rc = hook(S_E1, e_l1);
	EXPECT_RC(rc, 0, "e: first L2 entry -> the L1");
	rc = hook(S_E2, e_l1);
	EXPECT_RC(rc, 0, "e: second L2 entry -> the L1");
	rc = pin(MMUEXT_PIN_L1_TABLE, e_l1);
	EXPECT_RC(rc, 0, "e: pin the L1");
	rc = unpin(e_l1);
	EXPECT_RC(rc, 0, "e: UNPIN");
	rc = tool_map(T_E, pte(e_l1, RW));
	EXPECT_RC(rc, E_WRITABLE, "e: writable mapping refused after UNPIN (two L2 refs left)");
	rc = pin(MMUEXT_PIN_L1_TABLE, e_data);
	EXPECT_RC(rc, E_TYPE, "e: PIN_L1 of a frame that a live L1 maps writable");
	rc = unhook(S_E1);
	EXPECT_RC(rc, 0, "e: first L2 entry cleared");
	rc = tool_map(T_E, pte(e_l1, RW));
	EXPECT_RC(rc, E_WRITABLE, "e: writable mapping refused with one L2 ref left");
	rc = unhook(S_E2);
	EXPECT_RC(rc, 0, "e: last L2 entry cleared");
	rc = tool_map(T_E, pte(e_l1, RW));
	EXPECT_RC(rc, 0, "e: writable mapping once the last ref is gone (a leaked count?)");
	rc = pin(MMUEXT_PIN_L1_TABLE, e_data);
	EXPECT_RC(rc, 0, "e: the dead L1 released its entry's writable ref (PIN_L1 of the target)");
	return 0;
}

static int check_f(void)
{
	long rc = unpin(f_data);
	EXPECT_RC(rc, E_TYPE, "f: UNPIN of a data page");
	rc = pin(MMUEXT_PIN_L1_TABLE, tool_l1);
	EXPECT_RC(rc, E_TYPE, "f: PIN_L1 twice");
	rc = pin(MMUEXT_PIN_L2_TABLE, tool_l1);
	EXPECT_RC(rc, E_TYPE, "f: PIN_L2 of a pinned L1");
	rc = mmuext1(MMUEXT_CLEAR_PAGE, pfn(tool_l1), 0);
	EXPECT_RC(rc, E_TYPE, "f: CLEAR_PAGE onto a pinned L1");
	rc = mmuext1(MMUEXT_COPY_PAGE, pfn(tool_l1), pfn(f_data));
	EXPECT_RC(rc, E_TYPE, "f: COPY_PAGE onto a pinned L1");

	/* an L1 that is a table only by the live L2's reference */
	f_ref[3] = pte(f_data, RO);
	rc = map(f_ref, RO);
	EXPECT_RC(rc, 0, "f: make an L1 read-only");
	rc = hook(S_F, f_ref);
	EXPECT_RC(rc, 0, "f: hook the L1 into the live L2");
	rc = unpin(f_ref);
	EXPECT_RC(rc, E_TYPE, "f: UNPIN of an L1 referenced but not pinned");
	rc = mmuext1(MMUEXT_CLEAR_PAGE, pfn(f_ref), 0);
	EXPECT_RC(rc, E_TYPE, "f: CLEAR_PAGE onto an L1 of the live L2");
	rc = mmuext1(MMUEXT_COPY_PAGE, pfn(f_ref), pfn(f_data));
	EXPECT_RC(rc, E_TYPE, "f: COPY_PAGE onto an L1 of the live L2");
	EXPECT((f_ref[3] & (PTE_ADDR | PTE_P)) == pte(f_data, PTE_P), "f: that L1 unchanged",
	       f_ref[3], pte(f_data, PTE_P));
	return 0;
}

static int check_d(void)
{
	u64 cur = cr3(), *l4 = pfn_va(cur >> 12);
	const int first = HYPERVISOR_L4_FIRST_SLOT, last = first + HYPERVISOR_L4_SLOTS - 1;
	long rc = mmuext1(MMUEXT_UNPIN_TABLE, cur >> 12, 0);
	EXPECT_RC(rc, 0, "d: UNPIN of the L4 in CR3 (the builder pinned it)");
	rc = map(l4, RW);
	EXPECT_RC(rc, E_WRITABLE, "d: writable mapping of the L4 in CR3 after UNPIN");
	/* the values already there: harmless should a shim write them */
	rc = mmu_update1(cur + 8 * first, l4[first]);
	EXPECT_RC(rc, E_TYPE, "d: mmu_update of L4 slot 256 after UNPIN");
	rc = mmu_update1(cur + 8 * last, l4[last]);
	EXPECT_RC(rc, E_TYPE, "d: mmu_update of L4 slot 271 after UNPIN");
	rc = mmuext1(MMUEXT_UNPIN_TABLE, cur >> 12, 0);
	EXPECT_RC(rc, E_TYPE, "d: second UNPIN of the L4 in CR3");
	rc = mmuext1(MMUEXT_PIN_L4_TABLE, cur >> 12, 0);
	EXPECT_RC(rc, 0, "d: PIN_L4 of the L4 in CR3 again");
	return 0;
}

void tg_main(struct start_info *si)
{
	static int (*const checks[])(void) = {
		check_a_oob, check_a_l4, check_a_self, check_a_l2, check_b, check_b_baseptr,
		check_c, check_c_live, check_e, check_f, check_d,   /* d last: see the top */
	};
	nr_pages = si->nr_pages;
	l2m = l2_maddr(TEST_VA);
	long rc = hook_l1(tool_l1);
	tg_check(rc == 0, "hook the tool L1", rc, 0);
	if (tg_failures)
		return;
	for (unsigned i = 0; i < sizeof(checks) / sizeof(checks[0]); i++)
		checks[i]();
}
