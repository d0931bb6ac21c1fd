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
#endif
#endif
