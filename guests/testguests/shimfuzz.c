/* Fuzzing the shim's other hypercalls and its privileged-instruction
 * emulation (issue 11): a generated sequence from a seed, judged by the
 * host (tests/shimfuzz.py): the guest must reach its PASS line, with no
 * fault of the shim, no hang and no crash of the domain.
 *
 * Command line: seed=N ops=K [trace=1] [only=A-B,C,...], as mmufuzz's (fuzzguest.h): op
 * i draws its random numbers from (seed, i) alone, so a shorter run is a
 * prefix of a longer one and only= keeps each op's draws.  Return codes
 * are not judged; the guest counts what succeeded per kind and prints it
 * ("SHIMFUZZ STATS").
 *
 * The ops: set_trap_table (random, long and NULL lists), callback_op,
 * stack_switch, fpu_taskswitch (then an FPU instruction: #NM), set_segment_base,
 * set/get_debugreg (and breakpoints on memory a hypercall then touches),
 * update_descriptor and set_gdt (then segment loads), vcpu_op, sched_op
 * (yield, bounded polls), event_channel_op, xen_version, physdev_op's
 * iopl and I/O bitmap, multicalls of all these (nested ones and iret
 * entries too), HYPERVISOR_iret with random flags, and privileged or
 * faulting instructions (#GP/#UD emulation: I/O, MSRs, control and debug
 * registers, cpuid, ...).
 *
 * What keeps the guest alive, whatever the shim answers:
 *  - after each op, what it may have changed is put back: the trap table
 *    (cleared, then the guest's), the callbacks, DR7, the segment bases
 *    and selectors, TS, CR4, the GDT (test guests run without one),
 *    IOPL and the I/O bitmap, the periodic timer, the runstate area,
 *    the shutdown code (Xen's overrides the reason of a later shutdown);
 *  - whatever the shim or Python writes goes to the scratch pages, a
 *    read-only page or wild addresses, never to the guest's own memory;
 *    update_descriptor's targets are the descriptor pages, page tables
 *    and frames that are not RAM;
 *  - what the shim reads with a wild meaning (a poll's timeout, a
 *    multicall's entries) comes from scratch built for the op or from an
 *    unreadable address; a poll's timeout is never 0 (forever);
 *  - events stay masked (upcall_mask 1) but through an iret that unmasks;
 *    the event callback is always registered;
 *  - a faulting instruction is run under MAY_FAULT: the bounced fault
 *    resumes after it; #NM clears TS and retries; #DB clears TF. */
#include "mmutest.h"
#include "fuzzguest.h"
#include "tg_events.h"
const char tg_name[] = "shimfuzz";

#define NSCRATCH 4
#define LONG_TABLE 700      /* trap entries: more than the shim's work budget */
#define FLAT_KERNEL_CS 0xe030UL
#define FLAT_KERNEL_SS 0xe02bUL
#define RF_TF 0x100UL
#define RF_RF 0x10000UL

struct sched_poll { u64 ports; u32 nr_ports, _p; u64 timeout; };

/* written by the shim and Python: volatile */
static volatile u8 scratch[NSCRATCH][4096] __attribute__((aligned(4096)));
static volatile u64 desc_pages[2][512] __attribute__((aligned(4096)));  /* [1] mapped read-only */
static u8 ro_page[4096] __attribute__((aligned(4096)));                 /* mapped read-only */
extern char tg_stack[];
extern char tg_trap_0[], tg_trap_1[], tg_trap_3[], tg_trap_4[], tg_trap_5[], tg_trap_6[], tg_trap_7[],
	tg_trap_10[], tg_trap_11[], tg_trap_12[], tg_trap_13[], tg_trap_14[], tg_trap_16[], tg_trap_17[],
	tg_trap_19[];

static struct trap_info traps[] = {
	{ 0, 0, 0xe030, 0, (u64)tg_trap_0 }, { 1, 0, 0xe030, 0, (u64)tg_trap_1 },
	{ 3, 3, 0xe030, 0, (u64)tg_trap_3 }, { 4, 3, 0xe030, 0, (u64)tg_trap_4 },
	{ 5, 0, 0xe030, 0, (u64)tg_trap_5 }, { 6, 0, 0xe030, 0, (u64)tg_trap_6 },
	{ 7, 0, 0xe030, 0, (u64)tg_trap_7 }, { 10, 0, 0xe030, 0, (u64)tg_trap_10 },
	{ 11, 0, 0xe030, 0, (u64)tg_trap_11 }, { 12, 0, 0xe030, 0, (u64)tg_trap_12 },
	{ 13, 0, 0xe030, 0, (u64)tg_trap_13 },
	{ 14, 0, 0xe030, 0, (u64)tg_trap_14 }, { 16, 0, 0xe030, 0, (u64)tg_trap_16 },
	{ 17, 0, 0xe030, 0, (u64)tg_trap_17 }, { 19, 0, 0xe030, 0, (u64)tg_trap_19 },
	{ 0, 0, 0, 0, 0 } };

static u64 nr_pages, l4_mfn, l3_mfn, shinfo_mfn, code_mfn, cr4_0, xcr0_0 = 1;
#define CR4_OSXSAVE (1UL << 18)
static u16 sel0[4];   /* ds es fs gs at start */

/* ---------------- values ---------------- */

/* addresses nothing may be read from or written to */
static const u64 wild[] = {
	0x00000000dead0000UL,   /* unmapped user address */
	0x8000000000000000UL,   /* non-canonical */
	0xffff830000000000UL,   /* the hypervisor hole: the shim's own memory */
	0xfffffffffffff000UL,   /* the last page */
	0x00007ffffffffff8UL,   /* runs past the end of the lower half */
	0xffff87fffffffff8UL,   /* starts in the hole, ends past it */
	0,
};
#define NWILD (sizeof(wild) / sizeof(wild[0]))

static u64 wild_ptr(void) { return wild[below(NWILD)]; }
static volatile u8 *scr(int k) { return scratch[k]; }

/* a call's argument structure: 512 bytes of the last scratch page of its
 * own (a multicall's entries must not overwrite each other's: a poll's
 * timeout overwritten could be 0, forever) */
static int slot;
static volatile u8 *argbuf(void) { return scratch[NSCRATCH - 1] + 512 * slot; }

/* where the shim or Python may write: scratch, the read-only page, wild */
static u64 out_ptr(void)
{
	u32 r = below(100);
	if (r < 70)
		return (u64)scr(below(NSCRATCH - 1)) + (chance(80) ? 0 : below(4096));   /* room after it */
	if (r < 80)
		return (u64)ro_page + 8 * below(512);
	return wild_ptr();
}

/* a random address: canonical or not, kernel text, scratch, 0 */
static u64 any_addr(void)
{
	u32 r = below(100);
	if (r < 20) return (u64)tg_trap_13;
	if (r < 35) return (u64)scr(0) + below(4096);
	if (r < 45) return 0;
	if (r < 60) return wild_ptr();
	if (r < 75) return 0xffff800000000000UL | rnd();     /* canonical, upper half */
	if (r < 85) return rnd() & 0x00007fffffffffffUL;     /* canonical, lower half */
	return rnd();
}

/* a descriptor: null, flat code/data, a gate, or random bits */
static u64 gen_desc(void)
{
	static const u64 good[] = { 0x00cff3000000ffffUL, 0x00affb000000ffffUL, 0x00cffb000000ffffUL,
				    0x00cf93000000ffffUL, 0x00af9b000000ffffUL, 0x0000e90000000067UL };
	u32 r = below(100);
	if (r < 20) return 0;
	if (r < 55) return good[below(6)] ^ (chance(30) ? 1UL << (32 + below(32)) : 0);
	if (r < 65) return ((u64)tg_trap_13 & 0xffff) | 0xe0330000UL | ((u64)(0x8c00 | (below(4) << 13)) << 32)
			| (((u64)tg_trap_13 >> 16) & 0xffff) << 48;   /* call gate, first half */
	return rnd();
}

/* frames a descriptor hypercall names; for update_descriptor (`write`)
 * no RAM frame but the descriptor pages and page tables (refused) */
static u64 desc_frame(int write)
{
	u32 r = below(100);
	if (r < 35) return va_to_pfn((const void *)desc_pages[0]);
	if (r < 70) return va_to_pfn((const void *)desc_pages[1]);
	if (r < 78) return l4_mfn;
	if (r < 84) return l3_mfn;
	if (r < 88) return write ? l4_mfn : code_mfn;
	if (r < 92) return shinfo_mfn;
	if (r < 96) return nr_pages + below(100);
	return write ? nr_pages + (rnd() >> below(64)) % (1UL << 40) : rnd() >> below(64);
}

static u32 any_port(void)
{
	u32 r = below(100);
	if (r < 75) return below(64);
	if (r < 85) return below(EVTCHN_2L_NR_CHANNELS + 2);
	return (u32)rnd();
}

static u64 any_vcpu(void)
{
	u32 r = below(100);
	return r < 60 ? 0 : r < 75 ? 1 : r < 85 ? below(64) : r < 92 ? 0xffffffffUL : rnd();
}

/* ---------------- kinds and bookkeeping ---------------- */

enum kind { K_TRAPS, K_CALLBACK, K_TIMER, K_STACK, K_FPU, K_SEGBASE, K_SETDR, K_GETDR, K_DESC, K_GDT, K_VCPU,
	    K_SCHED, K_EVTCHN, K_XENVER, K_PHYSDEV, K_BADHC, K_MULTICALL, K_IRET, K_PRIV, K_WATCH, NKIND };
static const char *const kind_name[NKIND] = {
	"set_trap_table", "callback_op", "set_timer_op", "stack_switch", "fpu_taskswitch", "set_segment_base",
	"set_debugreg", "get_debugreg", "update_descriptor", "set_gdt", "vcpu_op", "sched_op",
	"event_channel_op", "xen_version", "physdev_op", "bad_hypercall", "multicall", "iret", "priv_insn", "watch",
};
static u64 tried[NKIND], okay[NKIND];

/* what an op may have changed, put back by restore() */
enum { D_TRAPS = 1, D_CB = 2, D_FPU = 4, D_SEG = 8, D_DR = 16, D_GDT = 32, D_PERIODIC = 64, D_RUNSTATE = 128,
       D_IO = 256, D_CR = 512, D_SHUTDOWN = 1024, D_XCR = 2048 };
static u32 dirty;

/* one generated call: number and arguments */
struct call { u64 nr, a[6]; enum kind k; };

static void trace_call(u64 i, const char *what, const struct call *c, long rc)
{
	if (!trace)
		return;
	lput("op "); ldec((long)i); lput(" "); lput(what); lput(" "); lput(kind_name[c->k]);
	lput(" nr="); ldec((long)c->nr);
	for (int a = 0; a < 4; a++) { lput(" "); lhex(c->a[a]); }
	lput(" rc="); ldec(rc);
	lend();
}

/* ---------------- generators: one call each ---------------- */

static u64 now(void) { return now_ns(); }

static void gen_traps(struct call *c)
{
	u32 r = below(100);
	c->k = K_TRAPS;
	c->nr = HC_set_trap_table;
	dirty |= D_TRAPS;
	if (r < 8) { c->a[0] = 0; return; }                   /* NULL: the whole table cleared */
	if (r < 16) { c->a[0] = wild_ptr(); return; }
	int n = chance(6) ? LONG_TABLE - 100 + (int)below(100) : (int)below(24);
	volatile struct trap_info *t = (volatile struct trap_info *)scr(0);
	for (int j = 0; j < n; j++) {
		t[j].vector = (u8)(chance(60) ? below(32) : below(256));
		t[j].flags = (u8)(chance(70) ? below(4) : rnd());
		t[j].cs = (u16)(chance(70) ? 0xe030 : rnd());
		t[j]._pad = (u32)rnd();
		t[j].address = chance(85) ? (u64)tg_trap_13 + 8 * below(4) : any_addr() | 1;
	}
	if (chance(92)) {   /* else no end: the list runs on through earlier ops' entries */
		t[n].vector = t[n].flags = 0;
		t[n].address = 0;
	}
	c->a[0] = (u64)t + (chance(95) ? 0 : 8);
}

static void gen_callback(struct call *c)
{
	static const u16 types[] = { CALLBACKTYPE_event, CALLBACKTYPE_failsafe, CALLBACKTYPE_syscall,
				     CALLBACKTYPE_syscall32, CALLBACKTYPE_sysenter, CALLBACKTYPE_nmi, 3, 6 };
	volatile struct callback_register *cb = (volatile struct callback_register *)argbuf();
	u32 r = below(100);
	c->k = K_CALLBACK;
	c->nr = HC_callback_op;
	dirty |= D_CB;
	cb->type = chance(90) ? types[below(8)] : (u16)rnd();
	cb->flags = (u16)(chance(80) ? below(2) : rnd());
	cb->_p = (u32)rnd();
	cb->address = chance(50) ? (u64)tg_upcall_entry : any_addr();
	c->a[0] = r < 75 ? CALLBACKOP_register : r < 95 ? CALLBACKOP_unregister : below(8) + (chance(50) ? 0 : rnd());
	c->a[1] = chance(90) ? (u64)cb : wild_ptr();
}

static void gen_simple(struct call *c)
{
	u32 r = below(100);
	if (r < 15) {
		c->k = K_TIMER;
		c->nr = HC_set_timer_op;
		u32 t = below(100);
		c->a[0] = t < 40 ? now() + below(2000000) : t < 60 ? now() - below(1000000000) : t < 75 ? 0 : rnd();
	} else if (r < 35) {
		c->k = K_STACK;
		c->nr = HC_stack_switch;   /* only used entering kernel mode from user mode: never here */
		c->a[0] = chance(50) ? FLAT_KERNEL_SS : rnd() & 0xffff;
		c->a[1] = any_addr();
	} else if (r < 60) {
		c->k = K_FPU;
		c->nr = HC_fpu_taskswitch;
		c->a[0] = chance(60) ? below(2) : rnd();
		dirty |= D_FPU;
	} else {
		c->k = K_SEGBASE;
		c->nr = HC_set_segment_base;
		c->a[0] = chance(85) ? below(5) : chance(50) ? ((u64)below(4) | rnd() << 32) : rnd();
		c->a[1] = chance(20) ? rnd() & 0xffff : any_addr();
		dirty |= D_SEG;
	}
}

static void gen_debugreg(struct call *c)
{
	if (chance(30)) {
		c->k = K_GETDR;
		c->nr = HC_get_debugreg;
		c->a[0] = chance(85) ? below(8) : rnd();
		return;
	}
	c->k = K_SETDR;
	c->nr = HC_set_debugreg;
	c->a[0] = chance(90) ? below(8) : rnd();
	u32 r = below(100);
	c->a[1] = r < 30 ? (u64)scr(below(NSCRATCH)) + 8 * below(512)
		: r < 45 ? (u64)&tg_stack[4096 + 8 * below(512)]
		: r < 55 ? rnd() & 0xffffffffUL          /* DR7-shaped: enables, kinds, lengths, GD */
		: r < 60 ? 0 : any_addr();
	dirty |= D_DR;
}

static void gen_desc_call(struct call *c)
{
	if (chance(55)) {
		c->k = K_DESC;
		c->nr = HC_update_descriptor;
		c->a[0] = (desc_frame(1) << 12) + 8 * (chance(80) ? below(16) : below(512)) + (chance(5) ? below(8) : 0);
		c->a[1] = gen_desc();
		return;
	}
	c->k = K_GDT;
	c->nr = HC_set_gdt;
	dirty |= D_GDT;
	volatile u64 *fl = (volatile u64 *)scr(2);
	for (int j = 0; j < 16; j++)
		fl[j] = chance(70) ? va_to_pfn((const void *)desc_pages[chance(70)]) : desc_frame(0);
	u32 r = below(100);
	c->a[0] = chance(92) ? (u64)fl : wild_ptr();
	c->a[1] = r < 50 ? 1 + below(512) : r < 70 ? below(1024) : r < 80 ? FIRST_RESERVED_GDT_ENTRY - below(2)
		: r < 90 ? FIRST_RESERVED_GDT_ENTRY + below(2) : rnd();
}

static void gen_vcpu(struct call *c)
{
	volatile u64 *arg = (volatile u64 *)argbuf();
	u32 r = below(100);
	c->k = K_VCPU;
	c->nr = HC_vcpu_op;
	c->a[1] = chance(75) ? 0 : any_vcpu();
	c->a[2] = chance(90) ? (u64)arg : out_ptr();
	arg[0] = rnd();
	arg[1] = rnd();
	if (r < 30) {
		u32 t = below(100);
		c->a[0] = VCPUOP_set_singleshot_timer;
		arg[0] = t < 40 ? now() + below(2000000) : t < 60 ? now() - below(1000000000) : t < 70 ? 0 : rnd();
		arg[1] = chance(70) ? below(2) : rnd();
	} else if (r < 40) {
		c->a[0] = VCPUOP_stop_singleshot_timer;
	} else if (r < 50) {
		c->a[0] = chance(50) ? VCPUOP_set_periodic_timer : VCPUOP_stop_periodic_timer;
		arg[0] = chance(50) ? 1000000 + below(100000000) : rnd() >> below(64);
		dirty |= D_PERIODIC;
	} else if (r < 65) {
		c->a[0] = VCPUOP_is_up;
		c->a[1] = any_vcpu();
	} else if (r < 75) {
		c->a[0] = VCPUOP_get_runstate_info;
		c->a[2] = out_ptr();
	} else if (r < 85) {
		/* Python writes the runstate there from now on: only scratch */
		c->a[0] = VCPUOP_register_runstate_memory_area;
		arg[0] = chance(60) ? (u64)scr(below(NSCRATCH - 1)) + 8 * below(500) : wild_ptr();
		dirty |= D_RUNSTATE;
	} else if (r < 90) {
		c->a[0] = VCPUOP_register_vcpu_info;   /* frames that are not RAM only */
		arg[0] = chance(50) ? nr_pages + below(64) : shinfo_mfn + 64 + below(16);
		arg[1] = rnd() & 0xfff;
	} else {
		/* others' vCPU ops; never VCPUOP_down (this guest's only vCPU) */
		static const u64 ops[] = { VCPUOP_initialise, VCPUOP_up, VCPUOP_send_nmi, VCPUOP_get_physid,
					   VCPUOP_register_vcpu_time_memory_area, 14, 99 };
		c->a[0] = ops[below(7)];
		if (c->a[0] == VCPUOP_initialise)
			c->a[2] = wild_ptr();
		if (c->a[0] == VCPUOP_register_vcpu_time_memory_area)
			arg[0] = wild_ptr();
	}
	/* what registers an area Python writes from then on: its own arg
	 * only, never scratch another op filled (pointers into the guest) */
	if (c->a[0] == VCPUOP_register_runstate_memory_area || c->a[0] == VCPUOP_register_vcpu_info
	    || c->a[0] == VCPUOP_register_vcpu_time_memory_area)
		c->a[2] = (u64)arg;
}

static void gen_sched(struct call *c)
{
	volatile struct sched_poll *p = (volatile struct sched_poll *)argbuf();
	volatile u32 *ports = (volatile u32 *)(argbuf() + 64);
	u32 r = below(100);
	c->k = K_SCHED;
	c->nr = HC_sched_op;
	if (r < 30) {
		c->a[0] = SCHEDOP_yield;
		return;
	}
	if (r < 90) {
		u32 n = below(100) < 90 ? below(6) : below(112);
		for (u32 j = 0; j < n; j++)
			ports[j] = any_port();
		p->ports = chance(90) ? (u64)ports : wild_ptr();
		p->nr_ports = chance(95) ? n : (u32)rnd();
		p->_p = (u32)rnd();
		u32 t = below(100);
		/* bounded: 0 would be forever */
		p->timeout = t < 50 ? now() + below(1000000) : t < 80 ? now() - below(1000000) : 1;
		c->a[0] = SCHEDOP_poll;
		c->a[1] = chance(95) ? (u64)p : wild[below(NWILD - 1)];
		return;
	}
	/* not block (nothing may wake it), shutdown, remote_shutdown, watchdog */
	static const u64 other[] = { SCHEDOP_shutdown_code, 7, 8, 9, 64, 0x100000000UL };
	c->a[0] = other[below(6)];
	c->a[1] = out_ptr();
	dirty |= D_SHUTDOWN;
}

static void gen_evtchn(struct call *c)
{
	volatile u32 *arg = (volatile u32 *)argbuf();
	c->k = K_EVTCHN;
	c->nr = HC_event_channel_op;
	for (int j = 0; j < 8; j++)
		arg[j] = chance(50) ? any_port() : (u32)rnd();
	u32 r = below(100);
	if (r < 20) {
		c->a[0] = EVTCHNOP_send;
	} else if (r < 35) {
		c->a[0] = EVTCHNOP_unmask;
	} else if (r < 45) {
		c->a[0] = EVTCHNOP_bind_ipi;
		arg[0] = (u32)any_vcpu();
	} else if (r < 55) {
		c->a[0] = EVTCHNOP_bind_virq;
		arg[0] = chance(80) ? below(16) : (u32)rnd();
		arg[1] = (u32)any_vcpu();
	} else if (r < 70) {
		c->a[0] = EVTCHNOP_close;
	} else if (r < 80) {
		c->a[0] = EVTCHNOP_status;
		*(volatile u16 *)arg = chance(80) ? DOMID_SELF : (u16)rnd();
		arg[1] = any_port();
	} else if (r < 85) {
		c->a[0] = EVTCHNOP_alloc_unbound;
		arg[0] = chance(80) ? DOMID_SELF | (u32)DOMID_SELF << 16 : (u32)rnd();
	} else if (r < 90) {
		c->a[0] = EVTCHNOP_bind_vcpu;
		arg[1] = (u32)any_vcpu();
	} else {
		static const u64 other[] = { EVTCHNOP_bind_interdomain, EVTCHNOP_bind_pirq, EVTCHNOP_reset,
					     EVTCHNOP_init_control, EVTCHNOP_expand_array, EVTCHNOP_set_priority, 14, 1000 };
		c->a[0] = other[below(8)];
		if (c->a[0] == EVTCHNOP_reset)
			*(volatile u16 *)arg = DOMID_SELF;
	}
	c->a[1] = chance(90) ? (u64)arg : wild_ptr();
}

static void gen_xenver(struct call *c)
{
	c->k = K_XENVER;
	c->nr = HC_xen_version;
	c->a[0] = chance(85) ? below(12) : rnd() >> below(64);
	c->a[1] = out_ptr();
}

/* set_iopl / set_iobitmap (Python checks, the shim keeps them) */
static void gen_physdev(struct call *c)
{
	volatile u64 *arg = (volatile u64 *)argbuf();
	c->k = K_PHYSDEV;
	c->nr = HC_physdev_op;
	dirty |= D_IO;
	u32 r = below(100);
	c->a[0] = r < 45 ? PHYSDEVOP_set_iopl : r < 90 ? PHYSDEVOP_set_iobitmap : below(32);
	arg[0] = chance(70) ? below(4) : rnd();
	if (r >= 45) {
		arg[0] = chance(60) ? (u64)ro_page + below(64) : any_addr();   /* the bitmap: read only */
		arg[1] = chance(60) ? below(65536) : rnd();
	}
	c->a[1] = chance(90) ? (u64)arg : wild_ptr();
}

/* hypercalls nobody should run: numbers past the table, unsupported ones */
static void gen_badhc(struct call *c)
{
	static const u64 nrs[] = { HC_set_callbacks, HC_sched_op_compat, HC_platform_op, 11, HC_event_channel_op_compat,
				   HC_physdev_op_compat, HC_xsm_op, HC_nmi_op, HC_xenoprof_op, HC_hvm_op, HC_sysctl,
				   HC_domctl, HC_kexec_op, HC_tmem_op, HC_dm_op, 43, 47, 49, 63, 64, 255, 4096 };
	c->k = K_BADHC;
	c->nr = chance(90) ? nrs[below(sizeof(nrs) / 8)] : rnd();
	for (int a = 0; a < 6; a++)
		c->a[a] = chance(50) ? wild_ptr() : rnd();
}

/* one call of any kind a multicall may hold */
static void gen_any(struct call *c)
{
	for (int a = 0; a < 6; a++)
		c->a[a] = 0;
	u32 r = below(100);
	if (r < 10) gen_traps(c);
	else if (r < 20) gen_callback(c);
	else if (r < 32) gen_simple(c);
	else if (r < 44) gen_debugreg(c);
	else if (r < 56) gen_desc_call(c);
	else if (r < 68) gen_vcpu(c);
	else if (r < 76) gen_sched(c);
	else if (r < 86) gen_evtchn(c);
	else if (r < 92) gen_xenver(c);
	else if (r < 96) gen_physdev(c);
	else gen_badhc(c);
}

/* ---------------- restoring ---------------- */

/* an instruction whose fault the trap handler skips (tg_trap) */
#define MAY_FAULT(insn, ...) \
	__asm__ volatile("leaq 1f(%%rip), %%r11; movq %%r11, tg_resume_rip(%%rip);" insn "\n1:" __VA_ARGS__)

static inline void load_sel(int which, u16 s)
{
	switch (which) {
	case 0: __asm__ volatile("movw %0, %%ds" :: "r"(s)); break;
	case 1: __asm__ volatile("movw %0, %%es" :: "r"(s)); break;
	case 2: __asm__ volatile("movw %0, %%fs" :: "r"(s)); break;
	default: __asm__ volatile("movw %0, %%gs" :: "r"(s)); break;
	}
}

static void must(long rc, const char *what)
{
	if (rc) {
		tg_check(0, what, (u64)rc, 0);
		tg_finish();
	}
}

static void restore(void)
{
	if (dirty & D_TRAPS) {
		HC1(HC_set_trap_table, 0);
		must(HC1(HC_set_trap_table, traps), "restore trap table");
	}
	if (dirty & D_CB) {
		static const u16 types[] = { CALLBACKTYPE_failsafe, CALLBACKTYPE_syscall, CALLBACKTYPE_syscall32,
					     CALLBACKTYPE_sysenter };
		struct callback_register cb = { CALLBACKTYPE_event, 0, 0, (u64)tg_upcall_entry };
		must(HC2(HC_callback_op, CALLBACKOP_register, &cb), "restore event callback");
		for (int j = 0; j < 4; j++) {
			struct callback_register z = { types[j], 0, 0, 0 };
			must(HC2(HC_callback_op, CALLBACKOP_register, &z), "restore callback");
		}
		struct callback_register nmi = { CALLBACKTYPE_nmi, 0, 0, 0 };
		must(HC2(HC_callback_op, CALLBACKOP_unregister, &nmi), "unregister nmi callback");
	}
	if (dirty & (D_FPU | D_CR))
		must(HC1(HC_fpu_taskswitch, 0), "clear TS");
	if (dirty & D_XCR) {
		u64 c4 = cr4_0 | CR4_OSXSAVE;
		MAY_FAULT("movq %0, %%cr4", :: "r"(c4) : "r11", "memory");
		tg_resume_rip = 0;
		MAY_FAULT("xsetbv", :: "a"(xcr0_0), "d"(xcr0_0 >> 32), "c"(0UL) : "r11", "memory");
		tg_resume_rip = 0;
	}
	if (dirty & D_CR) {
		MAY_FAULT("movq %0, %%cr4", :: "r"(cr4_0) : "r11", "memory");
		tg_resume_rip = 0;
	}
	if (dirty & D_DR)
		must(HC2(HC_set_debugreg, 7, 0), "DR7 = 0");
	if (dirty & D_GDT) {
		for (int s = 0; s < 4; s++)
			load_sel(s, sel0[s]);
		must(HC2(HC_set_gdt, scr(2), 0), "no GDT");
	}
	if (dirty & (D_SEG | D_GDT | D_CR)) {
		for (int s = 0; s < 4; s++)
			load_sel(s, sel0[s]);
		for (u64 w = SEGBASE_FS; w <= SEGBASE_GS_KERNEL; w++)
			must(HC2(HC_set_segment_base, w, 0), "segment base 0");
	}
	if (dirty & D_PERIODIC)
		HC3(HC_vcpu_op, VCPUOP_stop_periodic_timer, 0, 0);
	if (dirty & D_RUNSTATE) {
		u64 none = 0;
		HC3(HC_vcpu_op, VCPUOP_register_runstate_memory_area, 0, &none);
	}
	if (dirty & D_IO) {
		u64 iopl = 0, bmp[2] = { 0, 0 };
		must(HC2(HC_physdev_op, PHYSDEVOP_set_iopl, &iopl), "iopl 0");
		must(HC2(HC_physdev_op, PHYSDEVOP_set_iobitmap, bmp), "no I/O bitmap");
	}
	if (dirty & D_SHUTDOWN) {   /* Xen's recorded code overrides the reason of a later shutdown */
		u32 code = SHUTDOWN_poweroff;
		must(HC2(HC_sched_op, SCHEDOP_shutdown_code, &code), "shutdown code poweroff");
	}
	vi->upcall_mask = 1;
	dirty = 0;
}

/* ---------------- faults ---------------- */

u64 tg_resume_rip;
static volatile u64 traps_seen[32];

void tg_trap(u64 vec, u64 *f, int has_err)
{
	u64 *rip = &f[has_err ? 3 : 2], *rflags = &f[has_err ? 5 : 4];
	traps_seen[vec & 31]++;
	if (vec == 7) {   /* TS set by the op: clear it, the instruction runs again */
		HC1(HC_fpu_taskswitch, 0);
		return;
	}
	if (vec == 1) {   /* no single-stepping on; an instruction breakpoint not again */
		*rflags &= ~RF_TF;
		*rflags |= RF_RF;
	}
	if (tg_resume_rip) {
		*rip = tg_resume_rip;
		tg_resume_rip = 0;
		return;
	}
	if (vec == 1 || vec == 3)   /* traps: resume after the instruction */
		return;
	tg_check(0, "unexpected trap (vector, rip)", vec, *rip);
	tg_finish();
}


/* ---------------- the ops ---------------- */

static long do_call(const struct call *c)
{
	return hc((long)c->nr, (long)c->a[0], (long)c->a[1], (long)c->a[2], (long)c->a[3], (long)c->a[4]);
}

/* what a call leaves to look at: segment loads after set_gdt, an FPU
 * instruction after fpu_taskswitch, a touch of a watched word */
static void follow_up(const struct call *c, long rc)
{
	if (c->k == K_GDT && rc == 0 && chance(70)) {
		u16 sel = (u16)(chance(80) ? (below(c->a[1] < 16 ? (u32)c->a[1] + 1 : 16) << 3) | below(4) : rnd());
		int which = (int)below(4);
		if (which == 0)
			MAY_FAULT("movw %0, %%ds", :: "r"(sel) : "r11", "memory");
		else if (which == 1)
			MAY_FAULT("movw %0, %%es", :: "r"(sel) : "r11", "memory");
		else if (which == 2)
			MAY_FAULT("movw %0, %%fs", :: "r"(sel) : "r11", "memory");
		else
			MAY_FAULT("movw %0, %%gs", :: "r"(sel) : "r11", "memory");
		tg_resume_rip = 0;
		HC2(HC_set_segment_base, SEGBASE_GS_USER_SEL, sel);   /* loaded by the shim, in CPL0 */
	} else if (c->k == K_FPU && chance(60)) {
		MAY_FAULT("fnop", ::: "r11", "memory");
		tg_resume_rip = 0;
	} else if (c->k == K_SETDR && chance(60)) {
		/* the watched words, by the guest and by a hypercall reading them */
		volatile u64 *w = (volatile u64 *)scr(below(NSCRATCH));
		w[below(512)] += 1;
		HC1(HC_set_trap_table, scr(0));
		dirty |= D_TRAPS;
	}
}

static void op_single(u64 i)
{
	struct call c;
	gen_any(&c);
	long rc = do_call(&c);
	tried[c.k]++;
	okay[c.k] += rc == 0;
	trace_call(i, "call", &c, rc);
	follow_up(&c, rc);
}

static struct mc calls[8], inner[2];

static void op_multicall(u64 i)
{
	struct call cs[8];
	int n = 1 + (int)below(7);
	for (int e = 0; e < n; e++) {
		u32 r = below(100);
		slot = e;
		if (r < 85) {
			gen_any(&cs[e]);
		} else if (r < 92) {   /* Xen performs it; the shim answers -EINVAL */
			cs[e].k = K_IRET;
			cs[e].nr = HC_iret;
		} else {               /* nested: -EINVAL */
			cs[e].k = K_MULTICALL;
			cs[e].nr = HC_multicall;
			inner[0].op = HC_sched_op;
			inner[0].args[0] = SCHEDOP_yield;
			cs[e].a[0] = chance(80) ? (u64)inner : wild_ptr();
			cs[e].a[1] = 1 + below(2);
		}
		calls[e].op = cs[e].nr;
		calls[e].result = 0xdeadbeefUL;
		for (int a = 0; a < 6; a++)
			calls[e].args[a] = cs[e].a[a];
	}
	u32 r = below(100);
	u64 list = r < 92 ? (u64)calls : r < 96 ? wild_ptr() : (u64)calls + 8;   /* misaligned: shifted fields */
	u64 count = chance(90) ? (u64)n : chance(50) ? 0 : (u64)n | (u64)(1 + below(4)) << 32;
	if (list == (u64)calls + 8)
		count = n - 1;   /* the shifted entries stay inside the array */
	slot = 0;
	long rc = HC2(HC_multicall, list, count);
	tried[K_MULTICALL]++;
	okay[K_MULTICALL] += rc == 0;
	for (int e = 0; e < n; e++) {
		tried[cs[e].k]++;
		okay[cs[e].k] += calls[e].result == 0;
		trace_call(i, "mc", &cs[e], (long)calls[e].result);
	}
	if (trace) {
		lput("op "); ldec((long)i); lput(" multicall n="); ldec(n); lput(" list="); lhex(list);
		lput(" count="); lhex(count); lput(" rc="); ldec(rc); lend();
	}
}

/* HYPERVISOR_iret to the next instruction with random flags (TF, AC, DF,
 * NT, IF...), a kernel CS of any RPL but 3 (3 is a return to user mode,
 * which this guest has no tables for), and a random in-syscall flag.  The
 * instruction there is a hypercall (sched_op yield: rax comes from the
 * frame) or a push: with TF, the single-step trap lands in the shim's
 * syscall entry or after the push. */
#define IRET_TO(first)                                                        \
	__asm__ volatile(                                                     \
		"movq %%rsp, %%rax\n"                                         \
		"pushq $0xe02b\n"                                             \
		"pushq %%rax\n"                                               \
		"pushq %[fl]\n"                                               \
		"pushq %[cs]\n"                                               \
		"leaq 1f(%%rip), %%rax\n"                                     \
		"pushq %%rax\n"                                               \
		"pushq %[how]\n"                                              \
		"pushq %%rcx\n"                                               \
		"pushq %%r11\n"                                               \
		"pushq $29\n"                                                 \
		"movl $23, %%eax\n"                                           \
		"syscall\n"                                                   \
		"ud2\n"                                                       \
		"1: " first "\n"                                              \
		"pushq $2\n"                                                  \
		"popfq\n"                                                     \
		: "+D"(di) : [fl] "r"(flags), [cs] "r"(cs), [how] "r"(how)   \
		: "rax", "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11", "memory", "cc")

static void op_iret(u64 i)
{
	u64 cs = FLAT_KERNEL_CS | below(3), flags = rnd() & (chance(50) ? 0x254dd5UL : ~0UL);
	u64 how = chance(80) ? 0 : VGCF_IN_SYSCALL;
	u64 n0 = traps_seen[1], di = SCHEDOP_yield;   /* the hypercall's registers, as tg_syscall_hc's */
	int sc = chance(50);
	if (!chance(30))
		flags &= ~RF_TF;
	if (sc)
		IRET_TO("syscall");
	else
		IRET_TO("pushq $0; popq %%rax");
	vi->upcall_mask = 1;
	tried[K_IRET]++;
	okay[K_IRET]++;
	if (trace) {
		lput("op "); ldec((long)i); lput(" iret cs="); lhex(cs); lput(" flags="); lhex(flags);
		lput(" how="); lhex(how); lput(sc ? " then syscall" : " then push"); lput(" db=");
		ldec((long)(traps_seen[1] - n0)); lend();
	}
}

/* A hardware breakpoint (DR0..3 and DR7, with the kind and length drawn)
 * on memory the shim reads or writes in CPL0 (argument scratch, the trap
 * table restore() passes, vcpu_info, the stack bounce frames go to) or on
 * code the guest runs, then a generated call and a touch of the word.  A
 * #DB in the shim is dropped, one in the guest bounced. */
static void op_watch(u64 i)
{
	static const u32 kinds[] = { 1, 3, 1, 3, 0 };   /* write, read/write, execute (not I/O) */
	u32 k = below(4), kind = kinds[below(5)], len = kind ? below(4) : 0;
	u64 where, there = 0;
	u32 r = below(100);
	if (kind == 0)
		where = chance(50) ? (u64)restore : (u64)do_call;
	else if (r < 30)
		where = (u64)argbuf() + 8 * below(8);
	else if (r < 45)
		where = (u64)&traps[below(4)];
	else if (r < 60)
		where = (u64)vi + below(16);
	else if (r < 80) {
		__asm__ volatile("movq %%rsp, %0" : "=r"(there));
		where = (there - 8 * below(24)) & ~7UL;   /* where a bounce frame goes */
	} else
		where = (u64)scr(below(NSCRATCH)) + 8 * below(512);
	where &= ~((len == 2 ? 8UL : len + 1UL) - 1);
	u64 n0 = traps_seen[1];
	long rc1 = HC2(HC_set_debugreg, k, where);
	u64 dr7 = (1UL << (2 * k)) | ((u64)kind << (16 + 4 * k)) | ((u64)len << (18 + 4 * k)) | (chance(30) ? 0x300 : 0);
	long rc2 = HC2(HC_set_debugreg, 7, dr7);
	dirty |= D_DR;
	struct call c;
	gen_any(&c);
	long rc = do_call(&c);
	if (kind && chance(50))
		*(volatile u64 *)(where & ~7UL) = *(volatile u64 *)(where & ~7UL);
	tried[K_WATCH]++;
	okay[K_WATCH] += rc1 == 0 && rc2 == 0;
	if (trace) {
		lput("op "); ldec((long)i); lput(" watch dr"); ldec(k); lput("="); lhex(where); lput(" dr7="); lhex(dr7);
		lput(" rc="); ldec(rc1); lput(","); ldec(rc2); lput(" db="); ldec((long)(traps_seen[1] - n0)); lend();
		trace_call(i, "watched", &c, rc);
	}
	follow_up(&c, rc);
}

static const u32 msrs[] = {
	0x10, 0x1b, 0x3a, 0x48, 0x49, 0x8b, 0xce, 0x140, 0x174, 0x175, 0x176, 0x1a0, 0x1d9, 0x277, 0x2ff,
	0x345, 0x3f1, 0x480, 0x600, 0x6e0, 0x800, 0x802, 0x830, 0xc0000080, 0xc0000081, 0xc0000082,
	0xc0000083, 0xc0000084, 0xc0000100, 0xc0000101, 0xc0000102, 0xc0000103, 0xc0010015, 0x40000000,
	0x40000001, 0x4b564d00,
};

/* One privileged or faulting instruction, emitted here with its operands;
 * a fault the shim bounces resumes after it. */
static void op_priv(u64 i)
{
	u32 r = below(35);
	u64 a = rnd(), d = rnd(), cx = rnd();
	u16 port = (u16)(chance(40) ? 0x40 + below(4) : chance(20) ? 0x61 : rnd());
	volatile u8 *buf = scr(1);
	if (chance(60))
		cx = msrs[below(sizeof(msrs) / 4)];
	switch (r) {
	case 0: MAY_FAULT("cli", ::: "r11", "memory"); break;
	case 1: MAY_FAULT("sti", ::: "r11", "memory"); break;
	case 2: MAY_FAULT("inb %%dx, %%al", : "+a"(a) : "d"(port) : "r11", "memory"); break;
	case 3: MAY_FAULT("inw %%dx, %%ax", : "+a"(a) : "d"(port) : "r11", "memory"); break;
	case 4: MAY_FAULT("inl %%dx, %%eax", : "+a"(a) : "d"(port) : "r11", "memory"); break;
	case 5: MAY_FAULT("outb %%al, %%dx", :: "a"(a), "d"(port) : "r11", "memory"); break;
	case 6: MAY_FAULT("outw %%ax, %%dx", :: "a"(a), "d"(port) : "r11", "memory"); break;
	case 7: MAY_FAULT("outl %%eax, %%dx", :: "a"(a), "d"(port) : "r11", "memory"); break;
	case 8: MAY_FAULT("inb $0x42, %%al", : "+a"(a) :: "r11", "memory"); break;
	case 9: MAY_FAULT("outb %%al, $0x43", :: "a"(a) : "r11", "memory"); break;
	case 10: {   /* string I/O, counts small and large, buffers in scratch or wild */
		u64 n = chance(70) ? below(8) : rnd() & 0xfff, p;
		if (chance(50)) {   /* ins writes memory: scratch or wild only */
			p = chance(80) ? (u64)buf : wild_ptr();
			MAY_FAULT("rep insb", : "+D"(p), "+c"(n) : "d"(port) : "r11", "memory");
		} else {
			p = chance(80) ? (u64)buf : any_addr();
			MAY_FAULT("rep outsb", : "+S"(p), "+c"(n) : "d"(port) : "r11", "memory");
		}
		dirty |= D_IO;
		break;
	}
	case 11: MAY_FAULT("rdmsr", : "+a"(a), "+d"(d) : "c"(cx) : "r11", "memory"); break;
	case 12: MAY_FAULT("wrmsr", :: "a"(a), "d"(d), "c"(cx) : "r11", "memory"); dirty |= D_SEG | D_CR; break;
	case 13: MAY_FAULT("movq %%cr0, %0", : "=r"(a) :: "r11", "memory"); break;
	case 14: MAY_FAULT("movq %%cr2, %0", : "=r"(a) :: "r11", "memory"); break;
	case 15: MAY_FAULT("movq %%cr3, %0", : "=r"(a) :: "r11", "memory"); break;
	case 16: MAY_FAULT("movq %%cr4, %0", : "=r"(a) :: "r11", "memory"); break;
	case 17: {
		u64 v = read_cr3();
		if (chance(40))
			v ^= 1UL << below(12);            /* PWT, PCD, PCID bits */
		else if (chance(50))
			v = (nr_pages + below(64)) << 12;  /* not RAM */
		MAY_FAULT("movq %0, %%cr3", :: "r"(v) : "r11", "memory");
		dirty |= D_CR;
		break;
	}
	case 18: {
		u64 v = 0;
		MAY_FAULT("movq %%cr0, %0", : "+r"(v) :: "r11", "memory");
		v ^= 1UL << below(64);
		MAY_FAULT("movq %0, %%cr0", :: "r"(v) : "r11", "memory");
		dirty |= D_CR;
		break;
	}
	case 19: {
		u64 v = cr4_0 ^ (1UL << below(32));
		MAY_FAULT("movq %0, %%cr4", :: "r"(v) : "r11", "memory");
		tg_resume_rip = 0;
		MAY_FAULT("movq %0, %%cr4", :: "r"(cr4_0) : "r11", "memory");
		dirty |= D_CR;
		break;
	}
	case 20: MAY_FAULT("movq %%dr6, %0", : "=r"(a) :: "r11", "memory"); break;
	case 21: MAY_FAULT("movq %%dr7, %0", : "=r"(a) :: "r11", "memory"); break;
	case 22: {
		u64 v = chance(50) ? (u64)scr(0) : any_addr();
		if (chance(50))
			MAY_FAULT("movq %0, %%dr0", :: "r"(v) : "r11", "memory");
		else
			MAY_FAULT("movq %0, %%dr3", :: "r"(v) : "r11", "memory");
		dirty |= D_DR;
		break;
	}
	case 23: MAY_FAULT("movq %0, %%dr7", :: "r"(a & 0xffffffffUL) : "r11", "memory"); dirty |= D_DR; break;
	case 24: {
		u32 leaf = chance(50) ? below(0x20) : chance(50) ? 0x80000000u + below(0x20) : (u32)rnd();
		u64 b, sub = below(4);
		a = leaf;
		if (chance(50))
			MAY_FAULT("cpuid", : "+a"(a), "=b"(b), "+c"(sub), "=d"(d) :: "r11", "memory");
		else   /* Xen's forced-emulation prefix */
			MAY_FAULT("ud2; .ascii \"xen\"; cpuid", : "+a"(a), "=b"(b), "+c"(sub), "=d"(d) :: "r11", "memory");
		break;
	}
	case 25: {
		u64 v = chance(60) ? (u64)scr(below(NSCRATCH)) : any_addr();
		MAY_FAULT("invlpg (%0)", :: "r"(v) : "r11", "memory");
		break;
	}
	case 26: MAY_FAULT("wbinvd", ::: "r11", "memory"); break;
	case 27: MAY_FAULT("invd", ::: "r11", "memory"); break;
	case 28: MAY_FAULT("clts", ::: "r11", "memory"); dirty |= D_FPU; break;
	case 29: MAY_FAULT("swapgs", ::: "r11", "memory"); dirty |= D_SEG; break;
	case 30: MAY_FAULT("rdpmc", : "+a"(a), "=d"(d) : "c"(cx & 0xffffffffUL) : "r11", "memory"); break;
	case 31: {
		static u8 dt[10];
		u32 w = below(5);   /* no hlt: nothing may wake it */
		if (w == 0) MAY_FAULT("lgdt %0", :: "m"(dt) : "r11", "memory");
		else if (w == 1) MAY_FAULT("lidt %0", :: "m"(dt) : "r11", "memory");
		else if (w == 2) MAY_FAULT("sgdt %0", : "=m"(dt) :: "r11", "memory");
		else if (w == 3) MAY_FAULT("ltr %w0", :: "r"(a) : "r11", "memory");
		else MAY_FAULT("lmsw %w0", :: "r"(a) : "r11", "memory");
		dirty |= D_FPU;
		break;
	}
	case 32: {   /* xsetbv (an exit to Python), OSXSAVE set for it; xgetbv */
		static const u64 xcr0s[] = { 1, 3, 7, 2, 5, 0xe7, 0x207, 0x20007, 0 };
		u64 v = chance(80) ? xcr0s[below(9)] : rnd(), xc = chance(85) ? 0 : below(3);
		if (chance(70)) {
			u64 c4 = cr4_0 | CR4_OSXSAVE;
			MAY_FAULT("movq %0, %%cr4", :: "r"(c4) : "r11", "memory");
			tg_resume_rip = 0;
		}
		MAY_FAULT("xsetbv", :: "a"(v), "d"(v >> 32), "c"(xc) : "r11", "memory");
		tg_resume_rip = 0;
		MAY_FAULT("xgetbv", : "=a"(a), "=d"(d) : "c"(xc) : "r11", "memory");
		a = v;
		dirty |= D_CR | D_XCR;
		break;
	}
	case 33: MAY_FAULT("rdtscp", : "=a"(a), "=d"(d), "=c"(cx) :: "r11", "memory"); break;
	default: {
		u32 w = below(5);
		if (w == 0) MAY_FAULT("int3", ::: "r11", "memory");
		else if (w == 1) MAY_FAULT("int $0x80", ::: "r11", "memory");
		else if (w == 2) MAY_FAULT(".byte 0xf1", ::: "r11", "memory");   /* icebp */
		else if (w == 3) MAY_FAULT("ud2", ::: "r11", "memory");
		else MAY_FAULT("int $0x20", ::: "r11", "memory");
		break;
	}
	}
	tg_resume_rip = 0;
	if (chance(30)) {   /* whatever CR0.TS the op left, the FPU: #NM only with the virtual TS */
		MAY_FAULT("fnop", ::: "r11", "memory");
		tg_resume_rip = 0;
	}
	tried[K_PRIV]++;
	if (trace) {
		lput("op "); ldec((long)i); lput(" priv insn="); ldec(r); lput(" port="); lhex(port); lput(" msr="); lhex(cx);
		lput(" a="); lhex(a); lend();
	}
}

static void run_op(u64 seed, u64 i)
{
	seed_op(seed, i);
	u32 r = below(1000);
	if (r < 620)
		op_single(i);
	else if (r < 760)
		op_multicall(i);
	else if (r < 800)
		op_iret(i);
	else if (r < 850)
		op_watch(i);
	else
		op_priv(i);
	restore();
}

/* ---------------- set-up ---------------- */

void tg_main(struct start_info *s)
{
	const char *cl = s->cmd_line;
	u64 seed = tg_opt_num(cl, "seed", 1), ops = tg_opt_num(cl, "ops", 100);
	trace = tg_opt_num(cl, "trace", 0) != 0;
	only = opt(cl, "only");
	nr_pages = s->nr_pages;
	shinfo_mfn = s->shared_info >> 12;
	ev_setup(s);
	vi->upcall_mask = 1;
	must(HC1(HC_set_trap_table, traps), "set_trap_table");
	must(tg_map_readonly(ro_page), "ro_page read-only");
	must(tg_map_readonly((const void *)desc_pages[1]), "descriptor page read-only");
	l4_mfn = read_cr3() >> 12;
	l3_mfn = (pfn_va(l4_mfn)[511] & PTE_ADDR) >> 12;
	code_mfn = va_to_pfn((void *)tg_main);
	__asm__ volatile("movw %%ds, %0; movw %%es, %1; movw %%fs, %2; movw %%gs, %3"
			 : "=m"(sel0[0]), "=m"(sel0[1]), "=m"(sel0[2]), "=m"(sel0[3]));
	MAY_FAULT("movq %%cr4, %0", : "=r"(cr4_0) :: "r11", "memory");
	tg_resume_rip = 0;
	u64 c4 = cr4_0 | CR4_OSXSAVE, lo = 1, hi = 0;   /* XCR0 as the guest starts, for restore() */
	MAY_FAULT("movq %0, %%cr4", :: "r"(c4) : "r11", "memory");
	tg_resume_rip = 0;
	MAY_FAULT("xgetbv", : "+a"(lo), "+d"(hi) : "c"(0UL) : "r11", "memory");
	tg_resume_rip = 0;
	MAY_FAULT("movq %0, %%cr4", :: "r"(cr4_0) : "r11", "memory");
	tg_resume_rip = 0;
	xcr0_0 = (u32)lo | hi << 32;

	u64 n = 0;
	for (u64 i = 0; i < ops; i++) {
		if (!selected(i))
			continue;
		run_op(seed, i);
		n++;
	}
	lput("SHIMFUZZ STATS ops="); ldec((long)n);
	for (int k = 0; k < NKIND; k++) {
		lput(" "); lput(kind_name[k]); lput("="); ldec((long)okay[k]); lput("/"); ldec((long)tried[k]);
	}
	lend();
	lput("SHIMFUZZ TRAPS");
	for (int v = 0; v < 32; v++)
		if (traps_seen[v]) { lput(" "); ldec(v); lput("="); ldec((long)traps_seen[v]); }
	lend();
}
