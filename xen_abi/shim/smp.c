/* pyvmm shim: remote TLB flushes between the vCPUs of one domain (Xen's
 * flush_tlb_mask behind MMUEXT_*_MULTI / *_ALL and update_va_mapping's
 * UVMF_ALL / vCPU masks).
 *
 * Protocol, per target vCPU T (fields in T's events block):
 *   flusher: flush_req(T) += 1 (locked); mfence; if T is online and not in
 *            an exit to Python, IPI T on EV_FLUSH_VECTOR and wait until
 *            flush_done(T) reaches the new request (or T leaves guest
 *            code), serving its own requests meanwhile so that two vCPUs
 *            flushing each other cannot deadlock with interrupts off;
 *   target:  on the IPI, and right after every exit to Python (in_exit
 *            cleared; mfence), flush the whole TLB if flush_req moved.
 * The two fences make the flusher see in_exit = 0 or the target see the
 * new request (Dekker).  A vCPU that is down (online 0) is flushed by
 * Python when it comes back (KVM_SET_SREGS reloads CR3).
 *
 * Targets always flush their whole TLB: one interpreted CR3 write costs
 * less on kvm_pvm than passing addresses around.
 *
 * The TLB clock (Xen's tlbflush_clock, simplified): mmu.c advances it
 * each time a guest mapping of a frame goes away and stamps the frame;
 * each vCPU notes the clock it read just before its last full flush.  A
 * vCPU whose note is older than a frame's stamp may still translate
 * through the old mapping, so it is flushed before that frame changes
 * type (smp_flush_stale). */
#include "shim.h"
#include "smp.h"

#define EVSLOT(ev, off) (*(volatile u64 *)((ev) + (off)))

static inline u8 *events_of(u64 vcpu) { return vcpu_block(vcpu) + VCPU_EVENTS_OFF; }

static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

volatile u64 tlb_clock = 1;           /* stamps start at 1: 0 = never mapped */
volatile u64 tlb_flushed_at[MAX_VCPUS];

static inline u64 vcpu_of_events(u8 *ev)
{
	return ((u64)ev - VCPU_EVENTS_OFF - REGION_VA - VCPU_OFF) / VCPU_STRIDE;
}

void smp_serve(u8 *ev)
{
	u64 req = EVSLOT(ev, EVB_FLUSH_REQ);
	if (req == EVSLOT(ev, EVB_FLUSH_DONE))
		return;
	load_cr3(vcpu_of_events(ev), read_cr3());
	EVSLOT(ev, EVB_FLUSH_DONE) = req;
	EVSLOT(ev, EVB_FLUSHES)++;
}

/* the target stopped running guest code: it flushes before it goes back */
static inline int away(u8 *ev)
{
	return !EVSLOT(ev, EVB_ONLINE) || EVSLOT(ev, EVB_IN_EXIT);
}

/* The domain's vCPUs (Python's word, bounded by the shim's arrays). */
static inline u64 nr_vcpus(struct percpu *pc)
{
	u64 nr = *(u64 *)((u8 *)pc + PRIV_OFF + PRIV_NR_VCPUS);
	return nr > MAX_VCPUS ? MAX_VCPUS : nr;
}

void smp_flush(u64 mask, u64 va)
{
	struct percpu *pc = pcpu();
	u64 self = pc->vcpu_id;
	u64 nr = nr_vcpus(pc);
	u64 want[MAX_VCPUS], waiting = 0;
	mask &= (1UL << nr) - 1;
	for (u64 i = 0; i < nr; i++) {
		if (i == self || !(mask >> i & 1))
			continue;
		u8 *ev = events_of(i);
		want[i] = __atomic_add_fetch((u64 *)(ev + EVB_FLUSH_REQ), 1, __ATOMIC_SEQ_CST);
		mfence();
		if (away(ev))
			continue;
		wrmsr(MSR_X2APIC_ICR, (i << 32) | EV_FLUSH_VECTOR);   /* x2APIC ID = vCPU id */
		waiting |= 1UL << i;
	}
	if (mask >> self & 1) {
		if (va == FLUSH_ALL_VA)
			load_cr3(self, read_cr3());
		else
			invlpg(va);
	}
	u8 *mine = events_of(self);
	while (waiting) {
		smp_serve(mine);
		for (u64 i = 0; i < nr; i++) {
			if (!(waiting >> i & 1))
				continue;
			u8 *ev = events_of(i);
			if ((s64)(EVSLOT(ev, EVB_FLUSH_DONE) - want[i]) >= 0 || away(ev))
				waiting &= ~(1UL << i);
		}
		cpu_relax();
	}
}

void smp_flush_stale(u64 stamp)
{
	u64 nr = nr_vcpus(pcpu()), mask = 0;
	for (u64 i = 0; i < nr; i++)
		if (tlb_flushed_at[i] < stamp)
			mask |= 1UL << i;
	if (mask)
		smp_flush(mask, FLUSH_ALL_VA);
}
