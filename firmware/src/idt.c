#include <pyvmmfw.h>

struct idt_ptr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

#define KERNEL_CS 0x08
#define GATE_INTERRUPT_PRESENT 0x8E   /* P=1, DPL=0, type 0xE: 64-bit interrupt gate */

extern const char isr_stubs[];        /* isr.S: 256 stubs, 16 bytes apart */

/* 256 16-byte gates, each as two quadwords: offset 15:0 | selector << 16 | type/attr << 40 |
 * offset 31:16 << 48, then offset 63:32. */
static uint64_t idt[256 * 2] __attribute__((aligned(16)));
static int_handler_t handlers[256];

void isr_dispatch(struct int_frame *f);

void idt_init(void)
{
    /* About ten instructions a vector: this runs under the instruction emulator. */
    uint64_t *q = idt;
    uint64_t addr = (uint64_t)(uintptr_t)isr_stubs;
    for (unsigned v = 0; v < 256; v++, addr += 16, q += 2) {
        q[0] = (addr & 0xFFFF) | ((uint64_t)KERNEL_CS << 16)
               | ((uint64_t)GATE_INTERRUPT_PRESENT << 40) | ((addr & 0xFFFF0000) << 32);
        q[1] = addr >> 32;
    }
    struct idt_ptr p = { .limit = sizeof(idt) - 1, .base = (uint64_t)(uintptr_t)idt };
    __asm__ volatile("lidt %0" : : "m"(p) : "memory");
}

void idt_register(uint8_t vector, int_handler_t handler)
{
    handlers[vector] = handler;
    barrier();
}

void isr_dispatch(struct int_frame *f)
{
    int_handler_t h = handlers[f->vector & 0xFF];
    if (h) {
        h(f);
        return;
    }
    if (f->vector < 32) {
        printf("exception %lu rip=0x%lx err=0x%lx\n", f->vector, f->rip, f->error);
        fw_exit(IDT_EXIT_CODE);
    }
    if (f->vector == LAPIC_SPURIOUS_VECTOR)
        return;                       /* spurious: no EOI */
    printf("unexpected vector %lu\n", f->vector);
    fw_exit(IDT_EXIT_CODE);
}
