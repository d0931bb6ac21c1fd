/* fsgsbase guest: the trap entry traps_entry.S lacks (#BP from user mode is
 * not used; #UD, #GP come from traps_entry.S) and the user-mode snippets.
 * Each snippet ends in a `ud2` at its *_ok label when its own check held,
 * or in `int3` when it did not; one that faults earlier stops there. */
	.section .note.GNU-stack, "", @progbits
	.section .rodata
	.globl user_code_start, user_code_end
	.globl u_wrfs, u_wrfs_ok, u_wrgs, u_wrgs_ok, u_wrfs_bad, u_wrgs_bad
	.globl u_rdfs, u_rdfs_ok, u_rdgs, u_rdgs_ok
user_code_start:
/* write the FS base, read it back */
u_wrfs:		movabsq $0x00007f0011223000, %rax
		wrfsbase %rax
		rdfsbase %rdx
		cmpq %rax, %rdx
		jne 1f
u_wrfs_ok:	ud2
1:		int3
/* write the (user) GS base, read it back */
u_wrgs:		movabsq $0x00007f0044556000, %rax
		wrgsbase %rax
		rdgsbase %rdx
		cmpq %rax, %rdx
		jne 1f
u_wrgs_ok:	ud2
1:		int3
/* non-canonical bases: #GP(0) at the write */
u_wrfs_bad:	wrfsbase %rax		/* rax: from run_user */
		int3
u_wrgs_bad:	wrgsbase %rax
		int3
/* the FS / GS bases the kernel set (rax, rbx: what they must be) */
u_rdfs:		rdfsbase %rdx
		cmpq %rax, %rdx
		jne 1f
u_rdfs_ok:	ud2
1:		int3
u_rdgs:		rdgsbase %rdx
		cmpq %rbx, %rdx
		jne 1f
u_rdgs_ok:	ud2
1:		int3
user_code_end:
