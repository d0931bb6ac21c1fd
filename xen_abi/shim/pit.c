/* pyvmm shim: the PIT's channel 2 and port 0x61, as Xen emulates them for
 * every PV guest (pv_pit_handler, reached from its port-I/O emulation).
 *
 * A domU owns no I/O ports, but Linux calibrates its CPU clock against PIT
 * channel 2 at boot (quick_pit_calibrate, whatever the TSC source).  With
 * all-ones answers that loop spins 50,000 times, two `inb $0x42` each, and
 * on kvm_pvm every one of those is a shim entry (~100 us): seconds of
 * boot.  A counter that really counts lets it finish, or give up, within a
 * few dozen reads, as on Xen.
 *
 * The model: one 16-bit down-counter at 1.193182 MHz, counting while the
 * gate (port 0x61 bit 0) is high; control words for channel 2 (access
 * mode, operating mode, counter latch, read-back); OUT2 on port 0x61
 * bit 5.  Modes 0, 1, 4 and 5 count down once and raise OUT at terminal
 * count (then keep wrapping); modes 2 and 3 reload.  Channels 0 and 1 are
 * not there (writes dropped, reads all ones), like every other port.
 * Single-vCPU state: the shim runs one vCPU of one domain. */
#include <stdint.h>
#include "events.h"
#include "pit.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint64_t u64;
typedef int64_t s64;

#define PIT_HZ          1193182UL
#define NS_PER_S        1000000000UL

/* control word (port 0x43) */
#define CW_CHANNEL(cw)  ((cw) >> 6)
#define CW_ACCESS(cw)   (((cw) >> 4) & 3)
#define CW_MODE(cw)     (((cw) >> 1) & 7)
#define CHANNEL_2       2
#define READ_BACK       3
#define ACCESS_LATCH    0
#define ACCESS_LSB      1
#define ACCESS_MSB      2
#define ACCESS_WORD     3
#define RB_NO_COUNT     0x20    /* read-back: 0 = latch the count */
#define RB_CHANNEL_2    0x08

/* port 0x61 */
#define P61_GATE2       0x01
#define P61_SPEAKER     0x02
#define P61_WRITABLE    (P61_GATE2 | P61_SPEAKER)
#define P61_REFRESH     0x10    /* toggles on every read, as the DRAM refresh bit did */
#define P61_OUT2        0x20

static struct {
	u16 reload;             /* 0 stands for 65536 */
	u8 mode, access;
	u8 write_lsb_next;      /* ACCESS_WORD: which byte the next write sets */
	u8 read_lsb_next;       /* ACCESS_WORD: which byte the next read gives */
	u8 write_lo;            /* the LSB written, waiting for its MSB */
	u8 latched;             /* bytes of `latch` still to read */
	u16 latch;
	u8 port61;              /* gate and speaker bits */
	u8 refresh;
	u64 ticks_before;       /* ticks counted before the gate last rose */
	s64 running_since_ns;   /* when the gate rose (or the count was loaded) */
	u8 loaded;              /* a count was written: the counter runs */
} pit = { .access = ACCESS_WORD, .write_lsb_next = 1, .read_lsb_next = 1, .mode = 0 };

static u64 ns_to_ticks(u64 ns)
{
	return ns / NS_PER_S * PIT_HZ + ns % NS_PER_S * PIT_HZ / NS_PER_S;
}

static u64 elapsed_ticks(void)
{
	u64 t = pit.ticks_before;
	if (pit.port61 & P61_GATE2) {
		s64 ns = ev_now_ns() - pit.running_since_ns;
		t += ns > 0 ? ns_to_ticks((u64)ns) : 0;
	}
	return t;
}

static u64 period(void)
{
	return pit.reload ? pit.reload : 65536;
}

/* the counter as a read would see it now, and OUT2 */
static u16 count_now(u8 *out)
{
	u64 n = period();
	if (!pit.loaded) {
		*out = 0;
		return 0;
	}
	u64 t = elapsed_ticks();
	switch (pit.mode) {
	case 2: case 6:         /* rate generator: n .. 1, OUT low for one tick */
		*out = t % n != n - 1;
		return (u16)(n - t % n);
	case 3: case 7: {       /* square wave: counts by two, OUT high for the first half */
		u64 in_period = t % n;
		*out = in_period < (n + 1) / 2;
		return (u16)((n - 2 * (in_period % ((n + 1) / 2))) & ~1UL);
	}
	default:                /* one-shot: OUT rises at terminal count, the counter wraps on */
		*out = t >= n;
		return (u16)(n - t % 65536);
	}
}

static void start_counting(void)
{
	pit.ticks_before = 0;
	pit.running_since_ns = ev_now_ns();
	pit.loaded = 1;
}

static void write_control(u8 cw)
{
	if (CW_CHANNEL(cw) == READ_BACK) {
		u8 out;
		if ((cw & RB_CHANNEL_2) && !(cw & RB_NO_COUNT) && !pit.latched) {
			pit.latch = count_now(&out);
			pit.latched = pit.access == ACCESS_WORD ? 2 : 1;
		}
		return;         /* status latching is not modelled */
	}
	if (CW_CHANNEL(cw) != CHANNEL_2)
		return;
	if (CW_ACCESS(cw) == ACCESS_LATCH) {
		u8 out;
		if (!pit.latched) {
			pit.latch = count_now(&out);
			pit.latched = pit.access == ACCESS_WORD ? 2 : 1;
		}
		return;
	}
	pit.access = CW_ACCESS(cw);
	pit.mode = CW_MODE(cw);
	pit.write_lsb_next = pit.read_lsb_next = 1;
	pit.latched = 0;
	pit.loaded = 0;         /* a new control word stops the count until it is loaded */
}

static void write_count(u8 v)
{
	switch (pit.access) {
	case ACCESS_LSB:
		pit.reload = v;
		break;
	case ACCESS_MSB:
		pit.reload = (u16)(v << 8);
		break;
	default:
		if (pit.write_lsb_next) {
			pit.write_lo = v;
			pit.write_lsb_next = 0;
			return;
		}
		pit.reload = (u16)(pit.write_lo | v << 8);
		pit.write_lsb_next = 1;
		break;
	}
	start_counting();
}

static u8 read_count(void)
{
	u8 out;
	u16 v;
	int lsb;
	if (pit.latched) {
		v = pit.latch;
		lsb = pit.access == ACCESS_WORD ? pit.latched == 2 : pit.access == ACCESS_LSB;
		pit.latched--;
	} else {
		v = count_now(&out);
		lsb = pit.access == ACCESS_WORD ? pit.read_lsb_next : pit.access == ACCESS_LSB;
	}
	if (pit.access == ACCESS_WORD)
		pit.read_lsb_next ^= 1;
	return lsb ? (u8)v : (u8)(v >> 8);
}

static void write_port61(u8 v)
{
	u8 was = pit.port61;
	pit.port61 = v & P61_WRITABLE;
	if ((was & P61_GATE2) && !(pit.port61 & P61_GATE2)) {      /* gate falls: freeze */
		s64 ns = ev_now_ns() - pit.running_since_ns;
		pit.ticks_before += ns > 0 ? ns_to_ticks((u64)ns) : 0;
	} else if (!(was & P61_GATE2) && (pit.port61 & P61_GATE2)) {
		if (pit.mode != 0 && pit.mode != 4)      /* gate-triggered modes restart */
			pit.ticks_before = 0;
		pit.running_since_ns = ev_now_ns();
	}
}

static u8 read_port61(void)
{
	u8 out;
	count_now(&out);
	pit.refresh ^= P61_REFRESH;
	return pit.port61 | pit.refresh | (out ? P61_OUT2 : 0);
}

int pit_port(u16 port)
{
	return port == PIT_CH2_PORT || port == PIT_MODE_PORT || port == PIT_GATE_PORT;
}

u8 pit_read(u16 port)
{
	if (port == PIT_CH2_PORT)
		return read_count();
	if (port == PIT_GATE_PORT)
		return read_port61();
	return 0xff;            /* the control port is write-only */
}

void pit_write(u16 port, u8 v)
{
	if (port == PIT_CH2_PORT)
		write_count(v);
	else if (port == PIT_MODE_PORT)
		write_control(v);
	else if (port == PIT_GATE_PORT)
		write_port61(v);
}
