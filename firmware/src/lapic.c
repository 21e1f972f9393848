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
