/* Local APIC (xAPIC, MMIO at 0xFEE00000) and IOAPIC (MMIO at 0xFEC00000, 24 pins). */
#ifndef FW_APIC_H
#define FW_APIC_H

#include <stdint.h>

#define LAPIC_BASE        0xFEE00000UL
#define LAPIC_REG_ID      0x020
#define LAPIC_REG_VERSION 0x030
#define LAPIC_REG_TPR     0x080
#define LAPIC_REG_EOI     0x0B0
#define LAPIC_REG_SVR     0x0F0
#define LAPIC_REG_ICR_LO  0x300
#define LAPIC_REG_ICR_HI  0x310
#define LAPIC_REG_LVT_TIMER 0x320
#define LAPIC_REG_LVT_LINT0 0x350
#define LAPIC_REG_LVT_LINT1 0x360
#define LAPIC_REG_LVT_ERROR 0x370
#define LAPIC_REG_TIMER_INIT 0x380      /* initial count */
#define LAPIC_REG_TIMER_CUR  0x390      /* current count */
#define LAPIC_REG_TIMER_DIV  0x3E0      /* divide configuration */
#define LAPIC_LVT_MASKED  (1u << 16)
#define LAPIC_TIMER_PERIODIC (1u << 17)
#define LAPIC_TIMER_DIV_1    0xB
#define LAPIC_SPURIOUS_VECTOR 0xFF

#define MSR_IA32_APIC_BASE 0x1B
#define APIC_BASE_ENABLE   (1u << 11)

uint32_t lapic_read(uint32_t reg);
void lapic_write(uint32_t reg, uint32_t value);
/* Makes sure IA32_APIC_BASE has the xAPIC enabled at 0xFEE00000, sets TPR 0, masks LINT0/LINT1
 * and the timer, and software-enables the APIC with SVR = 0x1FF (spurious vector 0xFF). */
void lapic_enable(void);
uint32_t lapic_id(void);
void lapic_eoi(void);

/* A periodic tick from the LAPIC timer, to bound waits in time rather than in loop iterations.
 * The timer counts the APIC bus clock divided by 1; the period assumes a 1 GHz clock, which is
 * what KVM's in-kernel LAPIC and QEMU's emulated one use (so it is nominal elsewhere). The tick
 * handler is registered on `vector` with idt_register (call idt_init and lapic_enable first);
 * it increments lapic_ticks and sends the EOI. The timer is in-kernel under KVM: no exits to the
 * VMM. */
extern volatile uint32_t lapic_ticks;
void lapic_tick_start(uint8_t vector, uint32_t period_us);
/* Masks the timer and stops it (initial count 0); the handler stays registered. */
void lapic_tick_stop(void);
/* With interrupts off, halts (sti; hlt, then cli again) until *counter >= target or max_ticks
 * ticks have passed. Returns 0, or -1 on the time-out. Interrupts are off when it returns. */
int lapic_tick_wait(volatile uint32_t *counter, uint32_t target, uint32_t max_ticks);
/* Halts the same way until `ticks` ticks have passed, whatever else wakes it. */
void lapic_tick_sleep(uint32_t ticks);

#define IOAPIC_BASE       0xFEC00000UL
#define IOAPIC_REG_ID     0x00
#define IOAPIC_REG_VER    0x01
#define IOAPIC_REG_REDTBL 0x10          /* pin n: 0x10 + 2n (low), 0x11 + 2n (high) */

/* Redirection-entry flags (low dword); the default (0) is fixed delivery, physical destination,
 * active high, edge triggered, unmasked. */
#define IOAPIC_LOGICAL    (1u << 11)
#define IOAPIC_ACTIVE_LOW (1u << 13)
#define IOAPIC_LEVEL      (1u << 15)
#define IOAPIC_MASKED     (1u << 16)

uint32_t ioapic_read(uint32_t reg);
void ioapic_write(uint32_t reg, uint32_t value);
/* Number of redirection entries (from the version register). */
unsigned ioapic_pins(void);
/* Programs pin -> vector for destination dest (APIC id; logical set with IOAPIC_LOGICAL). */
void ioapic_route(unsigned pin, uint8_t vector, uint8_t dest, uint32_t flags);
void ioapic_mask(unsigned pin);

#endif
