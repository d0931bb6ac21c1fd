/* Shim entry points: 256 IDT stubs, the syscall join point, the common
 * save/restore path and the fault-tolerant guest-memory copy.
 * Every CPL0 instruction costs ~1 us on kvm_pvm (interpreted), so these
 * paths are kept as short as possible. */
#include "xen_numbers.h"
#include "shim_layout.h"
#include "priv.h"
#include "pit.h"

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
        .if vec == 13
        jmp shim_gp_entry       /* port I/O fast path first */
        .elseif (vec == 1) || (vec == 7) || (vec == EV_NMI_VECTOR)
        pushq $0
        pushq $vec
        jmp shim_common_cold    /* #DB, #NM, the virtual NMI: off the hot dispatch */
        .else
        .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        .else
        pushq $0
        .endif
        pushq $vec
        jmp shim_common
        .endif
        vec = vec + 1
        .endr

/* #GP fast paths, before the generic C path (kept short: on kvm_pvm every
 * instruction here is interpreted, ~1 us each; the C path costs a few
 * hundred):
 *  - kvm_pvm's CPL3 `syscall` arrives as #GP at LSTAR (see shim_trap):
 *    turn the frame into the syscall entry's frame at once;
 *  - port I/O from guest kernel mode: a domU owns no ports, so with the
 *    virtual IOPL granted (PHYSDEVOP_set_iopl) Xen answers `in` with all
 *    ones and drops `out` -- except for the PIT's channel 2 (pit.c),
 *    which Xen emulates for every PV guest and this leaves to the C path.
 *    Only the byte forms without prefixes (e4 in imm8, e6 out imm8, ec in
 *    dx, ee out dx);
 *  - `cli` and `sti` from guest kernel mode with the virtual IOPL granted:
 *    no-ops, as Xen's emulator leaves them (priv.c does the same for the
 *    prefixed forms); Linux runs them before its paravirt patching, some
 *    thousands at boot;
 *  - `iretq` to the same privilege from guest kernel mode (sync_core's
 *    iret_to_self, once per patched alternative at boot: tens of
 *    thousands), which kvm_pvm faults at CPL3; only with Xen's flat
 *    kernel selectors in the frame, so the iretq below cannot fault.
 * Anything else, user mode included, goes to priv.c.  Guest memory is
 * read between shim_fast_start and shim_fast_end only; a fault there
 * resumes at shim_fast_fault (shim.c: cpl0_fault), i.e. the C path. */
shim_gp_entry:                  /* CPU frame: err rip cs rflags rsp ss */
        testb $3, 16(%rsp)
        jz 9f                   /* a fault in the shim itself */
        pushq %rax              /* [0]rax [8]err [16]rip ... */
        movq %rsp, %rax
        andq $-PERCPU_BLOCK_SIZE, %rax
        movq PERCPU_IN_BLOCK+PC_LSTAR(%rax), %rax
        cmpq 16(%rsp), %rax
        je 7f                   /* kvm_pvm: a syscall (the hottest case first) */
        pushq %rdx
        pushq %rcx              /* [0]rcx [8]rdx [16]rax [24]err [32]rip [40]cs [48]rflags [56]rsp [64]ss */
        movq %rsp, %rcx
        andq $-PERCPU_BLOCK_SIZE, %rcx
        movq 32(%rsp), %rax
        cmpq $0, 24(%rsp)
        jne shim_fast_fault
        cmpq $0, PERCPU_IN_BLOCK+PC_KERNEL_MODE(%rcx)
        je shim_fast_fault
        .globl shim_fast_start, shim_fast_end, shim_fast_fault
shim_fast_start:
        movzwl (%rax), %edx     /* the instruction the CPU just fetched */
        cmpl $0xcf48, %edx      /* 48 cf: iretq */
        je 6f
        cmpq $0, PERCPU_IN_BLOCK+PRIV_OFF+PRIV_IOPL(%rcx)
        je shim_fast_fault
        cmpq $0, PERCPU_IN_BLOCK+PRIV_OFF+PRIV_DR7_EMUL(%rcx)
        jne shim_fast_fault     /* an I/O breakpoint is armed: priv.c checks it */
        movl %edx, %eax
        orb $1, %al
        cmpb $0xfb, %al         /* fa cli, fb sti */
        je 8f
        movl %edx, %eax
        andl $0xf5, %eax
        cmpl $0xe4, %eax
        jne shim_fast_fault
        testb $8, %dl           /* the port: imm8, or the guest's dx */
        jz 3f
        movzwl 8(%rsp), %eax
        jmp 4f
3:      movzbl %dh, %eax
4:      cmpl $PIT_CH2_PORT, %eax        /* the PIT (pit.c) is emulated in C */
        je shim_fast_fault
        cmpl $PIT_MODE_PORT, %eax
        je shim_fast_fault
        cmpl $PIT_GATE_PORT, %eax
        je shim_fast_fault
        testb $2, %dl           /* out: dropped */
        jnz 1f
        movb $0xff, 16(%rsp)    /* in: al = 0xff */
1:      addq $2, 32(%rsp)       /* imm8 forms are 2 bytes, dx forms 1 */
        testb $8, %dl
        jz 2f
        decq 32(%rsp)
2:      incq PERCPU_IN_BLOCK+PRIV_OFF+PRIV_FAST_IO(%rcx)
        jmp 5f
6:      movq 56(%rsp), %rax     /* guest rsp: the iretq frame rip cs rflags rsp ss */
        movabsq $HYPERVISOR_VIRT_END, %rdx
        cmpq %rdx, %rax         /* kernel stacks lie above the hypervisor hole */
        jb shim_fast_fault
        cmpq $-48, %rax
        ja shim_fast_fault
        cmpq $FLAT_RING3_CS64, 8(%rax)
        jne shim_fast_fault
        cmpq $FLAT_RING3_SS64, 32(%rax)
        jne shim_fast_fault
        movq (%rax), %rdx
        movq %rdx, %rcx         /* rip must be canonical */
        shlq $16, %rcx
        sarq $16, %rcx
        cmpq %rdx, %rcx
        jne shim_fast_fault
        movq %rdx, 32(%rsp)
        movq 16(%rax), %rdx
        andl $RFLAGS_GUEST_MASK_ASM, %edx
        orl $0x202, %edx        /* IF, fixed bit: the real IF stays on at CPL3 */
        movq %rdx, 48(%rsp)
        movq 24(%rax), %rdx
        movq %rdx, 56(%rsp)
        movq $FLAT_RING3_CS64, 40(%rsp)
        movq $FLAT_RING3_SS64, 64(%rsp)
        movq %rsp, %rcx
        andq $-PERCPU_BLOCK_SIZE, %rcx
        incq PERCPU_IN_BLOCK+PRIV_OFF+PRIV_FAST_IRET(%rcx)
        jmp 5f
8:      incq 32(%rsp)           /* cli/sti: a no-op, as Xen does with the IOPL granted */
        incq PERCPU_IN_BLOCK+PRIV_OFF+PRIV_FAST_CLI(%rcx)
shim_fast_end:
5:      popq %rcx
        popq %rdx
        popq %rax
        addq $8, %rsp
        iretq
7:      popq %rax               /* kvm_pvm syscall: the CPU frame holds the guest rsp */
        addq $8, %rsp           /* [0]rip [8]cs [16]rflags [24]rsp [32]ss */
        movq %rcx, (%rsp)       /* syscall's return rip and rflags */
        movq %r11, 16(%rsp)
        jmp shim_syscall
shim_fast_fault:
        popq %rcx
        popq %rdx
        popq %rax
9:      pushq $13               /* #GP */
        jmp shim_common

/* The per-vCPU trampoline at LSTAR (hypervisor/domain.py
 * syscall_trampoline) switched to this vCPU's stack and pushed ss and the
 * guest rsp: complete the frame an iretq takes. */
        .globl shim_syscall_entry
shim_syscall_entry:
        pushq %r11              /* rflags */
        pushq $FLAT_RING3_CS64
        pushq %rcx              /* rip */
        /* fall through */

/* A syscall from the guest, either lane: [0]rip [8]cs [16]rflags [24]rsp
 * [32]ss, with rip and rflags from rcx and r11 as `syscall` left them.
 * From guest kernel mode it is a hypercall, done by shim_hypercall (C)
 * with only what C may clobber saved (struct hc_frame: r9 is no longer a
 * parameter register and must survive; the parameters are kept so that
 * multicall, the slow path and a user-mode syscall can read them), then
 * straight back like sysretq: ~20 instructions here where the full path
 * (shim_common) costs ~60 (each ~1-2 us on kvm_pvm).  HYPERVISOR_iret
 * returns to an interrupted context, so it restores the parameter
 * registers too (shim_hypercall returns 2).  A syscall from user
 * mode, or an event to deliver on the way out, continues on the full path
 * (shim_common -> shim_trap) with the registers as they came. */
shim_syscall:
        movq $FLAT_RING3_CS64, 8(%rsp)  /* sysretq's selectors, whatever the guest had */
        movq $FLAT_RING3_SS64, 32(%rsp)
        andq $RFLAGS_GUEST_MASK_ASM, 16(%rsp)
        orq $0x202, 16(%rsp)    /* IF, fixed bit: the real IF stays on at CPL3 */
        pushq %rax
        pushq $VEC_HYPERCALL
        pushq %r9
        pushq %r8
        pushq %r10
        pushq %rdx
        pushq %rsi
        pushq %rdi
        pushq %rcx
        pushq %r11
        movq %rsp, %rdi
        cld
        call shim_hypercall
        testl %eax, %eax
        jnz 1f
        popq %r11
        popq %rcx
        addq $40, %rsp          /* the parameter registers: clobbered, as Xen may */
        popq %r9
        addq $8, %rsp
        popq %rax
        .globl shim_hc_iret_insn
shim_hc_iret_insn:
        iretq
1:      popq %r11               /* registers as they came, or as iret set them */
        popq %rcx
        popq %rdi
        popq %rsi
        popq %rdx
        popq %r10
        popq %r8
        popq %r9
        cmpl $2, %eax
        je 2f
        movq 8(%rsp), %rax      /* the full path: [0]vec [8]err, as shim_common wants */
        movq $0, 8(%rsp)
        jmp shim_common
2:      addq $8, %rsp           /* HYPERVISOR_iret: back to the interrupted */
        popq %rax               /* context, every register as it was */
        jmp shim_hc_iret_insn

/* The full frame (struct frame, every register) for C; rdi points at it. */
.macro SAVE_FRAME
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
.endm

        .globl shim_common
shim_common:
        SAVE_FRAME
        call shim_trap
shim_common_restore:
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

/* #DB, #NM and the NMI kick (shim.c shim_trap_cold): the same save and restore, another
 * C entry, so that the hot vectors' dispatch in shim_trap stays as short. */
shim_common_cold:
        SAVE_FRAME
        call shim_trap_cold
        jmp shim_common_restore

/* long guest_copy(void *dst, const void *src, u64 n): 0 or -EFAULT.
 * Quadwords, then the odd bytes: kvm_pvm's emulator takes ~5 us per
 * iteration of a string instruction, so `rep movsb` of a 64-byte bounce
 * frame cost ~350 us where `rep movsq` takes ~40.  A #PF/#GP at either
 * copy instruction resumes at shim_copy_fault (see shim.c). */
        .globl guest_copy, shim_copy_insn, shim_copy_tail_insn, shim_copy_fault
guest_copy:
        movq %rdx, %rcx
        shrq $3, %rcx
shim_copy_insn:
        rep movsq
        movl %edx, %ecx
        andl $7, %ecx
shim_copy_tail_insn:
        rep movsb
        xorl %eax, %eax
        ret
shim_copy_fault:
        movq $-XEN_EFAULT, %rax
        ret

/* void guest_load_gs(u16 sel): load %gs as Xen's SEGBASE_GS_USER_SEL, a
 * selector that faults as the null one.  A null selector leaves the base
 * as it was on AMD, zero on Intel: the flat data segment first makes it
 * zero on both, as Xen does. */
        .globl guest_load_gs, shim_gs_insn, shim_gs_fault
guest_load_gs:
        cmpw $3, %di
        ja shim_gs_insn
        movl $FLAT_RING3_DS32, %eax
        movw %ax, %gs
shim_gs_insn:
        movw %di, %gs
        ret
shim_gs_fault:
        movl $FLAT_RING3_DS32, %eax
        movw %ax, %gs
        xorl %eax, %eax
        movw %ax, %gs
        ret
