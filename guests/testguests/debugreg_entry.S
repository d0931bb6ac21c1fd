/* debugreg guest: #DB entry (traps_entry.S has the others), and a routine
 * an instruction breakpoint is put on. */
	.section .note.GNU-stack, "", @progbits
	.text
	.globl tg_trap_1
tg_trap_1:
	pushq %rax; pushq %rdi; pushq %rsi; pushq %rdx; pushq %r8; pushq %r9; pushq %r10
	leaq 56(%rsp), %rsi
	movl $1, %edi
	xorl %edx, %edx
	call tg_trap
	popq %r10; popq %r9; popq %r8; popq %rdx; popq %rsi; popq %rdi; popq %rax
	popq %rcx
	popq %r11
	jmp tg_xen_iret

	.globl bp_target, bp_insn
bp_target:
	nop
bp_insn:
	nop
	ret
