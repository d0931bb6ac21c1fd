/* bench: COUNT `out`s to PORT_BENCH in a loop (with OUTS=0: the same loop
 * without the out, to separate guest-side cost), then PORT_DONE. */
        .code64
        .text
        .globl _start
_start:
        mov     $COUNT, %rcx
        mov     $PORT_BENCH, %dx
1:
#if OUTS
        out     %eax, %dx
#else
        nop
#endif
        dec     %rcx
        jnz     1b
        mov     $PORT_DONE, %dx
        out     %al, %dx
        hlt
