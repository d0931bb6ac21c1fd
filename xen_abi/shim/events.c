/* pyvmm shim: time, timers, event delivery and blocking.
 *
 * The guest's one-shot timer is the vCPU's in-kernel LAPIC (x2APIC MSRs,
 * TSC-deadline mode when KVM offers it, else one-shot counting 1 ns APIC
 * bus ticks).  Its interrupt raises the vCPU's VIRQ_TIMER port with Xen's
 * 2-level protocol (LOCK-prefixed bit operations on shared_info and the
 * live vcpu_info); a second vector is the VMM's "event check" kick (an MSI
 * it sends after raising a port from Python).  Either way the upcall itself
 * is made by check_events() in shim.c on the way back to the guest.
 *
 * Hooks called from shim.c:
 *   ev_hypercall(nr, args, &ret)  hot hypercalls done here (1 = handled)
 *   ev_interrupt(vector)          any vector >= 32, from CPL3 or from the
 *                                 shim's own `sti; hlt` in SCHEDOP_block
 *
 * On kvm_pvm every instruction here is interpreted (~1 us): keep it short. */
#include <stddef.h>
#include <stdint.h>
#include "xen_numbers.h"
#include "shim_layout.h"
#include "events.h"
#include "smp.h"

typedef uint8_t u8;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;
typedef unsigned __int128 u128;

long guest_copy(void *dst, const void *src, u64 n);

#define SLOT(base, off) (*(volatile u64 *)((base) + (off)))

/* the per-vCPU blocks, found from the stack like shim.c's pcpu() */
static inline u8 *block_base(void)
{
	u64 sp;
	__asm__("mov %%rsp, %0" : "=r"(sp));
	return (u8 *)(sp & ~(u64)(PERCPU_BLOCK_SIZE - 1));
}
static inline u8 *evb(void) { return block_base() + VCPU_EVENTS_OFF; }
static inline u8 *percpu(void) { return block_base() + PERCPU_IN_BLOCK; }
static inline u8 *vcpu_info(void) { return *(u8 **)(percpu() + PC_VCPU_INFO); }
static inline u8 *shared_info(void) { return *(u8 **)(REGION_VA + GLOBALS_OFF + SG_SHARED_INFO); }

static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/* old value of the bit; LOCK-prefixed because the guest (and Python, from
 * other threads) update the same words concurrently */
static inline int test_and_set(volatile u64 *word, u64 bit)
{
	u8 old;
	__asm__ volatile("lock btsq %2, %0; setc %1" : "+m"(*word), "=q"(old) : "r"(bit) : "memory", "cc");
	return old;
}

/* pvclock: system time (ns) from the TSC, exactly as the guest computes it */
static s64 now_ns(u8 *ev)
{
	u64 delta = rdtsc() - SLOT(ev, EVB_TSC_TIMESTAMP);
	s64 shift = (s64)SLOT(ev, EVB_TSC_SHIFT);
	delta = shift >= 0 ? delta << shift : delta >> -shift;
	return (s64)(SLOT(ev, EVB_SYSTEM_TIME) + (u64)(((u128)delta * SLOT(ev, EVB_TSC_MUL)) >> 32));
}

/* for the shim's other devices (pit.c) */
s64 ev_now_ns(void)
{
	return now_ns(evb());
}

#define MAX_DELTA_NS (1ULL << 50)   /* ~13 days: keeps the TSC arithmetic in range */

static u64 deadline_tsc(u8 *ev, s64 deadline)
{
	s64 d = deadline - (s64)SLOT(ev, EVB_SYSTEM_TIME);
	u64 delta = d < 0 ? 0 : (u64)d > MAX_DELTA_NS ? MAX_DELTA_NS : (u64)d;
	/* rounded up: the interrupt should not come before the deadline */
	u64 tsc = SLOT(ev, EVB_TSC_TIMESTAMP) + (u64)(((u128)delta * SLOT(ev, EVB_NS_TO_TSC_MUL)) >> 32) + 1;
	return tsc ? tsc : 1;   /* 0 would disarm */
}

static void program_oneshot(u8 *ev, s64 deadline)
{
	s64 d = deadline - now_ns(ev);
	u64 count = d <= 0 ? 1 : (u64)d / APIC_BUS_NS;
	wrmsr(MSR_X2APIC_TMICT, count > ONESHOT_MAX_COUNT ? ONESHOT_MAX_COUNT : count ? count : 1);
}

/* the LAPIC timer alone (SCHEDOP_poll's timeout uses it too) */
static void arm_hw(u8 *ev, s64 deadline)
{
	if (SLOT(ev, EVB_FLAGS) & EVF_TSC_DEADLINE)
		wrmsr(MSR_TSC_DEADLINE, deadline_tsc(ev, deadline));   /* past: fires at once */
	else
		program_oneshot(ev, deadline);
}

static void disarm_hw(u8 *ev)
{
	wrmsr((SLOT(ev, EVB_FLAGS) & EVF_TSC_DEADLINE) ? MSR_TSC_DEADLINE : MSR_X2APIC_TMICT, 0);
}

/* the guest's one-shot timer */
static void arm(u8 *ev, s64 deadline)
{
	SLOT(ev, EVB_DEADLINE_NS) = (u64)deadline;
	SLOT(ev, EVB_ARMED) = 1;
	arm_hw(ev, deadline);
}

static void disarm(u8 *ev)
{
	SLOT(ev, EVB_ARMED) = 0;
	disarm_hw(ev);
}

static int read_guest(void *dst, u64 va, u64 n);
static int write_guest(u64 va, const void *src, u64 n);

/* vCPU n's vcpu_info, and the IPI that makes it look at it */
static inline u8 *vcpu_info_of(u64 n)
{
	return *(u8 **)(REGION_VA + VCPU_OFF + n * VCPU_STRIDE + PERCPU_IN_BLOCK + PC_VCPU_INFO);
}
static inline u64 this_vcpu(void) { return *(u64 *)(percpu() + PC_VCPU_ID); }
static inline void kick_vcpu(u64 n)
{
	if (n != this_vcpu())   /* this one's events are delivered on the way out */
		wrmsr(MSR_X2APIC_ICR, (n << 32) | EV_CHECK_VECTOR);
}
static inline u8 port_map(u64 port) { return ((volatile u8 *)(REGION_VA + PORT_MAP_OFF))[port]; }

/* Xen's evtchn_2l_set_pending for port on the vCPU whose vcpu_info is vi:
 * 1 if that vCPU needs a kick -- the port became pending, and either its
 * upcall was marked or it is masked (a masked port still wakes the vCPU out
 * of SCHEDOP_poll: Xen wakes pollers whatever the mask) */
static int mark_pending(u8 *vi, u64 port)
{
	u8 *si = shared_info();
	u64 w = port / 64, b = port % 64;
	if (test_and_set((volatile u64 *)(si + SI_EVTCHN_PENDING) + w, b))
		return 0;
	if (((volatile u64 *)(si + SI_EVTCHN_MASK))[w] >> b & 1)
		return 1;
	if (test_and_set((volatile u64 *)(vi + VI_PENDING_SEL), w))
		return 0;
	*(volatile u8 *)(vi + VI_UPCALL_PENDING) = 1;
	return 1;
}

/* ... on vCPU n (an IPI port) */
static void raise_on(u64 n, u64 port)
{
	if (mark_pending(vcpu_info_of(n), port))
		kick_vcpu(n);
}

/* EVTCHNOP_unmask (Xen's evtchn_2l_unmask): clear the mask; if the port
 * is pending, mark its vCPU and kick it.  Linux unmasks its ports bound
 * to other vCPUs this way. */
static int unmask(u64 arg, long *ret)
{
	u32 port;
	if (read_guest(&port, arg, 4) || port >= EVTCHN_2L_NR_CHANNELS)
		return 0;   /* Python answers (-EFAULT, -EINVAL) */
	u8 *si = shared_info();
	u64 w = port / 64, b = port % 64, n = port_map(port) & PORT_MAP_VCPU;
	u8 was;
	__asm__ volatile("lock btrq %2, %0; setc %1" : "+m"(((volatile u64 *)(si + SI_EVTCHN_MASK))[w]),
			 "=q"(was) : "r"(b) : "memory", "cc");
	*ret = 0;
	if (!was || !(((volatile u64 *)(si + SI_EVTCHN_PENDING))[w] >> b & 1))
		return 1;
	u8 *vi = vcpu_info_of(n);
	if (test_and_set((volatile u64 *)(vi + VI_PENDING_SEL), w))
		return 1;
	*(volatile u8 *)(vi + VI_UPCALL_PENDING) = 1;
	kick_vcpu(n);
	return 1;
}

static inline void eoi(void) { wrmsr(MSR_X2APIC_EOI, 0); }

void ev_interrupt(unsigned long vec)
{
	u8 *ev = evb();
	if (vec == EV_SPURIOUS_VECTOR)
		return;               /* no EOI for spurious interrupts */
	if (vec == EV_TIMER_VECTOR) {
		SLOT(ev, EVB_TIMER_IRQS)++;
		if (SLOT(ev, EVB_ARMED)) {
			s64 deadline = (s64)SLOT(ev, EVB_DEADLINE_NS);
			/* early (rounding; one-shot mode counts at most ~4.3 s):
			 * re-arm for the rest, as Xen's timer softirq does */
			if (now_ns(ev) < deadline) {
				arm(ev, deadline);
			} else {
				SLOT(ev, EVB_ARMED) = 0;
				if (SLOT(ev, EVB_TIMER_PORT) < EVTCHN_2L_NR_CHANNELS)   /* this vCPU: no kick */
					mark_pending(vcpu_info(), SLOT(ev, EVB_TIMER_PORT));
				SLOT(ev, EVB_RUNSTATE_DUE) = 1;   /* the tick reads steal: ev_runstate_update */
			}
		}
	} else if (vec == EV_CHECK_VECTOR) {
		SLOT(ev, EVB_CHECK_IRQS)++;   /* the check itself happens on return */
	} else if (vec == EV_FLUSH_VECTOR) {
		smp_serve(ev);                /* another vCPU's TLB flush (smp.c) */
	}
	eoi();
}

/* guest pointers: canonical, not wrapping, clear of the hypervisor hole
 * (the same test as shim.h's range_ok: all in the lower half, or all in
 * the upper half above the hole) */
static inline int guest_range_bad(u64 va, u64 n)
{
	u64 end = va + n;
	return end < va || (end <= (1UL << 47) ? va >= (1UL << 47) : va < HYPERVISOR_VIRT_END);
}

static int read_guest(void *dst, u64 va, u64 n)
{
	return guest_range_bad(va, n) ? -XEN_EFAULT : (int)guest_copy(dst, (const void *)va, n);
}

static int write_guest(u64 va, const void *src, u64 n)
{
	return guest_range_bad(va, n) ? -XEN_EFAULT : (int)guest_copy((void *)va, src, n);
}

/* Xen's set_timer_op workaround: Linux has been seen to pass deadlines
 * absurdly far ahead or negative; those become now + 100 ms. */
#define TIMER_SLOP_LIMIT_SHIFT 50
#define TIMER_WORKAROUND_NS 100000000LL

static long set_timer_op(u8 *ev, u64 timeout)
{
	if (!timeout) {
		disarm(ev);
		return 0;
	}
	s64 now = now_ns(ev), t = (s64)timeout;
	if (t < 0 || ((t - now) >> TIMER_SLOP_LIMIT_SHIFT))
		t = now + TIMER_WORKAROUND_NS;
	arm(ev, t);
	return 0;
}

static long set_singleshot(u8 *ev, u64 arg)
{
	u64 t[2];   /* timeout_abs_ns, flags (u32) */
	if (read_guest(t, arg, 12))
		return -XEN_EFAULT;
	if ((t[1] & VCPU_SSHOTTMR_future) && (s64)t[0] < now_ns(ev))
		return -XEN_ETIME;
	arm(ev, (s64)t[0]);
	return 0;
}

/* Halt until an interrupt, the time counted as the runstate's "blocked".
 * The sti shadow should keep an interrupt from coming between sti and
 * hlt; should one come there all the same (seen as lost wake-ups in the
 * faithful lane, nested SVM under TCG), shim.c's cpl0_fault resumes after
 * the hlt (shim_halt_insn), so the wake-up is never slept through.  Not
 * inlined: the label exists once. */
static __attribute__((noinline)) void halt(u8 *ev)
{
	s64 t = now_ns(ev);
	__asm__ volatile("sti\n\t.globl shim_halt_insn\nshim_halt_insn:\n\thlt\n\tcli" ::: "memory");
	SLOT(ev, EVB_BLOCKED_NS) += (u64)(now_ns(ev) - t);
}

/* The guest's runstate area (Xen's update_runstate_area), in the
 * guest's kernel mode (the area is kernel memory): time running, runnable
 * (KVM's steal time: the vCPU thread waited for a host CPU), blocked and
 * offline, running now.  The same sums as time.py's runstate_times. */
void ev_runstate_update(void)
{
	u8 *ev = evb();
	u64 va = SLOT(ev, EVB_RUNSTATE_VA);
	SLOT(ev, EVB_RUNSTATE_DUE) = 0;
	if (!va)
		return;
	u64 now = (u64)now_ns(ev), r[6];
	r[0] = 0;   /* RUNSTATE_running */
	r[1] = now;
	u64 steal = SLOT(ev, EVB_KVM_STEAL), base = SLOT(ev, EVB_STEAL_BASE);
	r[3] = steal > base ? steal - base : 0;
	r[4] = SLOT(ev, EVB_BLOCKED_NS);
	r[5] = SLOT(ev, EVB_OFFLINE_NS);
	u64 other = r[3] + r[4] + r[5];
	r[2] = now > other ? now - other : 0;
	if (SLOT(ev, EVB_RUNSTATE_UPDATE_FLAG)) {   /* the guest retries while the flag is set */
		u64 busy = now | XEN_RUNSTATE_UPDATE;
		if (write_guest(va + 8, &busy, 8))
			return;
		__asm__ volatile("sfence" ::: "memory");
		write_guest(va, r, sizeof(r));
		__asm__ volatile("sfence" ::: "memory");
		write_guest(va + 8, &now, 8);
		return;
	}
	write_guest(va, r, sizeof(r));
}

/* SCHEDOP_block: re-enable delivery as Xen's do_block does, return at once
 * if something is pending, else halt until an interrupt (timer or kick).
 * The upcall is made by check_events() on the way out. */
static long block(u8 *ev)
{
	volatile u8 *vi = vcpu_info();
	SLOT(ev, EVB_BLOCKS)++;
	vi[VI_UPCALL_MASK] = 0;
	__asm__ volatile("mfence" ::: "memory");   /* mask store before pending load */
	if (!vi[VI_UPCALL_PENDING])
		halt(ev);
	return 0;
}

/* SCHEDOP_poll (the PV spinlock slow path): Xen's checks, then return at
 * once if a port is pending, else halt until an interrupt: an event for
 * this vCPU (Python kicks the port's vCPU even when the port is masked),
 * the timeout, or anything else -- a spurious return, which Xen also
 * allows.  The timeout shares the LAPIC timer with the guest's one-shot:
 * the earlier deadline is programmed, the guest's re-armed afterwards. */
#define SCHED_POLL_MAX_PORTS 128

static long poll(u8 *ev, u64 arg)
{
	u64 p[3];   /* ports (guest pointer), nr_ports (u32), timeout */
	u32 ports[SCHED_POLL_MAX_PORTS];
	u8 *si = shared_info();
	if (read_guest(p, arg, XEN_SCHED_POLL_SIZE))
		return -XEN_EFAULT;
	u64 n = (u32)p[1];
	if (n > SCHED_POLL_MAX_PORTS)
		return -XEN_EINVAL;
	if (n && read_guest(ports, p[0], n * 4))
		return -XEN_EFAULT;
	SLOT(ev, EVB_POLLS)++;
	for (u64 i = 0; i < n; i++) {
		if (ports[i] >= EVTCHN_2L_NR_CHANNELS)
			return -XEN_EINVAL;
		if (((volatile u64 *)(si + SI_EVTCHN_PENDING))[ports[i] / 64] >> (ports[i] % 64) & 1)
			return 0;
	}
	s64 timeout = (s64)p[2];
	if (timeout) {
		if (timeout <= now_ns(ev))
			return 0;
		if (!SLOT(ev, EVB_ARMED) || timeout < (s64)SLOT(ev, EVB_DEADLINE_NS))
			arm_hw(ev, timeout);
	}
	halt(ev);
	if (timeout) {   /* the guest's one-shot as it was */
		if (SLOT(ev, EVB_ARMED))
			arm_hw(ev, (s64)SLOT(ev, EVB_DEADLINE_NS));
		else
			disarm_hw(ev);
	}
	return 0;
}

/* EVTCHNOP_send to a back-end port: one `out` that an ioeventfd absorbs;
 * to an IPI port: raised on its vCPU here */
static int send(u8 *ev, u64 arg, long *ret)
{
	u32 port;
	if (read_guest(&port, arg, 4) || port >= EVTCHN_2L_NR_CHANNELS)
		return 0;
	u8 route = port_map(port);
	if (route & PORT_MAP_IPI) {
		SLOT(ev, EVB_IPI_SENDS)++;
		raise_on(route & PORT_MAP_VCPU, port);
		*ret = 0;
		return 1;
	}
	if (!(SLOT(ev, EVB_FLAGS) & EVF_SEND_PORT) || !(ev[EVB_BACKEND_MAP + port / 8] >> (port % 8) & 1))
		return 0;
	SLOT(ev, EVB_BACKEND_SENDS)++;
	__asm__ volatile("outl %%eax, %%dx" :: "a"(port), "d"(EV_SEND_PORT) : "memory");
	*ret = 0;
	return 1;
}

int ev_hypercall(unsigned long nr, const unsigned long *a, long *ret)
{
	u8 *ev = evb();
	switch (nr) {
	case HC_xen_version:
		/* XENVER_version: Linux's force_evtchn_callback; the pending
		 * upcall is delivered on return */
		if (a[0] == 0 && SLOT(ev, EVB_XEN_VERSION)) {
			*ret = (long)SLOT(ev, EVB_XEN_VERSION);
			return 1;
		}
		return 0;
	case HC_set_timer_op:
		*ret = set_timer_op(ev, a[0]);
		return 1;
	case HC_vcpu_op:
		if (a[1] != *(u64 *)(percpu() + PC_VCPU_ID))
			return 0;   /* another vCPU's timer: Python answers */
		switch (a[0]) {
		case VCPUOP_set_singleshot_timer: *ret = set_singleshot(ev, a[2]); return 1;
		case VCPUOP_stop_singleshot_timer: disarm(ev); *ret = 0; return 1;
		case VCPUOP_stop_periodic_timer: *ret = 0; return 1;
		}
		return 0;
	case HC_sched_op:
		if (a[0] == SCHEDOP_block) {
			*ret = block(ev);
			return 1;
		}
		if (a[0] == SCHEDOP_poll) {
			*ret = poll(ev, a[1]);
			return 1;
		}
		return 0;
	case HC_event_channel_op:
		if (a[0] == EVTCHNOP_send)
			return send(ev, a[1], ret);
		if (a[0] == EVTCHNOP_unmask)
			return unmask(a[1], ret);
		return 0;
	}
	return 0;
}
