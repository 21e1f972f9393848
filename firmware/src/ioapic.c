#include <pyvmmfw.h>

#define IOREGSEL 0x00
#define IOWIN    0x10

uint32_t ioapic_read(uint32_t reg)
{
    mmio_write32(IOAPIC_BASE + IOREGSEL, reg);
    return mmio_read32(IOAPIC_BASE + IOWIN);
}

void ioapic_write(uint32_t reg, uint32_t value)
{
    mmio_write32(IOAPIC_BASE + IOREGSEL, reg);
    mmio_write32(IOAPIC_BASE + IOWIN, value);
}

unsigned ioapic_pins(void)
{
    return ((ioapic_read(IOAPIC_REG_VER) >> 16) & 0xFF) + 1;
}

void ioapic_route(unsigned pin, uint8_t vector, uint8_t dest, uint32_t flags)
{
    uint32_t reg = IOAPIC_REG_REDTBL + 2 * pin;
    /* Mask first so the entry never fires half-written, then destination, then the low dword. */
    ioapic_write(reg, IOAPIC_MASKED);
    ioapic_write(reg + 1, (uint32_t)dest << 24);
    ioapic_write(reg, (flags & (IOAPIC_LOGICAL | IOAPIC_ACTIVE_LOW | IOAPIC_LEVEL | IOAPIC_MASKED))
                 | vector);
}

void ioapic_mask(unsigned pin)
{
    uint32_t reg = IOAPIC_REG_REDTBL + 2 * pin;
    ioapic_write(reg, ioapic_read(reg) | IOAPIC_MASKED);
}
