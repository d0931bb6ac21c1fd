/* grant_table_op on the domain's own grants, as Xen 4.17 answers a 64-bit
 * PV guest (common/grant_table.c, arch/x86/pv/grant_table.c), a domain
 * mapping its own grants as a loopback back-end would:
 *   map   a page granted to itself mapped at a second address (host_map
 *         with a linear address, and with GNTMAP_contains_pte), read and
 *         written through both; read-only maps; device maps and their
 *         dev_bus_addr; the map holds the frame writable (it cannot be
 *         pinned as a page table until unmapped); a page table is not
 *         mapped writable; DOMID_SELF is GNTST_bad_domain (Xen looks the
 *         granter up by id); wild refs, addresses with no L1, non-canonical
 *         or in the hypervisor's half, a PTE address that is not an L1
 *   unmap by handle: host_addr / dev_bus_addr checked, a handle never
 *         issued or unmapped twice, a grant revoked while mapped, a PTE
 *         the guest overwrote (the map stays, the counts are right);
 *         unmap_and_replace moves another PTE in
 *   copy  gref or gmfn on each side, DOMID_SELF; a copy crossing the page,
 *         a gmfn of another domain, a frame past RAM, into a read-only
 *         grant or a page table
 *   v2    set_version refused while mapped, the reserved entries carried
 *         over both ways, the others cleared; status frames; 256 entries
 *         a frame; sub_page (copy only, within its range) and transitive
 *         (refused) entries; back to v1
 *   swap_grant_ref, cache_flush; dump_table (-ENOSYS: Xen 4.17 has no
 *   handler) and transfer (-ENOSYS here).
 * Each check stops at its first wrong answer; the next one goes on. */
#include "mmutest.h"
const char tg_name[] = "grants";
typedef int16_t s16;

#define MY_DOMID 1   /* pyvmm's one domain (hypercalls/context.py PvDomainBase) */
#define RO (PTE_P | PTE_A)
#define RW (PTE_P | PTE_RW | PTE_A)
#define PAGE(name) static u64 name[512] __attribute__((aligned(4096)))

struct map_op { u64 host_addr; u32 flags, ref; u16 dom; s16 status; u32 handle; u64 dev_bus_addr; };
struct unmap_op { u64 host_addr, dev_bus_addr; u32 handle; s16 status; u16 _pad; };
struct replace_op { u64 host_addr, new_addr; u32 handle; s16 status; u16 _pad; };
struct copy_ptr { u64 u; u16 domid, offset; u32 _pad; };
struct copy_op { struct copy_ptr src, dst; u16 len, flags; s16 status; u16 _pad; };
struct setup_op { u16 dom, _p0; u32 nr_frames; s16 status; u16 _p1[3]; u64 frame_list; };
struct status_op { u32 nr_frames; u16 dom; s16 status; u64 frame_list; };
struct query_op { u16 dom, _p0; u32 nr_frames, max_nr_frames; s16 status; u16 _p1; };
struct swap_op { u32 ref_a, ref_b; s16 status; u16 _pad; };
struct flush_op { u64 a; u16 offset, length; u32 op; };
struct transfer_op { u64 mfn; u16 domid, _p0; u32 ref; s16 status; u16 _p1[3]; };
struct entry_v1 { u16 flags, domid; u32 frame; };
struct entry_v2 { u16 flags, domid, page_off, length; u64 frame; };
_Static_assert(sizeof(struct map_op) == XEN_GNTTAB_MAP_GRANT_REF_SIZE, "map");
_Static_assert(sizeof(struct unmap_op) == XEN_GNTTAB_UNMAP_GRANT_REF_SIZE, "unmap");
_Static_assert(sizeof(struct replace_op) == XEN_GNTTAB_UNMAP_AND_REPLACE_SIZE, "replace");
_Static_assert(sizeof(struct copy_op) == XEN_GNTTAB_COPY_SIZE, "copy");
_Static_assert(sizeof(struct setup_op) == XEN_GNTTAB_SETUP_TABLE_SIZE, "setup");
_Static_assert(sizeof(struct status_op) == XEN_GNTTAB_GET_STATUS_FRAMES_SIZE, "status");
_Static_assert(sizeof(struct swap_op) == XEN_GNTTAB_SWAP_GRANT_REF_SIZE, "swap");
_Static_assert(sizeof(struct flush_op) == XEN_GNTTAB_CACHE_FLUSH_SIZE, "flush");
_Static_assert(sizeof(struct transfer_op) == XEN_GNTTAB_TRANSFER_SIZE, "transfer");
_Static_assert(sizeof(struct entry_v1) == GNTTAB_V1_ENTRY_SIZE, "v1");
_Static_assert(sizeof(struct entry_v2) == GNTTAB_V2_ENTRY_SIZE, "v2");

/* slots of the tool L1 (at TEST_VA) */
enum { T_GNT0 = 0, T_GNT1, T_STATUS, T_HOST = 16, T_PTE, T_RO, T_PT, T_NEW, T_OVER };
#define SLOT_VA(s) (TEST_VA + (u64)(s) * 4096)

PAGE(tool_l1);
PAGE(gpage_); PAGE(gpage2_); PAGE(ropage); PAGE(scratch_); PAGE(newpage_);
/* the pages also change behind the compiler's back (through the maps, by
 * copies): every access is volatile */
#define gpage ((volatile u64 *)gpage_)
#define gpage2 ((volatile u64 *)gpage2_)
#define scratch ((volatile u64 *)scratch_)
#define newpage ((volatile u64 *)newpage_)
#define pfn(p) va_to_pfn((const void *)(p))
#define pte(p, flags) ((pfn(p) << 12) | (flags))
static u64 frames[4], console_mfn, xenstore_mfn, nr_pages;

static volatile struct entry_v1 *v1(void) { return (volatile struct entry_v1 *)SLOT_VA(T_GNT0); }
static volatile struct entry_v2 *v2(void) { return (volatile struct entry_v2 *)SLOT_VA(T_GNT0); }
static volatile u16 *status_words(void) { return (volatile u16 *)SLOT_VA(T_STATUS); }
static long tool_map(int slot, u64 val) { return mmu_update1((pfn(tool_l1) << 12) + 8 * slot, val); }
static u64 slot_maddr(int slot) { return (pfn(tool_l1) << 12) + 8 * slot; }
static long gnttab(u32 cmd, void *op, u32 count) { return HC3(HC_grant_table_op, cmd, op, count); }

static void grant_v1(u32 ref, u16 flags, u64 frame)
{
	v1()[ref].domid = MY_DOMID;
	v1()[ref].frame = (u32)frame;
	__atomic_store_n(&v1()[ref].flags, flags, __ATOMIC_SEQ_CST);
}

static struct map_op map_op(u64 host_addr, u32 flags, u32 ref, u16 dom)
{
	struct map_op m = { host_addr, flags, ref, dom, 99, 0xdead, 0 };
	long rc = gnttab(GNTTABOP_map_grant_ref, &m, 1);
	if (rc)
		m.status = (s16)-1000;   /* shows as a wrong status */
	return m;
}

static s16 unmap(u64 host_addr, u64 dev_bus_addr, u32 handle)
{
	struct unmap_op u = { host_addr, dev_bus_addr, handle, 99, 0 };
	long rc = gnttab(GNTTABOP_unmap_grant_ref, &u, 1);
	return rc ? (s16)-1000 : u.status;
}

static s16 copy(u64 su, u16 sdom, u16 soff, u64 du, u16 ddom, u16 doff, u16 len, u16 flags)
{
	struct copy_op c = { { su, sdom, soff, 0 }, { du, ddom, doff, 0 }, len, flags, 99, 0 };
	long rc = gnttab(GNTTABOP_copy, &c, 1);
	return rc ? (s16)-1000 : c.status;
}

static long set_version(u32 v, u32 *now)
{
	u32 op = v;
	long rc = gnttab(GNTTABOP_set_version, &op, 1);
	*now = op;
	return rc;
}

/* ---- map / unmap ---- */

static int check_host_map(void)
{
	volatile u64 *second = (volatile u64 *)SLOT_VA(T_HOST);
	long rc = uvm((u64)gpage, pte(gpage, RO), UVMF_INVLPG);   /* the map is its only writable one */
	EXPECT_RC(rc, 0, "map: the granted page read-only in the kernel map");
	grant_v1(10, GTF_permit_access, pfn(gpage));
	struct map_op m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 10, MY_DOMID);
	EXPECT_RC(m.status, GNTST_okay, "map: host_map of our own grant");
	EXPECT(m.dev_bus_addr == pfn(gpage) << 12, "map: dev_bus_addr", m.dev_bus_addr, pfn(gpage) << 12);
	EXPECT(v1()[10].flags == (GTF_permit_access | GTF_reading | GTF_writing),
	       "map: the entry shows reading|writing", v1()[10].flags, GTF_permit_access | 0x18);
	u64 p = tool_l1[T_HOST];
	EXPECT((p & PTE_ADDR) == pfn(gpage) << 12 && (p & (PTE_P | PTE_RW)) == (PTE_P | PTE_RW) && (p & PTE_NX),
	       "map: the PTE (frame, P, RW, NX)", p, pfn(gpage) << 12);
	/* the page is all zeros (a valid L1): only the map's reference stops this */
	rc = mmuext1(MMUEXT_PIN_L1_TABLE, pfn(gpage), 0);
	EXPECT_RC(rc, -XEN_EINVAL, "map: a frame mapped writable by a grant is not pinned as an L1");
	second[5] = 0x1234567890abcdefUL;
	EXPECT(gpage[5] == 0x1234567890abcdefUL, "map: a write through the map is seen at home", gpage[5], 0);
	rc = mmu_update1((pfn(gpage) << 12) + 8 * 6, 0x77);       /* a write at home ... */
	EXPECT_RC(rc, 0, "map: write the page through mmu_update");
	EXPECT(second[6] == 0x77, "map: ... is seen through the map", second[6], 0x77);
	EXPECT_RC(unmap(SLOT_VA(T_HOST) + 4096, 0, m.handle), GNTST_general_error,
		  "unmap: host_addr that is not the map's");
	EXPECT_RC(unmap(SLOT_VA(T_HOST), 0, m.handle + 1000), GNTST_bad_handle, "unmap: a handle never issued");
	second[5] = 0;
	second[6] = 0;
	EXPECT_RC(unmap(SLOT_VA(T_HOST), 0, m.handle), GNTST_okay, "unmap: by handle");
	EXPECT(tool_l1[T_HOST] == 0, "unmap: the PTE is cleared", tool_l1[T_HOST], 0);
	EXPECT(v1()[10].flags == GTF_permit_access, "unmap: reading|writing cleared", v1()[10].flags, 1);
	EXPECT_RC(unmap(SLOT_VA(T_HOST), 0, m.handle), GNTST_bad_handle, "unmap: the same handle twice");
	rc = mmuext1(MMUEXT_PIN_L1_TABLE, pfn(gpage), 0);
	EXPECT_RC(rc, 0, "unmap: the frame is free again (pinned as an L1)");
	rc = mmuext1(MMUEXT_UNPIN_TABLE, pfn(gpage), 0);
	EXPECT_RC(rc, 0, "unmap: unpin it");
	return 0;
}

static int check_contains_pte_and_readonly(void)
{
	grant_v1(11, GTF_permit_access, pfn(gpage2));
	struct map_op m = map_op(slot_maddr(T_PTE), GNTMAP_host_map | GNTMAP_contains_pte, 11, MY_DOMID);
	EXPECT_RC(m.status, GNTST_okay, "contains_pte: map at the PTE's machine address");
	EXPECT((tool_l1[T_PTE] & PTE_ADDR) == pfn(gpage2) << 12, "contains_pte: the PTE", tool_l1[T_PTE], 0);
	gpage2[3] = 42;
	EXPECT(((volatile u64 *)SLOT_VA(T_PTE))[3] == 42, "contains_pte: read through the map", 0, 42);
	EXPECT_RC(unmap(slot_maddr(T_PTE), 0, m.handle), GNTST_okay, "contains_pte: unmap");
	EXPECT(tool_l1[T_PTE] == 0, "contains_pte: cleared", tool_l1[T_PTE], 0);
	m = map_op(slot_maddr(T_PTE) + 4, GNTMAP_host_map | GNTMAP_contains_pte, 11, MY_DOMID);
	EXPECT_RC(m.status, GNTST_general_error, "contains_pte: a misaligned PTE address");
	m = map_op(pfn(scratch) << 12, GNTMAP_host_map | GNTMAP_contains_pte, 11, MY_DOMID);
	EXPECT_RC(m.status, GNTST_general_error, "contains_pte: an address that is not in an L1");
	EXPECT(v1()[11].flags == GTF_permit_access, "refused maps leave no flags", v1()[11].flags, 1);
	/* read-only: grant and map */
	grant_v1(12, GTF_permit_access | GTF_readonly, pfn(ropage));
	m = map_op(SLOT_VA(T_RO), GNTMAP_host_map, 12, MY_DOMID);
	EXPECT_RC(m.status, GNTST_general_error, "readonly: a writable map of a read-only grant");
	m = map_op(SLOT_VA(T_RO), GNTMAP_host_map | GNTMAP_readonly, 12, MY_DOMID);
	EXPECT_RC(m.status, GNTST_okay, "readonly: a read-only map");
	EXPECT((tool_l1[T_RO] & (PTE_P | PTE_RW)) == PTE_P, "readonly: the PTE has no RW", tool_l1[T_RO], PTE_P);
	EXPECT(v1()[12].flags == (GTF_permit_access | GTF_readonly | GTF_reading),
	       "readonly: reading only", v1()[12].flags, 0xd);
	EXPECT_RC(unmap(SLOT_VA(T_RO), 0, m.handle), GNTST_okay, "readonly: unmap");
	return 0;
}

static int check_refusals(void)
{
	grant_v1(13, GTF_permit_access, pfn(gpage2));
	struct map_op m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 13, DOMID_SELF);
	EXPECT_RC(m.status, GNTST_bad_domain, "map: DOMID_SELF (Xen looks the granter up by id)");
	m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 13, 0);
	EXPECT_RC(m.status, GNTST_general_error, "map: domain 0 grants us nothing");
	m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 13, 4242);
	EXPECT_RC(m.status, GNTST_bad_domain, "map: a domain that does not exist");
	m = map_op(SLOT_VA(T_HOST), 0, 13, MY_DOMID);
	EXPECT_RC(m.status, GNTST_bad_gntref, "map: neither host_map nor device_map");
	m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 100000, MY_DOMID);
	EXPECT_RC(m.status, GNTST_bad_gntref, "map: a ref past the table");
	m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 14, MY_DOMID);
	EXPECT_RC(m.status, GNTST_general_error, "map: an entry that grants nothing");
	m = map_op(TEST_VA + (3UL << 21), GNTMAP_host_map, 13, MY_DOMID);
	EXPECT_RC(m.status, GNTST_general_error, "map: a host_addr with no L1");
	m = map_op(0x0000800000000000UL, GNTMAP_host_map, 13, MY_DOMID);
	EXPECT_RC(m.status, GNTST_general_error, "map: a non-canonical host_addr");
	m = map_op(0xffff800000001000UL, GNTMAP_host_map, 13, MY_DOMID);
	EXPECT_RC(m.status, GNTST_general_error, "map: a host_addr in the hypervisor's half");
	EXPECT(v1()[13].flags == GTF_permit_access, "refusals leave no flags", v1()[13].flags, 1);
	/* a page table is never mapped writable; read-only is fine */
	grant_v1(15, GTF_permit_access, pfn(tool_l1));
	m = map_op(SLOT_VA(T_PT), GNTMAP_host_map, 15, MY_DOMID);
	EXPECT_RC(m.status, GNTST_general_error, "map: a page table, writable");
	EXPECT(tool_l1[T_PT] == 0, "map: the refused PTE stays empty", tool_l1[T_PT], 0);
	m = map_op(SLOT_VA(T_PT), GNTMAP_host_map | GNTMAP_readonly, 15, MY_DOMID);
	EXPECT_RC(m.status, GNTST_okay, "map: a page table, read-only");
	EXPECT(((volatile u64 *)SLOT_VA(T_PT))[T_PT] == tool_l1[T_PT], "map: the L1 read through itself", 0, 0);
	EXPECT_RC(unmap(SLOT_VA(T_PT), 0, m.handle), GNTST_okay, "map: unmap the read-only table map");
	long rc = gnttab(GNTTABOP_map_grant_ref, (void *)0xffff800000000000UL, 1);
	EXPECT_RC(rc, -XEN_EFAULT, "map: an op array in the hypervisor's half");
	return 0;
}

static int check_device_map(void)
{
	grant_v1(16, GTF_permit_access, pfn(gpage2));
	struct map_op m = map_op(0, GNTMAP_device_map, 16, MY_DOMID);
	EXPECT_RC(m.status, GNTST_okay, "device_map");
	EXPECT(m.dev_bus_addr == pfn(gpage2) << 12, "device_map: dev_bus_addr", m.dev_bus_addr, pfn(gpage2) << 12);
	EXPECT_RC(unmap(0, (pfn(gpage2) + 1) << 12, m.handle), GNTST_bad_dev_addr, "device_map: wrong dev_bus_addr");
	EXPECT_RC(unmap(0, 0, m.handle), GNTST_okay, "device_map: naming nothing unmaps nothing");
	EXPECT(v1()[16].flags & GTF_writing, "device_map: still mapped", v1()[16].flags, 0x19);
	EXPECT_RC(unmap(0, pfn(gpage2) << 12, m.handle), GNTST_okay, "device_map: unmap");
	EXPECT(v1()[16].flags == GTF_permit_access, "device_map: flags cleared", v1()[16].flags, 1);
	EXPECT_RC(unmap(0, pfn(gpage2) << 12, m.handle), GNTST_bad_handle, "device_map: twice");
	return 0;
}

static int check_revoke_and_replace(void)
{
	grant_v1(17, GTF_permit_access, pfn(gpage2));
	struct map_op m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 17, MY_DOMID);
	EXPECT_RC(m.status, GNTST_okay, "revoke: map");
	v1()[17].flags = 0;                      /* revoked under the map */
	gpage2[1] = 5;
	EXPECT(((volatile u64 *)SLOT_VA(T_HOST))[1] == 5, "revoke: the map still works", 0, 5);
	EXPECT_RC(unmap(SLOT_VA(T_HOST), 0, m.handle), GNTST_okay, "revoke: unmap");
	EXPECT(v1()[17].flags == 0 && tool_l1[T_HOST] == 0, "revoke: gone", v1()[17].flags, 0);
	/* unmap_and_replace: newpage's PTE at T_NEW moves into the grant's slot */
	long rc = tool_map(T_NEW, pte(newpage, RW));
	EXPECT_RC(rc, 0, "replace: map newpage at T_NEW");
	grant_v1(17, GTF_permit_access, pfn(gpage2));
	m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 17, MY_DOMID);
	EXPECT_RC(m.status, GNTST_okay, "replace: map");
	struct replace_op r = { SLOT_VA(T_HOST), SLOT_VA(T_NEW), m.handle, 99, 0 };
	rc = gnttab(GNTTABOP_unmap_and_replace, &r, 1);
	EXPECT(rc == 0 && r.status == GNTST_okay, "replace: unmap_and_replace", r.status, 0);
	EXPECT(tool_l1[T_NEW] == 0, "replace: new_addr's PTE is taken", tool_l1[T_NEW], 0);
	EXPECT((tool_l1[T_HOST] & PTE_ADDR) == pfn(newpage) << 12, "replace: ... and now at host_addr",
	       tool_l1[T_HOST], pfn(newpage) << 12);
	newpage[0] = 9;
	EXPECT(((volatile u64 *)SLOT_VA(T_HOST))[0] == 9, "replace: host_addr maps newpage", 0, 9);
	rc = tool_map(T_HOST, 0);
	EXPECT_RC(rc, 0, "replace: clear it");
	EXPECT(v1()[17].flags == GTF_permit_access, "replace: the grant is free", v1()[17].flags, 1);
	return 0;
}

/* several host maps in one call: the shim answers each PTE request in turn */
static int check_batch(void)
{
	grant_v1(18, GTF_permit_access, pfn(gpage2));
	grant_v1(19, GTF_permit_access | GTF_readonly, pfn(ropage));
	struct map_op m[3] = {
		{ SLOT_VA(T_HOST), GNTMAP_host_map, 18, MY_DOMID, 99, 0, 0 },
		{ SLOT_VA(T_HOST), GNTMAP_host_map, 100000, MY_DOMID, 99, 0, 0 },    /* a bad one between */
		{ SLOT_VA(T_RO), GNTMAP_host_map | GNTMAP_readonly, 19, MY_DOMID, 99, 0, 0 },
	};
	long rc = gnttab(GNTTABOP_map_grant_ref, m, 3);
	EXPECT_RC(rc, 0, "batch: map 3");
	EXPECT(m[0].status == GNTST_okay && m[1].status == GNTST_bad_gntref && m[2].status == GNTST_okay,
	       "batch: each op its own status", (u16)m[1].status, (u16)GNTST_bad_gntref);
	EXPECT((tool_l1[T_HOST] & PTE_ADDR) == pfn(gpage2) << 12 && (tool_l1[T_RO] & PTE_ADDR) == pfn(ropage) << 12,
	       "batch: both PTEs", tool_l1[T_RO], pfn(ropage) << 12);
	struct unmap_op u[2] = { { SLOT_VA(T_HOST), 0, m[0].handle, 99, 0 }, { SLOT_VA(T_RO), 0, m[2].handle, 99, 0 } };
	rc = gnttab(GNTTABOP_unmap_grant_ref, u, 2);
	EXPECT(rc == 0 && u[0].status == GNTST_okay && u[1].status == GNTST_okay, "batch: unmap 2", u[1].status, 0);
	EXPECT(tool_l1[T_HOST] == 0 && tool_l1[T_RO] == 0, "batch: both PTEs gone", tool_l1[T_RO], 0);
	return 0;
}

/* what a host map and its unmap cost (each a hypercall exit to Python and
 * one shim request), against a device map (no PTE) */
static int check_cost(void)
{
	enum { N = 16 };
	grant_v1(26, GTF_permit_access, pfn(gpage2));
	u64 t0 = rdtsc();
	for (int i = 0; i < N; i++) {
		struct map_op m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 26, MY_DOMID);
		EXPECT_RC(m.status, GNTST_okay, "cost: host map");
		EXPECT_RC(unmap(SLOT_VA(T_HOST), 0, m.handle), GNTST_okay, "cost: host unmap");
	}
	u64 t1 = rdtsc();
	for (int i = 0; i < N; i++) {
		struct map_op m = map_op(0, GNTMAP_device_map, 26, MY_DOMID);
		EXPECT_RC(m.status, GNTST_okay, "cost: device map");
		EXPECT_RC(unmap(0, pfn(gpage2) << 12, m.handle), GNTST_okay, "cost: device unmap");
	}
	u64 t2 = rdtsc();
	report_cycles("host_map_unmap", t1 - t0, N);
	report_cycles("device_map_unmap", t2 - t1, N);
	return 0;
}

/* the guest overwrites a grant PTE with mmu_update: the reference the PTE
 * held goes with it (the frame can become a table), the map cannot be
 * unmapped by that address any more, and it stays (Xen: "active grants
 * that it cannot destroy") -- so this runs last, its ref pinned for good */
static int check_overwritten_pte(void)
{
	for (int i = 0; i < 512; i++)
		scratch[i] = 0;          /* it becomes an L1 below */
	long rc = uvm((u64)scratch, pte(scratch, RO), UVMF_INVLPG);
	EXPECT_RC(rc, 0, "overwrite: scratch read-only at home");
	grant_v1(20, GTF_permit_access, pfn(scratch));
	struct map_op m = map_op(SLOT_VA(T_OVER), GNTMAP_host_map, 20, MY_DOMID);
	EXPECT_RC(m.status, GNTST_okay, "overwrite: map");
	rc = tool_map(T_OVER, 0);
	EXPECT_RC(rc, 0, "overwrite: the guest clears the grant PTE itself");
	rc = mmuext1(MMUEXT_PIN_L1_TABLE, pfn(scratch), 0);
	EXPECT_RC(rc, 0, "overwrite: no writable reference is left behind (pinned as an L1)");
	rc = mmuext1(MMUEXT_UNPIN_TABLE, pfn(scratch), 0);
	EXPECT_RC(rc, 0, "overwrite: unpin");
	EXPECT_RC(unmap(SLOT_VA(T_OVER), 0, m.handle), GNTST_general_error,
		  "overwrite: unmap finds another PTE there");
	u32 now;
	rc = set_version(2, &now);
	EXPECT_RC(rc, -XEN_EBUSY, "overwrite: the grant is still in use");
	return 0;
}

/* ---- copy, swap, cache_flush, dump, transfer ---- */

static int check_copy(void)
{
	const u16 S = DOMID_SELF;
	for (int i = 0; i < 512; i++)
		scratch[i] = 0;
	gpage2[0] = 0x1111;
	grant_v1(21, GTF_permit_access, pfn(gpage2));
	grant_v1(22, GTF_permit_access | GTF_readonly, pfn(ropage));
	EXPECT_RC(copy(21, S, 0, pfn(scratch), S, 8, 8, GNTCOPY_source_gref), GNTST_okay, "copy: gref -> gmfn");
	EXPECT(scratch[1] == 0x1111, "copy: the bytes", scratch[1], 0x1111);
	EXPECT(v1()[21].flags == GTF_permit_access, "copy: flags released", v1()[21].flags, 1);
	scratch[2] = 0x2222;
	EXPECT_RC(copy(pfn(scratch), S, 16, 21, MY_DOMID, 24, 8, GNTCOPY_dest_gref), GNTST_okay,
		  "copy: gmfn -> gref (our domid)");
	EXPECT(gpage2[3] == 0x2222, "copy: into the grant", gpage2[3], 0x2222);
	EXPECT_RC(copy(pfn(gpage2), S, 24, pfn(scratch), S, 32, 8, 0), GNTST_okay, "copy: gmfn -> gmfn");
	EXPECT(scratch[4] == 0x2222, "copy: frame to frame", scratch[4], 0x2222);
	EXPECT_RC(copy(21, S, 4000, 22, S, 0, 200, GNTCOPY_source_gref | GNTCOPY_dest_gref), GNTST_general_error,
		  "copy: into a read-only grant");
	EXPECT_RC(copy(21, S, 4000, pfn(scratch), S, 0, 200, GNTCOPY_source_gref), GNTST_bad_copy_arg,
		  "copy: crossing the source page");
	EXPECT_RC(copy(21, S, 0, pfn(scratch), S, 4090, 8, GNTCOPY_source_gref), GNTST_bad_copy_arg,
		  "copy: crossing the destination page");
	EXPECT_RC(copy(pfn(scratch), MY_DOMID, 0, pfn(gpage2), S, 0, 8, 0), GNTST_permission_denied,
		  "copy: a gmfn named with a domid");
	EXPECT_RC(copy(21, 4242, 0, pfn(scratch), S, 0, 8, GNTCOPY_source_gref), GNTST_bad_domain,
		  "copy: a domain that does not exist");
	EXPECT_RC(copy(nr_pages + 5, S, 0, pfn(scratch), S, 0, 8, 0), GNTST_bad_page, "copy: a frame past RAM");
	EXPECT_RC(copy(pfn(scratch), S, 0, pfn(tool_l1), S, 0, 8, 0), GNTST_general_error,
		  "copy: into a page table");
	EXPECT_RC(copy(100000, S, 0, pfn(scratch), S, 0, 8, GNTCOPY_source_gref), GNTST_bad_gntref,
		  "copy: a ref past the table");
	EXPECT(v1()[21].flags == GTF_permit_access && v1()[22].flags == (GTF_permit_access | GTF_readonly),
	       "copy: refusals leave no flags", v1()[21].flags, 1);
	return 0;
}

static int check_swap_flush_dump(void)
{
	grant_v1(23, GTF_permit_access, 0x123);
	grant_v1(24, GTF_permit_access | GTF_readonly, 0x456);
	struct swap_op s = { 23, 24, 99, 0 };
	long rc = gnttab(GNTTABOP_swap_grant_ref, &s, 1);
	EXPECT(rc == 0 && s.status == GNTST_okay, "swap", s.status, 0);
	EXPECT(v1()[23].frame == 0x456 && v1()[24].frame == 0x123 && v1()[23].flags == 5,
	       "swap: the entries swapped", v1()[23].frame, 0x456);
	s = (struct swap_op){ 23, 100000, 99, 0 };
	gnttab(GNTTABOP_swap_grant_ref, &s, 1);
	EXPECT_RC(s.status, GNTST_bad_gntref, "swap: a ref past the table");
	grant_v1(25, GTF_permit_access, pfn(gpage2));
	struct map_op m = map_op(0, GNTMAP_device_map, 25, MY_DOMID);
	EXPECT_RC(m.status, GNTST_okay, "swap: map one");
	s = (struct swap_op){ 23, 25, 99, 0 };
	gnttab(GNTTABOP_swap_grant_ref, &s, 1);
	EXPECT_RC(s.status, GNTST_eagain, "swap: a ref in use");
	EXPECT_RC(unmap(0, pfn(gpage2) << 12, m.handle), GNTST_okay, "swap: unmap");
	struct flush_op f = { pfn(gpage2) << 12, 0, 64, GNTTAB_CACHE_CLEAN };
	EXPECT_RC(gnttab(GNTTABOP_cache_flush, &f, 1), 0, "cache_flush: clean");
	f.op = GNTTAB_CACHE_INVAL;
	EXPECT_RC(gnttab(GNTTABOP_cache_flush, &f, 1), -XEN_EOPNOTSUPP, "cache_flush: invalidate (x86)");
	f.op = GNTTAB_CACHE_CLEAN | 8;
	EXPECT_RC(gnttab(GNTTABOP_cache_flush, &f, 1), -XEN_EINVAL, "cache_flush: unknown op bits");
	f = (struct flush_op){ pfn(gpage2) << 12, 4000, 200, GNTTAB_CACHE_CLEAN };
	EXPECT_RC(gnttab(GNTTABOP_cache_flush, &f, 1), -XEN_EINVAL, "cache_flush: crossing the page");
	struct { u16 dom; s16 status; } d = { DOMID_SELF, 99 };
	EXPECT_RC(gnttab(GNTTABOP_dump_table, &d, 1), -XEN_ENOSYS, "dump_table: Xen 4.17 has none");
	struct transfer_op t = { pfn(scratch), MY_DOMID, 0, 26, 99, {0} };
	EXPECT_RC(gnttab(GNTTABOP_transfer, &t, 1), -XEN_ENOSYS, "transfer: not offered here");
	EXPECT_RC(gnttab(GNTTABOP_map_grant_ref | (1 << 12), &m, 1), -XEN_EINVAL, "continuation bits on map");
	return 0;
}

/* ---- v2 and back ---- */

static int check_v2(void)
{
	u32 now = 0;
	grant_v1(30, GTF_permit_access, pfn(gpage2));
	struct map_op m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 30, MY_DOMID);
	EXPECT_RC(m.status, GNTST_okay, "v2: map before");
	long rc = set_version(2, &now);
	EXPECT(rc == -XEN_EBUSY && now == 1, "v2: set_version while mapped", rc, -XEN_EBUSY);
	EXPECT_RC(unmap(SLOT_VA(T_HOST), 0, m.handle), GNTST_okay, "v2: unmap");
	struct status_op st = { 1, DOMID_SELF, 99, (u64)&frames[2] };
	rc = gnttab(GNTTABOP_get_status_frames, &st, 1);
	EXPECT(rc == 0 && st.status == GNTST_general_error, "v2: no status frames under v1", st.status, -1);
	rc = set_version(2, &now);
	EXPECT(rc == 0 && now == 2, "v2: set_version(2)", rc, 0);
	u32 ver[2] = { DOMID_SELF, 0 };
	rc = gnttab(GNTTABOP_get_version, ver, 1);
	EXPECT(rc == 0 && ver[1] == 2, "v2: get_version", ver[1], 2);
	EXPECT(v2()[0].flags == GTF_permit_access && v2()[0].domid == 0 && v2()[0].frame == console_mfn,
	       "v2: the console entry carried over", v2()[0].frame, console_mfn);
	EXPECT(v2()[1].frame == xenstore_mfn, "v2: the xenstore entry carried over", v2()[1].frame, xenstore_mfn);
	EXPECT(v2()[15].flags == 0 && v2()[15].frame == 0, "v2: the other entries cleared", v2()[15].frame, 0);
	rc = gnttab(GNTTABOP_get_status_frames, &st, 1);
	EXPECT(rc == 0 && st.status == GNTST_okay, "v2: get_status_frames", st.status, 0);
	rc = tool_map(T_STATUS, (frames[2] << 12) | RW);
	EXPECT_RC(rc, 0, "v2: map the status frame");
	st.nr_frames = 2;
	gnttab(GNTTABOP_get_status_frames, &st, 1);
	EXPECT_RC(st.status, GNTST_general_error, "v2: more status frames than the table has");
	/* a v2 full_page grant mapped: the status word, not the entry, shows it */
	v2()[30].domid = MY_DOMID;
	v2()[30].frame = pfn(gpage2);
	__atomic_store_n(&v2()[30].flags, GTF_permit_access, __ATOMIC_SEQ_CST);
	gpage2[7] = 0x7777;
	m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 30, MY_DOMID);
	EXPECT_RC(m.status, GNTST_okay, "v2: map a full_page entry");
	EXPECT(((volatile u64 *)SLOT_VA(T_HOST))[7] == 0x7777, "v2: read through the map", 0, 0x7777);
	EXPECT(status_words()[30] == (GTF_reading | GTF_writing) && v2()[30].flags == GTF_permit_access,
	       "v2: reading|writing in the status word", status_words()[30], 0x18);
	EXPECT_RC(unmap(SLOT_VA(T_HOST), 0, m.handle), GNTST_okay, "v2: unmap");
	EXPECT(status_words()[30] == 0, "v2: status cleared", status_words()[30], 0);
	/* 256 entries a frame: ref 256 needs a second frame */
	m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 256, MY_DOMID);
	EXPECT_RC(m.status, GNTST_bad_gntref, "v2: ref 256 with one frame");
	struct query_op q = { DOMID_SELF, 0, 0, 0, 99, 0 };
	rc = gnttab(GNTTABOP_query_size, &q, 1);
	EXPECT(rc == 0 && q.nr_frames == 1, "v2: query_size", q.nr_frames, 1);
	/* sub_page: copied within its range, never mapped */
	v2()[31].domid = MY_DOMID;
	v2()[31].page_off = 256;
	v2()[31].length = 128;
	v2()[31].frame = pfn(gpage2);
	__atomic_store_n(&v2()[31].flags, GTF_permit_access | GTF_sub_page, __ATOMIC_SEQ_CST);
	m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 31, MY_DOMID);
	EXPECT_RC(m.status, GNTST_general_error, "v2: a sub_page entry is not mapped");
	EXPECT_RC(copy(31, DOMID_SELF, 256, pfn(scratch), DOMID_SELF, 0, 128, GNTCOPY_source_gref), GNTST_okay,
		  "v2: copy within the sub-page");
	EXPECT_RC(copy(31, DOMID_SELF, 255, pfn(scratch), DOMID_SELF, 0, 8, GNTCOPY_source_gref),
		  GNTST_general_error, "v2: copy before the sub-page");
	EXPECT_RC(copy(31, DOMID_SELF, 300, pfn(scratch), DOMID_SELF, 0, 100, GNTCOPY_source_gref),
		  GNTST_general_error, "v2: copy past the sub-page");
	/* transitive (to ourselves): refused */
	v2()[32].domid = MY_DOMID;
	v2()[32].page_off = MY_DOMID;       /* transitive.trans_domid */
	v2()[32].frame = 30;                /* transitive.gref */
	__atomic_store_n(&v2()[32].flags, GTF_transitive, __ATOMIC_SEQ_CST);
	m = map_op(SLOT_VA(T_HOST), GNTMAP_host_map, 32, MY_DOMID);
	EXPECT_RC(m.status, GNTST_general_error, "v2: a transitive entry is not mapped");
	EXPECT_RC(copy(32, DOMID_SELF, 0, pfn(scratch), DOMID_SELF, 0, 8, GNTCOPY_source_gref),
		  GNTST_general_error, "v2: a transitive grant to the granter itself");
	/* setup_table under v2; then back to v1 */
	struct setup_op s = { DOMID_SELF, 0, 2, 99, {0}, (u64)frames };
	rc = gnttab(GNTTABOP_setup_table, &s, 1);
	EXPECT(rc == 0 && s.status == GNTST_okay, "v2: setup_table(2)", s.status, 0);
	v2()[0].frame = 1UL << 40;    /* not expressible in v1 */
	rc = set_version(1, &now);
	EXPECT(rc == -XEN_ERANGE && now == 2, "v1: a reserved entry v1 cannot hold", rc, -XEN_ERANGE);
	v2()[0].frame = console_mfn;
	rc = set_version(1, &now);
	EXPECT(rc == 0 && now == 1, "v1: set_version(1)", rc, 0);
	EXPECT(v1()[0].flags == GTF_permit_access && v1()[0].frame == console_mfn &&
	       v1()[1].frame == xenstore_mfn, "v1: the reserved entries carried back", v1()[0].frame, console_mfn);
	EXPECT(v1()[30].flags == 0 && v1()[31].flags == 0, "v1: the others cleared", v1()[30].flags, 0);
	rc = gnttab(GNTTABOP_get_status_frames, &st, 1);
	EXPECT(rc == 0 && st.status == GNTST_general_error, "v1: the status frames are gone", st.status, -1);
	return 0;
}

void tg_main(struct start_info *si)
{
	static int (*const checks[])(void) = {
		check_host_map, check_contains_pte_and_readonly, check_refusals, check_device_map,
		check_revoke_and_replace, check_batch, check_copy, check_swap_flush_dump, check_v2, check_cost,
		check_overwritten_pte,   /* last: its grant stays in use */
	};
	nr_pages = si->nr_pages;
	console_mfn = si->console_mfn;
	xenstore_mfn = si->store_mfn;
	long rc = hook_l1(tool_l1);
	tg_check(rc == 0, "hook the tool L1", rc, 0);
	struct setup_op s = { DOMID_SELF, 0, 1, 99, {0}, (u64)frames };
	rc = gnttab(GNTTABOP_setup_table, &s, 1);
	tg_check(rc == 0 && s.status == GNTST_okay, "setup_table", s.status, 0);
	rc = tool_map(T_GNT0, (frames[0] << 12) | RW);
	tg_check(rc == 0, "map the grant frame", rc, 0);
	if (tg_failures)
		return;
	for (unsigned i = 0; i < sizeof(checks) / sizeof(checks[0]); i++)
		checks[i]();
}
