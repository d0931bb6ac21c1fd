/* memory_op sub-ops a PV domU may issue, as Xen 4.17 answers them
 * (common/memory.c do_memory_op, arch/x86/mm.c arch_memory_op,
 * x86_64/mm.c subarch_memory_op); the reservation's decrease / increase /
 * populate are the balloon guest's:
 *   - maximum_ram_page; current/maximum_reservation and maximum_gpfn for
 *     DOMID_SELF, dom0 (-EPERM) and a domain that does not exist (-ESRCH),
 *     -EFAULT for an unreadable domid; a start extent in the command is
 *     -EINVAL for these;
 *   - maximum_gpfn of a PV guest: shared_info's arch.max_pfn, which the
 *     guest writes, minus one (0 while it is 0);
 *   - machine_memory_map -EPERM (dom0 only); memory_map -EFAULT for bad
 *     pointers; machphys_mapping;
 *   - machphys_mfn_list: one frame per 2 MiB of the M2P, at most
 *     max_extents;
 *   - get/set_pod_target: -EFAULT, -ESRCH, else -EINVAL (not an HVM
 *     guest). */
#include "tg.h"
const char tg_name[] = "memop";

#define MEMOP_EXTENT_SHIFT 6
#define XENMEM_maximum_gpfn 14
#define XENMEM_set_pod_target 16
#define XENMEM_get_pod_target 17
#define SI_MAX_PFN 3088

static u8 si_page[4096] __attribute__((aligned(4096)));
static u16 domid;
static struct { u64 target, tot, cache, entries; u16 domid; u8 pad[6]; } pod;
static struct { u32 max_extents, pad0; u64 extent_start; u32 nr_extents, pad1; } xmml;
static u64 extents[64];
static struct { u64 v_start, v_end, max_mfn; } mapping;
static struct { u32 nr_entries, pad; u64 buffer; } map;
static u8 e820[20 * 128];

static long mop(u64 cmd, void *arg) { return HC2(HC_memory_op, cmd, arg); }

void tg_main(struct start_info *si)
{
	long rc;
	rc = HC3(HC_update_va_mapping, si_page, si->shared_info | PTE_P | PTE_RW | PTE_A | PTE_D, UVMF_INVLPG);
	tg_check(rc == 0, "map shared_info", rc, 0);
	volatile u64 *max_pfn = (volatile u64 *)(si_page + SI_MAX_PFN);

	long ram_page = mop(XENMEM_maximum_ram_page, 0);
	tg_check(ram_page >= (long)si->nr_pages, "maximum_ram_page", ram_page, si->nr_pages);
	rc = mop(XENMEM_maximum_ram_page | (1 << MEMOP_EXTENT_SHIFT), 0);
	tg_check(rc == -XEN_EINVAL, "maximum_ram_page with a start extent: -EINVAL", rc, -XEN_EINVAL);

	domid = DOMID_SELF;
	long cur = mop(XENMEM_current_reservation, &domid);
	tg_check(cur == (long)si->nr_pages, "current_reservation = nr_pages", cur, si->nr_pages);
	long max = mop(XENMEM_maximum_reservation, &domid);
	tg_check(max >= cur, "maximum_reservation >= current", max, cur);
	static const u64 dom_ops[] = { XENMEM_current_reservation, XENMEM_maximum_reservation, XENMEM_maximum_gpfn };
	for (int k = 0; k < 3; k++) {
		domid = 0;
		rc = mop(dom_ops[k], &domid);
		tg_check(rc == -XEN_EPERM, "dom0: -EPERM", rc, -XEN_EPERM);
		domid = 4242;
		rc = mop(dom_ops[k], &domid);
		tg_check(rc == -XEN_ESRCH, "no such domain: -ESRCH", rc, -XEN_ESRCH);
		rc = mop(dom_ops[k], (void *)0x1000);
		tg_check(rc == -XEN_EFAULT, "unreadable domid: -EFAULT", rc, -XEN_EFAULT);
		rc = mop(dom_ops[k], (void *)0xffff800000000000UL);
		tg_check(rc == -XEN_EFAULT, "domid in the hypervisor's range: -EFAULT", rc, -XEN_EFAULT);
		domid = DOMID_SELF;
		rc = mop(dom_ops[k] | (3 << MEMOP_EXTENT_SHIFT), &domid);
		tg_check(rc == -XEN_EINVAL, "start extent: -EINVAL", rc, -XEN_EINVAL);
	}

	/* maximum_gpfn follows the guest's shared_info max_pfn */
	domid = DOMID_SELF;
	*max_pfn = 0;
	rc = mop(XENMEM_maximum_gpfn, &domid);
	tg_check(rc == 0, "maximum_gpfn with max_pfn 0: 0", rc, 0);
	*max_pfn = si->nr_pages;
	rc = mop(XENMEM_maximum_gpfn, &domid);
	tg_check(rc == (long)si->nr_pages - 1, "maximum_gpfn: max_pfn - 1", rc, si->nr_pages - 1);
	*max_pfn = 0x123456;
	rc = mop(XENMEM_maximum_gpfn, &domid);
	tg_check(rc == 0x123455, "maximum_gpfn: the guest's max_pfn - 1", rc, 0x123455);
	*max_pfn = si->nr_pages;

	/* maps */
	map.nr_entries = 128;
	map.buffer = (u64)e820;
	rc = mop(XENMEM_machine_memory_map, &map);
	tg_check(rc == -XEN_EPERM, "machine_memory_map: -EPERM", rc, -XEN_EPERM);
	rc = mop(XENMEM_memory_map, (void *)0x1000);
	tg_check(rc == -XEN_EFAULT, "memory_map unreadable: -EFAULT", rc, -XEN_EFAULT);
	rc = mop(XENMEM_memory_map, &map);
	tg_check(rc == 0 || rc == -XEN_ENOSYS, "memory_map", rc, 0);
	if (rc == 0) {
		tg_check(map.nr_entries >= 1 && map.nr_entries <= 128, "memory_map: entries", map.nr_entries, 1);
		map.nr_entries = 4;
		map.buffer = 0xffff800000000000UL;
		rc = mop(XENMEM_memory_map, &map);
		tg_check(rc == -XEN_EFAULT, "memory_map buffer in the hypervisor's range: -EFAULT", rc, -XEN_EFAULT);
	}
	rc = mop(XENMEM_machphys_mapping, &mapping);
	/* Xen's is at HYPERVISOR_VIRT_START; pyvmm's on kvm_pvm further up the
	 * hypervisor's range (README "Two test lanes") */
	tg_check(rc == 0 && mapping.v_start >= HYPERVISOR_VIRT_START && mapping.v_end > mapping.v_start &&
		 mapping.v_end <= HYPERVISOR_VIRT_END, "machphys_mapping", mapping.v_start, HYPERVISOR_VIRT_START);

	/* machphys_mfn_list */
	xmml.max_extents = 64;
	xmml.extent_start = (u64)extents;
	xmml.nr_extents = 0xdead;
	rc = mop(XENMEM_machphys_mfn_list, &xmml);
	u64 want = (ram_page * 8 + (2UL << 20) - 1) >> 21;
	if (want > 64)
		want = 64;
	tg_check(rc == 0 && xmml.nr_extents == want, "machphys_mfn_list: one per 2 MiB", xmml.nr_extents, want);
	tg_check(extents[0] != 0, "machphys_mfn_list: a frame", extents[0], 1);
	xmml.max_extents = 0;
	extents[0] = 0x77;
	rc = mop(XENMEM_machphys_mfn_list, &xmml);
	tg_check(rc == 0 && xmml.nr_extents == 0 && extents[0] == 0x77, "machphys_mfn_list max_extents 0",
		 xmml.nr_extents, 0);
	xmml.max_extents = 1;
	xmml.extent_start = 0x1000;
	rc = mop(XENMEM_machphys_mfn_list, &xmml);
	tg_check(rc == -XEN_EFAULT, "machphys_mfn_list unwritable extents: -EFAULT", rc, -XEN_EFAULT);
	rc = mop(XENMEM_machphys_mfn_list, (void *)0x1000);
	tg_check(rc == -XEN_EFAULT, "machphys_mfn_list unreadable: -EFAULT", rc, -XEN_EFAULT);

	/* PoD: HVM only */
	static const u64 pod_ops[] = { XENMEM_get_pod_target, XENMEM_set_pod_target };
	for (int k = 0; k < 2; k++) {
		pod.domid = DOMID_SELF;
		rc = mop(pod_ops[k], &pod);
		tg_check(rc == -XEN_EINVAL, "pod_target of a PV guest: -EINVAL", rc, -XEN_EINVAL);
		pod.domid = 4242;
		rc = mop(pod_ops[k], &pod);
		tg_check(rc == -XEN_ESRCH, "pod_target of no domain: -ESRCH", rc, -XEN_ESRCH);
		rc = mop(pod_ops[k], (void *)0x1000);
		tg_check(rc == -XEN_EFAULT, "pod_target unreadable: -EFAULT", rc, -XEN_EFAULT);
	}
}
