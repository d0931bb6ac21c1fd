/* Absurd hypercall arguments from a guest kernel: wild pointers (unmapped,
 * non-canonical, into the hypervisor hole), huge counts, unknown numbers and
 * sub-ops, out-of-range ports and frames.  Each one must come back as a Xen
 * error code, both for hypercalls the shim handles and for those it passes
 * to Python, and the guest must keep running to report PASS. */
#include "tg.h"
#include "tg_events.h"

const char tg_name[] = "absurd";

static const u64 wild[] = {
	0x00000000dead0000UL,   /* unmapped user address */
	0x8000000000000000UL,   /* non-canonical */
	0xffff830000000000UL,   /* the hypervisor hole: the shim's own memory */
	0xfffffffffffff000UL,   /* the last page: wraps with any length */
	0x00007ffffffffff8UL,   /* runs past the end of the lower half */
	0xffff87fffffffff8UL,   /* starts in the hole, ends past it */
	0xffff7ffffffffff8UL,   /* non-canonical, runs into the hole */
};

static void expect_err(long rc, long want, const char *what)
{
	/* want 0: any error will do; else exactly -want */
	if (want)
		tg_check(rc == -want, what, (u64)rc, (u64)-want);
	else
		tg_check(rc < 0 && rc > -4096, what, (u64)rc, (u64)-1);
}

void tg_main(struct start_info *si)
{
	static char msg[] = "absurd: still alive\n";
	static u64 buf[64];

	for (unsigned i = 0; i < sizeof(wild) / sizeof(wild[0]); i++) {
		u64 p = wild[i];
		/* slow path (Python) */
		expect_err(HC3(HC_console_io, CONSOLEIO_write, 16, p), XEN_EFAULT, "console_io wild pointer");
		expect_err(HC3(HC_memory_op, XENMEM_memory_map, p, 0), XEN_EFAULT, "memory_map wild pointer");
		expect_err(HC3(HC_event_channel_op, EVTCHNOP_alloc_unbound, p, 0), XEN_EFAULT,
			   "evtchn wild pointer");
		/* fast path (shim) */
		expect_err(HC4(HC_mmu_update, p, 1, 0, 0x7ff0), XEN_EFAULT, "mmu_update wild pointer");
		expect_err(HC4(HC_mmuext_op, p, 1, 0, 0x7ff0), XEN_EFAULT, "mmuext_op wild pointer");
		expect_err(HC2(HC_multicall, p, 1), XEN_EFAULT, "multicall wild pointer");
		expect_err(HC1(HC_set_trap_table, p), XEN_EFAULT, "set_trap_table wild pointer");
		expect_err(HC2(HC_callback_op, CALLBACKOP_register, p), XEN_EFAULT, "callback_op wild pointer");
		expect_err(HC3(HC_vcpu_op, VCPUOP_set_singleshot_timer, 0, p), XEN_EFAULT,
			   "set_singleshot_timer wild pointer");
	}

	/* huge counts with a valid (small) buffer */
	/* count is an unsigned int in the ABI: the largest one */
	expect_err(HC3(HC_console_io, CONSOLEIO_write, 0xffffffffUL, msg), 0, "console_io huge length");
	expect_err(HC4(HC_mmu_update, buf, 0x7fffffffUL, 0, 0x7ff0), 0, "mmu_update huge count");
	expect_err(HC4(HC_mmuext_op, buf, 0x7fffffffUL, 0, 0x7ff0), 0, "mmuext_op huge count");
	/* bits above the unsigned int are not part of the count (Xen): none */
	tg_check(HC4(HC_mmu_update, buf, 1UL << 40, 0, 0x7ff0) == 0, "mmu_update count 1 << 40 is 0",
		 0, 0);
	/* (a huge multicall count is not here: like Xen, the shim runs every
	 * entry it can read, so it would execute the zeroed memory after buf) */

	/* a page-table update aimed outside guest RAM */
	buf[0] = 0x7ffffffff000UL;   /* ptr: machine address far beyond RAM */
	buf[1] = 0x1000 | PTE_P;
	expect_err(HC4(HC_mmu_update, buf, 1, 0, 0x7ff0), 0, "mmu_update ptr outside RAM");

	/* unknown hypercall numbers and sub-ops */
	expect_err(hc(9999, 0, 0, 0, 0, 0), XEN_ENOSYS, "hypercall 9999");
	expect_err(tg_syscall_hc(-1L, 0, 0, 0, 0, 0), XEN_ENOSYS, "hypercall -1");
	expect_err(HC2(HC_memory_op, 0x7fff, buf), XEN_ENOSYS, "memory_op unknown sub-op");
	expect_err(HC2(HC_event_channel_op, 0x7fff, buf), XEN_ENOSYS, "evtchn unknown sub-op");
	expect_err(HC2(HC_callback_op, 0x7fff, buf), XEN_ENOSYS, "callback_op unknown sub-op");
	struct callback_register odd_cb = { 0x7fff, 0, 0, 0x1000 };
	expect_err(HC2(HC_callback_op, CALLBACKOP_register, &odd_cb), XEN_ENOSYS,
		   "callback_op register of an unknown type");

	/* out-of-range ports, vCPUs and frames */
	u32 port = 100000;
	expect_err(HC2(HC_event_channel_op, EVTCHNOP_send, &port), XEN_EINVAL, "send to port 100000");
	port = 4095;
	expect_err(HC2(HC_event_channel_op, EVTCHNOP_send, &port), 0, "send to an unbound port");
	u32 bind_virq[3] = { VIRQ_TIMER, 1000000, 0 };
	expect_err(HC2(HC_event_channel_op, EVTCHNOP_bind_virq, bind_virq), 0, "bind_virq on vCPU 1000000");
	expect_err(HC3(HC_vcpu_op, VCPUOP_is_up, 1, 0), XEN_ENOENT, "is_up of vCPU 1 (there is one)");
	struct { u64 mfn; u32 offset, rsvd; } vi = { 1UL << 40, 0, 0 };
	expect_err(HC3(HC_vcpu_op, VCPUOP_register_vcpu_info, 0, &vi), XEN_EINVAL,
		   "register_vcpu_info frame outside RAM");
	struct { u16 dom, pad; u32 nr_frames; s64 status_pad; u64 frame_list; } st = { 0x7ff0, 0, 1u << 30, 0,
		(u64)buf };
	long rc = HC3(HC_grant_table_op, GNTTABOP_setup_table, &st, 1);
	tg_check(rc < 0 || (s64)(short)st.status_pad != 0, "setup_table 2^30 frames refused", (u64)rc, 0);

	tg_write(msg, sizeof(msg) - 1);
	(void)si;
}
