/* MMIO exits: store VALUE to MMIO_ADDR (no memory slot there), load it
 * back into eax, report PORT_DONE, hlt. */
        .code64
        .text
        .globl _start
_start:
        mov     $MMIO_ADDR, %rdi
        movl    $VALUE, (%rdi)
        movl    (%rdi), %eax
        mov     $PORT_DONE, %dx
        out     %eax, %dx
        hlt
