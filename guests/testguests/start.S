/* Shared start-up and Xen ELF notes for the test guests. */
#define ELFNOTE(type, kind, value)            \
	.pushsection .note.Xen, "a";          \
	.balign 4;                            \
	.long 2f - 1f;                        \
	.long 4f - 3f;                        \
	.long type;                           \
1:	.asciz "Xen";                         \
2:	.balign 4;                            \
3:	kind value;                           \
4:	.balign 4;                            \
	.popsection

	ELFNOTE(6, .asciz, "pyvmm-testguest")          /* GUEST_OS */
	ELFNOTE(5, .asciz, "xen-3.0")                  /* XEN_VERSION */
	ELFNOTE(8, .asciz, "generic")                  /* LOADER */
	ELFNOTE(3, .quad, 0xffffffff80000000)          /* VIRT_BASE */
	ELFNOTE(4, .quad, 0)                           /* PADDR_OFFSET */
	ELFNOTE(1, .quad, _start)                      /* ENTRY */
	ELFNOTE(10, .asciz, "!writable_page_tables")   /* FEATURES */
#ifdef WITH_HYPERCALL_PAGE
	ELFNOTE(2, .quad, hypercall_page)              /* HYPERCALL_PAGE */
#endif

	.section .text.start, "ax"
	.globl _start
_start:
	cld
	leaq tg_stack_top(%rip), %rsp
	movq %rsi, %rdi
	call tg_main
	call tg_finish
1:	jmp 1b

	.section .note.GNU-stack, "", @progbits
	.section .bss.page, "aw", @nobits
	.balign 4096
	.globl tg_stack
tg_stack:
	.skip 16384
tg_stack_top:

#ifdef WITH_HYPERCALL_PAGE
	.section .text.hypercall_page, "ax"
	.balign 4096
	.globl hypercall_page
hypercall_page:
	.fill 4096, 1, 0xcc
	.data
	.globl tg_use_hypercall_page
tg_use_hypercall_page: .long 1
#else
	.section .text.hypercall_page, "ax"
	.globl hypercall_page
hypercall_page:
	.data
	.globl tg_use_hypercall_page
tg_use_hypercall_page: .long 0
#endif
