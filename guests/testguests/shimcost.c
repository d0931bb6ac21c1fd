/* The price list of the shim's hot paths (bench/shim_costs.py).
 *
 * Runs each operation a Linux guest makes most often -- the hypercalls of
 * a boot and of an idle tick, an exception bounced to the guest, an event
 * upcall -- COST_N times in a row, between two console lines
 * "COST <name>".  The host reads the vCPU's KVM statistics at each line
 * (on kvm_pvm `insn_emulation` counts the CPL0 instructions it
 * interpreted), so one block's difference, less the "empty" block's, over
 * COST_N is what one operation costs.  Each result is also checked, so
 * the guest ends with PASS or FAIL like the others. */
#include "mmutest.h"
#include "tg_events.h"

const char tg_name[] = "shimcost";

#define COST_N 100

static u64 l1a[512] __attribute__((aligned(4096)));
static u64 d0[512] __attribute__((aligned(4096)));
static u64 d1[512] __attribute__((aligned(4096)));
static u8 kstack[4096] __attribute__((aligned(16)));
static u32 ipi_port, timer_port;

u64 tg_expect_rip, tg_resume_rip, tg_expect_rsp;
static u64 traps_seen;

void tg_iret_to_self(void);
extern char tg_trap_3[], tg_trap_14[];

/* int3 and the expected #PF: count and resume (traps_entry.S returns with
 * HYPERVISOR_iret, as Linux does). */
void tg_trap(u64 vec, u64 *f, int has_err)
{
	traps_seen++;
	if (vec == 14 && tg_resume_rip) {
		f[3] = tg_resume_rip;
		return;
	}
	if (vec != 3) {
		tg_check(0, "unexpected trap", vec, 0);
		tg_finish();
	}
	(void)has_err;
}

static void mark(const char *name)
{
	char line[64] = "COST ";
	unsigned n = 5;
	while (*name && n < sizeof(line) - 1)
		line[n++] = *name++;
	line[n++] = '\n';
	tg_write(line, n);
}

static u64 pte_of(u64 *page) { return (va_to_pfn(page) << 12) | PTE_P | PTE_RW | PTE_A; }

static void multicall2(u64 va)
{
	struct { u64 op, result, args[6]; } mc[2] = {
		{ HC_update_va_mapping, 99, { va, pte_of(d0), UVMF_NONE } },
		{ HC_update_va_mapping, 99, { va, pte_of(d1), UVMF_INVLPG } },
	};
	long rc = HC2(HC_multicall, mc, 2);
	tg_check(rc == 0 && mc[0].result == 0 && mc[1].result == 0, "multicall", rc, 0);
}

static int ipi_seen(void) { return ev_hits[ipi_port] != 0; }
static int timer_seen(void) { return ev_hits[timer_port] != 0; }

void tg_main(struct start_info *s)
{
	long rc;
	u64 l1m = va_to_pfn(l1a) << 12;

	ev_setup(s);
	struct trap_info traps[] = {
		{ 3, 3, 0xe033, 0, (u64)tg_trap_3 },
		{ 14, 0, 0xe033, 0, (u64)tg_trap_14 },
		{ 0, 0, 0, 0, 0 },
	};
	rc = HC1(HC_set_trap_table, traps);
	tg_check(rc == 0, "set_trap_table", rc, 0);
	rc = hook_l1(l1a);
	tg_check(rc == 0, "hook a pinned L1", rc, 0);
	struct evtchn_bind_ipi ipi = { 0, 0 };
	rc = evtchn_op(EVTCHNOP_bind_ipi, &ipi);
	tg_check(rc == 0, "bind_ipi", rc, 0);
	ipi_port = ipi.port;
	timer_port = bind_virq(VIRQ_TIMER);
	if (tg_failures)
		return;
	ev_enable();

	tg_puts("COSTN "); tg_dec(COST_N); tg_puts("\n");
	mark("empty");

	mark("xen_version");
	for (int i = 0; i < COST_N; i++)
		HC2(HC_xen_version, XENVER_version, 0);

	mark("stack_switch");
	for (int i = 0; i < COST_N; i++)
		HC2(HC_stack_switch, 0xe02b, (u64)kstack + sizeof(kstack));

	mark("set_segment_base");
	for (int i = 0; i < COST_N; i++)
		HC2(HC_set_segment_base, SEGBASE_FS, 0);

	mark("set_singleshot_timer");
	for (int i = 0; i < COST_N; i++)
		singleshot(now_ns() + 3600000000000UL, 0);
	HC3(HC_vcpu_op, VCPUOP_stop_singleshot_timer, 0, 0);

	mark("sched_yield");
	for (int i = 0; i < COST_N; i++)
		HC2(HC_sched_op, SCHEDOP_yield, 0);

	mark("mmu_update");
	for (int i = 0; i < COST_N; i++)
		mmu_update1(l1m + 8 * 4, pte_of((i & 1) ? d0 : d1));

	mark("update_va_mapping");
	for (int i = 0; i < COST_N; i++)
		uvm(TEST_VA, pte_of((i & 1) ? d0 : d1), UVMF_INVLPG);

	mark("mmuext_invlpg");
	for (int i = 0; i < COST_N; i++)
		mmuext1(MMUEXT_INVLPG_LOCAL, TEST_VA, 0);

	u64 l4_mfn = read_cr3() >> 12;   /* a #GP the shim emulates: outside the loop */
	mark("mmuext_new_baseptr");
	for (int i = 0; i < COST_N; i++)
		mmuext1(MMUEXT_NEW_BASEPTR, l4_mfn, 0);

	mark("multicall_2_uvm");
	for (int i = 0; i < COST_N; i++)
		multicall2(TEST_VA);

	mark("iret");
	for (int i = 0; i < COST_N; i++)
		tg_iret_to_self();

	mark("int3_bounce_iret");
	for (int i = 0; i < COST_N; i++)
		__asm__ volatile("int3" ::: "memory");

	mark("pf_bounce_iret");
	for (int i = 0; i < COST_N; i++) {
		/* slot 100 of the test L1 is empty: a kernel-mode #PF */
		EXPECT_FAULT("movq (%0), %%rax", :: "r"(TEST_VA + 100 * 4096) : "rax", "memory");
	}

	mark("evtchn_send_ipi_upcall");
	for (int i = 0; i < COST_N; i++) {
		ev_hits[ipi_port] = 0;
		ev_send(ipi_port);
		if (!ipi_seen())
			ev_wait(ipi_seen, 10);
	}

	mark("timer_upcall");
	for (int i = 0; i < COST_N; i++) {
		ev_hits[timer_port] = 0;
		singleshot(now_ns(), 0);   /* in the past by the time it is read */
		if (!timer_seen())
			ev_wait(timer_seen, 10);
	}

	mark("end");
	tg_check(traps_seen == 2 * COST_N, "traps seen", traps_seen, 2 * COST_N);
	(void)rc;
}
