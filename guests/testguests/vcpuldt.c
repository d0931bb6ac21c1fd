/* VCPUOP_initialise with an LDT in the context (ldt_base, ldt_ents), as
 * Xen's arch_set_info_guest takes it for a 64-bit PV vCPU: the new vCPU
 * starts with that LDT, so an LDT selector loads at its first
 * instruction.  A context whose LDT pages are not mapped is accepted all
 * the same (Xen maps LDT pages lazily, at first use); that vCPU's use of
 * the selector faults (#GP with the selector) instead.  So does a context
 * whose LDT lies in the hypervisor's half, here the shim's 1:1 map of
 * guest RAM (its address from the command line, directmap=N): the same
 * valid LDT page seen through it is never taken, as MMUEXT_SET_LDT
 * refuses such a base.  The
 * shim takes the LDT at initialise through the context's own page tables
 * (mmu.c). */
#include "mmutest.h"
#include "vcpu_ctx.h"
const char tg_name[] = "vcpuldt";

#define SEL_LDT1 0xfUL          /* index 1, TI (LDT), RPL 3 */
#define DESC(base, limit, access, flags)                                                 \
	(((u64)(limit) & 0xffff) | (((u64)(base) & 0xffffff) << 16) | ((u64)(access) << 40) | \
	 ((((u64)(limit) >> 16) & 0xf) << 48) | ((u64)(flags) << 52) | (((u64)(base) >> 24) << 56))
#define WAIT_TICKS (1UL << 35)   /* ~10 s */
#define UNMAPPED_VA 0x10000000UL

static u64 ldtp[512] __attribute__((aligned(4096)));
static u8 stack1[3][8192] __attribute__((aligned(4096)));
static struct vcpu_guest_context ctx;
/* per vCPU 1-3: 1 once it ran, LAR of the selector (valid, access byte),
 * the #GP error code seen (or ~0) */
static volatile u64 ran[4], lar_ok[4], access[4], gp_err[4] = { 0, ~0UL, ~0UL, ~0UL };

extern char tg_trap_13[];
u64 tg_resume_rip;
void tg_trap(u64 vec, u64 *f, int has_err)
{
	u64 *hw = &f[2 + (has_err ? 1 : 0)];
	u64 me;
	__asm__ volatile("movq %%rsp, %0" : "=r"(me));
	int n = me >= (u64)stack1[2] ? 3 : me >= (u64)stack1[1] ? 2 : 1;
	if (vec == 13)
		gp_err[n] = f[2];
	hw[0] = tg_resume_rip;
}

/* each secondary vCPU: load the LDT selector into %fs, note what came of it, go down */
void vcpu_main(int n)
{
	u64 ar = 0;
	u8 valid;
	__asm__ volatile("leaq 1f(%%rip), %%rax; movq %%rax, tg_resume_rip(%%rip)\n\t"
			 "movw %0, %%ax; movw %%ax, %%fs\n1:" :: "i"(SEL_LDT1) : "rax", "memory");
	/* the descriptor as the CPU sees it (a selector read back from %fs
	 * shows 0 on kvm_pvm, README "Two test lanes") */
	__asm__ volatile("larq %2, %0; setz %1" : "+r"(ar), "=q"(valid) : "r"(SEL_LDT1) : "cc");
	lar_ok[n] = valid;
	access[n] = ar >> 8 & 0xff;
	ran[n] = 1;
	HC3(HC_vcpu_op, VCPUOP_down, n, 0);
	for (;;)
		__asm__ volatile("pause");
}
__asm__(".text\n"
	"vcpu1_entry: movl $1, %edi; call vcpu_main; ud2\n"
	"vcpu2_entry: movl $2, %edi; call vcpu_main; ud2\n"
	"vcpu3_entry: movl $3, %edi; call vcpu_main; ud2\n");
extern char vcpu1_entry[], vcpu2_entry[], vcpu3_entry[];

static long start(int n, u64 entry, u64 ldt_base, u64 ldt_ents)
{
	tg_kernel_context(&ctx, entry, (u64)stack1[n - 1] + sizeof(stack1[0]), read_cr3() & PTE_ADDR);
	ctx.trap_ctxt[13] = (struct trap_info){ 13, 0, FLAT_RING3_CS64, 0, (u64)tg_trap_13 };
	ctx.ldt_base = ldt_base;
	ctx.ldt_ents = ldt_ents;
	long rc = HC3(HC_vcpu_op, VCPUOP_initialise, n, &ctx);
	return rc ? rc : HC3(HC_vcpu_op, VCPUOP_up, n, 0);
}

static int wait_for(volatile u64 *flag)
{
	u64 end = rdtsc() + WAIT_TICKS;
	while (!*flag && rdtsc() < end)
		__asm__ volatile("pause" ::: "memory");
	return *flag != 0;
}

void tg_main(struct start_info *si)
{
	/* an LDT of two entries: a null one and a flat data segment, DPL 3 */
	ldtp[1] = DESC(0, 0xfffff, 0xf3, 0xc);
	tg_check(tg_map_readonly(ldtp) == 0, "the LDT page mapped read-only", 0, 0);
	long rc = start(1, (u64)vcpu1_entry, (u64)ldtp, 2);
	tg_check(rc == 0, "VCPUOP_initialise with an LDT, VCPUOP_up", rc, 0);
	if (rc)
		return;
	tg_check(wait_for(&ran[1]), "vCPU 1 ran", ran[1], 1);
	tg_check(gp_err[1] == ~0UL, "vCPU 1: the LDT selector loads (no #GP)", gp_err[1], ~0UL);
	/* LAR at CPL3 reads the host's descriptor tables on kvm_pvm (the
	 * selector load above is what it checks there) */
	tg_puts("OBSERVE ldt_lar ");
	tg_puts(lar_ok[1] && access[1] == 0xf3 ? "ok\n" : "differs\n");

	/* an LDT whose page is not mapped: accepted, and its use faults */
	rc = start(2, (u64)vcpu2_entry, UNMAPPED_VA, 2);
	tg_check(rc == 0, "VCPUOP_initialise with an unmapped LDT: accepted, as Xen", rc, 0);
	if (rc)
		return;
	tg_check(wait_for(&ran[2]), "vCPU 2 ran", ran[2], 1);
	tg_check(gp_err[2] == (SEL_LDT1 & ~3UL), "vCPU 2: no LDT, #GP(selector)", gp_err[2], SEL_LDT1 & ~3UL);
	tg_check(!lar_ok[2], "vCPU 2: LAR finds no such descriptor", lar_ok[2], 0);

	/* hostile: vCPU 1's LDT page through the hypervisor's map of RAM */
	u64 directmap = tg_opt_num(si->cmd_line, "directmap", 0);
	tg_check(directmap >= HYPERVISOR_VIRT_START, "directmap=N on the command line", directmap,
		 HYPERVISOR_VIRT_START);
	u64 mfn = ((u64 *)si->mfn_list)[va_to_pfn(ldtp)];
	rc = start(3, (u64)vcpu3_entry, directmap + (mfn << 12), 2);
	tg_check(rc == 0, "VCPUOP_initialise with an LDT in the hypervisor's half: accepted", rc, 0);
	if (rc)
		return;
	tg_check(wait_for(&ran[3]), "vCPU 3 ran", ran[3], 1);
	tg_check(gp_err[3] == (SEL_LDT1 & ~3UL), "vCPU 3: no LDT, #GP(selector)", gp_err[3], SEL_LDT1 & ~3UL);
	tg_puts("vcpuldt: vCPU 1 LAR access byte "); tg_hex(access[1]); tg_puts("\n");
}
