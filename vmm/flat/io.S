/* ioeventfd check: two writes to PORT_EVT (VALUE1 then VALUE2), then one
 * to PORT_DONE, then hlt. */
        .code64
        .text
        .globl _start
_start:
        mov     $PORT_EVT, %dx
        mov     $VALUE1, %eax
        out     %eax, %dx
        mov     $VALUE2, %eax
        out     %eax, %dx
        mov     $PORT_DONE, %dx
        out     %al, %dx
        hlt
