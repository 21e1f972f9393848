/* ticker: a periodic LAPIC timer at 100 Hz, counted by its interrupt handler; prints
 * "tick <n>" at every tenth tick (ten lines a second), halting in between. Never exits. For
 * tests that a timer runs on at its rate after a restore or a migration. */
#include <pyvmmfw.h>

#define TICK_VECTOR 0x30
#define TICK_US     10000u            /* 10 ms */

int main(void)
{
    idt_init();                       /* report any exception instead of triple-faulting */
    lapic_enable();
    lapic_tick_start(TICK_VECTOR, TICK_US);
    __asm__ volatile("sti");
    printf("ticker: every %u us\n", TICK_US);
    for (uint32_t line = 1;; line++) {
        while (lapic_ticks < line * 10)
            __asm__ volatile("hlt");
        printf("tick %u\n", line * 10);
    }
}
