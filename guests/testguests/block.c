/* SCHEDOP_block: returns at once (and re-enables delivery) when an event is
 * pending; otherwise halts until the host raises a port -- here the console
 * port, when the host sends input -- with no timer armed.  Without host
 * input it blocks forever: the host's run(timeout) must still end. */
#include "tg_events.h"

const char tg_name[] = "block";

void tg_main(struct start_info *s)
{
	ev_setup(s);
	u32 cport = s->console_evtchn;
	struct evtchn_bind_ipi bi = { 0, 0 };
	long rc = evtchn_op(EVTCHNOP_bind_ipi, &bi);
	tg_check(rc == 0, "bind_ipi", rc, 0);

	/* pending + masked: block returns at once, unmasked, upcall on return */
	tg_check(vi->upcall_mask == 1, "starts masked", vi->upcall_mask, 1);
	ev_send(bi.port);
	tg_check(ev_hits[bi.port] == 0, "no upcall while masked", ev_hits[bi.port], 0);
	u64 t0 = rdtsc();
	rc = sched_block();
	u64 t1 = rdtsc();
	tg_check(rc == 0, "block returns 0", rc, 0);
	tg_check(vi->upcall_mask == 0, "block cleared the mask", vi->upcall_mask, 0);
	tg_check(ev_hits[bi.port] == 1, "pending upcall delivered after block", ev_hits[bi.port], 1);
	tg_puts("block_pending_return_cycles="); tg_dec(t1 - t0); tg_puts("\n");

	/* no timer: only the host can wake us */
	tg_puts("BLOCKING\n");
	u64 n = 0;
	for (;;) {
		ev_disable();
		if (ev_hits[cport])
			break;
		sched_block();
		n++;
	}
	ev_enable();
	tg_puts("woke_ns="); tg_dec(now_ns()); tg_puts(" blocks="); tg_dec(n); tg_puts("\n");
}
