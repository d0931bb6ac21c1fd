"""What CPL0 code costs on this machine's KVM: the unit prices of the shim.

    python bench/cpl0_costs.py [COUNT]

On kvm_pvm every instruction the shim runs at CPL0 is interpreted, so a
shim path costs roughly the sum of its instructions' prices.  Two flat
guests (vmm/flatvm.py) measure them, each against its own empty loop:

* instruction classes at CPL0: COUNT iterations of UNROLL copies;
* one guest entry: a CPL3 loop of `cli` (a #GP at CPL3) whose CPL0 handler
  skips it and iretq's back -- the floor of any shim entry -- and the same
  with the 15 general registers pushed and popped, as the shim's common
  path does.

Figures, not pass/fail; compare them with each other (one run, one load).
bench/boot_profile.py says how many entries of each kind a boot makes.
"""
from __future__ import annotations

import sys
import time

from pyvmm.vmm.flatvm import FlatVm, assemble
from pyvmm.vmm.kvm import ExitReason, Kvm

DONE_PORT = 0x531
UNROLL = 4
REPEATS = 3
DEFAULT_COUNT = 500

CPL0_LOOP = r'''
        .code64
        .text
        .globl _start
_start:
        lea     scratch(%rip), %rsi
        mov     $COUNT, %r15
1:
        .rept UNROLL
        BODY
        .endr
        dec     %r15
        jnz     1b
        mov     $DONE_PORT, %dx
        out     %al, %dx
        hlt
        .data
        .balign 64
scratch: .fill 128, 1, 0
'''

#: name -> (body, what one body is, how many of those it counts as)
CLASSES = {
    "nop": ("nop", "instruction", 1),
    "mov reg, reg": ("mov %rax, %rbx", "instruction", 1),
    "load": ("mov 8(%rsi), %rax", "instruction", 1),
    "store": ("mov %rax, 8(%rsi)", "instruction", 1),
    "push + pop": ("push %rax; pop %rax", "pair", 1),
    "lock inc mem": ("lock incq 8(%rsi)", "instruction", 1),
    "call + ret": ("call 3f; jmp 4f; 3: ret; 4:", "pair", 1),
    "rdtsc": ("rdtsc", "instruction", 1),
    "rep movsb, 64 bytes": ("lea 64(%rsi), %rdi; mov %rsi, %r8; mov $64, %ecx; rep movsb; mov %r8, %rsi",
                            "byte", 64),
    "rep movsq, 8 quadwords": ("lea 64(%rsi), %rdi; mov %rsi, %r8; mov $8, %ecx; rep movsq; mov %r8, %rsi",
                               "quadword", 8),
}
#: the rep-string bodies carry four plain instructions around the copy
REP_SETUP = "lea 64(%rsi), %rdi; mov %rsi, %r8; mov $64, %ecx; mov %r8, %rsi"

ENTRY_LOOP = r'''
        .code64
        .text
        .globl _start
_start:
        mov     $USER_DS, %ax
        mov     %ax, %ds
        mov     %ax, %es
        pushq   $USER_DS
        pushq   $USER_STACK_TOP
        pushq   $0x2
        pushq   $USER_CS
        pushq   $user
        iretq
        .globl isr_13
isr_13:
        HANDLER
        addq    $1, 8(%rsp)             /* past the 1-byte cli */
        addq    $8, %rsp                /* the error code */
        iretq
        .globl isr_6
isr_6:
        hlt
user:
        mov     $COUNT, %rcx
1:      BODY
        dec     %rcx
        jnz     1b
        ud2                             /* #UD: the handler halts */
'''
SAVE_ALL = "; ".join([f"pushq %{r}" for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8",
                                               "r9", "r10", "r11", "r12", "r13", "r14", "r15")]
                     + [f"popq %{r}" for r in ("r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8",
                                              "rbp", "rdi", "rsi", "rdx", "rcx", "rbx", "rax")])


def run_until_stop(kvm: Kvm, binary) -> float:
    with FlatVm(kvm, binary) as vm:
        t0 = time.perf_counter()
        while True:
            ex = vm.vcpu.run()
            if ex.reason == ExitReason.IO and ex.port == DONE_PORT:
                break
            if ex.reason == ExitReason.IO:
                continue
            break                       # hlt: the entry loop is over
        return time.perf_counter() - t0


def best(kvm: Kvm, source: str, **defines) -> float:
    return min(run_until_stop(kvm, assemble(source, defines=defines)) for _ in range(REPEATS))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    count = int(argv[0]) if argv else DEFAULT_COUNT
    kvm = Kvm()
    print(f"CPL0 instruction prices ({count} x {UNROLL}, best of {REPEATS}):")
    loop = lambda body: best(kvm, CPL0_LOOP.replace("BODY", body), COUNT=count, UNROLL=UNROLL,
                             DONE_PORT=DONE_PORT)
    empty = loop("")
    rep_setup = loop(REP_SETUP)
    for name, (body, unit, units) in CLASSES.items():
        base = rep_setup if body.startswith("lea 64") else empty
        us = (loop(body) - base) / (count * UNROLL * units) * 1e6
        print(f"  {name:24s} {us:8.2f} us per {unit}")
    print(f"CPL3 -> CPL0 -> CPL3 round trips ({count}, best of {REPEATS}):")
    entry = lambda body, handler: best(kvm, ENTRY_LOOP.replace("BODY", body).replace("HANDLER", handler),
                                       COUNT=count)
    no_entry = entry("nop", "")
    floor = entry("cli", "")
    saved = entry("cli", SAVE_ALL)
    print(f"  #GP, skip, iretq            {(floor - no_entry) / count * 1e6:8.2f} us per entry (the floor)")
    print(f"  ... saving 15 registers too {(saved - no_entry) / count * 1e6:8.2f} us per entry")
    return 0


if __name__ == "__main__":
    sys.exit(main())
