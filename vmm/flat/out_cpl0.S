/* CPL0, 64-bit: write a value to a port, then hlt. The VMM entered long
 * mode for us (flatvm.FlatVm). PORT and VALUE come from -D. */
        .code64
        .text
        .globl _start
_start:
        mov     $PORT, %dx
        mov     $VALUE, %eax
        out     %eax, %dx
        mov     $0x42, %rbx         /* visible in the final register state */
        mov     %cs, %rcx
        hlt
after_hlt:
        jmp     after_hlt
