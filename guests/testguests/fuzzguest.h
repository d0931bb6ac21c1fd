/* Shared by the fuzzing test guests (mmufuzz.c, shimfuzz.c): the command
 * line (seed=N ops=K [trace=1] [only=A-B,C,...]), the per-(seed, op)
 * random numbers and the one-console-write-per-line output.  Op i draws
 * from (seed, i) alone (seed_op()), so a shorter run is a prefix of a
 * longer one and only= keeps each op's draws (the host's minimiser). */
#ifndef FUZZGUEST_H
#define FUZZGUEST_H
#include "tg.h"

struct mc { u64 op, result, args[6]; };
_Static_assert(sizeof(struct mc) == XEN_MULTICALL_ENTRY_SIZE, "multicall_entry");

static int trace;          /* trace=1: a line per op */

/* ---------------- command line ---------------- */

/* only=...: the text after its '=' (tg.h's tg_opt), or 0 */
static __attribute__((unused)) const char *opt(const char *s, const char *key)
{
	const char *p = tg_opt(s, key);
	return p && *p == '=' ? p + 1 : 0;
}

static const char *only;   /* "A-B,C,..." or 0: every op */

static __attribute__((unused)) int selected(u64 i)
{
	if (!only)
		return 1;
	for (const char *p = only; *p >= '0' && *p <= '9';) {
		u64 a = tg_num(&p), b = a;
		if (*p == '-') {
			p++;
			b = tg_num(&p);
		}
		if (i >= a && i <= b)
			return 1;
		if (*p != ',')
			break;
		p++;
	}
	return 0;
}

/* ---------------- output: one console write per line ---------------- */

static char line[1024];
static int llen;

static __attribute__((unused)) void lput(const char *s) { while (*s && llen < (int)sizeof(line) - 24) line[llen++] = *s++; }

static __attribute__((unused)) void lhex(u64 v)
{
	char b[16];
	int n = 0;
	do { b[n++] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
	lput("0x");
	while (n && llen < (int)sizeof(line) - 2)
		line[llen++] = b[--n];
}

static __attribute__((unused)) void ldec(long v)
{
	char b[20];
	int n = 0;
	u64 u = v < 0 ? -(u64)v : (u64)v;
	if (v < 0)
		lput("-");
	do { b[n++] = '0' + u % 10; u /= 10; } while (u);
	while (n && llen < (int)sizeof(line) - 2)
		line[llen++] = b[--n];
}

static __attribute__((unused)) void lend(void)
{
	line[llen++] = '\n';
	tg_write(line, llen);
	llen = 0;
}

/* ---------------- random numbers ---------------- */

static u64 rs;

static __attribute__((unused)) u64 splitmix(u64 x)
{
	x += 0x9e3779b97f4a7c15UL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9UL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebUL;
	return x ^ (x >> 31);
}

static __attribute__((unused)) u64 rnd(void)   /* xorshift64* */
{
	rs ^= rs >> 12;
	rs ^= rs << 25;
	rs ^= rs >> 27;
	return rs * 0x2545f4914f6cdd1dUL;
}

static __attribute__((unused)) u32 below(u32 n) { return (u32)(((rnd() >> 32) * n) >> 32); }
static __attribute__((unused)) int chance(u32 pct) { return below(100) < pct; }

/* op i's random numbers: from (seed, i) alone */
static __attribute__((unused)) void seed_op(u64 seed, u64 i) { rs = splitmix(seed ^ splitmix(i + 1)) | 1; }

#endif
