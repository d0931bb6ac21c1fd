#include "tg.h"

int tg_failures;
static const char *first_failure;

void *tg_memcpy(void *d, const void *s, size_t n)
{
	u8 *p = d; const u8 *q = s;
	while (n--) *p++ = *q++;
	return d;
}
void *memcpy(void *d, const void *s, size_t n) { return tg_memcpy(d, s, n); }
void *memset(void *d, int c, size_t n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }

static size_t slen(const char *s) { size_t n = 0; while (s[n]) n++; return n; }

void tg_write(const char *s, size_t n) { HC3(HC_console_io, CONSOLEIO_write, n, s); }
void tg_puts(const char *s) { tg_write(s, slen(s)); }

void tg_hex(u64 v)
{
	char b[19]; int i = 18;
	b[0] = '0'; b[1] = 'x';
	do { b[i--] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v && i > 1);
	int n = 18 - i;
	tg_memcpy(b + 2, b + i + 1, n);
	tg_write(b, 2 + n);
}

void tg_dec(u64 v)
{
	char b[21]; int i = 20;
	do { b[i--] = '0' + v % 10; v /= 10; } while (v);
	tg_write(b + i + 1, 20 - i);
}

void tg_check(int ok, const char *what, u64 got, u64 want)
{
	if (ok) return;
	tg_failures++;
	if (!first_failure) first_failure = what;
	tg_puts("check failed: "); tg_puts(what); tg_puts(" got "); tg_hex(got);
	tg_puts(" want "); tg_hex(want); tg_puts("\n");
}

void tg_shutdown(int reason)
{
	u32 r = reason;
	HC2(HC_sched_op, SCHEDOP_shutdown, &r);
	for (;;) ;
}

void tg_finish(void)
{
	tg_puts("TESTGUEST "); tg_puts(tg_name);
	if (tg_failures) { tg_puts(": FAIL "); tg_puts(first_failure); tg_puts("\n"); }
	else tg_puts(": PASS\n");
	tg_shutdown(SHUTDOWN_poweroff);
}
