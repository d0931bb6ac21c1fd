/* Event channels end to end: alloc_unbound + status, an IPI port sent to
 * self (upcall with the right pending bits), per-port mask + EVTCHNOP_unmask
 * re-raise, the vcpu mask + "check events" (xen_version 0), iret restoring
 * the mask, a loopback interdomain pair, close + status, bad ports. */
#include "tg_events.h"

const char tg_name[] = "evtchn";

static u32 ipi;
static int resend_in_handler;
static u64 pending_seen;     /* the pending word as the handler found it */

static void hook(u32 port)
{
	if (port == ipi && resend_in_handler) {
		resend_in_handler = 0;
		/* raised while the upcall runs masked: delivered after iret */
		ev_send(ipi);
		pending_seen = si->evtchn_pending[ipi / 64] >> (ipi % 64) & 1;
	}
}

static u32 status(u32 port, struct evtchn_status *st)
{
	st->dom = DOMID_SELF;
	st->port = port;
	long rc = evtchn_op(EVTCHNOP_status, st);
	tg_check(rc == 0, "status", rc, 0);
	return st->status;
}

void tg_main(struct start_info *s)
{
	struct evtchn_status st;
	ev_setup(s);
	ev_hook = hook;
	tg_check(vi->upcall_mask == 1, "events start masked", vi->upcall_mask, 1);

	/* the store/console ports the builder announced are bound to domain 0 */
	tg_check(status(s->store_evtchn, &st) == EVTCHNSTAT_interdomain, "store port interdomain", st.status, 2);
	tg_check(st.u.inter.dom == 0, "store port remote dom 0", st.u.inter.dom, 0);
	tg_check(status(s->console_evtchn, &st) == EVTCHNSTAT_interdomain, "console port interdomain", st.status, 2);

	/* alloc_unbound for domain 0 */
	struct evtchn_alloc_unbound au = { DOMID_SELF, 0, 0 };
	long rc = evtchn_op(EVTCHNOP_alloc_unbound, &au);
	tg_check(rc == 0 && au.port > 0, "alloc_unbound", rc, 0);
	tg_check(status(au.port, &st) == EVTCHNSTAT_unbound, "unbound status", st.status, EVTCHNSTAT_unbound);
	tg_check(st.u.dom == 0, "unbound remote dom", st.u.dom, 0);

	/* IPI to self: the upcall sees exactly that port pending */
	struct evtchn_bind_ipi bi = { 0, 0 };
	rc = evtchn_op(EVTCHNOP_bind_ipi, &bi);
	ipi = bi.port;
	tg_check(rc == 0 && ipi > 0, "bind_ipi", rc, 0);
	tg_check(status(ipi, &st) == EVTCHNSTAT_ipi && st.vcpu == 0, "ipi status", st.status, EVTCHNSTAT_ipi);
	ev_enable();
	u64 before = ev_upcalls, t0 = rdtsc();
	ev_send(ipi);
	u64 lat = ev_last_tsc - t0;
	tg_check(ev_hits[ipi] == 1, "ipi upcall", ev_hits[ipi], 1);
	tg_check(ev_upcalls == before + 1, "exactly one upcall", ev_upcalls - before, 1);
	tg_check(!(si->evtchn_pending[ipi / 64] >> (ipi % 64) & 1), "pending cleared by handler", 1, 0);
	tg_check(vi->upcall_mask == 0, "mask restored by iret", vi->upcall_mask, 0);
	tg_puts("ipi_send_to_upcall_cycles="); tg_dec(lat); tg_puts("\n");

	/* per-port mask: the send only sets pending; EVTCHNOP_unmask re-raises */
	set_bit_locked(&si->evtchn_mask[ipi / 64], ipi % 64);
	ev_send(ipi);
	tg_check(ev_hits[ipi] == 1, "masked port: no upcall", ev_hits[ipi], 1);
	tg_check(si->evtchn_pending[ipi / 64] >> (ipi % 64) & 1, "masked port: pending set", 0, 1);
	u32 p = ipi;
	rc = evtchn_op(EVTCHNOP_unmask, &p);
	tg_check(rc == 0, "unmask", rc, 0);
	tg_check(ev_hits[ipi] == 2, "unmask re-raises", ev_hits[ipi], 2);

	/* vcpu-level mask: pending waits for the guest's check-events call */
	ev_disable();
	ev_send(ipi);
	tg_check(ev_hits[ipi] == 2, "upcall masked: none", ev_hits[ipi], 2);
	tg_check(vi->upcall_pending == 1, "upcall_pending set", vi->upcall_pending, 1);
	vi->upcall_mask = 0;
	barrier();
	tg_check(ev_hits[ipi] == 2, "nothing until checked", ev_hits[ipi], 2);
	HC2(HC_xen_version, XENVER_version, 0);
	tg_check(ev_hits[ipi] == 3, "xen_version(0) delivers", ev_hits[ipi], 3);

	/* raised inside the (masked) upcall: delivered when iret unmasks */
	resend_in_handler = 1;
	ev_send(ipi);
	tg_check(pending_seen == 1, "re-raised while masked stays pending", pending_seen, 1);
	tg_check(ev_hits[ipi] == 5, "iret restoring the mask delivers", ev_hits[ipi], 5);

	/* loopback interdomain: bind raises the new port once; sends cross */
	struct evtchn_alloc_unbound lu = { DOMID_SELF, DOMID_SELF, 0 };
	rc = evtchn_op(EVTCHNOP_alloc_unbound, &lu);
	tg_check(rc == 0, "alloc_unbound self", rc, 0);
	struct evtchn_bind_interdomain bd = { DOMID_SELF, 0, lu.port, 0 };
	rc = evtchn_op(EVTCHNOP_bind_interdomain, &bd);
	tg_check(rc == 0, "bind_interdomain loopback", rc, 0);
	tg_check(ev_hits[bd.local_port] == 1, "bind raises the local port", ev_hits[bd.local_port], 1);
	ev_send(bd.local_port);
	tg_check(ev_hits[lu.port] == 1, "send reaches the other end", ev_hits[lu.port], 1);
	tg_check(status(lu.port, &st) == EVTCHNSTAT_interdomain && st.u.inter.port == bd.local_port,
		 "interdomain status", st.u.inter.port, bd.local_port);

	/* close: status closed, sends refused, bad ports refused */
	p = ipi;
	rc = evtchn_op(EVTCHNOP_close, &p);
	tg_check(rc == 0, "close", rc, 0);
	tg_check(status(ipi, &st) == EVTCHNSTAT_closed, "closed status", st.status, 0);
	rc = ev_send(ipi);
	tg_check(rc == -XEN_EINVAL, "send on closed port", rc, -XEN_EINVAL);
	rc = ev_send(EVTCHN_2L_NR_CHANNELS + 5);
	tg_check(rc == -XEN_EINVAL, "send on out-of-range port", rc, -XEN_EINVAL);
	st.dom = DOMID_SELF; st.port = 1u << 30;
	rc = evtchn_op(EVTCHNOP_status, &st);
	tg_check(rc == -XEN_EINVAL, "status of out-of-range port", rc, -XEN_EINVAL);
	rc = evtchn_op(EVTCHNOP_send, (void *)0x10);
	tg_check(rc == -14, "send with a wild pointer", rc, -14);
}
