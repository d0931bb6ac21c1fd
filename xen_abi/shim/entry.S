/* Shim entry points: 256 IDT stubs, the syscall join point, the common
 * save/restore path and the fault-tolerant guest-memory copy.
 * Every CPL0 instruction costs ~1 us on kvm_pvm (interpreted), so these
 * paths are kept as short as possible. */
#include "xen_abi.h"

        .section .text.entry, "ax"
        .code64

/* One 16-byte stub per vector: push a zero error code where the CPU does
 * not push one, push the vector, join the common path. */
        .align 16
        .globl shim_vectors
shim_vectors:
        vec = 0
        .rept 256
        .align 16
        .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        .else
        pushq $0
        .endif
        pushq $vec
        jmp shim_common
        vec = vec + 1
        .endr

/* The per-vCPU trampoline (at LSTAR) saved the guest rsp into the percpu
 * block and loaded this vCPU's stack; build the same frame the CPU builds
 * for an exception so both paths join one C handler.  rsp, cs and ss are
 * filled in by C from the percpu block. */
        .globl shim_syscall_entry
shim_syscall_entry:
        pushq $0                /* ss */
        pushq $0                /* rsp */
        pushq %r11              /* rflags */
        pushq $0                /* cs */
        pushq %rcx              /* rip */
        pushq $0                /* error code */
        pushq $VEC_SYSCALL
        /* fall through */

        .globl shim_common
shim_common:
        pushq %rax
        pushq %rbx
        pushq %rcx
        pushq %rdx
        pushq %rsi
        pushq %rdi
        pushq %rbp
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        cld
        movq %rsp, %rdi
        call shim_trap
        popq %r15
        popq %r14
        popq %r13
        popq %r12
        popq %r11
        popq %r10
        popq %r9
        popq %r8
        popq %rbp
        popq %rdi
        popq %rsi
        popq %rdx
        popq %rcx
        popq %rbx
        popq %rax
        addq $16, %rsp
        .globl shim_iret_insn
shim_iret_insn:
        iretq

/* long guest_copy(void *dst, const void *src, u64 n): 0 or -EFAULT.
 * A #PF/#GP at shim_copy_insn resumes at shim_copy_fault (see shim.c). */
        .globl guest_copy, shim_copy_insn, shim_copy_fault
guest_copy:
        movq %rdx, %rcx
shim_copy_insn:
        rep movsb
        xorl %eax, %eax
        ret
shim_copy_fault:
        movq $-XEN_EFAULT, %rax
        ret

/* long guest_load_gs(u16 sel): load %gs with fault fixup (0 / -EFAULT). */
        .globl guest_load_gs, shim_gs_insn, shim_gs_fault
guest_load_gs:
shim_gs_insn:
        movw %di, %gs
        xorl %eax, %eax
        ret
shim_gs_fault:
        xorl %eax, %eax
        movw %ax, %gs
        movq $-XEN_EFAULT, %rax
        ret
