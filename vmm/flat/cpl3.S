/* Enter CPL3 from CPL0 with iretq, run one of the user snippets below.
 * The CPL0 handlers report through port `out`s; the VMM reads the
 * registers at that exit:
 *   PORT_GP      #GP:   r8 = error code, r9 = faulting RIP, r10 = CS, r12 = RFLAGS
 *   PORT_UD      #UD:   r9 = faulting RIP, r10 = CS
 *   PORT_INT     int 0x80 delivered to a DPL3 gate: r9 = RIP after int, r10 = CS
 *   PORT_SYSCALL reached LSTAR and swapgs ran (so CPL0): rax = CS there
 * rcx/r11 are left untouched by every handler (syscall writes them);
 * user_syscall leaves its RFLAGS in rbx for comparison with r11.
 * Defines: USER_ENTRY (one of the user_* labels), PORT_GP, PORT_UD, PORT_INT,
 * PORT_SYSCALL, and the selectors/stacks from flatvm.ASM_DEFINES. */
        .code64
        .text
        .globl _start
_start:
        mov     $USER_DS, %ax
        mov     %ax, %ds
        mov     %ax, %es
        pushq   $USER_DS                /* ss */
        pushq   $USER_STACK_TOP         /* rsp */
        pushq   $0x2                    /* rflags: IF clear */
        pushq   $USER_CS                /* cs */
        pushq   $USER_ENTRY             /* rip */
        iretq

/* ---- CPL0 handlers ---- */
        .globl isr_13
isr_13:
        mov     0(%rsp), %r8            /* error code */
        mov     8(%rsp), %r9            /* rip */
        mov     16(%rsp), %r10          /* cs */
        mov     24(%rsp), %r12          /* rflags */
        mov     $PORT_GP, %dx
        out     %al, %dx
1:      hlt
        jmp     1b

        .globl isr_6
isr_6:
        mov     0(%rsp), %r9            /* rip (no error code) */
        mov     8(%rsp), %r10           /* cs */
        mov     $PORT_UD, %dx
        out     %al, %dx
1:      hlt
        jmp     1b

        .globl uisr_128
uisr_128:
        mov     0(%rsp), %r9            /* rip (no error code) */
        mov     8(%rsp), %r10           /* cs */
        mov     $PORT_INT, %dx
        out     %al, %dx
1:      hlt
        jmp     1b

        .globl lstar_entry
lstar_entry:
        swapgs                          /* #GP if still at CPL3 */
        mov     %cs, %rax
        mov     $PORT_SYSCALL, %dx
        out     %al, %dx
1:      hlt
        jmp     1b

/* ---- CPL3 snippets ---- */
        .globl user_hlt
user_hlt:
        mov     %cs, %r13               /* proves we ran here */
        mov     $0x5eed, %r14
        .globl user_hlt_insn
user_hlt_insn:
        hlt                             /* privileged: #GP at CPL3 */

        .globl user_spin
user_spin:
        mov     %cs, %r13
1:      inc     %r14
        mov     %r14, -8(%rsp)          /* the count, for the VMM to watch */
        jmp     1b

        .globl user_syscall
user_syscall:
        pushfq                          /* rbx = RFLAGS that syscall saves in r11 */
        pop     %rbx
        syscall
        .globl after_syscall
after_syscall:
        hlt

        .globl user_int80
user_int80:
        int     $0x80
        .globl after_int80
after_int80:
        hlt
