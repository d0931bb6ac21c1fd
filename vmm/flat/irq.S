/* Interrupt delivery check (in-kernel irqchip): software-enable the LAPIC,
 * report PORT_READY, then sti;hlt until VECTOR arrives. Its handler counts
 * deliveries in r13, acknowledges (EOI) and reports PORT_IRQ with the
 * vector in eax. */
#define APIC_SVR        0xf0
#define APIC_EOI        0xb0
#define APIC_SVR_ENABLE 0x100
#define SPURIOUS_VECTOR 0xff
        .code64
        .text
        .globl _start
_start:
        xor     %r13, %r13
        mov     $APIC_BASE, %rdi        /* above 2 GiB: no disp32 form */
        movl    $(APIC_SVR_ENABLE | SPURIOUS_VECTOR), APIC_SVR(%rdi)
        mov     $PORT_READY, %dx
        out     %al, %dx
1:      sti
        hlt
        jmp     1b

        .globl irq_handler
irq_handler:
        push    %rax
        push    %rdx
        push    %rdi
        inc     %r13
        mov     $APIC_BASE, %rdi
        movl    $0, APIC_EOI(%rdi)
        mov     $VECTOR, %eax
        mov     $PORT_IRQ, %dx
        out     %al, %dx
        pop     %rdi
        pop     %rdx
        pop     %rax
        iretq
