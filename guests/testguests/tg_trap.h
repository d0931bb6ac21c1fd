/* The trap entry of the test guests' assembly (traps_entry.S and the
 * guests' own *_entry.S): record the Xen bounce frame through
 * tg_trap(vec, frame, has_err), then return with HYPERVISOR_iret exactly
 * like Linux's xen_iret (push flags=0, rcx, r11, rax; syscall). */
.macro TRAP vec, err
	.globl tg_trap_\vec
tg_trap_\vec:
	pushq %rax; pushq %rdi; pushq %rsi; pushq %rdx; pushq %r8; pushq %r9; pushq %r10
	leaq 56(%rsp), %rsi
	movl $\vec, %edi
	movl $\err, %edx
	call tg_trap
	popq %r10; popq %r9; popq %r8; popq %rdx; popq %rsi; popq %rdi; popq %rax
	popq %rcx
	popq %r11
	.if \err
	addq $8, %rsp
	.endif
	jmp tg_xen_iret
.endm
