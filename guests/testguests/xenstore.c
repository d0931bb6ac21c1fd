/* xenstore through the real ring and event channel (as xenbus does):
 * write/read, directory, the domain's own "domid" and "name", a watch with
 * its immediate event and a later one, a committed transaction, an error
 * reply.  Every request notifies the store port (EVTCHNOP_send, which the
 * shim turns into an ioeventfd write) and waits with SCHEDOP_block for the
 * reply's event. */
#include "tg_events.h"

const char tg_name[] = "xenstore";

#define XS_MASK(i) ((i) & (XENSTORE_RING_SIZE - 1))

struct xsd_sockmsg { u32 type, req_id, tx_id, len; };
struct xs_ring {
	char req[XENSTORE_RING_SIZE], rsp[XENSTORE_RING_SIZE];
	u32 req_cons, req_prod, rsp_cons, rsp_prod;
	u32 server_features, connection, error;
};

static volatile struct xs_ring *ring;
static u32 store_port;
static u32 next_id = 1;
static char watch_buf[256];
static u32 watch_len, watch_events, blocks;

static int rsp_avail(void) { return ring->rsp_prod != ring->rsp_cons; }
static int req_room(void) { return ring->req_prod - ring->req_cons < XENSTORE_RING_SIZE; }

static void wait_for(int (*cond)(void))
{
	while (!cond()) {
		ev_wait(cond, 1);
		blocks++;
	}
}

static void ring_put(const void *data, u32 len)
{
	const char *p = data;
	while (len) {
		wait_for(req_room);
		u32 prod = ring->req_prod;
		while (len && prod - ring->req_cons < XENSTORE_RING_SIZE) {
			ring->req[XS_MASK(prod)] = *p++;
			prod++;
			len--;
		}
		__atomic_thread_fence(__ATOMIC_SEQ_CST);   /* data before the index */
		ring->req_prod = prod;
		ev_send(store_port);
	}
}

static void ring_get(void *dst, u32 len)
{
	char *p = dst;
	while (len) {
		wait_for(rsp_avail);
		u32 cons = ring->rsp_cons;
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		while (len && cons != ring->rsp_prod) {
			*p++ = ring->rsp[XS_MASK(cons)];
			cons++;
			len--;
		}
		ring->rsp_cons = cons;
		ev_send(store_port);
	}
}

static size_t slen(const char *s) { size_t n = 0; while (s[n]) n++; return n; }
static int seq(const char *a, const char *b, u32 n) { for (u32 i = 0; i < n; i++) if (a[i] != b[i]) return 0; return 1; }

/* One request (payload = parts, each sent with its NUL if `nul`), its
 * reply into out[]; watch events that arrive meanwhile are recorded. */
static u32 xs_req(u32 type, u32 tx, const char *a, const char *b, int nul_b, char *out, u32 *outlen)
{
	u32 la = a ? slen(a) + 1 : 0, lb = b ? slen(b) + (nul_b ? 1 : 0) : 0;
	struct xsd_sockmsg m = { type, next_id++, tx, la + lb };
	ring_put(&m, sizeof(m));
	if (a) ring_put(a, la);
	if (b) ring_put(b, lb);
	for (;;) {
		struct xsd_sockmsg r;
		ring_get(&r, sizeof(r));
		char buf[512];
		u32 n = r.len < sizeof(buf) ? r.len : sizeof(buf);
		ring_get(buf, n);
		if (r.type == XS_WATCH_EVENT) {
			watch_events++;
			watch_len = n < sizeof(watch_buf) ? n : sizeof(watch_buf);
			tg_memcpy(watch_buf, buf, watch_len);
			continue;
		}
		tg_check(r.req_id == m.req_id, "reply req_id", r.req_id, m.req_id);
		if (out) {
			tg_memcpy(out, buf, n);
			*outlen = n;
		}
		return r.type;
	}
}

static void expect_read(const char *path, const char *want, const char *what)
{
	char v[256];
	u32 n = 0;
	u32 t = xs_req(XS_READ, 0, path, 0, 0, v, &n);
	tg_check(t == XS_READ, what, t, XS_READ);
	tg_check(n == slen(want) && seq(v, want, n), what, n, slen(want));
}

void tg_main(struct start_info *s)
{
	char v[256];
	u32 n, t;
	ev_setup(s);
	ring = (volatile struct xs_ring *)(VIRT_BASE + (s->store_mfn << 12));
	store_port = s->store_evtchn;
	ev_enable();

	expect_read("domid", "1", "read domid");
	t = xs_req(XS_READ, 0, "name", 0, 0, v, &n);
	tg_check(t == XS_READ && n > 0, "read name", t, XS_READ);
	tg_puts("name="); tg_write(v, n); tg_puts("\n");

	t = xs_req(XS_WRITE, 0, "data/greeting", "hello xenstore", 0, 0, 0);
	tg_check(t == XS_WRITE, "write", t, XS_WRITE);
	expect_read("data/greeting", "hello xenstore", "read back");
	t = xs_req(XS_DIRECTORY, 0, "data", 0, 0, v, &n);
	tg_check(t == XS_DIRECTORY && n == slen("greeting") + 1 && seq(v, "greeting", n), "directory", t, n);

	/* a path that does not exist: XS_ERROR "ENOENT" */
	t = xs_req(XS_READ, 0, "data/nope", 0, 0, v, &n);
	tg_check(t == XS_ERROR && seq(v, "ENOENT", 6), "error reply", t, XS_ERROR);

	/* watch: the reply plus the immediate event (path, token) */
	t = xs_req(XS_WATCH, 0, "data/greeting", "tok1", 1, 0, 0);
	tg_check(t == XS_WATCH, "watch", t, XS_WATCH);
	wait_for(rsp_avail);  /* the immediate event may follow the reply */
	xs_req(XS_READ, 0, "domid", 0, 0, 0, 0);
	tg_check(watch_events >= 1, "immediate watch event", watch_events, 1);
	tg_check(watch_len == 19 && seq(watch_buf, "data/greeting\0tok1\0", 19), "watch event payload", watch_len, 0);
	u32 before = watch_events;

	/* transaction: a write inside, commit, then the watch fires */
	t = xs_req(XS_TRANSACTION_START, 0, "", 0, 0, v, &n);
	tg_check(t == XS_TRANSACTION_START, "transaction_start", t, XS_TRANSACTION_START);
	u32 tx = 0;
	for (u32 i = 0; i < n && v[i] >= '0' && v[i] <= '9'; i++)
		tx = tx * 10 + (v[i] - '0');
	tg_check(tx != 0, "transaction id", tx, 1);
	t = xs_req(XS_WRITE, tx, "data/greeting", "in a transaction", 0, 0, 0);
	tg_check(t == XS_WRITE, "write in transaction", t, XS_WRITE);
	expect_read("data/greeting", "hello xenstore", "outside sees the old value");
	t = xs_req(XS_TRANSACTION_END, tx, "T", 0, 0, 0, 0);
	tg_check(t == XS_TRANSACTION_END, "commit", t, XS_TRANSACTION_END);
	expect_read("data/greeting", "in a transaction", "committed value");
	for (int i = 0; i < 100 && watch_events == before; i++)
		xs_req(XS_READ, 0, "domid", 0, 0, 0, 0);
	tg_check(watch_events > before, "watch fires on commit", watch_events, before + 1);

	tg_puts("xs_blocks="); tg_dec(blocks); tg_puts("\n");
	/* time one request round trip */
	u64 t0 = rdtsc();
	for (int i = 0; i < 10; i++)
		xs_req(XS_READ, 0, "domid", 0, 0, 0, 0);
	tg_puts("xs_read_roundtrip_cycles="); tg_dec((rdtsc() - t0) / 10); tg_puts("\n");
}
