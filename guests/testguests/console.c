/* The PV console ring (hvc_xen's protocol): output through `out` with a
 * notification on the console port, which the host's back-end prints; then
 * "READY", block until the host's input arrives in `in` (its event wakes us),
 * echo it back through the ring. */
#include "tg_events.h"

const char tg_name[] = "console";

#define IN_SIZE 1024
#define OUT_SIZE 2048

struct cons_ring {
	char in[IN_SIZE], out[OUT_SIZE];
	u32 in_cons, in_prod, out_cons, out_prod;
};

static volatile struct cons_ring *ring;
static u32 port;
static u32 blocks;

static int out_room(void) { return ring->out_prod - ring->out_cons < OUT_SIZE; }
static int in_avail(void) { return ring->in_prod != ring->in_cons; }
static int out_drained(void) { return ring->out_cons == ring->out_prod; }

static void cons_write(const char *s)
{
	while (*s) {
		while (!out_room()) {
			ev_wait(out_room, 1);
			blocks++;
		}
		u32 prod = ring->out_prod;
		while (*s && prod - ring->out_cons < OUT_SIZE)
			ring->out[prod++ & (OUT_SIZE - 1)] = *s++;
		__atomic_thread_fence(__ATOMIC_SEQ_CST);   /* data before the index */
		ring->out_prod = prod;
		ev_send(port);
	}
}

/* one line of input (without the newline) */
static u32 cons_readline(char *buf, u32 max)
{
	u32 n = 0;
	for (;;) {
		while (!in_avail()) {
			if (!ev_wait(in_avail, 1))
				blocks++;
		}
		u32 cons = ring->in_cons;
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		while (cons != ring->in_prod) {
			char c = ring->in[cons++ & (IN_SIZE - 1)];
			if (c == '\n' || c == '\r') {
				ring->in_cons = cons;
				ev_send(port);
				return n;
			}
			if (n < max)
				buf[n++] = c;
		}
		ring->in_cons = cons;
		ev_send(port);
	}
}

void tg_main(struct start_info *s)
{
	ev_setup(s);
	ring = (volatile struct cons_ring *)(VIRT_BASE + (s->console_mfn << 12));
	port = s->console_evtchn;
	ev_enable();
	cons_write("hello via the console ring\n");
	/* more than the ring holds: the writer must wait for the back-end */
	for (int i = 0; i < 60; i++)
		cons_write("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n");
	cons_write("READY\n");
	char line[64];
	u64 t0 = rdtsc();
	u32 n = cons_readline(line, sizeof(line) - 1);
	line[n] = 0;
	u64 t1 = rdtsc();
	cons_write("got: ");
	cons_write(line);
	cons_write("\n");
	tg_check(n == 4 && line[0] == 'p' && line[3] == 'g', "input line", n, 4);
	/* let the back-end drain `out` before console_io output follows */
	while (!out_drained()) {
		ev_wait(out_drained, 1);
		blocks++;
	}
	tg_puts("console_blocks="); tg_dec(blocks); tg_puts("\n");
	tg_puts("console_wait_cycles="); tg_dec(t1 - t0); tg_puts("\n");
}
