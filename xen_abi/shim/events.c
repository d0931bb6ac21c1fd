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
 * Under the FIFO ABI (EVTCHNOP_init_control) the same sources raise ports
 * in the guest's event array instead; see "FIFO event channels" below.
 *
 * Hooks called from shim.c:
 *   ev_hypercall(nr, args, &ret)  hot hypercalls done here (1 = handled)
 *   ev_fifo_drain()               link the FIFO ports raised for this vCPU
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

/* ---------------- FIFO event channels (Xen's event_fifo.c) ----------------
 *
 * Locking model (the Python half is evtchn.py's "FIFO ABI" section): a
 * raiser -- this shim for VIRQ_TIMER, IPIs and unmask, Python for the
 * rest -- sets PENDING with one locked bit operation and, if the word was
 * neither MASKED nor LINKED, marks the port in the notify vCPU's fifo_link
 * bitmap (and fifo_link_sum) and kicks that vCPU.  Only a vCPU's own shim
 * drains its bitmap (fifo_drain, on every way back to the guest: shim.c
 * events_due), and it links under the domain's FF_LOCK, which guards every
 * queue tail and each port's last queue: Xen's per-queue locks, folded
 * into one because a port moved to another vCPU or priority invalidates
 * its old queue's tail.  Raisers here set PENDING under it too, so that
 * Python, taking it to tear the FIFO state down (EVTCHNOP_reset), knows
 * no shim still writes the frames it gives back.  The lock holder waits
 * for nothing, so a vCPU spinning on it with interrupts off gets it.  The guest may write
 * its event words and control block at any time: we never follow LINK,
 * only write head[] and READY, and retry a cmpxchg a bounded number of
 * times; every walk here is bounded by FIFO_PORTS. */
#define FIFO_BIT(b) (1u << (b))

static inline u8 *fifo(void) { return (u8 *)(REGION_VA + FIFO_OFF); }
static inline int fifo_on(void) { return SLOT(fifo(), FF_ON) != 0; }
static inline u8 *events_of(u64 n) { return (u8 *)(REGION_VA + VCPU_OFF + n * VCPU_STRIDE + VCPU_EVENTS_OFF); }

/* the port's event word, or 0 while its page is not registered */
static volatile u32 *fifo_word(u64 port)
{
	u8 *f = fifo();
	if (port >= FIFO_PORTS || port >= SLOT(f, FF_NR_WORDS))
		return 0;
	u8 *page = *(u8 *volatile *)(f + FF_ARRAY + port / EVTCHN_FIFO_EVENT_WORDS_PER_PAGE * 8);
	return page ? (volatile u32 *)page + port % EVTCHN_FIFO_EVENT_WORDS_PER_PAGE : 0;
}

static inline int bts32(volatile u32 *w, u32 bit)
{
	u8 old;
	__asm__ volatile("lock btsl %2, %0; setc %1" : "+m"(*w), "=q"(old) : "r"(bit) : "memory", "cc");
	return old;
}

static inline void btr32(volatile u32 *w, u32 bit)
{
	__asm__ volatile("lock btrl %1, %0" : "+m"(*w) : "r"(bit) : "memory", "cc");
}

/* The link lock (FF_LOCK): held for bounded work only, with interrupts
 * off; Python takes it too, to take the FIFO state down (EVTCHNOP_reset),
 * so nothing here writes a frame after Python gave it back. */
static inline void fifo_lock(void)
{
	volatile u64 *lock = (volatile u64 *)(fifo() + FF_LOCK);
	while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE))
		__asm__ volatile("pause" ::: "memory");
}
static inline void fifo_unlock(void)
{
	__atomic_store_n((volatile u64 *)(fifo() + FF_LOCK), 0, __ATOMIC_RELEASE);
}

/* Xen's evtchn_fifo_set_pending, the raiser's half, for port notifying
 * vCPU n, under the link lock: 1 if n needs a kick (it has a port to
 * link, or one became pending while masked: SCHEDOP_poll waits for those
 * too).  A port with no event word yet is dropped: Linux expands the
 * array before it binds. */
static int fifo_set_pending_locked(u64 n, u64 port)
{
	volatile u32 *w = fifo_word(port);
	if (!w || n >= MAX_VCPUS)
		return 0;
	int was = bts32(w, EVTCHN_FIFO_PENDING);
	u32 now = *w;
	if (now & FIFO_BIT(EVTCHN_FIFO_LINKED))
		return 0;
	if (now & FIFO_BIT(EVTCHN_FIFO_MASKED))
		return !was;
	u8 *ev = events_of(n);
	test_and_set((volatile u64 *)(ev + EVB_FIFO_LINK) + port / 64, port % 64);
	test_and_set((volatile u64 *)(ev + EVB_FIFO_LINK_SUM), port / 64);
	return 1;
}

static int fifo_set_pending(u64 n, u64 port)
{
	fifo_lock();
	int kick = fifo_set_pending_locked(n, port);
	fifo_unlock();
	return kick;
}

/* Xen's try_set_link / evtchn_fifo_set_link: LINK of the tail's word :=
 * port iff the tail is still LINKED (1), or 0 if the guest unlinked it.
 * The guest may only change MASKED, PENDING and LINKED meanwhile; BUSY
 * keeps it from unmasking, so after four more failures the link is
 * given up (Xen warns and forces it as linked: the event is lost). */
static int try_set_link(volatile u32 *word, u32 *w, u32 link)
{
	if (!(*w & FIFO_BIT(EVTCHN_FIFO_LINKED)))
		return 0;
	u32 old = *w, new = (old & ~(FIFO_BIT(EVTCHN_FIFO_BUSY) | EVTCHN_FIFO_LINK_MASK)) | link;
	*w = __sync_val_compare_and_swap(word, old, new);
	return *w == old ? 1 : -1;
}

static int set_link(volatile u32 *word, u32 link)
{
	u32 w = *word;
	int r = try_set_link(word, &w, link);
	if (r >= 0)
		return r;
	bts32(word, EVTCHN_FIFO_BUSY);
	w = *word;
	for (int i = 0; i < 4; i++) {
		r = try_set_link(word, &w, link);
		if (r >= 0) {
			if (!r)
				btr32(word, EVTCHN_FIFO_BUSY);
			return r;
		}
	}
	btr32(word, EVTCHN_FIFO_BUSY);
	return 1;
}

/* link port into queue prio of this vCPU (self, control block cb) */
static void fifo_link(u8 *ev, u8 *cb, u64 self, u64 port)
{
	volatile u32 *w = fifo_word(port);
	if (!w || (*w & FIFO_BIT(EVTCHN_FIFO_MASKED)) || bts32(w, EVTCHN_FIFO_LINKED))
		return;
	u8 *f = fifo();
	u64 prio = f[FF_PRIO + port] & (EVTCHN_FIFO_MAX_QUEUES - 1);
	u8 last = f[FF_LASTQ + port];
	/* the port was its old queue's tail: that queue is empty now, and
	 * must not link after it (it lives on in this queue) */
	volatile u32 *old_tail = (volatile u32 *)(events_of((last >> 4) % MAX_VCPUS) + EVB_FIFO_TAIL) + (last & 15);
	if (*old_tail == port)
		*old_tail = 0;
	f[FF_LASTQ + port] = (u8)(self << 4 | prio);
	volatile u32 *tail = (volatile u32 *)(ev + EVB_FIFO_TAIL) + prio;
	int linked = 0;
	if (*tail) {
		volatile u32 *tw = fifo_word(*tail);
		if (tw)
			linked = set_link(tw, (u32)port);
	}
	if (!linked)
		((volatile u32 *)(cb + EVTCHN_FIFO_CB_HEAD))[prio] = (u32)port;
	*tail = (u32)port;
	if (!linked && !bts32((volatile u32 *)(cb + EVTCHN_FIFO_CB_READY), (u32)prio))
		*(volatile u8 *)(vcpu_info() + VI_UPCALL_PENDING) = 1;
}

/* Link every port raised for this vCPU (shim.c calls it when
 * fifo_link_sum is set, before it looks at upcall_pending). */
void ev_fifo_drain(void)
{
	u8 *ev = evb();
	u64 sum = __atomic_exchange_n((u64 *)(ev + EVB_FIFO_LINK_SUM), 0, __ATOMIC_SEQ_CST);
	u64 self = this_vcpu();
	fifo_lock();
	u8 *cb = *(u8 *volatile *)(ev + EVB_FIFO_CB);
	while (sum) {
		u64 i = (u64)__builtin_ctzll(sum);
		sum &= sum - 1;
		if (i >= FIFO_PORTS / 64)
			continue;
		u64 bits = __atomic_exchange_n((u64 *)(ev + EVB_FIFO_LINK) + i, 0, __ATOMIC_SEQ_CST);
		while (bits) {
			u64 b = (u64)__builtin_ctzll(bits);
			bits &= bits - 1;
			if (cb)   /* no control block: Xen drops the event */
				fifo_link(ev, cb, self, i * 64 + b);
		}
	}
	fifo_unlock();
}

/* raise an IPI port on vCPU n, either ABI */
static void raise_on(u64 n, u64 port)
{
	if (fifo_on() ? fifo_set_pending(n, port) : mark_pending(vcpu_info_of(n), port))
		kick_vcpu(n);
}

/* EVTCHNOP_unmask under FIFO (Xen's evtchn_fifo_unmask) */
static void fifo_unmask(u64 port)
{
	u64 n = port_map(port) & PORT_MAP_VCPU;
	int kick = 0;
	fifo_lock();
	volatile u32 *w = fifo_word(port);
	if (w) {
		btr32(w, EVTCHN_FIFO_MASKED);
		if (*w & FIFO_BIT(EVTCHN_FIFO_PENDING))
			kick = fifo_set_pending_locked(n, port);
	}
	fifo_unlock();
	if (kick)
		kick_vcpu(n);
}

/* EVTCHNOP_unmask (Xen's evtchn_2l_unmask): clear the mask; if the port
 * is pending, mark its vCPU and kick it.  Linux unmasks its ports bound
 * to other vCPUs this way. */
static int unmask(u64 arg, long *ret)
{
	u32 port;
	if (read_guest(&port, arg, 4) || port > MAX_EVTCHN_PORT)
		return 0;   /* Python answers (-EFAULT, -EINVAL) */
	if (fifo_on()) {
		fifo_unmask(port);
		*ret = 0;
		return 1;
	}
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
				u64 port = SLOT(ev, EVB_TIMER_PORT);   /* this vCPU: no kick */
				if (port && port <= MAX_EVTCHN_PORT) {
					if (fifo_on())
						fifo_set_pending(this_vcpu(), port);
					else
						mark_pending(vcpu_info(), port);
				}
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
 * offline, running now.  The same sums as time.py's runstate_times.
 * Xen writes the area when the vCPU changes state, not while it runs on;
 * so when a tick finds no time runnable, blocked or offline since the
 * last write, the area stays as it is (the guest's steal clock reads only
 * those): ~100 interpreted instructions less on most ticks of a busy vCPU. */
void ev_runstate_update(void)
{
	u8 *ev = evb();
	u64 va = SLOT(ev, EVB_RUNSTATE_VA);
	SLOT(ev, EVB_RUNSTATE_DUE) = 0;
	if (!va)
		return;
	u64 steal = SLOT(ev, EVB_KVM_STEAL), blocked = SLOT(ev, EVB_BLOCKED_NS);
	u64 offline = SLOT(ev, EVB_OFFLINE_NS), written = steal + blocked + offline;
	if (written == SLOT(ev, EVB_RUNSTATE_WRITTEN))
		return;
	u64 now = (u64)now_ns(ev), r[6], base = SLOT(ev, EVB_STEAL_BASE);
	r[0] = 0;   /* RUNSTATE_running */
	r[1] = now;
	r[3] = steal > base ? steal - base : 0;
	r[4] = blocked;
	r[5] = offline;
	u64 other = r[3] + r[4] + r[5];
	r[2] = now > other ? now - other : 0;
	if (SLOT(ev, EVB_RUNSTATE_UPDATE_FLAG)) {   /* the guest retries while the flag is set */
		u64 busy = now | XEN_RUNSTATE_UPDATE;
		if (write_guest(va + 8, &busy, 8))
			return;
		__asm__ volatile("sfence" ::: "memory");
		if (!write_guest(va, r, sizeof(r)))
			SLOT(ev, EVB_RUNSTATE_WRITTEN) = written;
		__asm__ volatile("sfence" ::: "memory");
		write_guest(va + 8, &now, 8);
		return;
	}
	if (!write_guest(va, r, sizeof(r)))
		SLOT(ev, EVB_RUNSTATE_WRITTEN) = written;
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
	if (SLOT(ev, EVB_FIFO_LINK_SUM))
		ev_fifo_drain();   /* FIFO ports raised for us: linked, maybe an upcall */
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
	int fifo_abi = fifo_on();
	for (u64 i = 0; i < n; i++) {
		if (ports[i] > MAX_EVTCHN_PORT)
			return -XEN_EINVAL;
		if (fifo_abi) {
			volatile u32 *w = fifo_word(ports[i]);
			if (w && (*w & FIFO_BIT(EVTCHN_FIFO_PENDING)))
				return 0;
		} else if (((volatile u64 *)(si + SI_EVTCHN_PENDING))[ports[i] / 64] >> (ports[i] % 64) & 1) {
			return 0;
		}
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
	if (read_guest(&port, arg, 4) || port > MAX_EVTCHN_PORT)
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
