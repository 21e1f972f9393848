#include <pyvmmfw.h>

uint32_t lapic_read(uint32_t reg)
{
    return mmio_read32(LAPIC_BASE + reg);
}

void lapic_write(uint32_t reg, uint32_t value)
{
    mmio_write32(LAPIC_BASE + reg, value);
}

void lapic_enable(void)
{
    uint64_t base = rdmsr(MSR_IA32_APIC_BASE);
    uint64_t want = (base & 0xFFFULL & ~(uint64_t)(1u << 10)) | LAPIC_BASE | APIC_BASE_ENABLE;
    if (base != want)
        wrmsr(MSR_IA32_APIC_BASE, want);      /* xAPIC mode (x2APIC bit 10 clear) */
    lapic_write(LAPIC_REG_TPR, 0);
    lapic_write(LAPIC_REG_LVT_TIMER, LAPIC_LVT_MASKED);
    lapic_write(LAPIC_REG_LVT_LINT0, LAPIC_LVT_MASKED);
    lapic_write(LAPIC_REG_LVT_LINT1, LAPIC_LVT_MASKED);
    lapic_write(LAPIC_REG_SVR, 0x100 | LAPIC_SPURIOUS_VECTOR);
}

uint32_t lapic_id(void)
{
    return lapic_read(LAPIC_REG_ID) >> 24;
}

void lapic_eoi(void)
{
    lapic_write(LAPIC_REG_EOI, 0);
}

volatile uint32_t lapic_ticks;

static void tick(struct int_frame *f)
{
    (void)f;
    lapic_ticks++;
    lapic_eoi();
}

void lapic_tick_start(uint8_t vector, uint32_t period_us)
{
    idt_register(vector, tick);
    lapic_write(LAPIC_REG_TIMER_DIV, LAPIC_TIMER_DIV_1);
    lapic_write(LAPIC_REG_LVT_TIMER, LAPIC_TIMER_PERIODIC | vector);
    lapic_write(LAPIC_REG_TIMER_INIT, period_us * 1000u);     /* 1 GHz: 1000 counts a us */
}

void lapic_tick_stop(void)
{
    lapic_write(LAPIC_REG_LVT_TIMER, LAPIC_LVT_MASKED);
    lapic_write(LAPIC_REG_TIMER_INIT, 0);
}

int lapic_tick_wait(volatile uint32_t *counter, uint32_t target, uint32_t max_ticks)
{
    cli();
    uint32_t start = lapic_ticks;
    while (*counter < target) {
        if (lapic_ticks - start >= max_ticks)
            return -1;
        sti_hlt();
        cli();
    }
    return 0;
}

void lapic_tick_sleep(uint32_t ticks)
{
    cli();
    uint32_t start = lapic_ticks;
    while (lapic_ticks - start < ticks) {
        sti_hlt();
        cli();
    }
}
