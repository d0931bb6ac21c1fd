/* Tiny freestanding PV test guests: hypercalls, console output, checks.
 * Xen's numbers (HC_*, SCHEDOP_*, XEN_E*, ...) come from xen_numbers.h,
 * generated from xen_abi/abi.py at build time (xen_abi/shim/layout.py). */
#ifndef TG_H
#define TG_H
#include <stdint.h>
#include <stddef.h>
#include "xen_numbers.h"

typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;
typedef int64_t s64;

#define PTE_P 1UL
#define PTE_RW 2UL
#define PTE_US 4UL
#define PTE_A 0x20UL
#define PTE_D 0x40UL
#define VIRT_BASE 0xffffffff80000000UL

struct start_info {
	char magic[32];
	u64 nr_pages, shared_info;
	u32 flags, _p0;
	u64 store_mfn;
	u32 store_evtchn, _p1;
	u64 console_mfn;
	u32 console_evtchn, _p2;
	u64 pt_base, nr_pt_frames, mfn_list, mod_start, mod_len;
	char cmd_line[1024];
	u64 first_p2m_pfn, nr_p2m_frames;
};

struct vcpu_info {
	u8 upcall_pending, upcall_mask, _pad[6];
	u64 pending_sel, cr2, _arch_pad;
	u8 time[32];
};

struct trap_info { u8 vector, flags; u16 cs; u32 _pad; u64 address; };
/* vcpu_runstate_info: time[] is running, runnable, blocked, offline */
struct runstate { u32 state, pad; u64 entry, time[4]; };

_Static_assert(sizeof(struct start_info) == XEN_START_INFO_SIZE, "start_info");
_Static_assert(sizeof(struct vcpu_info) == VI_SIZE, "vcpu_info");
_Static_assert(sizeof(struct runstate) == XEN_VCPU_RUNSTATE_INFO_SIZE, "runstate");
_Static_assert(sizeof(struct trap_info) == XEN_TRAP_INFO_SIZE, "trap_info");

extern int tg_use_hypercall_page;
extern char hypercall_page[];

static inline long tg_syscall_hc(long nr, long a1, long a2, long a3, long a4, long a5)
{
	register long r10 __asm__("r10") = a4;
	register long r8 __asm__("r8") = a5;
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret), "+D"(a1), "+S"(a2), "+d"(a3), "+r"(r10), "+r"(r8)
			 : "0"(nr) : "rcx", "r11", "r9", "memory");
	return ret;
}

static inline long tg_page_hc(long nr, long a1, long a2, long a3, long a4, long a5)
{
	register long r10 __asm__("r10") = a4;
	register long r8 __asm__("r8") = a5;
	long ret;
	void *slot = hypercall_page + nr * 32;
	__asm__ volatile("call *%[slot]"
			 : "=a"(ret), "+D"(a1), "+S"(a2), "+d"(a3), "+r"(r10), "+r"(r8)
			 : [slot] "r"(slot) : "rcx", "r11", "r9", "memory");
	return ret;
}

static inline long hc(long nr, long a1, long a2, long a3, long a4, long a5)
{
	return tg_use_hypercall_page ? tg_page_hc(nr, a1, a2, a3, a4, a5)
				     : tg_syscall_hc(nr, a1, a2, a3, a4, a5);
}
#define HC1(n, a) hc(n, (long)(a), 0, 0, 0, 0)
#define HC2(n, a, b) hc(n, (long)(a), (long)(b), 0, 0, 0)
#define HC3(n, a, b, c) hc(n, (long)(a), (long)(b), (long)(c), 0, 0)
#define HC4(n, a, b, c, d) hc(n, (long)(a), (long)(b), (long)(c), (long)(d), 0)

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/* console + reporting (tg.c) */
void tg_write(const char *s, size_t n);
void tg_puts(const char *s);
void tg_hex(u64 v);
void tg_dec(u64 v);
void tg_check(int ok, const char *what, u64 got, u64 want);
__attribute__((noreturn)) void tg_finish(void);
__attribute__((noreturn)) void tg_shutdown(int reason);
extern const char tg_name[];
extern int tg_failures;
void *tg_memcpy(void *d, const void *s, size_t n);

static inline u64 va_to_pfn(const void *p) { return ((u64)p - VIRT_BASE) >> 12; }

/* Xen refuses a page table that is mapped writable: before a page of the
 * guest image becomes one, its own mapping goes read-only (as Linux does
 * before it pins).  Returns update_va_mapping's answer. */
static inline long tg_map_readonly(const void *page)
{
	u64 pte = (va_to_pfn(page) << 12) | 0x21;   /* present, accessed */
	return HC3(HC_update_va_mapping, page, pte, UVMF_INVLPG);
}

/* The command line: the text after `key` where a word starts with it
 * (at its '=' or the word's end), or 0.  tg_opt_num: `key=N` in
 * decimal, 1 for a bare `key`, dflt when absent. */
static inline const char *tg_opt(const char *s, const char *key)
{
	for (int i = 0; s[i] && i < 1024; i++) {
		if (i && s[i - 1] != ' ')
			continue;
		int k = 0;
		while (key[k] && s[i + k] == key[k])
			k++;
		if (!key[k] && (s[i + k] == '=' || s[i + k] == ' ' || !s[i + k]))
			return s + i + k;
	}
	return 0;
}

/* a decimal number at *p, *p moved past it */
static inline u64 tg_num(const char **p)
{
	u64 v = 0;
	while (**p >= '0' && **p <= '9')
		v = v * 10 + (u64)(*(*p)++ - '0');
	return v;
}

static inline u64 tg_opt_num(const char *s, const char *key, u64 dflt)
{
	const char *p = tg_opt(s, key);
	if (!p)
		return dflt;
	if (*p++ != '=')
		return 1;
	return tg_num(&p);
}

/* entry point each test guest provides */
void tg_main(struct start_info *si);
#endif
