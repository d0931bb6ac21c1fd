/* Time, timers, event delivery and blocking in the shim (events.c): the
 * per-vCPU events block Python fills, the vectors and the Xen numbers only
 * these paths need.  Mirrored in xen_abi/hypervisor/time.py; the test
 * tests/test_testguests_events.py parses this header and compares. */
#ifndef SHIM_EVENTS_H
#define SHIM_EVENTS_H

/* Xen numbers (abi.py has them too) */
#define HC_set_timer_op                 15
#define XEN_VCPUOP_stop_periodic_timer   7
#define XEN_VCPUOP_set_singleshot_timer  8
#define XEN_VCPUOP_stop_singleshot_timer 9
#define XEN_VCPU_SSHOTTMR_future         1
#define XEN_EVTCHNOP_send                4
#define XEN_ETIME                       62
#define XEN_NR_EVENT_CHANNELS         4096
#define SI_EVTCHN_PENDING             2048   /* shared_info byte offsets */
#define SI_EVTCHN_MASK                2560

/* Per-vCPU events block, one page at (stack block base + VCPU_EVENTS_OFF);
 * u64 slots, byte offsets.  Python writes the EVB_* inputs before the vCPU
 * first runs (and EVB_TIMER_PORT whenever VIRQ_TIMER is (un)bound); the
 * shim owns the rest. */
#define EVB_TIMER_PORT      0    /* port bound to VIRQ_TIMER here; 0 = none */
#define EVB_TSC_TIMESTAMP   8    /* private copy of the pvclock snapshot */
#define EVB_SYSTEM_TIME    16
#define EVB_TSC_MUL        24    /* tsc_to_system_mul */
#define EVB_TSC_SHIFT      32    /* tsc_shift, sign-extended */
#define EVB_NS_TO_TSC_MUL  40    /* tsc ticks = ns * this >> 32 */
#define EVB_XEN_VERSION    48    /* the xen_version(XENVER_version) answer */
#define EVB_FLAGS          56    /* EVF_* */
#define EVB_DEADLINE_NS    64    /* armed one-shot deadline (system time), shim */
#define EVB_ARMED          72    /* 1 while a one-shot is armed, shim */
#define EVB_TIMER_IRQS     80    /* counters, shim */
#define EVB_CHECK_IRQS     88
#define EVB_BLOCKS         96
#define EVB_BACKEND_SENDS 104
#define EVB_BACKEND_MAP   512    /* 4096-bit map: guest ports whose remote end is a
                                    back-end; sends go out through EV_SEND_PORT */
#define EVB_SIZE          (512 + XEN_NR_EVENT_CHANNELS / 8)

#define EVF_TSC_DEADLINE  1      /* LAPIC timer in TSC-deadline mode, else one-shot */
#define EVF_SEND_PORT     2      /* back-end sends go to EV_SEND_PORT (ioeventfd) */

/* LAPIC (x2APIC MSRs; the xAPIC MMIO page is never mapped) */
#define EV_TIMER_VECTOR   0xf0   /* LVT timer */
#define EV_CHECK_VECTOR   0xf1   /* "event check" MSI from the VMM (kick) */
#define EV_SPURIOUS_VECTOR 0xff
#define MSR_X2APIC_EOI    0x80b
#define MSR_X2APIC_TMICT  0x838
#define MSR_TSC_DEADLINE  0x6e0
#define APIC_BUS_NS          1   /* KVM's APIC bus runs at 1 GHz; divide-by-1 */
#define ONESHOT_MAX_COUNT 0xffffffffUL

/* `outl port, EV_SEND_PORT`: EVTCHNOP_send to a back-end port; KVM signals
 * the ioeventfd registered for that port number (datamatch) without an
 * exit, and any port without one exits to Python, which sends it. */
#define EV_SEND_PORT      0x0704

#ifndef __ASSEMBLER__
/* hooks shim.c calls (events.c) */
int ev_hypercall(unsigned long nr, const unsigned long *a, long *ret);  /* 1 = handled */
void ev_interrupt(unsigned long vec);    /* any vector >= 32, CPL3 or the shim's hlt */
#endif
#endif
