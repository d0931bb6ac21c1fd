/* Step 4: user mode.  A separate user L4 (MMUEXT_NEW_USER_BASEPTR), iret to
 * user mode, user `syscall` -> the registered syscall callback on kernel_sp
 * (kernel/user GS bases swapped, frame CS/SS/RSP/RIP checked), iret back
 * to user, second syscall. */
#include "tg.h"
const char tg_name[] = "usermode";

#define USER_CODE_VA 0x400000UL
#define USER_STACK_TOP 0x402000UL
#define USER_DATA_VA 0x402000UL
#define USER_MARK 0x5555aaaa5555aaaaUL
#define KERNEL_MARK 0x1234567887654321UL

extern char user_code_start[], user_code_end[];
extern char tg_syscall_cb[], tg_trap_6[], tg_trap_13[], tg_trap_14[], tg_trap_3[];
void tg_enter_user(u64 rip, u64 rsp) __attribute__((noreturn));
struct rec { u64 n, rip, cs, rflags, rsp, ss, err, rcx, r11, mask_in_handler; };
extern struct rec recs[32];
u64 tg_expect_rip, tg_resume_rip, tg_expect_rsp;
struct rec recs[32];

static u64 pt[4][512] __attribute__((aligned(4096)));   /* L4u L3u L2u L1u */
static u8 upages[3][4096] __attribute__((aligned(4096))); /* code, stack, data */
static u8 kstack[16384] __attribute__((aligned(16)));
static u64 kernel_gs_area[2] = { KERNEL_MARK, 0 };
static int nsys;

void tg_trap(u64 vec, u64 *f, int has_err)
{
	(void)f; (void)has_err;
	tg_check(0, "unexpected trap", vec, 0);
	tg_finish();
}

struct mmuext_op { u32 cmd, _pad; u64 arg1, arg2; };
struct callback_register { u16 type, flags; u32 _pad; u64 address; };

/* frame: rip, cs, rflags, rsp, ss (rcx/r11 already popped) */
void tg_on_syscall(u64 rax, u64 rbx, u64 *frame)
{
	u64 kgs;
	__asm__ volatile("movq %%gs:0, %0" : "=r"(kgs));
	nsys++;
	tg_check(kgs == KERNEL_MARK, "kernel GS base live in the callback", kgs, KERNEL_MARK);
	tg_check(rbx == USER_MARK, "user GS base was live in user mode", rbx, USER_MARK);
	tg_check((frame[1] & 0xffff) == 0xe033, "syscall frame cs", frame[1], 0xe033);
	tg_check(frame[4] == 0xe02b, "syscall frame ss", frame[4], 0xe02b);
	tg_check(frame[3] == USER_STACK_TOP, "syscall frame rsp (user rsp)", frame[3], USER_STACK_TOP);
	if (nsys == 1) {
		tg_check(rax == 42, "first syscall number", rax, 42);
		tg_check(frame[0] == USER_CODE_VA + 16, "syscall frame rip", frame[0], USER_CODE_VA + 16);
		return;   /* iret back to user mode */
	}
	tg_check(rax == 43, "second syscall number", rax, 43);
	tg_check(frame[0] == USER_CODE_VA + 23, "second syscall rip", frame[0], USER_CODE_VA + 23);
	tg_finish();
}

void tg_main(struct start_info *si)
{
	(void)si;
	u64 U = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D;
	pt[0][0] = (va_to_pfn(pt[1]) << 12) | U;
	pt[1][0] = (va_to_pfn(pt[2]) << 12) | U;
	pt[2][USER_CODE_VA >> 21] = (va_to_pfn(pt[3]) << 12) | U;
	for (int i = 0; i < 3; i++)
		pt[3][((USER_CODE_VA >> 12) & 511) + i] = (va_to_pfn(upages[i]) << 12) | U;
	tg_memcpy(upages[0], user_code_start, user_code_end - user_code_start);
	*(u64 *)upages[2] = USER_MARK;

	for (int i = 0; i < 4; i++)
		tg_check(tg_map_readonly(pt[i]) == 0, "page table mapped read-only", i, 0);
	struct mmuext_op op = { MMUEXT_NEW_USER_BASEPTR, 0, va_to_pfn(pt[0]), 0 };
	long rc = HC4(HC_mmuext_op, &op, 1, 0, 0x7ff0);
	tg_check(rc == 0, "NEW_USER_BASEPTR", rc, 0);
	struct callback_register cb = { CALLBACKTYPE_syscall, 1, 0, (u64)tg_syscall_cb };
	rc = HC2(HC_callback_op, CALLBACKOP_register, &cb);
	tg_check(rc == 0, "register syscall callback", rc, 0);
	rc = HC2(HC_stack_switch, 0xe02b, kstack + sizeof(kstack));
	tg_check(rc == 0, "stack_switch", rc, 0);
	rc = HC2(HC_set_segment_base, SEGBASE_GS_KERNEL, kernel_gs_area);
	tg_check(rc == 0, "set_segment_base GS_KERNEL", rc, 0);
	rc = HC2(HC_set_segment_base, SEGBASE_GS_USER, USER_DATA_VA);
	tg_check(rc == 0, "set_segment_base GS_USER", rc, 0);
	static struct trap_info tt[] = {
		{ 3, 3, 0xe030, 0, (u64)tg_trap_3 }, { 6, 0, 0xe030, 0, (u64)tg_trap_6 },
		{ 13, 0, 0xe030, 0, (u64)tg_trap_13 }, { 14, 0, 0xe030, 0, (u64)tg_trap_14 },
		{ 0, 0, 0, 0, 0 },
	};
	rc = HC1(HC_set_trap_table, tt);
	tg_check(rc == 0, "set_trap_table", rc, 0);
	if (tg_failures)
		return;
	tg_enter_user(USER_CODE_VA, USER_STACK_TOP);
}
