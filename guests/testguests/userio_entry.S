/* userio guest: the user-mode snippets.  Each ends in `ud2` at its *_ok
 * label when the value read was all ones (a domU owns no ports), `int3`
 * when it was not; a refused access is the #GP at its *_at label. */
	.section .note.GNU-stack, "", @progbits
	.section .rodata
	.globl user_code_start, user_code_end
	.globl u_inb60, u_inb60_ok, u_inb64, u_inb64_at, u_inb64_ok, u_inw5f, u_inw5f_at, u_inw5f_ok
	.globl u_inl, u_inl_at, u_inl_ok, u_outb, u_outb_ok
user_code_start:
u_inb60:	inb $0x60, %al
		cmpb $0xff, %al
		jne 1f
u_inb60_ok:	ud2
1:		int3
u_inb64:	movw $0x64, %dx
u_inb64_at:	inb %dx, %al
		cmpb $0xff, %al
		jne 1f
u_inb64_ok:	ud2
1:		int3
u_inw5f:	movw $0x5f, %dx
u_inw5f_at:	inw %dx, %ax
		cmpw $0xffff, %ax
		jne 1f
u_inw5f_ok:	ud2
1:		int3
u_inl:		movw $0xcf8, %dx
u_inl_at:	inl %dx, %eax
		cmpl $0xffffffff, %eax
		jne 1f
u_inl_ok:	ud2
1:		int3
u_outb:		outb %al, $0x80
u_outb_ok:	ud2
user_code_end:
