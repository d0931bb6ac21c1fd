/* Declarations shared by the shim's C files (shim.c, mmu.c, events.c, ...):
 * the saved-register frame, the per-vCPU and global blocks, CPU helpers and
 * the fault-tolerant guest-memory accessors.  Everything here is static
 * inline or a type, so each C file that includes it stays self-contained.
 *
 * The numbers come from the headers generated at build time from
 * xen_abi/shim/layout.py: xen_numbers.h (Xen's) and shim_layout.h (what
 * Python and the shim share: REGION_VA, the blocks, the mailbox, ...). */
#ifndef SHIM_SHIM_H
#define SHIM_SHIM_H
#include <stddef.h>
#include <stdint.h>
#include "xen_numbers.h"
#include "shim_layout.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;

#define RFLAGS_CF   0x1UL
#define RFLAGS_TF   0x100UL
#define RFLAGS_IF   0x200UL
#define RFLAGS_DF   0x400UL
#define RFLAGS_IOPL 0x3000UL
#define RFLAGS_NT   0x4000UL
#define RFLAGS_RF   0x10000UL
#define RFLAGS_VM   0x20000UL
#define RFLAGS_AC   0x40000UL
#define RFLAGS_FIXED 0x2UL
/* bits a guest may set through iret (arithmetic + TF/DF/AC/ID) */
#define RFLAGS_GUEST_MASK 0x254dd5UL
/* the arithmetic flags (CF PF AF ZF SF OF) */
#define RFLAGS_ARITH 0x8d5UL

#define PTE_P   0x1UL
#define PTE_RW  0x2UL
#define PTE_US  0x4UL
#define PTE_PS  0x80UL
#define PTE_ADDR 0x000ffffffffff000UL

#define PFEC_P  1
#define PFEC_W  2
#define PFEC_U  4
#define PFEC_RSVD 8

#define MSR_FS_BASE        0xc0000100
#define MSR_GS_BASE        0xc0000101
#define MSR_KERNEL_GS_BASE 0xc0000102

#define CR0_TS 0x8UL

#define VEC_DE 0
#define VEC_DB 1
#define VEC_NMI 2
#define VEC_BP 3
#define VEC_OF 4
#define VEC_UD 6
#define VEC_NM 7
#define VEC_DF 8
#define VEC_GP 13
#define VEC_PF 14
#define VEC_MC 18

/* Saved state, lowest address first (see shim_common in entry.S). */
struct frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vec, err;
	u64 rip, cs, rflags, rsp, ss;
};

/* A hypercall from guest kernel mode, lowest address first (entry.S
 * shim_syscall; HF_* in shim_layout.h). */
struct hc_frame {
	u64 r11, rcx;
	u64 args[6];           /* rdi rsi rdx r10 r8 r9 */
	u64 vec, rax;
	u64 rip, cs, rflags, rsp, ss;
};

struct trap_ent { u64 addr; u64 flags; };

/* Guest GDT/LDT state of one vCPU (mmu.c).  The guest's descriptor frames
 * are copied (validated) into the per-vCPU GDT pages; see mmu.c. */
#define SHIM_MAX_GDT_FRAMES 14
#define SHIM_MAX_LDT_FRAMES 16
struct desc_state {
	u64 gdt_frames[SHIM_MAX_GDT_FRAMES];   /* machine frame numbers */
	u64 gdt_ents;                          /* entries in use (0 = none) */
	u64 ldt_base;                          /* guest linear address */
	u64 ldt_ents;
	u64 ldt_frames[SHIM_MAX_LDT_FRAMES];
};

/* The mailbox page of the exit to Python (MB_*, MBOP_* in shim_layout.h). */
struct mailbox {
	u64 op;
	u64 nr;
	u64 args[6];
	u64 cr3;
	u64 kmode;
	u64 result;
	u64 rip;
	u64 info;
	u64 info2;
};

struct percpu {
	/* boot block, written by Python (PC_* in shim_layout.h) */
	u64 vcpu_id;
	u8 *vcpu_info;
	u64 lstar;
	u64 kernel_sp;
	u64 kernel_ss;
	u64 kernel_mode;
	u64 cr3_kernel;
	u64 cr3_user;
	struct mailbox *mailbox;
	u64 syscall_rsp;
	/* shim-private */
	u64 event_cb, failsafe_cb, syscall_cb;
	/* the NMI callback is traps[VEC_NMI], as Xen keeps it in trap_ctxt */
	u64 nmi_pending;       /* written by any vCPU (shim.c send_nmi) */
	u64 nmi_masked;        /* from the NMI's bounce until HYPERVISOR_iret */
	u64 syscall32_cb, sysenter_cb;   /* kept as Xen keeps them; no 32-bit code runs */
	u64 cb_mask;           /* bit n: callback type n masks events */
	u64 vcr0_ts;
	struct trap_ent traps[256];
	struct desc_state desc;
	/* Preemption of long hypercalls (Xen's hypercall_preempt_check and
	 * hypercall_create_continuation): each guest hypercall may do
	 * HYPERCALL_WORK_BUDGET units of work (batch entries, multicall entries,
	 * trap-table entries) before the loop doing them stops and asks for a
	 * continuation: the guest re-executes the hypercall with cont_args,
	 * taking its pending events first. */
	u64 hc_work_left;
	u64 cont_set;
	u64 cont_nr;
	u64 cont_args[6];
};

#define HYPERCALL_WORK_BUDGET 256

/* One unit of a long hypercall's work: 1 when it is time to stop. */
static inline int hc_preempt_check(struct percpu *pc)
{
	return pc->hc_work_left-- == 0;
}

/* Ask the guest to re-execute hypercall nr with these arguments. */
static inline void hc_continue(struct percpu *pc, u64 nr, u64 a0, u64 a1, u64 a2, u64 a3)
{
	pc->cont_set = 1;
	pc->cont_nr = nr;
	pc->cont_args[0] = a0;
	pc->cont_args[1] = a1;
	pc->cont_args[2] = a2;
	pc->cont_args[3] = a3;
}

/* The globals page, written by Python (SG_* in shim_layout.h). */
struct globals {
	u8 *shared_info;
	u8 *cpuid_table;
	u64 nr_cpuid;
	u8 *directmap;
	u64 ram_pages;
	u64 l4_slots[HYPERVISOR_L4_SLOTS];
	u64 *m2p;
	u32 *page_type;        /* one word per RAM frame: counted type (mmu.c) */
	u64 *tlb_stamp;        /* per RAM frame: TLB clock when last unmapped writable */
	u64 region_gpa;        /* guest-physical base of the VMM region */
};

MB_CHECK_LAYOUT(struct mailbox);
FR_CHECK_LAYOUT(struct frame);
HF_CHECK_LAYOUT(struct hc_frame);
PC_CHECK_LAYOUT(struct percpu);
SG_CHECK_LAYOUT(struct globals);
_Static_assert(sizeof(struct percpu) <= 2 * 4096, "percpu fits its 2 pages");

#define G ((struct globals *)(REGION_VA + GLOBALS_OFF))

long guest_copy(void *dst, const void *src, u64 n);
void guest_load_gs(u16 sel);
extern char shim_copy_insn[], shim_copy_tail_insn[], shim_copy_fault[], shim_gs_insn[], shim_gs_fault[];
extern char shim_iret_insn[], shim_hc_iret_insn[];

/* a cold or large helper kept out of its callers, so that their hot paths
 * need no stack frame (each saved register costs two interpreted instructions) */
#define NOINLINE __attribute__((noinline))
/* noinline, and no facts about the callers carried into the function */
#define NOIPA __attribute__((noinline, noipa))

static inline struct percpu *pcpu(void)
{
	u64 sp;
	__asm__("mov %%rsp, %0" : "=r"(sp));
	return (struct percpu *)((sp & ~(u64)(PERCPU_BLOCK_SIZE - 1)) + PERCPU_IN_BLOCK);
}

static inline u64 read_cr2(void) { u64 v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" :: "r"(v) : "memory"); }
static inline u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline void write_cr0(u64 v) { __asm__ volatile("mov %0, %%cr0" :: "r"(v) : "memory"); }
static inline void invlpg(u64 va) { __asm__ volatile("invlpg (%0)" :: "r"(va) : "memory"); }
static inline void swapgs(void) { __asm__ volatile("swapgs" ::: "memory"); }
static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

static inline int canonical(u64 va) { return (u64)((s64)(va << 16) >> 16) == va; }

/* A guest pointer range is usable if canonical, not wrapping, and clear of
 * the hypervisor hole (where the shim itself lives): all of it in the lower
 * canonical half, or all of it in the upper half above the hole (which
 * starts that half).  Two compares: every hypercall with a pointer, every
 * bounce and every iret come here. */
#define LOWER_HALF_END (1UL << 47)
_Static_assert(HYPERVISOR_VIRT_START == 0xffff800000000000UL, "the hole starts the upper half");
static inline int range_ok(u64 va, u64 n)
{
	u64 end = va + n;
	if (end < va)
		return 0;
	if (end <= LOWER_HALF_END)
		return va < LOWER_HALF_END;
	return va >= HYPERVISOR_VIRT_END;
}

static inline long from_guest(void *dst, u64 va, u64 n)
{
	return range_ok(va, n) ? guest_copy(dst, (const void *)va, n) : -XEN_EFAULT;
}

static inline long to_guest(u64 va, const void *src, u64 n)
{
	return range_ok(va, n) ? guest_copy((void *)va, src, n) : -XEN_EFAULT;
}

void smp_serve(u8 *events);   /* smp.c */

/* The one exit to Python.  The vCPU thread handles it synchronously and
 * resumes us right after the `out`.  Meanwhile other vCPUs' TLB flushes
 * do not wait for this one; it serves them on the way back (smp.c). */
static inline void exit_to_python(void)
{
	u8 *ev = (u8 *)((u64)pcpu() - PERCPU_IN_BLOCK + VCPU_EVENTS_OFF);
	*(volatile u64 *)(ev + EVB_IN_EXIT) = 1;
	__asm__ volatile("mfence; outl %%eax, %%dx" :: "a"(0), "d"(SHIM_EXIT_PORT) : "memory");
	*(volatile u64 *)(ev + EVB_IN_EXIT) = 0;
	__asm__ volatile("mfence" ::: "memory");
	smp_serve(ev);
}

static inline __attribute__((noreturn)) void stop_here(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* ---- mmu.c: page tables, writable page tables, descriptor tables ---- */
long do_mmu_update(struct percpu *pc, u64 reqs, u64 count, u64 done_ptr, u64 domid);
long do_mmuext_op(struct percpu *pc, u64 ops, u64 count, u64 done_ptr, u64 domid);
long do_update_va_mapping(struct percpu *pc, u64 va, u64 val, u64 flags);
long do_set_gdt(struct percpu *pc, u64 frames_ptr, u64 entries);
long do_update_descriptor(struct percpu *pc, u64 maddr, u64 desc);
/* #PF from the guest: 1 if handled here (lazy _PAGE_USER fix-up or an
 * emulated page-table write), 0 to bounce it to the guest. */
int mmu_page_fault(struct percpu *pc, struct frame *f, u64 cr2);
void mmu_type_boot_tables(struct percpu *pc);
long mmu_grant_pte(struct percpu *pc, const u64 *req);
/* End the guest: the mailbox says why (CRASH_*), at rip, with err. */
__attribute__((noreturn)) void crash_at(struct percpu *pc, u64 rip, u64 err, u64 why);
long mmu_vcpu_context(struct percpu *pc, struct percpu *target, u64 *target_gdt, u64 ctx);
void mmu_vcpu_context_undo(struct percpu *target);

/* vCPU n's stack block (its percpu, events block and GDT pages are in it) */
static inline u8 *vcpu_block(u64 n) { return (u8 *)(REGION_VA + VCPU_OFF + n * VCPU_STRIDE); }
#endif
