/* The balloon's memory_op sub-ops as Xen answers a PV guest
 * (xen/common/memory.c): decrease_reservation gives frames back (the
 * current reservation falls, their M2P entries become invalid);
 * populate_physmap hands released frames back zero-filled, sets their M2P
 * entries, and never beyond the maximum reservation; hostile extents end a
 * batch with the count done: a frame released twice, a frame past RAM, an
 * order above DOMU_MAX_ORDER, an unreadable list; the guest's own live L4
 * released is counted out (as Xen does) yet keeps working.  As Linux's
 * balloon does, a frame's own mapping goes before the frame (a frame still
 * mapped writable is in use, and pyvmm keeps it until it is not).
 * Leaves POOL - REFILL frames released for the host side to check. */
#include "tg.h"

const char tg_name[] = "balloon";

#define POOL 16
#define REFILL 8

struct xen_memory_reservation {
	u64 extent_start, nr_extents;
	u32 extent_order, mem_flags;
	u16 domid, _pad[3];
};
struct xen_machphys_mapping { u64 v_start, v_end, max_mfn; };

static u8 pool[POOL][4096] __attribute__((aligned(4096)));

static long resv(int op, u64 *list, u64 n, u32 order)
{
	struct xen_memory_reservation r = { (u64)list, n, order, 0, DOMID_SELF, { 0 } };
	return HC2(HC_memory_op, op, &r);
}

static long reservation(int op)
{
	u16 self = DOMID_SELF;
	return HC2(HC_memory_op, op, &self);
}

void tg_main(struct start_info *si)
{
	struct xen_machphys_mapping mm;
	long rc = HC2(HC_memory_op, XENMEM_machphys_mapping, &mm);
	tg_check(rc == 0, "machphys_mapping", rc, 0);
	volatile u64 *m2p = (volatile u64 *)mm.v_start;
	long max = reservation(XENMEM_maximum_reservation), cur = reservation(XENMEM_current_reservation);
	tg_check(cur == max && cur > POOL, "reservation at start", cur, max);

	u64 list[POOL];
	for (int i = 0; i < POOL; i++) {
		for (int b = 0; b < 4096; b += 64)
			pool[i][b] = 0xA5;              /* the host must really hold these */
		list[i] = va_to_pfn(pool[i]);    /* the builder's p2m is identity */
		rc = HC3(HC_update_va_mapping, pool[i], 0, UVMF_INVLPG);
		tg_check(rc == 0, "pool page unmapped", rc, 0);
	}
	rc = resv(XENMEM_decrease_reservation, list, POOL, 0);
	tg_check(rc == POOL, "decrease", rc, POOL);
	tg_check(reservation(XENMEM_current_reservation) == cur - POOL, "current after decrease",
		 reservation(XENMEM_current_reservation), cur - POOL);
	tg_check(m2p[list[3]] == ~0UL, "M2P of a released frame", m2p[list[3]], ~0UL);

	/* hostile extents: each ends its batch with the count done */
	u64 bad[2] = { list[0], 1UL << 40 };
	for (int i = 0; i < 2; i++) {
		rc = resv(XENMEM_decrease_reservation, &bad[i], 1, 0);
		tg_check(rc == 0, "decrease of a released frame / a frame past RAM", rc, 0);
	}
	/* our live L4, as Xen allows: counted out, but it keeps working (the
	 * hypercalls below run on it) and is never handed back */
	u64 l4 = va_to_pfn((void *)si->pt_base);
	rc = resv(XENMEM_decrease_reservation, &l4, 1, 0);
	tg_check(rc == 1, "decrease of the live L4", rc, 1);
	cur -= 1;
	rc = resv(XENMEM_decrease_reservation, list, 1, 10);
	tg_check(rc == 0, "order 10 (above DOMU_MAX_ORDER)", rc, 0);
	rc = resv(XENMEM_decrease_reservation, (u64 *)0x1000, 4, 0);
	tg_check(rc == 0, "unreadable extent list", rc, 0);
	tg_check(reservation(XENMEM_current_reservation) == cur - POOL, "current after hostile extents",
		 reservation(XENMEM_current_reservation), cur - POOL);

	/* populate: released frames come back zeroed, M2P set to our gpfns */
	u64 got[REFILL];
	for (int i = 0; i < REFILL; i++)
		got[i] = 0x100000 + i;               /* the gpfns we file them under */
	rc = resv(XENMEM_populate_physmap, got, REFILL, 0);
	tg_check(rc == REFILL, "populate", rc, REFILL);
	for (int i = 0; i < REFILL; i++) {
		int ours = 0;
		for (int j = 0; j < POOL; j++)
			ours |= got[i] == list[j];
		tg_check(ours, "populated frame is one we released (never the L4)", got[i], list[0]);
		tg_check(m2p[got[i]] == 0x100000UL + i, "M2P of a populated frame", m2p[got[i]], 0x100000UL + i);
		volatile u8 *p = (volatile u8 *)(VIRT_BASE + (got[i] << 12));
		rc = HC3(HC_update_va_mapping, p, (got[i] << 12) | 0x63 /* P RW A D */, UVMF_INVLPG);
		tg_check(rc == 0, "populated frame mapped", rc, 0);
		u8 any = 0;
		for (int b = 0; b < 4096; b++)
			any |= p[b];
		tg_check(any == 0, "populated frame reads zero", any, 0);
		p[0] = 1;
	}
	/* never beyond the maximum: ask for more than were released */
	u64 more[POOL];
	rc = resv(XENMEM_increase_reservation, more, POOL, 0);
	tg_check(rc == POOL - REFILL, "increase stops at the maximum", rc, POOL - REFILL);
	rc = resv(XENMEM_decrease_reservation, more, POOL - REFILL, 0);
	tg_check(rc == POOL - REFILL, "decrease them again", rc, POOL - REFILL);
	rc = resv(XENMEM_increase_reservation, 0, 0, 0);
	tg_check(rc == 0, "increase of nothing", rc, 0);
	tg_check(reservation(XENMEM_current_reservation) == cur - (POOL - REFILL), "current at the end",
		 reservation(XENMEM_current_reservation), cur - (POOL - REFILL));
}
