/* Bounded waits for the test guests that run several vCPUs (smp, nmi):
 * TSC ticks per ms (a 2 GHz guess until tg_calibrate_tsc reads vCPU 0's
 * pvclock), waits that yield (vCPU 0) or spin (the others), and delays. */
#ifndef TG_SMP_H
#define TG_SMP_H
#include "tg_events.h"

static u64 tsc_per_ms = 2000000;

#define cpu_relax() __asm__ volatile("pause" ::: "memory")
static inline u64 ms_ticks(u64 ms) { return ms * tsc_per_ms; }
static inline long yield(void) { return HC2(HC_sched_op, SCHEDOP_yield, 0); }

/* TSC ticks per ms from the pvclock: ns = (ticks << shift) * mul >> 32 */
static inline void tg_calibrate_tsc(void)
{
	volatile struct pvclock *t = pvclock();
	if (t->mul) {
		u64 k = (1000000UL << 32) / t->mul;
		tsc_per_ms = t->shift >= 0 ? k >> t->shift : k << -t->shift;
	}
}

/* cond, re-read until it holds or ms pass (then its last value); between
 * reads `pause`: a yield (vCPU 0) or cpu_relax() (the others) */
#define TG_BOUNDED_WAIT(cond, ms, pause) ({                             \
	u64 _d = rdtsc() + ms_ticks(ms); int _ok;                       \
	for (;;) {                                                      \
		if (cond) { _ok = 1; break; }                           \
		if (rdtsc() > _d) { _ok = (cond); break; }              \
		pause;                                                  \
	}                                                               \
	_ok; })
#define WAIT_UNTIL(cond, ms) TG_BOUNDED_WAIT(cond, ms, yield())
#define SPIN_UNTIL(cond, ms) TG_BOUNDED_WAIT(cond, ms, cpu_relax())
static inline void delay_ms(u64 ms) { u64 d = rdtsc() + ms_ticks(ms); while (rdtsc() < d) yield(); }
#endif
