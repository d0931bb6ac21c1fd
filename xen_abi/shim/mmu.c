/* Page tables and descriptor tables for the PV guest (Xen's arch/x86/mm.c,
 * pv/ro-page-fault.c and pv/descriptor-tables.c, reduced to what a
 * single-guest shim needs; ABI notes §4, §5.4, §5.9-5.11).
 *
 * Counted page types (Xen's type model; the word is declared in
 * memory/page_types.py).  Every RAM frame has a type -- none, L1..L4 or
 * writable -- and a count of the references that hold it in that type:
 *   - a pin (MMUEXT_PIN_Ln_TABLE, PGT_PINNED) and each vCPU's kernel and
 *     user base pointer hold their table;
 *   - each present entry of a *validated* table holds what it points at:
 *     an L2..L4 entry the table of the level below, an L1 entry with RW a
 *     writable reference on the frame it maps;
 *   - pyvmm's own writers (grant maps, rings) hold writable references.
 * A frame changes type only at count 0, so a page table can never be
 * mapped writable and a frame mapped writable can never become a table.
 * Promotion to a table level validates every entry, taking the references
 * above (recursively, as get_page_type does); a table whose count drops to
 * 0 gives them back (free_page_type).  A frame at count 0 keeps its last
 * type, so that a change of type -- and only that -- flushes the vCPUs
 * that may still translate through a mapping older than the frame's TLB
 * stamp (smp.c's clock; Xen's tlbflush_timestamp).  Entries that map
 * frames read-only take no reference (Xen takes a general one, which only
 * matters for freeing pages here).  Linear page tables (a table mapping
 * a table of its own level) are refused.
 *
 * Concurrency: vCPUs change types under one lock (mmu_lock, which serves
 * TLB-flush requests while it waits, as smp_flush does); pyvmm's threads
 * change words without it, so every change of a word is a compare-and-swap,
 * and Python never changes a word that is a table with references.
 *
 * Typing a table ORs _PAGE_USER into its present entries (Xen's
 * adjust_guest_l?e: the kernel runs in ring 3).  The builder's initial
 * tables are typed (as Xen's builder pins the initial L4 and loads it) on
 * the first MMU operation, page fault or exit to Python.
 *
 * Writable page tables (§5.10): a kernel-mode #PF(present|write) whose
 * target frame is typed L1 is emulated: the store/xchg/cmpxchg/or/and/
 * bts/btr/btc forms Linux uses on PTEs (sub-word stores widened, naturally
 * aligned only, LOCK honoured by doing the update with cmpxchg), the new
 * PTE validated and adjusted, rip advanced.  Anything else is bounced
 * (writes to read-only L2-L4 tables too: Linux uses hypercalls for those).
 * VMASST_writable_pagetables is taken as always on (Linux enables it).
 *
 * Descriptor tables: set_gdt validates the guest's frames (Xen's
 * check_descriptor, fix-ups written back to the frames) and copies them
 * into this vCPU's GDT pages 0..13 in the VMM region; update_descriptor
 * writes the guest frame and, when the frame is part of the live GDT, the
 * copy.  Copying (instead of aliasing the guest frames as Xen does) keeps
 * the CPU's Accessed-bit writes away from the guest's read-only frames and
 * needs no region page-table edits; a guest that maps its GDT frames
 * writable and changes them behind Xen's back (Xen refuses such mappings)
 * is not seen until its next set_gdt.  A non-empty LDT (MMUEXT_SET_LDT)
 * is validated and copied the same way, into the vCPU's LDT area, at once
 * rather than on first use as Xen does.
 */
#include "shim.h"
#include "smp.h"

#define PAGE_SIZE       4096UL
#define ENTRIES         512
#define MMU_CMD_MASK    7UL              /* low bits of mmu_update.ptr */
#define MMU_UPDATE_PREEMPTED (1UL << 31)
#define UVMF_CMD_MASK   7UL              /* flush type + ALL; the rest is a mask pointer */
#define PTE_A           0x20UL
#define PTE_D           0x40UL
#define MAX_LDT_ENTS    8192

/* descriptor bits (high dword) */
#define SEG_P           (1U << 15)
#define SEG_DPL         (3U << 13)
#define SEG_S           (1U << 12)
#define SEG_TYPE        (0xfU << 8)
#define SEG_TYPE_CALLGATE64 (0xcU << 8)
#define GUEST_KERNEL_RPL 3                /* 64-bit PV kernels run in ring 3 */
#define DESCS_PER_PAGE  512

static int booted;   /* bss: the builder's tables have been typed */

/* ---------------- frames ---------------- */

static inline u64 *frame_ptr(u64 mfn)
{
	return mfn < G->ram_pages ? (u64 *)(G->directmap + (mfn << 12)) : 0;
}

static inline u64 *phys_ptr(u64 pa) { return frame_ptr(pa >> 12) ? (u64 *)(G->directmap + pa) : 0; }

/* Frames a present L1 entry may map: guest RAM, shared_info, grant frames. */
static int mappable(u64 mfn)
{
	u64 r = G->region_gpa >> 12;
	return mfn < G->ram_pages || (mfn >= r && mfn < r + GUEST_REGION_FRAMES);
}

/* Xen's adjust_guest_l?e for a 64-bit PV guest: present entries get
 * _PAGE_USER (the guest kernel runs in ring 3). */
static inline u64 adjust_pte(u64 v) { return (v & PTE_P) ? (v | PTE_US) : v; }

static inline int cas64(u64 *p, u64 old, u64 new)
{
	u64 prev = old;
	__asm__ volatile("lock cmpxchgq %2, %1" : "+a"(prev), "+m"(*p) : "r"(new) : "memory");
	return prev == old;
}

static void flush_tlb(struct percpu *pc) { load_cr3(pc->vcpu_id, read_cr3()); }

/* Xen's slots of an L4 being promoted: all of them, whatever the frame
 * held (a guest may have written any of them while it was not a table). */
static void install_hv_slots(u64 *l4)
{
	for (int i = 0; i < HYPERVISOR_L4_SLOTS; i++)
		l4[HYPERVISOR_L4_FIRST_SLOT + i] = G->l4_slots[i];
}

static inline int hv_slot(int idx)
{
	return idx >= HYPERVISOR_L4_FIRST_SLOT && idx < HYPERVISOR_L4_FIRST_SLOT + HYPERVISOR_L4_SLOTS;
}

/* ---------------- counted page types ---------------- */

#define PGT_TYPE(w)     (((w) & PGT_TYPE_MASK) >> PGT_TYPE_SHIFT)
#define PGT_WORD(t, n)  (((u32)(t) << PGT_TYPE_SHIFT) | (u32)(n))
#define IS_TABLE_TYPE(t) ((t) >= PGT_L1 && (t) <= PGT_L4)
#define ALWAYS_INLINE   inline __attribute__((always_inline))

static volatile u32 mmu_lock_word;

static inline int single_vcpu(struct percpu *pc)
{
	return *(u64 *)((u8 *)pc + PRIV_OFF + PRIV_NR_VCPUS) == 1;
}

/* One vCPU at a time changes types (a domain with one vCPU skips the
 * lock: each instruction counts on kvm_pvm).  A waiter serves TLB-flush
 * requests: the holder may be flushing it (smp_flush), with interrupts
 * off here. */
static inline void mmu_lock(struct percpu *pc)
{
	if (single_vcpu(pc))
		return;
	u8 *ev = (u8 *)pc - PERCPU_IN_BLOCK + VCPU_EVENTS_OFF;
	while (__atomic_exchange_n(&mmu_lock_word, 1, __ATOMIC_ACQUIRE))
		while (mmu_lock_word) {
			smp_serve(ev);
			__asm__ volatile("pause" ::: "memory");
		}
}

static inline void mmu_unlock(struct percpu *pc)
{
	if (!single_vcpu(pc))
		__atomic_store_n(&mmu_lock_word, 0, __ATOMIC_RELEASE);
}

/* The word of RAM frame mfn (callers check mfn < ram_pages). */
static inline volatile u32 *type_word(u64 mfn) { return (volatile u32 *)&G->page_type[mfn]; }

static inline int cas32(volatile u32 *p, u32 old, u32 new)
{
	return __atomic_compare_exchange_n(p, &old, new, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* A validated table of `level` now (referenced). */
static inline int table_of_level(u64 mfn, u32 level)
{
	u32 w = mfn < G->ram_pages ? *type_word(mfn) : 0;
	return (w & PGT_COUNT_MASK) && PGT_TYPE(w) == level;
}

static long validate(u64 mfn, u32 level);
static void release_entries(u64 mfn, u32 level, int upto);

/* The first non-zero entry of t[i..ENTRIES), or ENTRIES: a run of empty
 * entries costs one interpreted instruction on kvm_pvm (repe scasq).  For
 * an empty t[i] only: dense tables pay nothing for it. */
static inline int next_used(const u64 *t, int i)
{
	const u64 *p = t + i;
	u64 n = (u64)(ENTRIES - i);
	int all_zero;
	__asm__ volatile("repe scasq" : "+D"(p), "+c"(n), "=@ccz"(all_zero) : "a"(0UL) : "memory");
	return all_zero ? ENTRIES : (int)(p - t) - 1;
}

/* Xen's get_page_type: one reference of `type` on RAM frame mfn; 0, or
 * -EINVAL (another type is referenced, the count is full), or what the
 * first bad entry got when the frame fails validation as a table. */
static long get_type(u64 mfn, u32 type)
{
	volatile u32 *w = type_word(mfn);
	for (;;) {
		u32 old = *w, n = old & PGT_COUNT_MASK;
		if (n) {
			if (PGT_TYPE(old) != type || n == PGT_COUNT_MASK)
				return -XEN_EINVAL;
			if (cas32(w, old, old + 1))
				return 0;
			continue;
		}
		if (!cas32(w, old, PGT_WORD(type, 1)))
			continue;
		/* ours at count 1: no new reference of another type can appear;
		 * translations from the frame's former life go first (they could
		 * write a new table, or walk a former one) */
		if (PGT_TYPE(old) != type)
			smp_flush_stale(G->tlb_stamp[mfn]);
		long rc = type == PGT_WRITABLE ? 0 : validate(mfn, type);
		if (rc)
			__atomic_store_n(w, old, __ATOMIC_SEQ_CST);
		return rc;
	}
}

/* Xen's put_page_type.  The last reference of a table gives back its
 * entries' references first; the frame is stamped whenever a mapping of
 * it or through it may linger in a TLB. */
static void put_type(u64 mfn)
{
	volatile u32 *w = type_word(mfn);
	for (;;) {
		u32 old = *w, n = old & PGT_COUNT_MASK, t = PGT_TYPE(old);
		if (!n)
			return;   /* nothing held: only a forged word gets here */
		if (n == 1 && IS_TABLE_TYPE(t)) {
			/* no one else changes a referenced table's word */
			release_entries(mfn, t, ENTRIES);
			G->tlb_stamp[mfn] = tlb_clock_tick();
			__atomic_store_n(w, PGT_WORD(t, 0), __ATOMIC_SEQ_CST);
			return;
		}
		if (!cas32(w, old, n == 1 ? PGT_WORD(t, 0) : old - 1))
			continue;
		if (t == PGT_WRITABLE)
			G->tlb_stamp[mfn] = tlb_clock_tick();
		return;
	}
}

/* The common cases inline (each instruction counts on kvm_pvm): a writable
 * reference on a frame that is writable already or was never anything
 * (no type change, so no flush), and not the last one back. */
static ALWAYS_INLINE long get_writable(u64 mfn)
{
	volatile u32 *w = type_word(mfn);
	u32 old = *w, n = old & PGT_COUNT_MASK;
	if ((PGT_TYPE(old) == PGT_WRITABLE || !old) && n != PGT_COUNT_MASK
	    && cas32(w, old, PGT_WORD(PGT_WRITABLE, n + 1)))
		return 0;
	return get_type(mfn, PGT_WRITABLE);
}

static ALWAYS_INLINE void put_writable(u64 mfn)
{
	volatile u32 *w = type_word(mfn);
	u32 old = *w;
	if (PGT_TYPE(old) == PGT_WRITABLE && (old & PGT_COUNT_MASK) > 1 && cas32(w, old, old - 1)) {
		G->tlb_stamp[mfn] = tlb_clock_tick();
		return;
	}
	put_type(mfn);
}

/* The reference a present entry of a level-`level` table holds: the
 * table below, or for an L1 entry with RW a writable reference on RAM
 * (refused with -EBUSY, as Xen's get_page_from_l1e does). */
static ALWAYS_INLINE long entry_get(u32 level, u64 e)
{
	u64 mfn = (e & PTE_ADDR) >> 12;
	if (level == PGT_L1) {
		if (mfn >= G->ram_pages)
			return mappable(mfn) ? 0 : -XEN_EINVAL;
		return (e & PTE_RW) && get_writable(mfn) ? -XEN_EBUSY : 0;
	}
	if ((e & PTE_PS) || mfn >= G->ram_pages)
		return -XEN_EINVAL;   /* no superpages for PV; tables are RAM */
	return get_type(mfn, level - 1);
}

/* The frame whose reference entry e holds, or ~0 for none. */
static inline u64 entry_ref(u32 level, u64 e)
{
	u64 mfn = (e & PTE_ADDR) >> 12;
	if (!(e & PTE_P) || mfn >= G->ram_pages || (level == PGT_L1 && !(e & PTE_RW)))
		return ~0UL;
	return mfn;
}

/* Give back the reference held on mfn (from entry_ref) by an entry of a
 * level-`level` table. */
static ALWAYS_INLINE void ref_put(u32 level, u64 mfn)
{
	if (mfn == ~0UL)
		return;
	if (level == PGT_L1)
		put_writable(mfn);
	else
		put_type(mfn);
}

static ALWAYS_INLINE void entry_put(u32 level, u64 e)
{
	ref_put(level, entry_ref(level, e));
}

/* Promotion (Xen's alloc_l?_table): every present entry takes its
 * reference and gets _PAGE_USER; on the first bad one, those taken are
 * given back.  The frame's word is ours (count 1) meanwhile.  One loop per
 * level (the level a constant in each): an L1 promotion visits 512
 * entries, each a few interpreted instructions. */
static ALWAYS_INLINE long validate_level(u64 *t, u64 mfn, u32 level)
{
	for (int i = 0; i < ENTRIES; i++) {
		u64 e = t[i];
		if (!e) {
			i = next_used(t, i) - 1;
			continue;
		}
		if (!(e & PTE_P) || (level == PGT_L4 && hv_slot(i)))
			continue;
		long rc = entry_get(level, e);
		if (rc) {
			release_entries(mfn, level, i);
			return rc;
		}
		if (!(e & PTE_US))
			t[i] = e | PTE_US;
	}
	return 0;
}

static long validate(u64 mfn, u32 level)
{
	u64 *t = frame_ptr(mfn);
	switch (level) {
	case PGT_L1: return validate_level(t, mfn, PGT_L1);
	case PGT_L2: return validate_level(t, mfn, PGT_L2);
	case PGT_L3: return validate_level(t, mfn, PGT_L3);
	default:
		install_hv_slots(t);
		return validate_level(t, mfn, PGT_L4);
	}
}

static ALWAYS_INLINE void release_level(u64 *t, u32 level, int upto)
{
	for (int i = 0; i < upto; i++) {
		u64 e = t[i];
		if (!e) {
			i = next_used(t, i) - 1;
			continue;
		}
		if ((e & PTE_P) && !(level == PGT_L4 && hv_slot(i)))
			entry_put(level, e);
	}
}

static void release_entries(u64 mfn, u32 level, int upto)
{
	u64 *t = frame_ptr(mfn);
	if (level == PGT_L1)
		release_level(t, PGT_L1, upto);
	else
		release_level(t, level, upto);
}

/* Replace the entry at p, in a validated table of `level`, by val: the new
 * entry's reference is taken before the old one's is given back (the same
 * target keeps its type).  With preserve_ad the A/D bits the CPU sets
 * meanwhile survive. */
static ALWAYS_INLINE long entry_update_inline(u32 level, u64 *p, u64 val, int preserve_ad)
{
	if (level == PGT_L4 && hv_slot(((u64)p & (PAGE_SIZE - 1)) >> 3))
		return -XEN_EINVAL;
	/* under mmu_lock only the CPU's A/D bits change *p meanwhile, so the
	 * reference the old entry holds is known before the write */
	u64 had = entry_ref(level, *(volatile u64 *)p), nv = adjust_pte(val);
	/* the same reference kept (e.g. RW kept, other flags changed): the
	 * new entry is still checked, as entry_get would (no superpages) */
	int same = had != ~0UL && had == entry_ref(level, val);
	if (same && level != PGT_L1 && (val & PTE_PS))
		return -XEN_EINVAL;
	if (!same && (val & PTE_P)) {
		long rc = entry_get(level, val);
		if (rc)
			return rc;
	}
	if (preserve_ad) {
		u64 old;
		do
			old = *(volatile u64 *)p;
		while (!cas64(p, old, nv | (old & (PTE_A | PTE_D))));
	} else {
		*(volatile u64 *)p = nv;   /* the CPU's A/D bits of the old entry go with it */
	}
	if (!same)
		ref_put(level, had);
	return 0;
}

/* One body, inlined into the hot callers (mmu_update, update_va_mapping:
 * a boot makes ~30,000 of them): a call per layer cost its own prologue of
 * saved registers, ~27 interpreted instructions of ~280 per mmu_update. */
static NOINLINE long entry_update(u32 level, u64 *p, u64 val, int preserve_ad)
{
	return entry_update_inline(level, p, val, preserve_ad);
}

/* The builder's initial L4 is pinned and loaded, as Xen's builder leaves
 * it: two references, validated down to the L1s.  Under mmu_lock. */
static void boot_types(struct percpu *pc)
{
	if (booted)
		return;
	booted = 1;
	u64 mfn = pc->cr3_kernel >> 12;
	if (mfn >= G->ram_pages || get_type(mfn, PGT_L4) || get_type(mfn, PGT_L4))
		crash_at(pc, 0, mfn, CRASH_BOOT_TABLES_INVALID);   /* the builder's: a pyvmm bug */
	__atomic_or_fetch(type_word(mfn), PGT_PINNED, __ATOMIC_SEQ_CST);
}

/* For Python, before it acts on frame types (reservation.py keeps frames
 * in use): the bootstrap tables typed. */
void mmu_type_boot_tables(struct percpu *pc)
{
	if (booted)
		return;
	mmu_lock(pc);
	boot_types(pc);
	mmu_unlock(pc);
}

/* Walk the current tables for va; the leaf entry or 0.  With fix_user,
 * OR _PAGE_USER into present entries that lack it (lazy adjust). */
static u64 *walk(u64 cr3, u64 va, int fix_user, int *changed, int *level_out)
{
	u64 table = cr3 & PTE_ADDR;
	for (int level = 4; level >= 1; level--) {
		u64 *t = phys_ptr(table);
		if (!t)
			return 0;
		u64 *e = &t[(va >> (12 + 9 * (level - 1))) & 511];
		if (!(*e & PTE_P)) {
			/* an empty L1 slot is still a slot (update_va_mapping
			 * installs into it) -- stock-kernel helper */
			if (level == 1 && level_out) {
				*level_out = 1;
				return e;
			}
			return 0;
		}
		if (fix_user && !(*e & PTE_US)) {
			*e |= PTE_US;
			*changed = 1;
		}
		if (level == 1 || (level <= 3 && (*e & PTE_PS))) {
			if (level_out)
				*level_out = level;
			return e;
		}
		table = *e & PTE_ADDR;
	}
	return 0;
}

/* ---------------- mmu_update ---------------- */

static ALWAYS_INLINE long pt_update(u64 pa, u64 val, int preserve_ad)
{
	u64 mfn = pa >> 12, *p = phys_ptr(pa);
	if (!p)
		return -XEN_EINVAL;
	u32 w = *type_word(mfn);
	if ((w & PGT_COUNT_MASK) && IS_TABLE_TYPE(PGT_TYPE(w)))
		return entry_update_inline(PGT_TYPE(w), p, val, preserve_ad);
	/* not a table: a plain write through a writable reference */
	if (get_type(mfn, PGT_WRITABLE))
		return -XEN_EINVAL;
	*p = val;
	put_type(mfn);
	return 0;
}

static long check_domid(u64 domid)
{
	return (domid & 0xffff) == DOMID_SELF && !(domid >> 16) ? 0 : -XEN_ESRCH;
}

#define BATCH_REQ_WORDS 3   /* the larger request: mmuext_op's cmd, arg1, arg2 */
_Static_assert(XEN_MMU_UPDATE_SIZE <= BATCH_REQ_WORDS * 8, "mmu_update request fits");
_Static_assert(XEN_MMUEXT_OP_SIZE <= BATCH_REQ_WORDS * 8, "mmuext_op request fits");

/* mmu_update and mmuext_op share Xen's batch protocol: `count` requests of
 * `size` bytes at guest VA `reqs`, applied in order up to the first that
 * fails; *done_ptr (when given) learns how many were applied.  A long
 * batch is preempted: the continuation names the rest, with
 * MMU_UPDATE_PREEMPTED in its count, and *done_ptr keeps adding up across
 * the pieces (Xen reads it back when resuming).  Inlined into each, so
 * that `apply` is a direct call the compiler can inline. */
static inline __attribute__((always_inline))
long run_batch(struct percpu *pc, u64 nr, u64 reqs, u64 size, u64 count, u64 done_ptr, u64 domid,
	       long (*apply)(struct percpu *pc, const u64 *req))
{
	u64 i;
	u32 done = 0;
	long rc = 0;
	if (check_domid(domid))
		return -XEN_ESRCH;
	count = (u32)count;   /* Xen's count is an unsigned int */
	if (count & MMU_UPDATE_PREEMPTED) {
		count &= ~MMU_UPDATE_PREEMPTED;
		if (done_ptr)
			from_guest(&done, done_ptr, sizeof(done));   /* unreadable: from 0, as Xen */
	}
	mmu_lock(pc);
	boot_types(pc);
	for (i = 0; i < count; i++) {
		u64 req[BATCH_REQ_WORDS];
		if (i && hc_preempt_check(pc)) {
			hc_continue(pc, nr, reqs + i * size, (count - i) | MMU_UPDATE_PREEMPTED, done_ptr, domid);
			break;
		}
		if (from_guest(req, reqs + i * size, size)) {
			rc = -XEN_EFAULT;
			break;
		}
		rc = apply(pc, req);
		if (rc)
			break;
	}
	mmu_unlock(pc);
	if (done_ptr) {
		done += (u32)i;
		to_guest(done_ptr, &done, sizeof(done));
	}
	return rc;
}

/* One mmu_update request: ptr (command in the low bits), val. */
static ALWAYS_INLINE long mmu_update_one(struct percpu *pc, const u64 *r)
{
	u64 cmd = r[0] & MMU_CMD_MASK, pa = r[0] & ~MMU_CMD_MASK;
	if (cmd == MMU_NORMAL_PT_UPDATE || cmd == MMU_PT_UPDATE_PRESERVE_AD)
		return pt_update(pa, r[1], cmd == MMU_PT_UPDATE_PRESERVE_AD);
	if (cmd == MMU_MACHPHYS_UPDATE) {
		if ((pa >> 12) >= G->ram_pages)
			return -XEN_EINVAL;
		G->m2p[pa >> 12] = r[1];
		return 0;
	}
	return -XEN_ENOSYS;
}

/* Linux's xen_set_pte and friends: one request, no done count (most of a
 * boot's mmu_updates).  What run_batch does for it, without the loop's
 * bookkeeping: its six saved registers cost 12 interpreted instructions. */
static NOINLINE long mmu_update_single(struct percpu *pc, u64 reqs, u64 domid)
{
	u64 req[2];
	if (check_domid(domid))
		return -XEN_ESRCH;
	if (from_guest(req, reqs, XEN_MMU_UPDATE_SIZE))
		return -XEN_EFAULT;
	mmu_lock(pc);
	boot_types(pc);
	long rc = mmu_update_one(pc, req);
	mmu_unlock(pc);
	return rc;
}

static NOINLINE long mmu_update_batch(struct percpu *pc, u64 reqs, u64 count, u64 done_ptr,
				     u64 domid)
{
	return run_batch(pc, HC_mmu_update, reqs, XEN_MMU_UPDATE_SIZE, count, done_ptr, domid,
			 mmu_update_one);
}

long do_mmu_update(struct percpu *pc, u64 reqs, u64 count, u64 done_ptr, u64 domid)
{
	if (count == 1 && !done_ptr)
		return mmu_update_single(pc, reqs, domid);
	return mmu_update_batch(pc, reqs, count, done_ptr, domid);
}

/* ---------------- update_va_mapping ---------------- */

/* A vCPU mask at guest VA `ptr` (a bitmap of unsigned longs; the domain
 * has at most MAX_VCPUS <= 64 vCPUs, so the first word is all of it). */
static long read_vcpumask(u64 ptr, u64 *mask)
{
	return from_guest(mask, ptr, sizeof(*mask));
}

static inline u64 this_vcpu_only(struct percpu *pc) { return 1UL << pc->vcpu_id; }

long do_update_va_mapping(struct percpu *pc, u64 va, u64 val, u64 flags)
{
	int level = 0, ch = 0;
	if (!range_ok(va, 1))
		return -XEN_EINVAL;
	mmu_lock(pc);
	boot_types(pc);
	u64 *e = walk(read_cr3(), va, 0, &ch, &level);
	/* the L1 must exist and be a validated L1 (Xen: -EINVAL otherwise) */
	long rc = !e || level != 1 || !table_of_level(((u64)e - (u64)G->directmap) >> 12, PGT_L1)
		? -XEN_EINVAL : entry_update_inline(PGT_L1, e, val, 0);
	mmu_unlock(pc);
	if (rc)
		return rc;
	u64 type = flags & UVMF_FLUSHTYPE_MASK, mask_ptr = flags & ~UVMF_CMD_MASK, mask;
	if (!type)
		return 0;
	if (flags & UVMF_ALL)
		mask = ~0UL;
	else if (!mask_ptr)   /* UVMF_LOCAL: the common case, no other vCPU involved */
		mask = this_vcpu_only(pc);
	else if (read_vcpumask(mask_ptr, &mask))
		return -XEN_EFAULT;
	if (mask == this_vcpu_only(pc)) {
		if (type == UVMF_INVLPG)
			invlpg(va);
		else
			flush_tlb(pc);
		return 0;
	}
	smp_flush(mask, type == UVMF_INVLPG ? va : FLUSH_ALL_VA);
	return 0;
}

/* ---------------- grant maps of the domain's own grants ----------------
 *
 * GNTTABOP_map_grant_ref / unmap_grant_ref / unmap_and_replace with
 * GNTMAP_host_map: Python decides the grant (hypervisor/grant_table.py:
 * entry, pin, status bits, map handle) and asks for the PTE here
 * (MBOP_GRANT_PTE, slow_hypercall's loop).  The PTE is one of the guest's
 * page-table entries, so it is changed the way mmu_update changes one:
 * under mmu_lock, the new entry taking its writable reference (refused
 * over a page table: -EBUSY, GNTST_general_error), the old one's given
 * back.  The grant holds no reference of its own on the frame (Xen's
 * grant code takes the ones a PTE would, and a PTE overwritten by
 * mmu_update gives them back in a release build): the guest overwriting
 * the PTE, or freeing its L1, leaves the counts right.  Python cannot do
 * this itself: another vCPU may be changing the same table under
 * mmu_lock, and only the shim can flush the other vCPUs' TLBs.  The path
 * is cold (a loopback back-end), so nothing here is tuned. */

/* The validated L1 slot host_addr names (Xen's map_guest_l1e, or the
 * machine address of the PTE with GNTMAP_contains_pte), or 0. */
static u64 *grant_slot(u64 addr, u64 flags)
{
	u64 *p;
	if (flags & GNTMAP_contains_pte) {
		if (addr & 7)
			return 0;
		p = phys_ptr(addr);
	} else {
		int level = 0, ch = 0;
		if (!range_ok(addr, 1))
			return 0;
		p = walk(read_cr3(), addr, 0, &ch, &level);
		if (level != 1)
			return 0;
	}
	if (!p || !table_of_level(((u64)p - (u64)G->directmap) >> 12, PGT_L1))
		return 0;
	return p;
}

/* Xen's create_grant_pv_mapping (INSTALL) and replace_grant_pv_mapping
 * (REMOVE, with steal_linear_address for unmap_and_replace's new_addr).
 * GNTST_okay or GNTST_general_error. */
long mmu_grant_pte(struct percpu *pc, const u64 *r)
{
	u64 kind = r[0], addr = r[1], flags = r[2];
	long rc = GNTST_general_error;
	mmu_lock(pc);
	boot_types(pc);
	if (kind == GRANT_PTE_INSTALL) {
		u64 *p = grant_slot(addr, flags);
		if (p && !entry_update(PGT_L1, p, r[3], 0))
			rc = GNTST_okay;
		mmu_unlock(pc);
		return rc;
	}
	if (kind != GRANT_PTE_REMOVE) {
		mmu_unlock(pc);
		return rc;
	}
	/* the entry at new_addr moves to host_addr with its reference */
	u64 moved = 0, *q = 0;
	if (r[5]) {
		if ((flags & GNTMAP_contains_pte) || !(q = grant_slot(r[5], 0))) {
			mmu_unlock(pc);
			return rc;
		}
		moved = __atomic_exchange_n(q, 0, __ATOMIC_SEQ_CST);
	}
	u64 *p = grant_slot(addr, flags);
	u64 old = p ? *(volatile u64 *)p : 0;
	/* still the grant's: its frame, present, RW as it was mapped */
	if (p && ((old & PTE_ADDR) >> 12) == r[3] && !((old ^ r[4]) & (PTE_P | PTE_RW))) {
		u64 had = entry_ref(PGT_L1, old);
		__atomic_store_n(p, moved, __ATOMIC_SEQ_CST);
		ref_put(PGT_L1, had);
		rc = GNTST_okay;
	} else if (moved) {
		entry_put(PGT_L1, moved);   /* Xen: the stolen entry is dropped */
	}
	mmu_unlock(pc);
	smp_flush(~0UL, FLUSH_ALL_VA);   /* Xen's gnttab_flush_tlb */
	return rc;
}

/* ---------------- mmuext_op ---------------- */

static u64 *gdt_base(void);
static int copy_ok(u64 *d, u64 pages);
static long validate_desc_frame(u64 mfn);
static inline void rep_stosq(void *d, u64 n);
static inline void rep_movsq(void *d, const void *s, u64 n);

/* An LDT into vCPU t's LDT area (VCPU_LDT_OFF, beside its GDT pages
 * `gdt`), its pages found through the L4 at cr3: validated, copied, and
 * the GDT's LDT descriptor pointed there (0 entries: none).  The caller
 * loads LDTR.  Xen maps the LDT pages lazily on the first #PF in its
 * per-vCPU LDT area; the shim takes them at once, and descriptor writes
 * reach the copy through update_descriptor. */
static long load_ldt(struct percpu *t, u64 *gdt, u64 cr3, u64 base, u64 ents)
{
	u64 frames[SHIM_MAX_LDT_FRAMES];
	long rc = 0;
	u64 nr = (ents * 8 + PAGE_SIZE - 1) / PAGE_SIZE;
	for (u64 i = 0; i < nr; i++) {
		int level = 0, ch = 0;
		u64 *e = walk(cr3, base + i * PAGE_SIZE, 0, &ch, &level);
		if (!e || level != 1 || !(*e & PTE_P))
			return -XEN_EINVAL;
		frames[i] = (*e & PTE_ADDR) >> 12;
		if (validate_desc_frame(frames[i]))
			return -XEN_EINVAL;
	}
	u64 *ldt = (u64 *)((u64)gdt + VCPU_LDT_FROM_GDT);
	for (u64 i = 0; i < nr; i++) {
		rep_movsq(ldt + i * DESCS_PER_PAGE, frame_ptr(frames[i]), DESCS_PER_PAGE);
		t->desc.ldt_frames[i] = frames[i];
	}
	if (!copy_ok(ldt, nr)) {
		rep_stosq(ldt, nr * DESCS_PER_PAGE);
		ents = 0;
		rc = -XEN_EINVAL;
	}
	t->desc.ldt_base = ents ? base : 0;
	t->desc.ldt_ents = ents;
	u64 *d = &gdt[SHIM_LDT_SEL >> 3];
	if (!ents) {
		d[0] = d[1] = 0;
		return rc;
	}
	/* 16-byte system descriptor: type 2 (LDT), present, DPL 0 */
	u64 va = (u64)ldt, limit = ents * 8 - 1;
	d[0] = (limit & 0xffff) | ((va & 0xffffff) << 16) | (0x82UL << 40)
	       | (((limit >> 16) & 0xf) << 48) | (((va >> 24) & 0xff) << 56);
	d[1] = va >> 32;
	return 0;
}

/* MMUEXT_SET_LDT on the calling vCPU, through its current tables */
static long set_ldt(struct percpu *pc, u64 base, u64 ents)
{
	long rc = load_ldt(pc, gdt_base(), read_cr3(), base, ents);
	if (rc == -XEN_EINVAL && pc->desc.ldt_ents)   /* refused before the copy: the old one stays */
		return rc;
	__asm__ volatile("lldt %w0" :: "r"(pc->desc.ldt_ents ? SHIM_LDT_SEL : 0));
	return rc;
}

/* MMUEXT_NEW_BASEPTR / NEW_USER_BASEPTR: the base pointer holds its L4. */
static long new_baseptr(struct percpu *pc, u64 mfn, int user)
{
	u64 old = user ? pc->cr3_user : pc->cr3_kernel;
	if (user && !mfn) {
		pc->cr3_user = 0;
	} else {
		if (mfn >= G->ram_pages || get_type(mfn, PGT_L4))
			return -XEN_EINVAL;
		if (user) {
			pc->cr3_user = mfn << 12;
		} else {
			pc->cr3_kernel = mfn << 12;
			if (pc->kernel_mode)
				load_cr3(pc->vcpu_id, mfn << 12);
		}
	}
	if (old)
		put_type(old >> 12);
	return 0;
}

static long pin(u64 mfn, u32 level)
{
	if (mfn >= G->ram_pages || (*type_word(mfn) & PGT_PINNED))
		return -XEN_EINVAL;   /* not RAM, or already pinned (Xen: -EINVAL) */
	long rc = get_type(mfn, level);
	if (rc)
		return rc;   /* a type conflict, or a bad entry (Xen passes it on) */
	/* a referenced table: only vCPUs, under mmu_lock, change its word */
	__atomic_or_fetch(type_word(mfn), PGT_PINNED, __ATOMIC_SEQ_CST);
	return 0;
}

static long unpin(u64 mfn)
{
	if (mfn >= G->ram_pages || !(*type_word(mfn) & PGT_PINNED))
		return -XEN_EINVAL;
	__atomic_and_fetch(type_word(mfn), ~(u32)PGT_PINNED, __ATOMIC_SEQ_CST);
	put_type(mfn);
	return 0;
}

static inline void rep_stosq(void *d, u64 n)
{
	__asm__ volatile("rep stosq" : "+D"(d), "+c"(n) : "a"(0UL) : "memory");
}

static inline void rep_movsq(void *d, const void *s, u64 n)
{
	__asm__ volatile("rep movsq" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
}

/* One mmuext_op request: cmd (u32 + pad), arg1, arg2. */
static long mmuext_one(struct percpu *pc, const u64 *op)
{
	long rc = 0;
	u64 cmd = op[0] & 0xffffffff, mfn = op[1];
	switch (cmd) {
	case MMUEXT_PIN_L1_TABLE: case MMUEXT_PIN_L2_TABLE:
	case MMUEXT_PIN_L3_TABLE: case MMUEXT_PIN_L4_TABLE:
		rc = pin(mfn, (u32)(cmd - MMUEXT_PIN_L1_TABLE) + PGT_L1);
		break;
	case MMUEXT_UNPIN_TABLE:
		rc = unpin(mfn);
		break;
	case MMUEXT_NEW_BASEPTR:
	case MMUEXT_NEW_USER_BASEPTR:
		rc = new_baseptr(pc, mfn, cmd == MMUEXT_NEW_USER_BASEPTR);
		break;
	case MMUEXT_TLB_FLUSH_LOCAL:
		flush_tlb(pc);
		break;
	case MMUEXT_INVLPG_LOCAL:
		if (range_ok(op[1], 1))
			invlpg(op[1]);
		break;
	case MMUEXT_TLB_FLUSH_ALL:
		smp_flush(~0UL, FLUSH_ALL_VA);
		break;
	case MMUEXT_INVLPG_ALL:
		if (range_ok(op[1], 1))
			smp_flush(~0UL, op[1]);
		break;
	case MMUEXT_TLB_FLUSH_MULTI: case MMUEXT_INVLPG_MULTI: {
		u64 mask;
		if (read_vcpumask(op[2], &mask))
			rc = -XEN_EINVAL;   /* Xen: vcpumask_to_pcpumask failed */
		else if (cmd == MMUEXT_TLB_FLUSH_MULTI)
			smp_flush(mask, FLUSH_ALL_VA);
		else if (range_ok(op[1], 1))
			smp_flush(mask, op[1]);
		break;
	}
	case MMUEXT_FLUSH_CACHE:
		rc = -XEN_EACCES;    /* a domU has no cache-flush permission */
		break;
	case MMUEXT_FLUSH_CACHE_GLOBAL:
		rc = -XEN_EINVAL;
		break;
	case MMUEXT_SET_LDT: {
		u64 ents = op[2] & 0xffffffff, base = ents ? op[1] : 0;
		if ((base & (PAGE_SIZE - 1)) || !range_ok(base, ents * 8) || ents > MAX_LDT_ENTS)
			rc = -XEN_EINVAL;
		else
			rc = set_ldt(pc, base, ents);
		break;
	}
	case MMUEXT_CLEAR_PAGE:   /* the destination through a writable reference */
		if (mfn >= G->ram_pages || get_type(mfn, PGT_WRITABLE))
			rc = -XEN_EINVAL;
		else {
			rep_stosq(frame_ptr(mfn), PAGE_SIZE / 8);
			put_type(mfn);
		}
		break;
	case MMUEXT_COPY_PAGE:
		if (mfn >= G->ram_pages || !frame_ptr(op[2]) || get_type(mfn, PGT_WRITABLE))
			rc = -XEN_EINVAL;
		else {
			rep_movsq(frame_ptr(mfn), frame_ptr(op[2]), PAGE_SIZE / 8);
			put_type(mfn);
		}
		break;
	default:
		rc = -XEN_ENOSYS;
	}
	return rc;
}

long do_mmuext_op(struct percpu *pc, u64 ops, u64 count, u64 done_ptr, u64 domid)
{
	return run_batch(pc, HC_mmuext_op, ops, XEN_MMUEXT_OP_SIZE, count, done_ptr, domid, mmuext_one);
}

/* ---------------- writable page tables ---------------- */

static u64 *reg_ptr(struct frame *f, int idx)
{
	/* ModRM register number -> saved slot (struct frame order r15..rax) */
	static const u8 slot[16] = { 14, 12, 11, 13, 255, 8, 10, 9, 7, 6, 5, 4, 3, 2, 1, 0 };
	return idx == 4 ? &f->rsp : &((u64 *)f)[slot[idx]];
}

/* Read a register operand of `size` bytes (legacy AH..BH without REX). */
static u64 reg_read(struct frame *f, int idx, int size, int rex)
{
	if (size == 1 && !rex && idx >= 4 && idx < 8)
		return (*reg_ptr(f, idx - 4) >> 8) & 0xff;
	return *reg_ptr(f, idx);
}

static void reg_write(struct frame *f, int idx, int size, int rex, u64 v)
{
	u64 *r;
	if (size == 1 && !rex && idx >= 4 && idx < 8) {
		r = reg_ptr(f, idx - 4);
		*r = (*r & ~0xff00UL) | ((v & 0xff) << 8);
		return;
	}
	r = reg_ptr(f, idx);
	switch (size) {
	case 1: *r = (*r & ~0xffUL) | (v & 0xff); break;
	case 2: *r = (*r & ~0xffffUL) | (v & 0xffff); break;
	case 4: *r = (u32)v; break;                   /* zero-extends */
	default: *r = v;
	}
}

enum { OP_MOV, OP_XCHG, OP_CMPXCHG, OP_OR, OP_AND, OP_BTS, OP_BTR, OP_BTC };

/* Arithmetic flags of `a OP b` at operand size, computed by the CPU. */
static u64 alu_flags(int op, u64 a, u64 b, int size)
{
	u64 fl = 0;
	u64 bb = b;
	/* operand registers are named by size; a is in rax */
#define CASES(insn) \
	switch (size) { \
	case 1: __asm__("mov %1, %%rax\n\t" insn "b %b2, %%al\n\tpushfq\n\tpopq %0" : "=r"(fl) : "r"(a), "q"(bb) : "rax", "cc"); break; \
	case 2: __asm__("mov %1, %%rax\n\t" insn "w %w2, %%ax\n\tpushfq\n\tpopq %0" : "=r"(fl) : "r"(a), "r"(bb) : "rax", "cc"); break; \
	case 4: __asm__("mov %1, %%rax\n\t" insn "l %k2, %%eax\n\tpushfq\n\tpopq %0" : "=r"(fl) : "r"(a), "r"(bb) : "rax", "cc"); break; \
	default: __asm__("mov %1, %%rax\n\t" insn "q %2, %%rax\n\tpushfq\n\tpopq %0" : "=r"(fl) : "r"(a), "r"(bb) : "rax", "cc"); break; \
	}
	if (op == OP_CMPXCHG)
		CASES("cmp")
	else if (op == OP_OR)
		CASES("or")
	else
		CASES("and")
#undef CASES
	return fl & RFLAGS_ARITH;
}

struct insn {
	int op, size, reg, rex, len;
	int has_imm;
	u64 imm;
};

/* Decode the instruction at rip: only the memory-writing forms Linux uses
 * on PTEs.  The memory operand's address is CR2, so ModRM/SIB are only
 * skipped.  Returns 0 if not one of them. */
static int decode(const u8 *b, int n, struct insn *d)
{
	int i = 0, lock = 0, opsz16 = 0, rex = 0;
	for (;; i++) {
		if (i >= n)
			return 0;
		if (b[i] == 0xf0)
			lock = 1;
		else if (b[i] == 0x66)
			opsz16 = 1;
		else if (b[i] == 0x2e || b[i] == 0x3e || b[i] == 0x26 || b[i] == 0x36 || b[i] == 0x64 || b[i] == 0x65)
			;   /* segment override: CR2 already is the linear address */
		else
			break;
	}
	(void)lock;   /* every update below is done atomically anyway */
	if ((b[i] & 0xf0) == 0x40)
		rex = b[i++];
	if (i + 2 > n)
		return 0;
	u32 opc = b[i++];
	if (opc == 0x0f)
		opc = 0x100 | b[i++];
	int byteop = 0, sub = -1, immsz = 0;
	switch (opc) {
	case 0x88: byteop = 1; /* fall through */
	case 0x89: d->op = OP_MOV; break;
	case 0xc6: byteop = 1; immsz = 1; d->op = OP_MOV; sub = 0; break;
	case 0xc7: immsz = 4; d->op = OP_MOV; sub = 0; break;
	case 0x86: byteop = 1; /* fall through */
	case 0x87: d->op = OP_XCHG; break;
	case 0x1b0: byteop = 1; /* fall through */
	case 0x1b1: d->op = OP_CMPXCHG; break;
	case 0x08: byteop = 1; /* fall through */
	case 0x09: d->op = OP_OR; break;
	case 0x20: byteop = 1; /* fall through */
	case 0x21: d->op = OP_AND; break;
	case 0x80: byteop = 1; immsz = 1; sub = 8; break;
	case 0x81: immsz = 4; sub = 8; break;
	case 0x83: immsz = 1; sub = 8; break;   /* imm8 sign-extended */
	case 0x1ab: d->op = OP_BTS; break;
	case 0x1b3: d->op = OP_BTR; break;
	case 0x1bb: d->op = OP_BTC; break;
	case 0x1ba: immsz = 1; sub = 9; break;
	default: return 0;
	}
	d->size = byteop ? 1 : (rex & 8) ? 8 : opsz16 ? 2 : 4;
	u8 modrm = b[i++];
	int mod = modrm >> 6, rm = modrm & 7, regf = (modrm >> 3) & 7;
	if (mod == 3)
		return 0;   /* register destination: not our fault */
	d->reg = regf | ((rex & 4) << 1);
	d->rex = rex;
	if (sub == 0 && regf != 0)
		return 0;
	if (sub == 8) {   /* group 1: only OR (/1) and AND (/4) */
		if (regf == 1) d->op = OP_OR;
		else if (regf == 4) d->op = OP_AND;
		else return 0;
	}
	if (sub == 9) {   /* group 8: BTS /5, BTR /6, BTC /7 */
		if (regf < 5)
			return 0;
		d->op = OP_BTS + (regf - 5);
	}
	if (rm == 4 && i < n) {   /* SIB */
		u8 sib = b[i++];
		if ((sib & 7) == 5 && mod == 0)
			i += 4;
	} else if (rm == 5 && mod == 0) {
		i += 4;           /* rip-relative */
	}
	if (mod == 1)
		i += 1;
	else if (mod == 2)
		i += 4;
	d->has_imm = immsz != 0;
	if (immsz == 1) {
		d->imm = (u64)(s64)(int8_t)b[i];
	} else if (immsz == 4) {
		if (i + 4 > n)
			return 0;
		d->imm = (u64)(s64)(int32_t)(b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | ((u32)b[i + 3] << 24));
	}
	i += immsz;
	if (i > n)
		return 0;
	d->len = i;
	return 1;
}

/* Emulate a write to the PTE page at cr2; 1 if done. */
static int ptwr_emulate(struct percpu *pc, struct frame *f, u64 cr2)
{
	int level = 0, ch = 0;
	/* Linux writes PTEs through kernel mappings only; a kernel write
	 * fault on a user address is copy-on-write etc.: the guest's own */
	if (cr2 < HYPERVISOR_VIRT_START)
		return 0;
	u64 *leaf = walk(pc->cr3_kernel, cr2, 0, &ch, &level);
	if (!leaf || level != 1 || !(*leaf & PTE_P) || (*leaf & PTE_RW))
		return 0;
	u64 mfn = (*leaf & PTE_ADDR) >> 12;
	if (!table_of_level(mfn, PGT_L1))
		return 0;

	u8 b[15];
	int n = 15;
	if (((f->rip + n - 1) ^ f->rip) & ~(PAGE_SIZE - 1))
		n = (int)(PAGE_SIZE - (f->rip & (PAGE_SIZE - 1)));
	if (from_guest(b, f->rip, n))
		return 0;
	if (n < 15 && from_guest(b + n, f->rip + n, 15 - n) == 0)
		n = 15;
	struct insn d = { 0 };
	if (!decode(b, n, &d))
		return 0;
	/* naturally aligned, inside the faulting page (Xen's rule) */
	if (cr2 & (d.size - 1))
		return 0;

	u64 *p = frame_ptr(mfn) + ((cr2 & (PAGE_SIZE - 1)) >> 3);
	int sh = (int)(cr2 & 7) * 8;
	u64 mask = d.size == 8 ? ~0UL : ((1UL << (d.size * 8)) - 1);
	u64 bits = d.size * 8;
	u64 src = d.has_imm ? d.imm : reg_read(f, d.reg, d.size, d.rex);
	u64 acc = f->rax & mask;
	u64 old, cur, nv, flags = 0;
	int write_reg = 0, write_acc = 0;

	for (;;) {
		old = *(volatile u64 *)p;
		cur = (old >> sh) & mask;
		nv = cur;
		switch (d.op) {
		case OP_MOV: nv = src; break;
		case OP_XCHG: nv = src; write_reg = 1; break;
		case OP_CMPXCHG:
			flags = alu_flags(OP_CMPXCHG, acc, cur, d.size);
			if (cur == acc)
				nv = src;
			else
				write_acc = 1;
			break;
		case OP_OR: nv = cur | src; flags = alu_flags(OP_OR, cur, src, d.size); break;
		case OP_AND: nv = cur & src; flags = alu_flags(OP_AND, cur, src, d.size); break;
		default: {   /* bit ops: CF = old bit */
			u64 bit = 1UL << (src & (bits - 1));
			flags = (cur & bit) ? RFLAGS_CF : 0;
			nv = d.op == OP_BTS ? (cur | bit) : d.op == OP_BTR ? (cur & ~bit) : (cur ^ bit);
		}
		}
		u64 pte = adjust_pte((old & ~(mask << sh)) | ((nv & mask) << sh));
		if (pte == old)
			break;
		/* the new entry's reference first, then the old one's back */
		if ((pte & PTE_P) && entry_get(PGT_L1, pte))
			return 0;   /* Xen: the new PTE failed validation -> #PF to the guest */
		if (cas64(p, old, pte)) {
			entry_put(PGT_L1, old);
			break;
		}
		entry_put(PGT_L1, pte);   /* the CPU set A/D meanwhile: again */
	}
	if (write_reg)
		reg_write(f, d.reg, d.size, d.rex, cur);
	if (write_acc)
		reg_write(f, 0, d.size, d.rex, cur);
	if (d.op != OP_MOV && d.op != OP_XCHG) {
		u64 keep = (d.op >= OP_BTS) ? ~RFLAGS_CF : ~RFLAGS_ARITH;
		f->rflags = (f->rflags & keep) | flags;
	}
	f->rip += d.len;
	return 1;
}

int mmu_page_fault(struct percpu *pc, struct frame *f, u64 cr2)
{
	if (!pc->kernel_mode || (cr2 >= HYPERVISOR_VIRT_START && cr2 < HYPERVISOR_VIRT_END))
		return 0;
	if (!booted) {
		/* typing the bootstrap tables may itself have made this access
		 * legal (adjust_guest_l1e): retry it (stock-kernel helper) */
		mmu_type_boot_tables(pc);
		flush_tlb(pc);
		return 1;
	}
	u64 err = f->err & (PFEC_P | PFEC_W | PFEC_RSVD | 0x10 /* insn fetch */);
	int done = 0;
	mmu_lock(pc);
	if (err & PFEC_P && !(err & PFEC_RSVD)) {
		/* Lazy adjust_guest_l?e: a present page the guest mapped without
		 * _PAGE_USER (written before it became a page table); fix the
		 * walk and retry. */
		int changed = 0;
		walk(read_cr3(), cr2, 1, &changed, 0);
		if (changed) {
			invlpg(cr2);
			done = 1;
		}
	}
	if (!done && err == (PFEC_P | PFEC_W))
		done = ptwr_emulate(pc, f, cr2);
	mmu_unlock(pc);
	return done;
}

/* ---------------- descriptor tables ---------------- */

/* Xen's check_descriptor for a 64-bit PV guest: 1 if acceptable, with the
 * DPL / call-gate fix-ups applied to *d. */
static int check_descriptor(u64 *d)
{
	u32 a = (u32)*d, b = (u32)(*d >> 32);
	if (!(b & SEG_P))
		return 1;
	u32 dpl = (b >> 13) & 3;
	if (dpl < GUEST_KERNEL_RPL)
		dpl = GUEST_KERNEL_RPL;
	b = (b & ~SEG_DPL) | (dpl << 13);
	if (!(b & SEG_S))  {
		if ((b & SEG_TYPE) == 0)
			return 1;   /* harmless: the upper half of a 16-byte gate */
		if ((b & SEG_TYPE) != SEG_TYPE_CALLGATE64)
			return 0;   /* TSS, LDT, interrupt/trap gates: refused */
		u32 cs = a >> 16;
		/* target: a guest GDT entry, the flat kernel CS, or an LDT selector */
		if (!((cs >> 3) < FIRST_RESERVED_GDT_ENTRY || cs == FLAT_RING3_CS64 || (cs & 4)))
			return 0;
		/* DPL 0 so its use faults and can be emulated; old DPL in the RPL */
		b &= ~SEG_DPL;
		cs = (cs & ~3U) | dpl;
		a = (a & 0xffff) | (cs << 16);
		if (b & 0xff)
			return 0;
	}
	*d = ((u64)b << 32) | a;
	return 1;
}

/* A frame mapped writable now, or a page table: Xen's get_page_type
 * (PGT_seg_desc_page) fails on it, so it cannot be part of a GDT or LDT. */
static int desc_frame_refused(u64 mfn)
{
	return mfn >= G->ram_pages || (*type_word(mfn) & PGT_COUNT_MASK);
}

/* A frame becoming part of a GDT or LDT: RAM, not mapped writable, not a
 * page table, every descriptor acceptable (Xen's validate_segdesc_page);
 * fix-ups are written back to the frame as Xen does, through a writable
 * reference of the shim's own.  Under mmu_lock. */
static long validate_desc_frame(u64 mfn)
{
	long rc = 0;
	if (desc_frame_refused(mfn) || get_type(mfn, PGT_WRITABLE))
		return -XEN_EINVAL;
	u64 *fr = frame_ptr(mfn);
	for (int j = 0; j < DESCS_PER_PAGE; j++) {
		u64 dsc = fr[j];
		if (!(dsc & ((u64)SEG_P << 32)))
			continue;   /* not present: always safe (fast path, CPL0 is slow) */
		if (!check_descriptor(&dsc)) {
			rc = -XEN_EINVAL;
			break;
		}
		if (dsc != fr[j])
			fr[j] = dsc;
	}
	put_type(mfn);
	return rc;
}

/* Descriptors copied from guest frames are checked again in the copy, the
 * one the CPU will use: the frames stay writable to the guest's other
 * vCPUs and to a back-end it granted them to, so what was validated in a
 * frame may have changed before it was copied.  1 if every present
 * descriptor of the `pages` pages at d is acceptable (fixed up in place). */
static int copy_ok(u64 *d, u64 pages)
{
	for (u64 p = 0; p < pages; p++, d += DESCS_PER_PAGE)
		for (int j = 0; j < DESCS_PER_PAGE; j++) {
			if (!d[j]) {
				j = next_used(d, j) - 1;
				continue;
			}
			if ((d[j] & ((u64)SEG_P << 32)) && !check_descriptor(&d[j]))
				return 0;
		}
	return 1;
}

static u64 *gdt_base(void)
{
	struct { u16 limit; u64 base; } __attribute__((packed)) g;
	__asm__ volatile("sgdt %0" : "=m"(g));
	return (u64 *)g.base;
}

long do_set_gdt(struct percpu *pc, u64 frames_ptr, u64 entries)
{
	u64 frames[SHIM_MAX_GDT_FRAMES];
	if (entries > FIRST_RESERVED_GDT_ENTRY)
		return -XEN_EINVAL;
	u64 nr = (entries + DESCS_PER_PAGE - 1) / DESCS_PER_PAGE;
	if (nr && from_guest(frames, frames_ptr, nr * 8))
		return -XEN_EFAULT;
	/* validate every descriptor of every frame before changing anything
	 * (Xen's validate_segdesc_page), fixing up in place */
	mmu_lock(pc);
	long rc = 0;
	for (u64 i = 0; i < nr && !rc; i++)
		rc = validate_desc_frame(frames[i]);
	mmu_unlock(pc);
	if (rc)
		return rc;
	u64 *gdt = gdt_base();
	u64 old = pc->desc.gdt_ents ? (pc->desc.gdt_ents + DESCS_PER_PAGE - 1) / DESCS_PER_PAGE : 0;
	for (u64 i = 0; i < nr; i++) {
		rep_movsq(gdt + i * DESCS_PER_PAGE, frame_ptr(frames[i]), DESCS_PER_PAGE);
		pc->desc.gdt_frames[i] = frames[i];
	}
	for (u64 i = nr; i < old; i++)
		rep_stosq(gdt + i * DESCS_PER_PAGE, DESCS_PER_PAGE);
	if (!copy_ok(gdt, nr)) {   /* changed under us: no GDT rather than that one */
		rep_stosq(gdt, nr * DESCS_PER_PAGE);
		pc->desc.gdt_ents = 0;
		return -XEN_EINVAL;
	}
	pc->desc.gdt_ents = entries;
	return 0;
}

/* VCPUOP_initialise, the shim's half of Xen's arch_set_info_guest: the
 * context's GDT frames are copied into the target vCPU's GDT pages `gdt`
 * and every descriptor is checked in the copy (no other vCPU can change it
 * between the check and its use), and its base pointers become L4s.  `t`
 * is the target's percpu; it is not running (shim.c vcpu_initialise). */
long mmu_vcpu_context(struct percpu *pc, struct percpu *t, u64 *gdt, u64 ctx)
{
	u64 frames[SHIM_MAX_GDT_FRAMES], ents, cr[4], ldt[2];   /* ldt: base, entries */
	if (from_guest(&ents, ctx + VGC_GDT_ENTS, 8) || from_guest(cr, ctx + VGC_CTRLREG, sizeof(cr))
	    || from_guest(ldt, ctx + VGC_LDT_BASE, sizeof(ldt)))
		return -XEN_EFAULT;
	if (ents > FIRST_RESERVED_GDT_ENTRY)
		return -XEN_EINVAL;
	u64 nr = (ents + DESCS_PER_PAGE - 1) / DESCS_PER_PAGE;
	if (nr && from_guest(frames, ctx + VGC_GDT_FRAMES, nr * 8))
		return -XEN_EFAULT;
	u64 old = (t->desc.gdt_ents + DESCS_PER_PAGE - 1) / DESCS_PER_PAGE;
	t->desc.gdt_ents = 0;
	rep_stosq(gdt, (old > nr ? old : nr) * DESCS_PER_PAGE);
	mmu_lock(pc);
	boot_types(pc);
	for (u64 i = 0; i < nr; i++) {
		u64 *fr = frame_ptr(frames[i]);
		if (desc_frame_refused(frames[i]))
			goto bad;
		rep_movsq(gdt + i * DESCS_PER_PAGE, fr, DESCS_PER_PAGE);
		t->desc.gdt_frames[i] = frames[i];
	}
	if (!copy_ok(gdt, nr))
		goto bad;
	/* the base pointers hold their L4s (64-bit: plain addresses) */
	u64 kernel = cr[3] >> 12, user = cr[1] >> 12;
	if (kernel >= G->ram_pages || get_type(kernel, PGT_L4))
		goto bad;
	if (user && (user >= G->ram_pages || get_type(user, PGT_L4))) {
		put_type(kernel);
		goto bad;
	}
	/* the LDT, through the context's own kernel tables; Python refuses a
	 * misaligned or oversized one.  Pages it cannot take now leave the
	 * vCPU without an LDT (its uses fault) where Xen would map them at
	 * first use. */
	if (ldt[1] > MAX_LDT_ENTS || (ldt[0] & (PAGE_SIZE - 1)) || !range_ok(ldt[0], ldt[1] * 8)
	    || load_ldt(t, gdt, kernel << 12, ldt[0], ldt[1]))
		load_ldt(t, gdt, 0, 0, 0);
	mmu_unlock(pc);
	t->desc.gdt_ents = ents;
	t->cr3_kernel = kernel << 12;
	t->cr3_user = user << 12;
	return 0;
bad:
	mmu_unlock(pc);
	rep_stosq(gdt, nr * DESCS_PER_PAGE);
	return -XEN_EINVAL;
}

/* Python refused the rest of the context: the base pointers taken by
 * mmu_vcpu_context go back.  `t` is not running. */
void mmu_vcpu_context_undo(struct percpu *t)
{
	struct percpu *pc = pcpu();
	mmu_lock(pc);
	if (t->cr3_kernel)
		put_type(t->cr3_kernel >> 12);
	if (t->cr3_user)
		put_type(t->cr3_user >> 12);
	mmu_unlock(pc);
	t->cr3_kernel = t->cr3_user = 0;
	t->desc.gdt_ents = 0;
	t->desc.ldt_ents = 0;
}

long do_update_descriptor(struct percpu *pc, u64 maddr, u64 desc)
{
	u64 mfn = maddr >> 12;
	if ((maddr & 7) || !check_descriptor(&desc))
		return -XEN_EINVAL;
	/* a write through a writable reference: not a page table */
	mmu_lock(pc);
	if (mfn >= G->ram_pages || get_type(mfn, PGT_WRITABLE)) {
		mmu_unlock(pc);
		return -XEN_EINVAL;
	}
	u64 idx = (maddr & (PAGE_SIZE - 1)) >> 3;
	frame_ptr(mfn)[idx] = desc;
	put_type(mfn);
	mmu_unlock(pc);
	/* live GDT and LDT copies */
	u64 nr = (pc->desc.gdt_ents + DESCS_PER_PAGE - 1) / DESCS_PER_PAGE;
	for (u64 i = 0; i < nr; i++)
		if (pc->desc.gdt_frames[i] == mfn)
			gdt_base()[i * DESCS_PER_PAGE + idx] = desc;
	nr = (pc->desc.ldt_ents * 8 + PAGE_SIZE - 1) / PAGE_SIZE;
	for (u64 i = 0; i < nr; i++)
		if (pc->desc.ldt_frames[i] == mfn)
			((u64 *)((u64)gdt_base() + VCPU_LDT_FROM_GDT))[i * DESCS_PER_PAGE + idx] = desc;
	return 0;
}
