/* PIT channel 2 and port 0x61, as Xen emulates them for a PV guest
 * (pv_pit_handler) and Linux's boot-time CPU calibration uses them:
 *   - the count, loaded LSB then MSB in mode 0, runs down at 1.193182 MHz
 *     of guest system time while the gate (port 0x61 bit 0) is high;
 *   - OUT2 (port 0x61 bit 5) is low until terminal count, then high;
 *   - a counter-latch command freezes what the next two reads return;
 *   - the count stops while the gate is low;
 *   - the speaker bit reads back, the refresh bit toggles;
 *   - every other port still reads all ones (channel 0 included).
 * Then Linux's quick_pit_calibrate's pattern (expect the MSB to drop)
 * runs once and the number of port reads it took is printed. */
#include "tg_events.h"

const char tg_name[] = "pit";

#define PIT_HZ 1193182UL

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %%dx, %%al" : "=a"(v) : "d"(port));
	return v;
}
static inline void outb(u8 v, u16 port) { __asm__ volatile("outb %%al, %%dx" :: "a"(v), "d"(port)); }
static inline u8 inb_42(void) { u8 v; __asm__ volatile("inb $0x42, %%al" : "=a"(v)); return v; }

static u16 read_count(void)
{
	u8 lo = inb_42();
	return lo | (u16)inb_42() << 8;
}

static void load(u8 mode_cw, u16 count)
{
	outb(mode_cw, 0x43);
	outb((u8)count, 0x42);
	outb((u8)(count >> 8), 0x42);
}

static void spin_ns(u64 ns)
{
	u64 end = now_ns() + ns;
	while (now_ns() < end)
		;
}

void tg_main(struct start_info *s)
{
	ev_setup(s);
	u32 level = 1;
	long rc = HC2(HC_physdev_op, PHYSDEVOP_set_iopl, &level);
	tg_check(rc == 0, "PHYSDEVOP_set_iopl(1)", rc, 0);

	/* gate on, speaker off; mode 0, LSB then MSB, 0xffff */
	outb((inb(0x61) & ~0x02) | 0x01, 0x61);
	u64 t0 = now_ns();
	load(0xb0, 0xffff);
	u16 c0 = read_count();
	spin_ns(2000000);                       /* 2 ms: ~2386 ticks */
	u16 c1 = read_count();
	u64 t1 = now_ns();
	tg_check(c1 < c0, "the count runs down", c1, c0);
	u64 ticks = (u64)(0xffff - c1), want = (t1 - t0) * PIT_HZ / 1000000000UL;
	/* between the load and the read: at least 2 ms, at most t1 - t0 */
	tg_check(ticks >= 2000000UL * PIT_HZ / 1000000000UL && ticks <= want + 2,
		 "ticks match the guest's clock", ticks, want);
	tg_check(!(inb(0x61) & 0x20), "OUT2 low before terminal count", inb(0x61), 0x01);

	/* counter latch: two reads give the value at the latch */
	outb(0x80, 0x43);
	spin_ns(500000);
	u16 latched = read_count();
	u16 after = read_count();
	tg_check(after < latched, "reads after the latch run on", after, latched);
	tg_check(latched - after >= 500000UL * PIT_HZ / 1000000000UL,
		 "the latch froze the count (0.5 ms earlier)", latched - after, 596);

	/* gate low: the count stops */
	outb(inb(0x61) & ~0x01, 0x61);
	u16 g0 = read_count();
	spin_ns(1000000);
	u16 g1 = read_count();
	tg_check(g0 == g1, "no count while the gate is low", g1, g0);
	outb(inb(0x61) | 0x01, 0x61);

	/* terminal count: 100 ticks (84 us), then OUT2 high */
	load(0xb0, 100);
	spin_ns(1000000);
	tg_check(inb(0x61) & 0x20, "OUT2 high after terminal count", inb(0x61), 0x21);

	/* port 0x61: speaker bit reads back, refresh toggles */
	outb(inb(0x61) | 0x02, 0x61);
	u8 a = inb(0x61), b = inb(0x61);
	tg_check(a & 0x02, "speaker bit reads back", a, 0x02);
	tg_check((a ^ b) & 0x10, "refresh bit toggles", a ^ b, 0x10);
	outb(inb(0x61) & ~0x02, 0x61);

	/* not the PIT's channel 2: all ones, as for any port a domU does not own */
	tg_check(inb(0x40) == 0xff, "channel 0 reads all ones", inb(0x40), 0xff);
	tg_check(inb(0x60) == 0xff, "port 0x60 reads all ones", inb(0x60), 0xff);

	/* a guest may write anything: every control word, counts, read-backs,
	 * gate toggles -- the model stays sane (no division by a zero period,
	 * reads still answer) and the other ports are untouched */
	for (u32 cw = 0; cw < 256; cw++) {
		outb((u8)cw, 0x43);
		outb((u8)(cw * 7), 0x42);
		outb((u8)(cw * 13), 0x42);
		outb((u8)cw, 0x61);
		inb(0x42);
		inb(0x42);
		inb(0x61);
	}
	outb(inb(0x61) | 0x01, 0x61);
	tg_check(inb(0x40) == 0xff, "channel 0 still all ones after garbage", inb(0x40), 0xff);

	/* quick_pit_calibrate's first step: see the MSB hold at 0xff at least
	 * 6 times, then drop (it gives up after 50,000 tries) */
	load(0xb0, 0xffff);
	u64 reads = 0, same = 0;
	for (u64 i = 0; i < 50000; i++) {
		inb_42();
		reads += 2;
		if (inb_42() != 0xff)
			break;
		same++;
	}
	tg_check(reads < 50000 * 2, "the MSB drops (no 50,000-read spin)", reads, 0);
	tg_puts("calibration_reads="); tg_dec(reads);
	tg_puts(" msb_held="); tg_dec(same);
	tg_puts("\n");
}
