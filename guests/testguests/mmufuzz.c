/* Fuzzing the shim's counted page types (issue 11): a generated sequence
 * of page-table hypercalls, checked by the host.
 *
 * Command line: seed=N ops=K [check=M] [trace=1] [only=A-B,C,...].  Op i
 * draws its random numbers from (seed, i) alone, so a shorter run is a
 * prefix of a longer one and a subset of the ops (only=) keeps each op's
 * draws (what the host's minimiser needs).  Every M ops and at the end the
 * guest writes "MMUFUZZ CHECK op=<n>" with one console_io write: the host
 * checks the page-type invariants in that exit (tests/mmufuzz.py), while
 * this vCPU waits.  Return codes are not judged; the guest counts what
 * succeeded per kind and prints it ("MMUFUZZ STATS").
 *
 * The ops: mmu_update (normal, PRESERVE_AD, MACHPHYS, bad commands) on
 * entries of a pool of frames and of a few slots of the live tables,
 * single and batched; update_va_mapping in test windows; MMUEXT pin,
 * unpin, NEW_BASEPTR, NEW_USER_BASEPTR, CLEAR_PAGE, COPY_PAGE and flushes,
 * single and batched; multicalls of these; now and then a batch longer
 * than the shim's work budget (preempted and resumed); direct writes to
 * pool frames through their own mapping (the writable-page-table
 * emulation when that is read-only and the frame an L1, a bounced #PF
 * the guest skips when it is no L1, a plain store when it is writable).
 *
 * Entry values name pool frames, untouched RAM, the guest's own data
 * frames, the live L4, frames past RAM and VMM-region frames, with random
 * flags (PS, NX, RW, ...) or one flag of the entry already there flipped.
 *
 * What keeps the guest alive, whatever the shim does with the ops:
 *  - writes (mmu_update, CLEAR_PAGE, COPY_PAGE destinations) go only to
 *    pool frames and to owned slots of the live tables: L4 slots 1..3 (and
 *    Xen's 256..271, refused) of the current L4, slots 100..101 of the
 *    kernel L3, slots 500..503 of the kernel L2 (TEST_VA's);
 *  - entry values never name the builder's L1..L3, so no walk through the
 *    test windows reaches the guest's own mappings; the live L4 can only
 *    be an L4 (any other level fails on its Xen slots);
 *  - entry 511 (the kernel's L4 slot) of a pool frame is only ever written
 *    with the live L4's own, and NEW_BASEPTR goes to a pool frame only when
 *    its entry 511 is that (read through its read-only mapping), never in
 *    one op with CLEAR/COPY_PAGE; or back to the builder's L4;
 *  - update_va_mapping of a pool page's own address maps that page again,
 *    read-only or writable: the guest reads the pool through them. */
#include "mmutest.h"
#include "fuzzguest.h"
const char tg_name[] = "mmufuzz";

#define NPOOL 10            /* pool frames in the image, readable */
#define NFREE 6             /* pool frames at the end of RAM, never mapped */
#define NALL (NPOOL + NFREE)
#define KSLOT 511           /* L4 slot of VIRT_BASE */
#define KL3_SLOT 510        /* L3 slot of VIRT_BASE */
#define PTE_PS 0x80UL
#define W3_BASE 0xffffff8000000000UL   /* the kernel L3's own 512 GiB */
#define LONG_BATCH 300      /* more than the shim's work budget (256) */
#define BIG (LONG_BATCH + 64)   /* a long batch and a multicall's other entries */


/* written only by the shim: volatile */
static volatile u64 pool[NPOOL][512] __attribute__((aligned(4096)));
static u64 pool_va(int i) { return (u64)pool[i]; }
extern char tg_stack[];

static u64 frames[NALL];                 /* the pool's frames */
static u64 own[4], wild[6], nr_pages;
static u64 orig_l4, kl3, kl2, kl3e, cur_l4;

/* ---------------- frames and values ---------------- */

enum kind { K_PT, K_PTAD, K_M2P, K_BADCMD, K_UVM, K_PIN, K_UNPIN, K_BASE, K_UBASE, K_CLEAR, K_COPY,
	    K_FLUSH, K_BADCALL, K_PTWR, NKIND };
static const char *const kind_name[NKIND] = {
	"pt_update", "pt_update_ad", "machphys", "bad_cmd", "update_va_mapping", "pin", "unpin",
	"new_baseptr", "new_user_baseptr", "clear_page", "copy_page", "flush", "bad_call", "direct_write",
};
static u64 tried[NKIND], okay[NKIND];


/* The frame's contents if the guest can read them (pool in the image,
 * the builder's L4..L2), else 0. */
static volatile u64 *readable(u64 mfn)
{
	for (int i = 0; i < NPOOL; i++)
		if (frames[i] == mfn)
			return pool[i];
	if (mfn == orig_l4 || mfn == kl3 || mfn == kl2)
		return pfn_va(mfn);
	return 0;
}

static u64 any_pool(void) { return frames[below(NALL)]; }

/* Each pool frame leans to one level (pool index % 4 + 1): its entries
 * mostly name frames of the level below, pins mostly pin it at its own,
 * so that hierarchies grow instead of random words. */
static u32 lean(u64 mfn)
{
	for (int i = 0; i < NALL; i++)
		if (frames[i] == mfn)
			return (u32)i % 4 + 1;
	return mfn == kl2 ? 2 : mfn == kl3 ? 3 : mfn == cur_l4 ? 4 : 0;
}

static u64 pool_of_level(u32 level) { return frames[(below(NALL / 4) * 4 + level - 1) % NALL]; }

/* Frames an entry, a pin or a base pointer may name. */
static u64 pick_target(void)
{
	u32 r = below(100);
	if (r < 62)
		return any_pool();
	if (r < 72)
		return own[below(4)];
	if (r < 77)
		return orig_l4;
	return wild[below(6)];
}

static u32 pick_index(void)
{
	u32 r = below(100);
	if (r < 55)
		return below(4);
	if (r < 70)
		return 255 + below(18);   /* around Xen's slots 256..271 */
	return below(512);
}

static u64 make_entry(u64 mfn, int rw_pct)
{
	u64 v = (mfn << 12) & PTE_ADDR;
	if (chance(92)) v |= PTE_P;
	if (chance(rw_pct)) v |= PTE_RW;
	if (chance(30)) v |= PTE_US;
	if (chance(50)) v |= PTE_A;
	if (chance(20)) v |= PTE_D;
	if (chance(4)) v |= PTE_PS;
	if (chance(8)) v |= PTE_NX;
	if (chance(4)) v |= (u64)below(8) << 9;
	return v;
}

static u64 flip(u64 e)
{
	static const u64 bits[] = { PTE_P, PTE_RW, PTE_RW, PTE_US, PTE_A | PTE_D, PTE_PS, PTE_PS, PTE_NX,
				    1UL << 9, PTE_P | PTE_RW };
	return e ^ bits[below(sizeof(bits) / sizeof(bits[0]))];
}

/* A value for entry idx of frame mfn. */
static u64 gen_val(u64 mfn, u32 idx)
{
	if (idx == KSLOT)
		return kl3e;
	u32 r = below(100), level = lean(mfn);
	volatile u64 *cur = readable(mfn);
	if (r < 8)
		return 0;
	if (r < 30 && cur)
		return flip(cur[idx]);
	if (r < 70 && level >= 2)
		return make_entry(pool_of_level(level - 1), 85);
	return make_entry(pick_target(), level == 1 ? 30 : 50);
}

/* (frame, index) an mmu_update writes */
static void pick_dest(u64 *mfn, u32 *idx)
{
	u32 r = below(100);
	if (r < 74) {
		*mfn = any_pool();
		*idx = pick_index();
	} else if (r < 82) {
		*mfn = cur_l4;
		*idx = chance(75) ? 1 + below(3) : 256 + below(16);
	} else if (r < 88) {
		*mfn = kl3;
		*idx = 100 + below(2);
	} else if (r < 97) {
		*mfn = kl2;
		*idx = 500 + below(4);
	} else {
		*mfn = wild[below(6)];
		*idx = pick_index();
	}
}

/* ---------------- requests ---------------- */

/* what one op asked for, request by request, to count what succeeded */
static u8 req_kind[BIG];
static int nreq;
static int has_switch, has_copy;   /* kernel NEW_BASEPTR / CLEAR or COPY_PAGE in this op */

static void note(enum kind k) { if (nreq < BIG) req_kind[nreq++] = (u8)k; }

/* n requests from `first`, the first `ok` applied, the next one failed */
static void account(int first, int n, long ok)
{
	for (int j = 0; j < n; j++) {
		if (j > ok)
			break;
		tried[req_kind[first + j]]++;
		if (j < ok)
			okay[req_kind[first + j]]++;
	}
}

static void gen_mmu(struct mmu_update *r)
{
	u64 mfn;
	u32 idx, c = below(100);
	pick_dest(&mfn, &idx);
	r->ptr = (mfn << 12) + 8 * idx;
	r->val = gen_val(mfn, idx);
	if (c < 86) {
		note(K_PT);
	} else if (c < 95) {
		r->ptr |= MMU_PT_UPDATE_PRESERVE_AD;
		note(K_PTAD);
	} else if (c < 98) {
		r->ptr = (mfn << 12) | MMU_MACHPHYS_UPDATE;
		note(K_M2P);
	} else {
		r->ptr |= MMU_PT_UPDATE_NO_TRANSLATE + below(5);   /* 3..7: Xen's -ENOSYS */
		note(K_BADCMD);
	}
}

/* A pool frame that can be the kernel's L4 (its entry 511 is the live
 * L4's), else the builder's L4. */
static u64 l4_for_cr3(void)
{
	u32 start = below(NPOOL);
	if (chance(70))
		for (u32 k = 0; k < NPOOL; k++) {
			u32 i = (start + k) % NPOOL;
			if (pool[i][KSLOT] == kl3e)
				return frames[i];
		}
	return orig_l4;
}

static void gen_ext(struct mmuext_op *op)
{
	u32 r = below(100);
	op->_pad = 0;
	op->arg2 = 0;
	if (r < 30) {
		op->arg1 = pick_target();
		op->cmd = MMUEXT_PIN_L1_TABLE + (lean(op->arg1) && chance(70) ? lean(op->arg1) - 1 : below(4));
		note(K_PIN);
	} else if (r < 50) {
		op->cmd = MMUEXT_UNPIN_TABLE;
		op->arg1 = chance(85) ? any_pool() : pick_target();
		note(K_UNPIN);
	} else if (r < 62 && !has_copy && !has_switch) {
		op->cmd = MMUEXT_NEW_BASEPTR;
		op->arg1 = l4_for_cr3();
		has_switch = 1;
		note(K_BASE);
	} else if (r < 74) {
		op->cmd = MMUEXT_NEW_USER_BASEPTR;
		op->arg1 = chance(10) ? 0 : pick_target();
		note(K_UBASE);
	} else if (r < 85 && !has_switch) {
		/* COPY_PAGE sources: the pool and the L4s, never junk that
		 * could name the builder's tables */
		op->cmd = MMUEXT_COPY_PAGE;
		op->arg1 = chance(95) ? any_pool() : wild[below(6)];
		u32 s = below(100);
		op->arg2 = s < 30 ? orig_l4 : s < 40 ? cur_l4 : any_pool();
		has_copy = 1;
		note(K_COPY);
	} else if (r < 93 && !has_switch) {
		op->cmd = MMUEXT_CLEAR_PAGE;
		op->arg1 = chance(95) ? any_pool() : wild[below(6)];
		has_copy = 1;
		note(K_CLEAR);
	} else {
		static const u32 flushes[] = { MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_INVLPG_LOCAL, MMUEXT_TLB_FLUSH_ALL,
					       MMUEXT_INVLPG_ALL, MMUEXT_TLB_FLUSH_MULTI, MMUEXT_INVLPG_MULTI };
		static u64 vmask = 1;
		op->cmd = flushes[below(6)];
		op->arg1 = TEST_VA + ((u64)below(4) << 21);
		op->arg2 = (u64)&vmask;
		note(K_FLUSH);
	}
}

/* update_va_mapping: a VA of a test window, or a pool page's own */
static void gen_uvm(u64 *va, u64 *val, u64 *flags)
{
	static u64 vmask = 1;
	u32 w = below(100), l1 = pick_index() & 511;
	if (w < 40) {
		*va = TEST_VA + ((u64)below(4) << 21) + ((u64)l1 << 12);
	} else if (w < 62) {
		*va = ((u64)(1 + below(3)) << 39) | ((u64)below(4) << 30) | ((u64)below(4) << 21) | ((u64)l1 << 12);
	} else if (w < 78) {
		*va = W3_BASE | ((u64)(100 + below(2)) << 30) | ((u64)below(4) << 21) | ((u64)l1 << 12);
	} else {
		u32 i = below(NPOOL);
		*va = pool_va(i);
		*val = (frames[i] << 12) | PTE_P | PTE_A | (chance(50) ? PTE_RW | PTE_D : 0);
	}
	if (w < 78)
		*val = chance(10) ? 0 : make_entry(pick_target(), 40);
	u32 f = below(100);
	*flags = f < 30 ? UVMF_NONE : f < 70 ? UVMF_INVLPG : f < 85 ? UVMF_TLB_FLUSH
		: f < 95 ? (below(2) + 1) | UVMF_ALL : UVMF_INVLPG | (u64)&vmask;
	note(K_UVM);
}

/* ---------------- tracing ---------------- */

static void trace_mmu(u64 i, const char *what, const struct mmu_update *r, int n, long rc, u32 done)
{
	if (!trace)
		return;
	for (int j = 0; j < n; j++) {
		lput("op "); ldec((long)i); lput(" "); lput(what);
		lput(" ptr="); lhex(r[j].ptr); lput(" val="); lhex(r[j].val);
		if (j == n - 1) { lput(" rc="); ldec(rc); if (n > 1) { lput(" done="); ldec(done); } }
		lend();
	}
}

static void trace_ext(u64 i, const char *what, const struct mmuext_op *o, int n, long rc, u32 done)
{
	if (!trace)
		return;
	for (int j = 0; j < n; j++) {
		lput("op "); ldec((long)i); lput(" "); lput(what); lput(" cmd="); ldec(o[j].cmd);
		lput(" arg1="); lhex(o[j].arg1); lput(" arg2="); lhex(o[j].arg2);
		if (j == n - 1) { lput(" rc="); ldec(rc); if (n > 1) { lput(" done="); ldec(done); } }
		lend();
	}
}

static void trace_uvm(u64 i, const char *what, u64 va, u64 val, u64 flags, long rc)
{
	if (!trace)
		return;
	lput("op "); ldec((long)i); lput(" "); lput(what); lput(" va="); lhex(va); lput(" val="); lhex(val);
	lput(" flags="); lhex(flags); lput(" rc="); ldec(rc);
	lend();
}

/* ---------------- the ops ---------------- */

static struct mmu_update reqs[BIG];
static struct mmuext_op exts[8];
static struct mc calls[4];
static struct mmu_update mc_reqs[4][BIG];
static struct mmuext_op mc_exts[4][4];
static u32 mc_done[4];

static long mmu_batch(struct mmu_update *r, int n, u32 *done)
{
	*done = 0;
	return mmu_update(r, n, done, DOMID_SELF);
}

/* A batch past the work budget: the current values rewritten at random
 * readable places (each one applies), then a few random requests. */
static int gen_long(struct mmu_update *r)
{
	int n = LONG_BATCH - 20 + (int)below(40);
	for (int j = 0; j < n - 3; j++) {
		u32 i = below(NPOOL), idx = below(512);
		if (idx >= 256 && idx < 272)
			idx -= 16;
		r[j].ptr = (frames[i] << 12) + 8 * idx;
		r[j].val = pool[i][idx];
		note(K_PT);
	}
	for (int j = n - 3; j < n; j++)
		gen_mmu(&r[j]);
	return n;
}

static void op_mmu_single(u64 i)
{
	u32 done = 0;
	gen_mmu(&reqs[0]);
	long rc = chance(60) ? mmu_update(reqs, 1, 0, DOMID_SELF) : mmu_batch(reqs, 1, &done);
	account(0, 1, rc == 0);
	trace_mmu(i, "mmu", reqs, 1, rc, done);
}

static void op_mmu_batch(u64 i, int is_long)
{
	u32 done;
	int n = is_long ? gen_long(reqs) : 2 + (int)below(7);
	if (!is_long)
		for (int j = 0; j < n; j++)
			gen_mmu(&reqs[j]);
	long rc = mmu_batch(reqs, n, &done);
	account(0, n, done);
	trace_mmu(i, is_long ? "mmu-long" : "mmu-batch", reqs, n, rc, done);
}

static void op_ext(u64 i, int n)
{
	u32 done = 0;
	for (int j = 0; j < n; j++)
		gen_ext(&exts[j]);
	long rc = n == 1 && chance(60) ? HC4(HC_mmuext_op, exts, 1, 0, DOMID_SELF)
				       : HC4(HC_mmuext_op, exts, n, &done, DOMID_SELF);
	account(0, n, n == 1 && rc == 0 ? 1 : done);
	trace_ext(i, n == 1 ? "ext" : "ext-batch", exts, n, rc, done);
}

static void op_uvm(u64 i)
{
	u64 va, val, flags;
	gen_uvm(&va, &val, &flags);
	long rc = uvm(va, val, flags);
	account(0, 1, rc == 0);
	trace_uvm(i, "uvm", va, val, flags, rc);
}

static void op_multicall(u64 i, int with_long)
{
	int n = 2 + (int)below(3), first[4], cnt[4];
	for (int e = 0; e < n; e++) {
		struct mc *c = &calls[e];
		u32 r = below(100);
		first[e] = nreq;
		mc_done[e] = 0;
		for (int a = 0; a < 6; a++)
			c->args[a] = 0;
		c->result = 0xdeadbeefUL;
		if (with_long && e == 0) {
			cnt[e] = gen_long(mc_reqs[e]);
			c->op = HC_mmu_update;
		} else if (r < 40) {
			cnt[e] = 1 + (int)below(4);
			for (int j = 0; j < cnt[e]; j++)
				gen_mmu(&mc_reqs[e][j]);
			c->op = HC_mmu_update;
		} else if (r < 75) {
			cnt[e] = 1 + (int)below(3);
			for (int j = 0; j < cnt[e]; j++)
				gen_ext(&mc_exts[e][j]);
			c->op = HC_mmuext_op;
		} else {
			cnt[e] = 1;
			c->op = HC_update_va_mapping;
			gen_uvm(&c->args[0], &c->args[1], &c->args[2]);
			continue;
		}
		c->args[0] = c->op == HC_mmu_update ? (u64)mc_reqs[e] : (u64)mc_exts[e];
		c->args[1] = (u64)cnt[e];
		c->args[2] = (u64)&mc_done[e];
		c->args[3] = DOMID_SELF;
	}
	long rc = HC2(HC_multicall, calls, n);
	for (int e = 0; e < n; e++) {
		long res = (long)calls[e].result;
		account(first[e], cnt[e], calls[e].op == HC_update_va_mapping ? res == 0 : mc_done[e]);
		if (calls[e].op == HC_mmu_update)
			trace_mmu(i, "mc-mmu", mc_reqs[e], cnt[e], res, mc_done[e]);
		else if (calls[e].op == HC_mmuext_op)
			trace_ext(i, "mc-ext", mc_exts[e], cnt[e], res, mc_done[e]);
		else
			trace_uvm(i, "mc-uvm", calls[e].args[0], calls[e].args[1], calls[e].args[2], res);
	}
	if (rc && trace) {
		lput("op "); ldec((long)i); lput(" multicall rc="); ldec(rc); lend();
	}
}

/* Calls that fail before any request: another domain, an unreadable
 * request list. */
static void op_bad(u64 i)
{
	u32 done;
	gen_mmu(&reqs[0]);
	nreq = 0;
	note(K_BADCALL);
	long rc = below(2) ? mmu_update(reqs, 1 + below(2), &done, 7) : mmu_update((void *)0x1000, 2, &done, DOMID_SELF);
	account(0, 1, rc == 0);
	trace_mmu(i, "mmu-bad", reqs, 1, rc, 0);
}

/* Writes that may fault: a bounced #PF resumes after the instruction. */
u64 tg_resume_rip;
extern char tg_trap_14[];
static volatile struct faults_seen pf;

void tg_trap(u64 vec, u64 *f, int has_err)
{
	take_expected_fault(&pf, 14, vec, f, has_err);
}

#define MAY_FAULT(insn, ...) \
	__asm__ volatile("leaq 1f(%%rip), %%r11; movq %%r11, tg_resume_rip(%%rip);" insn "\n1:" __VA_ARGS__)

/* A store or read-modify-write, in one of the forms Linux uses on PTEs,
 * to an entry of a pool frame through the frame's own mapping. */
static void op_direct(u64 i)
{
	static const u64 bits[] = { PTE_P, PTE_RW, PTE_US, PTE_PS, PTE_NX, PTE_A | PTE_D, 1UL << 12 };
	u32 k = below(NPOOL), idx = pick_index(), form = below(100);
	if (idx == KSLOT && form >= 50)
		idx--;   /* entry 511 only ever gets the live L4's (whole stores below) */
	volatile u64 *p = &pool[k][idx];
	u64 v = gen_val(frames[k], idx), mask = bits[below(sizeof(bits) / sizeof(bits[0]))], n0 = pf.count;
	note(K_PTWR);
	if (form < 50) {
		MAY_FAULT("movq %1, %0", : "=m"(*p) : "r"(v) : "r11", "memory");
	} else if (form < 62) {
		MAY_FAULT("xchgq %0, %1", : "+r"(v), "+m"(*p) :: "r11", "memory");
	} else if (form < 76) {
		u64 acc = chance(80) ? *p : v ^ PTE_P;
		MAY_FAULT("lock cmpxchgq %2, %1", : "+a"(acc), "+m"(*p) : "r"(v) : "r11", "memory", "cc");
	} else if (form < 86) {
		volatile u32 *h = (volatile u32 *)p + below(2);
		u32 half = (u32)(h == (volatile u32 *)p ? v : v >> 32);
		MAY_FAULT("movl %1, %0", : "=m"(*h) : "r"(half) : "r11", "memory");
	} else if (form < 91) {
		MAY_FAULT("lock orq %1, %0", : "+m"(*p) : "r"(mask) : "r11", "memory", "cc");
	} else if (form < 96) {
		MAY_FAULT("lock andq %1, %0", : "+m"(*p) : "r"(~mask) : "r11", "memory", "cc");
	} else {
		u64 bit = (u64)__builtin_ctzl(mask);
		MAY_FAULT("lock btcq %1, %0", : "+m"(*p) : "r"(bit) : "r11", "memory", "cc");
	}
	tg_resume_rip = 0;
	int faulted = pf.count != n0;
	account(0, 1, !faulted);
	if (trace) {
		lput("op "); ldec((long)i); lput(" direct form="); ldec(form); lput(" at="); lhex((frames[k] << 12) + 8 * idx);
		lput(" val="); lhex(v); lput(" mask="); lhex(mask); lput(faulted ? " faulted" : " done"); lend();
	}
}

static void run_op(u64 seed, u64 i)
{
	seed_op(seed, i);
	nreq = 0;
	has_switch = has_copy = 0;
	u32 r = below(1000);
	if (r < 240)
		op_mmu_single(i);
	else if (r < 280)
		op_direct(i);
	else if (r < 380)
		op_mmu_batch(i, 0);
	else if (r < 540)
		op_uvm(i);
	else if (r < 860)
		op_ext(i, 1);
	else if (r < 920)
		op_ext(i, 2 + (int)below(3));
	else if (r < 980)
		op_multicall(i, 0);
	else if (r < 986)
		op_mmu_batch(i, 1);
	else if (r < 990)
		op_multicall(i, 1);
	else
		op_bad(i);
	if (has_switch)
		cur_l4 = read_cr3() >> 12;
}

static void check(u64 n)
{
	lput("MMUFUZZ CHECK op="); ldec((long)n); lend();
}

/* ---------------- set-up ---------------- */

void tg_main(struct start_info *si)
{
	const char *cl = si->cmd_line;
	u64 seed = tg_opt_num(cl, "seed", 1), ops = tg_opt_num(cl, "ops", 100), every = tg_opt_num(cl, "check", 20);
	trace = tg_opt_num(cl, "trace", 0) != 0;
	only = opt(cl, "only");
	nr_pages = si->nr_pages;
	static struct trap_info traps[] = { { 14, 0, 0xe030, 0, (u64)tg_trap_14 }, { 0, 0, 0, 0, 0 } };
	long rc = HC1(HC_set_trap_table, traps);
	tg_check(rc == 0, "set_trap_table", rc, 0);

	orig_l4 = cur_l4 = read_cr3() >> 12;
	kl3 = (pfn_va(orig_l4)[KSLOT] & PTE_ADDR) >> 12;
	kl2 = (pfn_va(kl3)[KL3_SLOT] & PTE_ADDR) >> 12;
	for (int i = 0; i < NPOOL; i++) {
		frames[i] = va_to_pfn((const void *)pool_va(i));
		rc = tg_map_readonly((const void *)pool_va(i));   /* the first MMU op: the builder's tables are typed */
		tg_check(rc == 0, "pool page mapped read-only", rc, 0);
	}
	/* the end of RAM: past the builder's mapping (no L1 in the kernel L2) */
	for (int i = 0; i < NFREE; i++)
		frames[NPOOL + i] = nr_pages - NFREE + i;
	u64 free_va = VIRT_BASE + ((nr_pages - NFREE) << 12);
	tg_check(!(pfn_va(kl2)[(free_va >> 21) & 511] & PTE_P), "free frames outside the builder's mapping",
		 pfn_va(kl2)[(free_va >> 21) & 511], 0);
	kl3e = pfn_va(orig_l4)[KSLOT];   /* as typing left it (_PAGE_USER) */
	own[0] = va_to_pfn((void *)tg_main);
	own[1] = va_to_pfn(tg_stack);
	own[2] = va_to_pfn(si);
	own[3] = si->console_mfn;
	u64 shinfo = si->shared_info >> 12;
	wild[0] = nr_pages;
	wild[1] = nr_pages + 1000;
	wild[2] = PTE_ADDR >> 12;
	wild[3] = shinfo;          /* shared_info: mappable */
	wild[4] = shinfo + 1;      /* the first grant frame: mappable */
	wild[5] = shinfo + 64;     /* further into the VMM region: not */
	if (tg_failures)
		return;

	lput("MMUFUZZ FRAMES pool="); for (int i = 0; i < NALL; i++) { lhex(frames[i]); lput(","); }
	lput(" l4="); lhex(orig_l4); lput(" l3="); lhex(kl3); lput(" l2="); lhex(kl2); lend();
	check(0);
	u64 n = 0;
	for (u64 i = 0; i < ops; i++) {
		if (!selected(i))
			continue;
		run_op(seed, i);
		if (++n % every == 0)
			check(i + 1);
	}
	if (n % every)
		check(ops);
	lput("MMUFUZZ STATS ops="); ldec((long)n);
	for (int k = 0; k < NKIND; k++) {
		lput(" "); lput(kind_name[k]); lput("="); ldec((long)okay[k]); lput("/"); ldec((long)tried[k]);
	}
	lend();
}
