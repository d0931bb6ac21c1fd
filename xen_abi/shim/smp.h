/* What the vCPUs of one domain do to each other in the shim (smp.c):
 * remote TLB flushes.  The per-vCPU fields they use (EVB_ONLINE,
 * EVB_IN_EXIT, EVB_FLUSH_REQ, EVB_FLUSH_DONE) are in the generated
 * shim_layout.h (xen_abi/shim/layout.py). */
#ifndef SHIM_SMP_H
#define SHIM_SMP_H

#define MSR_X2APIC_ICR 0x830
#define FLUSH_ALL_VA   (~0UL)   /* smp_flush: the whole TLB, not one page */

#ifndef __ASSEMBLER__
/* Flush the TLBs of the vCPUs in `mask` (bit n: vCPU n; this vCPU's bit
 * flushes here): the page at `va`, or everything (FLUSH_ALL_VA).  Returns
 * once no vCPU of the mask can use a stale translation. */
void smp_flush(unsigned long mask, unsigned long va);
/* Serve what other vCPUs asked of this one (the flush IPI, and every
 * return from an exit to Python).  `events` is this vCPU's events block. */
void smp_serve(unsigned char *events);

/* The TLB clock (smp.c): the clock each vCPU read just before its last
 * full flush.  Every full flush of a vCPU goes through load_cr3 (a CR3
 * write that skips it only costs an extra flush later). */
extern volatile unsigned long tlb_clock;
extern volatile unsigned long tlb_flushed_at[MAX_VCPUS];
static inline void load_cr3(unsigned long vcpu, unsigned long cr3)
{
	unsigned long now = tlb_clock;
	__asm__ volatile("mov %0, %%cr3" :: "r"(cr3) : "memory");
	tlb_flushed_at[vcpu] = now;
}
/* Advance the clock: the stamp of a mapping that just went away.  Under
 * mmu.c's lock (or with one vCPU): one writer at a time, and x86 keeps
 * this store after the page-table write that preceded it. */
static inline unsigned long tlb_clock_tick(void) { return ++tlb_clock; }
/* Flush every vCPU that may still hold a translation older than `stamp`. */
void smp_flush_stale(unsigned long stamp);
#endif
#endif
