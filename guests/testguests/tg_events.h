/* Event channels, time and rings for the event test guests (evtchn, timer,
 * block, xenstore, console).  Include once per guest: it also defines the
 * upcall entry (top-level asm) and the upcall's C half. */
#ifndef TG_EVENTS_H
#define TG_EVENTS_H
#include "tg.h"

struct pvclock {
	u32 version, pad0;
	u64 tsc_timestamp, system_time;
	u32 mul;
	int8_t shift;
	u8 flags, pad1[2];
};

struct shared_info {
	struct vcpu_info vcpu_info[32];
	u64 evtchn_pending[64];
	u64 evtchn_mask[64];
	u32 wc_version, wc_sec, wc_nsec, wc_sec_hi;
};
_Static_assert(offsetof(struct shared_info, evtchn_pending) == SI_EVTCHN_PENDING, "evtchn_pending");
_Static_assert(offsetof(struct shared_info, evtchn_mask) == SI_EVTCHN_MASK, "evtchn_mask");

struct evtchn_alloc_unbound { u16 dom, remote_dom; u32 port; };
struct evtchn_bind_interdomain { u16 remote_dom, _p; u32 remote_port, local_port; };
struct evtchn_bind_virq { u32 virq, vcpu, port; };
struct evtchn_bind_ipi { u32 vcpu, port; };
struct evtchn_status { u16 dom, _p; u32 port, status, vcpu; union { u16 dom; struct { u16 dom, _p; u32 port; } inter; u32 virq; } u; };
struct callback_register { u16 type, flags; u32 _p; u64 address; };
struct vcpu_set_singleshot_timer { u64 timeout_abs_ns; u32 flags, _p; };
struct vcpu_register_vcpu_info { u64 mfn; u32 offset, rsvd; };

/* The mapped shared_info and the live vcpu_info (may be moved). */
static struct shared_info *si;
static volatile struct vcpu_info *vi;
static u8 si_page[4096] __attribute__((aligned(4096)));

/* upcall bookkeeping */
static volatile u32 ev_hits[EVTCHN_2L_NR_CHANNELS];
static volatile u64 ev_upcalls;
static volatile u64 ev_last_tsc;          /* rdtsc at the last upcall */
static void (*ev_hook)(u32 port);          /* per-port callback, optional */

static inline int test_and_clear(volatile u64 *w, int bit)
{
	u8 old;
	__asm__ volatile("lock btrq %2, %0; setc %1" : "+m"(*w), "=q"(old) : "r"((u64)bit) : "memory", "cc");
	return old;
}
static inline void set_bit_locked(volatile u64 *w, int bit)
{
	__asm__ volatile("lock btsq %1, %0" : "+m"(*w) : "r"((u64)bit) : "memory", "cc");
}
static inline void clear_bit_locked(volatile u64 *w, int bit) { test_and_clear(w, bit); }
#define barrier() __asm__ volatile("" ::: "memory")

/* FIFO ABI (fifo.c): the event array page and this vCPU's control block,
 * once EVTCHNOP_init_control took them; the upcall then walks the queues
 * as Linux's events_fifo.c does, bounded (the test scribbles on them). */
struct evtchn_fifo_control_block { u32 ready, _rsvd; u32 head[EVTCHN_FIFO_MAX_QUEUES]; };
_Static_assert(sizeof(struct evtchn_fifo_control_block) == XEN_EVTCHN_FIFO_CONTROL_BLOCK_SIZE, "control block");
static volatile u32 *ev_fifo_words;
static volatile struct evtchn_fifo_control_block *ev_fifo_cb;
static u32 ev_fifo_head[EVTCHN_FIFO_MAX_QUEUES];   /* Linux's per-cpu q->head */
static u32 ev_order[64];                            /* ports in the order handled */
static volatile u32 ev_norder;

static void ev_fifo_handle(u32 port)
{
	if (port > MAX_EVTCHN_PORT)
		return;
	volatile u32 *w = &ev_fifo_words[port];
	if ((*w & (1u << EVTCHN_FIFO_MASKED)) ||
	    !(__atomic_fetch_and(w, ~(1u << EVTCHN_FIFO_PENDING), __ATOMIC_SEQ_CST) & (1u << EVTCHN_FIFO_PENDING)))
		return;
	ev_hits[port]++;
	if (ev_norder < 64)
		ev_order[ev_norder++] = port;
	if (ev_hook)
		ev_hook(port);
}

static void ev_fifo_consume(void)
{
	u32 ready = __atomic_exchange_n(&ev_fifo_cb->ready, 0, __ATOMIC_SEQ_CST);
	for (int n = 0; ready && n < 256; n++) {
		u32 q = __builtin_ctz(ready);
		u32 head = ev_fifo_head[q];
		if (!head)
			head = ev_fifo_cb->head[q];
		u32 port = head > MAX_EVTCHN_PORT ? 0 : head;
		u32 next = 0;
		if (port) {   /* clear LINKED and LINK, keep the rest */
			volatile u32 *w = &ev_fifo_words[port];
			u32 old = *w, seen;
			while ((seen = __sync_val_compare_and_swap(w, old, old & ~((1u << EVTCHN_FIFO_LINKED) | EVTCHN_FIFO_LINK_MASK))) != old)
				old = seen;
			next = old & EVTCHN_FIFO_LINK_MASK;
			if (next > MAX_EVTCHN_PORT || next == port)
				next = 0;
		}
		if (!next)
			ready &= ~(1u << q);
		if (port)
			ev_fifo_handle(port);
		ev_fifo_head[q] = next;
		ready |= __atomic_exchange_n(&ev_fifo_cb->ready, 0, __ATOMIC_SEQ_CST);
	}
}

/* Called by tg_upcall_entry with events masked: Linux's 2-level scan (or
 * the FIFO queues). */
void tg_upcall(void);
void tg_upcall(void)
{
	ev_upcalls++;
	ev_last_tsc = rdtsc();
	vi->upcall_pending = 0;
	if (ev_fifo_cb) {
		ev_fifo_consume();
		return;
	}
	u64 sel = __atomic_exchange_n(&((struct vcpu_info *)vi)->pending_sel, 0, __ATOMIC_SEQ_CST);
	while (sel) {
		int w = __builtin_ctzll(sel);
		sel &= sel - 1;
		u64 pend = si->evtchn_pending[w] & ~si->evtchn_mask[w];
		while (pend) {
			int b = __builtin_ctzll(pend);
			pend &= pend - 1;
			u32 port = w * 64 + b;
			if (test_and_clear(&si->evtchn_pending[w], b)) {
				ev_hits[port]++;
				if (ev_hook)
					ev_hook(port);
			}
		}
	}
}

/* The Xen bounce frame for an event: rcx, r11, rip, cs, rflags, rsp, ss.
 * Drop rcx/r11 into registers, save the rest, scan, HYPERVISOR_iret
 * (which restores upcall_mask from the saved IF). */
__asm__(
	".text\n"
	".globl tg_upcall_entry\n"
	"tg_upcall_entry:\n"
	"	popq %rcx\n"
	"	popq %r11\n"
	"	pushq %rax; pushq %rcx; pushq %rdx; pushq %rsi; pushq %rdi\n"
	"	pushq %r8; pushq %r9; pushq %r10; pushq %r11\n"
	"	call tg_upcall\n"
	"	popq %r11; popq %r10; popq %r9; popq %r8\n"
	"	popq %rdi; popq %rsi; popq %rdx; popq %rcx; popq %rax\n"
	/* HYPERVISOR_iret as Linux's xen_iret: flags 0, rcx, r11, rax */
	".globl tg_ev_xen_iret\n"
	"tg_ev_xen_iret:\n"
	"	pushq $0\n"
	"	pushq %rcx\n"
	"	pushq %r11\n"
	"	pushq %rax\n"
	"	movl $23, %eax\n"
	"	syscall\n"
	"	ud2\n");
extern char tg_upcall_entry[];

static inline long evtchn_op(int cmd, void *arg) { return HC2(HC_event_channel_op, cmd, arg); }

static inline long ev_send(u32 port) { u32 p = port; return evtchn_op(EVTCHNOP_send, &p); }

/* Map shared_info over si_page, register the event callback, unmask. */
static inline void ev_setup(struct start_info *s)
{
	u64 pte = s->shared_info | PTE_P | PTE_RW | PTE_A | PTE_D;
	long rc = HC3(HC_update_va_mapping, si_page, pte, UVMF_INVLPG);
	tg_check(rc == 0, "map shared_info", rc, 0);
	si = (struct shared_info *)si_page;
	vi = (volatile struct vcpu_info *)&si->vcpu_info[0];
	struct callback_register cb = { CALLBACKTYPE_event, 0, 0, (u64)tg_upcall_entry };
	rc = HC2(HC_callback_op, CALLBACKOP_register, &cb);
	tg_check(rc == 0, "register event callback", rc, 0);
}

static inline void ev_enable(void)
{
	vi->upcall_mask = 0;
	barrier();
	if (vi->upcall_pending)
		HC2(HC_xen_version, XENVER_version, 0);   /* force_evtchn_callback */
}

static inline void ev_disable(void) { vi->upcall_mask = 1; barrier(); }

static inline long sched_block(void) { return HC2(HC_sched_op, SCHEDOP_block, 0); }

/* Wait (blocking, no lost wake-up) until cond() holds or `limit` blocks. */
static inline int ev_wait(int (*cond)(void), int limit)
{
	for (int i = 0; i < limit; i++) {
		ev_disable();
		if (cond()) {
			ev_enable();
			return 1;
		}
		sched_block();   /* re-enables delivery; upcall on the way out */
	}
	ev_enable();
	return cond();
}

/* pvclock (vcpu_info.time) with the version protocol */
static inline u64 pvclock_read(volatile struct pvclock *t)
{
	u32 v;
	u64 ns;
	do {
		v = t->version;
		barrier();
		u64 delta = rdtsc() - t->tsc_timestamp;
		if (t->shift >= 0)
			delta <<= t->shift;
		else
			delta >>= -t->shift;
		ns = t->system_time + (u64)(((unsigned __int128)delta * t->mul) >> 32);
		barrier();
	} while ((v & 1) || v != t->version);
	return ns;
}
static inline volatile struct pvclock *pvclock(void) { return (volatile struct pvclock *)vi->time; }
static inline u64 now_ns(void) { return pvclock_read(pvclock()); }

static inline long singleshot(u64 abs_ns, u32 flags)
{
	struct vcpu_set_singleshot_timer t = { abs_ns, flags, 0 };
	return HC3(HC_vcpu_op, VCPUOP_set_singleshot_timer, 0, &t);
}

static inline u32 bind_virq(u32 virq)
{
	struct evtchn_bind_virq b = { virq, 0, 0 };
	long rc = evtchn_op(EVTCHNOP_bind_virq, &b);
	tg_check(rc == 0, "bind_virq", rc, 0);
	return b.port;
}
#endif
