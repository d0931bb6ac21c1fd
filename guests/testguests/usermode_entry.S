	.section .note.GNU-stack, "", @progbits
/* user-mode code, copied to a user page at USER_CODE_VA (position independent) */
	.section .rodata
	.globl user_code_start, user_code_end
user_code_start:
	movq %gs:0, %rbx          /* the user GS base must be live in user mode */
	movl $42, %eax
	syscall
	movl $43, %eax
	syscall
	ud2
user_code_end:

	.text
/* syscall callback: Xen frame {rcx, r11, rip, cs, rflags, rsp, ss} on kernel_sp */
	.globl tg_syscall_cb
tg_syscall_cb:
	popq %rcx
	popq %r11
	pushq %r11
	pushq %rcx
	movq %rax, %rdi
	movq %rbx, %rsi
	leaq 16(%rsp), %rdx
	call tg_on_syscall
	popq %rcx
	popq %r11
	xorl %eax, %eax
	jmp tg_xen_iret

/* enter user mode through HYPERVISOR_iret: rdi = rip, rsi = rsp */
	.globl tg_enter_user
tg_enter_user:
	pushq $0xe02b
	pushq %rsi
	pushq $0x202
	pushq $0xe033
	pushq %rdi
	jmp tg_xen_iret
