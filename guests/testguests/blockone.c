/* One vCPU blocked while another runs (issue 9): vCPU 1 comes up and
 * blocks in SCHEDOP_block with nothing that could wake it (no port bound,
 * no timer), while vCPU 0 spins at CPL3 for about spin_s seconds
 * (command line "spin_s=N", default 4; counted in TSC cycles, 2 GHz
 * assumed) and then powers off.  The test
 * measures the host CPU time of vCPU 1's thread meanwhile: a blocked vCPU
 * costs none (its thread sleeps in KVM's halt; nothing polls). */
#include "tg.h"
#include "vcpu_ctx.h"
#include "mmutest.h"
const char tg_name[] = "blockone";

static u8 stack1[8192] __attribute__((aligned(4096)));
static struct vcpu_guest_context ctx;
static volatile u64 blocked1;

void vcpu1_main(void)
{
	blocked1 = 1;
	for (;;)
		HC2(HC_sched_op, SCHEDOP_block, 0);
}
__asm__(".text\nvcpu1_entry: call vcpu1_main; ud2\n");
extern char vcpu1_entry[];

void tg_main(struct start_info *si)
{
	u64 spin_s = tg_opt_num(si->cmd_line, "spin_s", 4);
	tg_kernel_context(&ctx, (u64)vcpu1_entry, (u64)stack1 + sizeof(stack1), read_cr3() & PTE_ADDR);
	long rc = HC3(HC_vcpu_op, VCPUOP_initialise, 1, &ctx);
	tg_check(rc == 0, "VCPUOP_initialise of vCPU 1", rc, 0);
	rc = rc ? rc : HC3(HC_vcpu_op, VCPUOP_up, 1, 0);
	tg_check(rc == 0, "VCPUOP_up of vCPU 1", rc, 0);
	if (rc)
		return;
	u64 t0 = rdtsc();
	while (!blocked1 && rdtsc() - t0 < (1UL << 35))
		__asm__ volatile("pause" ::: "memory");
	tg_check(blocked1, "vCPU 1 ran up to its block", blocked1, 1);
	tg_puts("blockone: vCPU 1 blocked, vCPU 0 spinning\n");
	u64 end = rdtsc() + spin_s * 1000000000UL * 2;   /* spin_s s at a 2 GHz TSC, less above */
	while (rdtsc() < end)
		__asm__ volatile("pause");
	tg_puts("blockone: done\n");
}
