/* The 256 interrupt stubs and the common entry/exit path.
 *
 * Stub v sits at isr_stubs + 16 * v. It pushes a zero error code unless the CPU pushed one
 * (vectors 8, 10-14, 17, 21, 29, 30), pushes v, and jumps to isr_common, which saves the general
 * registers (struct int_frame in fw/idt.h) and calls isr_dispatch(frame). */
    .text
    .code64

    .balign 16
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .org isr_stubs + 16 * vec         /* errors out if the previous stub outgrew 16 bytes */
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq   $0
    .endif
    pushq   $vec
    jmp     isr_common
    .set vec, vec + 1
    .endr
    .org isr_stubs + 16 * 256

isr_common:
    pushq   %rax
    pushq   %rbx
    pushq   %rcx
    pushq   %rdx
    pushq   %rsi
    pushq   %rdi
    pushq   %rbp
    pushq   %r8
    pushq   %r9
    pushq   %r10
    pushq   %r11
    pushq   %r12
    pushq   %r13
    pushq   %r14
    pushq   %r15
    movq    %rsp, %rdi          /* 7 + 15 quadwords below a 16-aligned CPU frame: aligned */
    cld
    call    isr_dispatch
    popq    %r15
    popq    %r14
    popq    %r13
    popq    %r12
    popq    %r11
    popq    %r10
    popq    %r9
    popq    %r8
    popq    %rbp
    popq    %rdi
    popq    %rsi
    popq    %rdx
    popq    %rcx
    popq    %rbx
    popq    %rax
    addq    $16, %rsp           /* vector, error code */
    iretq

    .section .note.GNU-stack, "", @progbits
