/* softint guest: trap entries for the vectors traps_entry.S lacks and the
 * user-mode snippets (run by user_run.S's run_user). */
	.section .note.GNU-stack, "", @progbits
	.text
#include "tg_trap.h"
	TRAP 1, 0
	TRAP 4, 0
	TRAP 7, 0
	TRAP 0x21, 0
	TRAP 0x22, 0
	TRAP 0x24, 0
	TRAP 0x80, 0

/* user-mode code, copied to a user page (position independent); each
 * snippet traps at its first instruction unless its comment says */
	.section .rodata
	.globl user_code_start, user_code_end
	.globl u_int21, u_int24, u_int3, u_int_3, u_int4, u_int80, u_pf_read, u_pf_write
	.globl u_ud, u_gp, u_nm, u_tf, u_tf_nop, u_sel, u_sel_mov, u_int24_pfx
user_code_start:
u_int21:	int $0x21		/* vDPL 1: #GP from user mode */
		ud2
u_int24:	int $0x24		/* vDPL 3: delivered after it */
		ud2
u_int3:		int3
		ud2
u_int_3:	.byte 0xcd, 0x03	/* int $3 (gas would write int3) */
		ud2
u_int4:		int $4
		ud2
u_int80:	int $0x80
		ud2
u_pf_read:	movq 0x10000000, %rax
u_pf_write:	movq %rax, 0x10000000
u_ud:		ud2
u_gp:		hlt
u_nm:		fnop
u_tf:		pushfq			/* TF by popf: #DB after the nop following it */
		orq $0x100, (%rsp)
		popfq
u_tf_nop:	nop
		nop
		ud2
u_sel:		movw $0x0f, %ax		/* LDT selector, no LDT: #GP(0x0c) */
u_sel_mov:	movw %ax, %fs
		ud2
u_int24_pfx:	.byte 0x66, 0x2e	/* prefixed int $0x24: delivered after all of it */
		int $0x24
		ud2
user_code_end:
