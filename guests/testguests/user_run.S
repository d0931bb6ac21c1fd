/* run_user / tg_back_to_kernel: enter user mode and come back from a trap
 * handler as setjmp/longjmp would (the guests that run user-mode snippets
 * one at a time: softint, fsgsbase). */
	.section .note.GNU-stack, "", @progbits
	.text
/* void run_user(u64 rip, u64 rsp, u64 rax, u64 rbx): iret to user mode
 * with rax and rbx set; "returns" when a handler calls tg_back_to_kernel() */
	.globl run_user, tg_back_to_kernel
run_user:
	pushq %rbx; pushq %rbp; pushq %r12; pushq %r13; pushq %r14; pushq %r15
	movq %rsp, tg_kctx(%rip)
	movq %rcx, %rbx
	movq %rdx, %rax			/* HYPERVISOR_iret restores it from the frame */
	pushq $0xe02b
	pushq %rsi
	pushq $0x202
	pushq $0xe033
	pushq %rdi
	jmp tg_xen_iret
tg_back_to_kernel:
	movq tg_kctx(%rip), %rsp
	popq %r15; popq %r14; popq %r13; popq %r12; popq %rbp; popq %rbx
	ret

	.bss
	.balign 8
tg_kctx: .quad 0
