/* crt0 for pyvmm guests. Entered in 64-bit mode with RSP = 0, RDI = RAM bytes, RSI = vCPUs. */
    .section .text.start, "ax"
    .code64
    .globl _start
    .type _start, @function
_start:
    cli
    movq    $__stack_top, %rsp
    xorl    %ebp, %ebp
    movq    %rdi, %r12
    movq    %rsi, %r13

    /* Zero .bss (16-byte aligned at both ends) with a plain store loop. */
    movq    $__bss_start, %rax
    movq    $__bss_end, %rcx
1:  cmpq    %rcx, %rax
    jae     2f
    movq    $0, (%rax)
    movq    $0, 8(%rax)
    addq    $16, %rax
    jmp     1b
2:
    movq    %r12, fw_ram_bytes(%rip)
    movq    %r13, fw_nr_cpus(%rip)

    call    main
    movl    %eax, %edi
    call    fw_exit
3:  cli
    hlt
    jmp     3b
    .size _start, . - _start

    .section .bss
    .balign 8
    .globl fw_ram_bytes, fw_nr_cpus
fw_ram_bytes:
    .quad 0
fw_nr_cpus:
    .quad 0

    .section .note.GNU-stack, "", @progbits
