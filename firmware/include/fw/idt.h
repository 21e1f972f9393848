/* IDT with a stub for each of the 256 vectors, and per-vector C handlers.
 *
 * Every stub pushes an error code (0 when the CPU pushes none) and the vector number, then the
 * common path saves all general registers and calls the handler registered for the vector with a
 * pointer to the frame below. Without a handler: an exception (0-31) prints
 *     exception <vec decimal> rip=0x<hex> err=0x<hex>
 * and debug-exits 0xEE; the LAPIC spurious vector (0xFF) is ignored; any other vector prints
 *     unexpected vector <vec decimal>
 * and debug-exits 0xEE. Handlers run with interrupts off; an interrupt handler must send the LAPIC
 * EOI itself (lapic_eoi()). Returning from a handler resumes the interrupted code. */
#ifndef FW_IDT_H
#define FW_IDT_H

#include <stdint.h>

#define IDT_EXIT_CODE 0xEE

struct int_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error;
    uint64_t rip, cs, rflags, rsp, ss;   /* pushed by the CPU */
};

typedef void (*int_handler_t)(struct int_frame *frame);

/* Fills all 256 gates (interrupt gates, CS 0x08, DPL 0) and loads the IDT. Call once. */
void idt_init(void);
/* Installs (or with NULL removes) the handler for a vector. Exceptions may be hooked too. */
void idt_register(uint8_t vector, int_handler_t handler);

#endif
