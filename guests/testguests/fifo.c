/* FIFO-based event channels as Xen 4.17 has them: EVTCHNOP_init_control,
 * expand_array and set_priority with Xen's answers to bad arguments; a
 * port pending under 2-level carried over; delivery through the queues
 * from every kind of raiser (IPI sent in the shim, VIRQ_TIMER raised by
 * the shim's timer, a loopback interdomain pair raised from Python);
 * priorities ordering the READY bits and the walk; one queue linking in
 * order; a masked port not linked until EVTCHNOP_unmask; SCHEDOP_poll
 * seeing FIFO PENDING; close; a guest scribbling on its event words and
 * control block (the shim must neither hang nor misdeliver); and
 * EVTCHNOP_reset back to the 2-level ABI. */
#include "tg_events.h"

const char tg_name[] = "fifo";

struct evtchn_init_control { u64 control_gfn; u32 offset, vcpu; u8 link_bits, _pad[7]; };
_Static_assert(sizeof(struct evtchn_init_control) == XEN_EVTCHN_INIT_CONTROL_SIZE, "init_control");
struct evtchn_set_priority { u32 port, priority; };
struct sched_poll { u64 ports; u32 nr_ports, _p; u64 timeout; };

static u8 array_page[4096] __attribute__((aligned(4096)));
static u8 cb_page[4096] __attribute__((aligned(4096)));
static u8 cb_page2[4096] __attribute__((aligned(4096)));
#define CB_OFFSET 64

#define PENDING (1u << EVTCHN_FIFO_PENDING)
#define MASKED (1u << EVTCHN_FIFO_MASKED)
#define LINKED (1u << EVTCHN_FIFO_LINKED)
#define BUSY (1u << EVTCHN_FIFO_BUSY)

static long init_control(u64 gfn, u32 offset, u32 vcpu, u8 *link_bits)
{
	struct evtchn_init_control ic = { gfn, offset, vcpu, 0xAA, {0} };
	long rc = evtchn_op(EVTCHNOP_init_control, &ic);
	if (link_bits)
		*link_bits = ic.link_bits;
	return rc;
}

static long expand(u64 gfn) { return evtchn_op(EVTCHNOP_expand_array, &gfn); }

static long set_priority(u32 port, u32 prio)
{
	struct evtchn_set_priority sp = { port, prio };
	return evtchn_op(EVTCHNOP_set_priority, &sp);
}

static u32 bind_ipi(void)
{
	struct evtchn_bind_ipi bi = { 0, 0 };
	long rc = evtchn_op(EVTCHNOP_bind_ipi, &bi);
	tg_check(rc == 0 && bi.port > 0, "bind_ipi", rc, 0);
	return bi.port;
}

static long poll1(u32 port, u64 timeout)
{
	struct sched_poll p = { (u64)&port, 1, 0, timeout };
	return HC2(HC_sched_op, SCHEDOP_poll, &p);
}

static u32 timer_port;
static int timer_fired(void) { return ev_hits[timer_port] > 0; }

void tg_main(struct start_info *s)
{
	u8 lb;
	long rc;
	ev_setup(s);
	volatile u32 *words = (volatile u32 *)array_page;
	volatile struct evtchn_fifo_control_block *cb = (void *)(cb_page + CB_OFFSET);

	/* ---- before init_control ---- */
	rc = set_priority(1, 3);
	tg_check(rc == -XEN_ENOSYS, "set_priority under 2-level", rc, -XEN_ENOSYS);
	rc = expand(va_to_pfn(array_page));
	tg_check(rc == -XEN_EOPNOTSUPP, "expand_array before init", rc, -XEN_EOPNOTSUPP);
	/* an IPI pending under 2-level (events masked) must survive the switch */
	u32 early = bind_ipi();
	ev_disable();
	ev_send(early);
	tg_check(si->evtchn_pending[early / 64] >> (early % 64) & 1, "2-level pending before switch", 0, 1);

	/* ---- init_control: Xen's answers ---- */
	rc = init_control(va_to_pfn(cb_page), CB_OFFSET, 1, &lb);
	tg_check(rc == -XEN_ENOENT, "init_control vcpu out of range", rc, -XEN_ENOENT);
	tg_check(lb == 0xAA, "link_bits untouched on failure", lb, 0xAA);
	rc = init_control(va_to_pfn(cb_page), 4, 0, 0);
	tg_check(rc == -XEN_EINVAL, "init_control misaligned offset", rc, -XEN_EINVAL);
	rc = init_control(va_to_pfn(cb_page), 4096 - XEN_EVTCHN_FIFO_CONTROL_BLOCK_SIZE + 8, 0, 0);
	tg_check(rc == -XEN_EINVAL, "init_control crossing the page", rc, -XEN_EINVAL);
	rc = init_control(1UL << 40, 0, 0, 0);
	tg_check(rc == -XEN_EINVAL, "init_control gfn not ours", rc, -XEN_EINVAL);
	rc = init_control(va_to_pfn((void *)s->pt_base), 0, 0, 0);
	tg_check(rc == -XEN_EINVAL, "init_control on a page table", rc, -XEN_EINVAL);
	rc = init_control(va_to_pfn(cb_page), CB_OFFSET, 0, &lb);
	tg_check(rc == 0, "init_control", rc, 0);
	tg_check(lb == EVTCHN_FIFO_LINK_BITS, "link_bits", lb, EVTCHN_FIFO_LINK_BITS);
	rc = init_control(va_to_pfn(cb_page2), 0, 0, 0);
	tg_check(rc == -XEN_EINVAL, "init_control twice", rc, -XEN_EINVAL);

	/* ---- expand_array ---- */
	rc = expand(1UL << 40);
	tg_check(rc == -XEN_EINVAL, "expand_array gfn not ours", rc, -XEN_EINVAL);
	ev_fifo_words = words;
	ev_fifo_cb = cb;
	rc = expand(va_to_pfn(array_page));
	tg_check(rc == 0, "expand_array", rc, 0);
	/* the carried-over port is linked as soon as its word exists */
	tg_check(words[early] & PENDING, "carried over: pending", words[early], PENDING);
	tg_check(words[early] & LINKED, "carried over: linked", words[early], LINKED);
	tg_check(cb->head[EVTCHN_FIFO_PRIORITY_DEFAULT] == early, "carried over: head", cb->head[7], early);
	ev_enable();
	tg_check(ev_hits[early] == 1, "carried over: delivered", ev_hits[early], 1);
	/* Xen leaves the 2-level bit as it was; clear it for the reset below */
	clear_bit_locked(&si->evtchn_pending[early / 64], early % 64);

	/* ---- set_priority ---- */
	u32 a = bind_ipi(), b = bind_ipi(), c = bind_ipi();
	rc = set_priority(a, EVTCHN_FIFO_PRIORITY_MIN + 1);
	tg_check(rc == -XEN_EINVAL, "set_priority 16", rc, -XEN_EINVAL);
	rc = set_priority(MAX_EVTCHN_PORT + 1, 1);
	tg_check(rc == -XEN_EINVAL, "set_priority bad port", rc, -XEN_EINVAL);
	tg_check(set_priority(a, 10) == 0 && set_priority(b, 3) == 0, "set_priority", 0, 0);

	/* ---- an IPI to self through the queue ---- */
	u64 before = ev_upcalls;
	ev_send(c);
	tg_check(ev_hits[c] == 1, "ipi delivered", ev_hits[c], 1);
	tg_check(ev_upcalls == before + 1, "exactly one upcall", ev_upcalls - before, 1);
	tg_check(!(words[c] & (PENDING | LINKED)), "consumed: not pending, not linked", words[c], 0);

	/* ---- priorities: READY bits and the walk's order ---- */
	ev_disable();
	ev_send(a);
	ev_send(c);
	ev_send(b);
	u32 want = (1u << 10) | (1u << 7) | (1u << 3);
	tg_check(cb->ready == want, "ready bits by priority", cb->ready, want);
	tg_check(cb->head[10] == a && cb->head[3] == b && cb->head[7] == c, "heads", cb->head[3], b);
	tg_check(vi->upcall_pending == 1, "upcall pending", vi->upcall_pending, 1);
	ev_norder = 0;
	ev_enable();
	tg_check(ev_norder == 3 && ev_order[0] == b && ev_order[1] == c && ev_order[2] == a,
		 "highest priority first", ev_order[0], b);

	/* ---- one queue keeps its order: LINK of the tail ---- */
	u32 d = bind_ipi();
	ev_disable();
	ev_send(c);
	ev_send(d);
	tg_check((words[c] & EVTCHN_FIFO_LINK_MASK) == d, "tail linked to the next", words[c] & EVTCHN_FIFO_LINK_MASK, d);
	tg_check(cb->head[7] == c, "head stays", cb->head[7], c);
	ev_norder = 0;
	ev_enable();
	tg_check(ev_norder == 2 && ev_order[0] == c && ev_order[1] == d, "queue order", ev_order[0], c);

	/* ---- a port moved to another queue: its old queue's tail is
	 * forgotten (Xen's "old_q->tail = 0"), so a later event of the old
	 * queue starts it afresh instead of linking behind the moved port ---- */
	ev_disable();
	ev_send(c);            /* c: the tail of queue 7 */
	ev_enable();           /* consumed: unlinked, still the shim's tail */
	tg_check(set_priority(c, 3) == 0, "set_priority 3", 0, 0);
	ev_disable();
	ev_send(c);            /* now in queue 3 */
	ev_send(d);            /* queue 7 again */
	tg_check(cb->head[3] == c && cb->head[7] == d, "moved port: each queue its head", cb->head[7], d);
	tg_check(!(words[c] & EVTCHN_FIFO_LINK_MASK), "moved port: nothing linked behind it", words[c], 0);
	tg_check(cb->ready == ((1u << 3) | (1u << 7)), "moved port: both queues ready", cb->ready, 0x88);
	ev_norder = 0;
	ev_enable();
	tg_check(ev_norder == 2 && ev_order[0] == c && ev_order[1] == d, "moved port: order", ev_order[0], c);
	tg_check(set_priority(c, EVTCHN_FIFO_PRIORITY_DEFAULT) == 0, "set_priority back", 0, 0);

	/* ---- masked: pending, not linked, until EVTCHNOP_unmask ---- */
	__atomic_fetch_or(&words[d], MASKED, __ATOMIC_SEQ_CST);
	u32 hits = ev_hits[d];
	ev_send(d);
	tg_check(words[d] == (MASKED | PENDING), "masked: pending only", words[d], MASKED | PENDING);
	tg_check(ev_hits[d] == hits, "masked: no delivery", ev_hits[d], hits);
	/* SCHEDOP_poll sees FIFO PENDING: returns at once, not at the timeout */
	u64 t0 = now_ns();
	rc = poll1(d, t0 + 2000000000UL);
	u64 took = now_ns() - t0;
	tg_check(rc == 0 && took < 500000000UL, "poll sees a pending port", took, 0);
	u32 pd = d;
	rc = evtchn_op(EVTCHNOP_unmask, &pd);
	tg_check(rc == 0, "unmask", rc, 0);
	tg_check(ev_hits[d] == hits + 1, "unmask links and delivers", ev_hits[d], hits + 1);
	/* poll on a quiet port waits for its timeout */
	t0 = now_ns();
	rc = poll1(d, t0 + 30000000UL);
	took = now_ns() - t0;
	tg_check(rc == 0 && took >= 20000000UL, "poll on a quiet port waits", took, 30000000UL);

	/* ---- VIRQ_TIMER, raised by the shim's timer ---- */
	timer_port = bind_virq(VIRQ_TIMER);
	singleshot(now_ns() + 1000000, 0);
	tg_check(ev_wait(timer_fired, 100), "timer through the queue", ev_hits[timer_port], 1);

	/* ---- a loopback interdomain pair, raised from Python ---- */
	struct evtchn_alloc_unbound lu = { DOMID_SELF, DOMID_SELF, 0 };
	rc = evtchn_op(EVTCHNOP_alloc_unbound, &lu);
	tg_check(rc == 0, "alloc_unbound self", rc, 0);
	struct evtchn_bind_interdomain bd = { DOMID_SELF, 0, lu.port, 0 };
	rc = evtchn_op(EVTCHNOP_bind_interdomain, &bd);
	tg_check(rc == 0, "bind_interdomain", rc, 0);
	tg_check(ev_hits[bd.local_port] == 1, "bind raises the local port", ev_hits[bd.local_port], 1);
	ev_send(bd.local_port);
	tg_check(ev_hits[lu.port] == 1, "send reaches the other end", ev_hits[lu.port], 1);

	/* ---- close clears PENDING ---- */
	ev_disable();
	ev_send(b);
	u32 pb = b;
	rc = evtchn_op(EVTCHNOP_close, &pb);
	tg_check(rc == 0, "close", rc, 0);
	tg_check(!(words[b] & PENDING), "close clears pending", words[b], 0);
	ev_norder = 0;
	ev_enable();   /* b is still linked: walked, not handled */
	tg_check(ev_norder == 0, "closed port not handled", ev_norder, 0);

	/* ---- a hostile guest: the shim never follows LINK, never hangs ---- */
	/* a tail held BUSY: the link still goes in, BUSY dropped */
	ev_disable();
	ev_send(c);
	__atomic_fetch_or(&words[c], BUSY, __ATOMIC_SEQ_CST);
	ev_send(d);
	tg_check((words[c] & (EVTCHN_FIFO_LINK_MASK | BUSY)) == d, "BUSY tail linked", words[c], d);
	ev_enable();
	/* a word claiming LINKED with LINK at itself or out of range: not linked again */
	for (u32 bad = 0; bad < 2; bad++) {
		words[a] = LINKED | (bad ? EVTCHN_FIFO_LINK_MASK : a);
		hits = ev_hits[a];
		ev_send(a);
		tg_check(words[a] & PENDING, "self-linked: pending", words[a], PENDING);
		tg_check(ev_hits[a] == hits, "self-linked: not delivered", ev_hits[a], hits);
		words[a] = 0;
	}
	/* garbage in head[] and READY: an empty queue's head is written anew */
	ev_disable();
	for (int q = 0; q < EVTCHN_FIFO_MAX_QUEUES; q++)
		cb->head[q] = 0xFFFFFFFFu - q;
	cb->ready = 0;
	for (int q = 0; q < EVTCHN_FIFO_MAX_QUEUES; q++)
		ev_fifo_head[q] = 0;
	ev_send(c);
	tg_check(cb->head[7] == c, "head rewritten", cb->head[7], c);
	tg_check(cb->ready == (1u << 7), "ready set", cb->ready, 1u << 7);
	hits = ev_hits[c];
	ev_enable();
	tg_check(ev_hits[c] == hits + 1, "delivered after garbage heads", ev_hits[c], hits + 1);
	/* every word scribbled on: the shim still only links what is raised */
	ev_disable();
	for (int i = 0; i < 1024; i++)
		if (i != (int)c)
			words[i] = 0xFFFFFFFFu;
	ev_send(c);
	ev_enable();
	tg_check(ev_hits[c] == hits + 2, "delivered among scribbled words", ev_hits[c], hits + 2);
	for (int i = 0; i < 1024; i++)
		words[i] = 0;
	for (int q = 0; q < EVTCHN_FIFO_MAX_QUEUES; q++)
		ev_fifo_head[q] = 0;
	ev_send(c);
	tg_check(ev_hits[c] == hits + 3, "delivered after the scribbling", ev_hits[c], hits + 3);

	/* ---- EVTCHNOP_reset: back to the 2-level ABI ---- */
	u16 self = DOMID_SELF;
	rc = evtchn_op(EVTCHNOP_reset, &self);
	tg_check(rc == 0, "reset", rc, 0);
	ev_fifo_cb = 0;
	rc = set_priority(1, 3);
	tg_check(rc == -XEN_ENOSYS, "2-level again", rc, -XEN_ENOSYS);
	/* the 2-level bitmaps are as the switch left them (Xen does not
	 * clear them either): start clean */
	for (int i = 0; i < 64; i++)
		si->evtchn_pending[i] = 0;
	((struct vcpu_info *)vi)->pending_sel = 0;
	u32 e = bind_ipi();
	hits = ev_hits[e];
	ev_send(e);
	tg_check(ev_hits[e] == hits + 1, "2-level delivery after reset", ev_hits[e], hits + 1);
	rc = init_control(va_to_pfn(cb_page2), 0, 0, &lb);
	tg_check(rc == 0, "init_control after reset", rc, 0);
}
