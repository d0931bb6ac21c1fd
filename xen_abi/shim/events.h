/* Time, timers, event delivery and blocking in the shim (events.c): the
 * LAPIC registers these paths program and the hooks shim.c calls.  The
 * per-vCPU events block Python fills (EVB_*, EVF_*), the vectors and the
 * send port are in the generated shim_layout.h (xen_abi/shim/layout.py). */
#ifndef SHIM_EVENTS_H
#define SHIM_EVENTS_H

/* LAPIC (x2APIC MSRs; the xAPIC MMIO page is never mapped) */
#define MSR_X2APIC_EOI    0x80b
#define MSR_X2APIC_TMICT  0x838
#define MSR_TSC_DEADLINE  0x6e0
#define APIC_BUS_NS          1   /* KVM's APIC bus runs at 1 GHz; divide-by-1 */
#define ONESHOT_MAX_COUNT 0xffffffffUL

#ifndef __ASSEMBLER__
/* hooks shim.c calls (events.c) */
int ev_hypercall(unsigned long nr, const unsigned long *a, long *ret);  /* 1 = handled */
void ev_interrupt(unsigned long vec);    /* any vector >= 32, CPL3 or the shim's hlt */
long ev_now_ns(void);                   /* guest system time, as the guest's pvclock gives it */
void ev_runstate_update(void);          /* write the guest's runstate area (kernel mode) */
void ev_fifo_drain(void);               /* link this vCPU's raised FIFO ports (EVB_FIFO_LINK) */
#endif
#endif
