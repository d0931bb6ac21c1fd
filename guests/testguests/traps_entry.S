/* Trap handlers for the traps/usermode guests: record the Xen bounce frame
 * through tg_trap(vec, frame, has_err), then return with HYPERVISOR_iret
 * exactly like Linux's xen_iret (push flags=0, rcx, r11, rax; syscall). */
	.section .note.GNU-stack, "", @progbits
	.text
#include "tg_trap.h"
	TRAP 3, 0
	TRAP 6, 0
	TRAP 13, 1
	TRAP 14, 1

	.globl tg_xen_iret
tg_xen_iret:
	pushq $0
	pushq %rcx
	pushq %r11
	pushq %rax
	movl $23, %eax
	syscall
	ud2

/* HYPERVISOR_iret back to the next instruction (Linux's iret_to_self),
 * keeping events masked (IF clear in the frame). */
	.globl tg_iret_to_self
tg_iret_to_self:
	movq %rsp, %rax
	pushq $0xe02b
	pushq %rax
	pushfq
	andq $~0x200, (%rsp)
	pushq $0xe030
	leaq 1f(%rip), %rax
	pushq %rax
	jmp tg_xen_iret
1:	ret
