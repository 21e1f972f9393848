/* What the viommu-edu guests share: a 4 KiB page of a pattern, edu's DMA of a page, the count of
 * a buffer's words that hold the pattern, a request's status checked, their failure line, and
 * their start.
 * A guest defines GUEST (its name, the lines' prefix) before including this. */
#ifndef GUESTS_VIOMMU_EDU_H
#define GUESTS_VIOMMU_EDU_H

#include "edu.h"

#define TICK_VECTOR 0x30
#define TICK_US     10000u     /* 10 ms */
#define WORDS       (4096 / 8)

static struct viommu viommu;

static void __attribute__((noreturn, format(printf, 1, 2))) fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    puts_serial(GUEST ": ");
    vprintf(fmt, ap);
    va_end(ap);
    puts_serial("\n");
    fw_exit(1);
}

static uint64_t pattern(unsigned i)
{
    return 0xFEDCBA9876543210ULL ^ ((uint64_t)i * 0x9E3779B97F4A7C15ULL);
}

static void clear(uint64_t *buf)
{
    for (unsigned i = 0; i < WORDS; i++)
        ((volatile uint64_t *)buf)[i] = 0;
}

/* How many words of buf hold the pattern. */
static unsigned landed(const uint64_t *buf)
{
    unsigned n = 0;
    for (unsigned i = 0; i < WORDS; i++)
        n += ((const volatile uint64_t *)buf)[i] == pattern(i);
    return n;
}

/* One page from src to dst (bus addresses), waited for. */
static void dma(uint32_t src, uint32_t dst, uint32_t cmd)
{
    uint32_t last;
    if (edu_dma(src, dst, 8 * WORDS, cmd, &last) < 0)
        fail("dma 0x%x -> 0x%x still running, command 0x%x", src, dst, last);
}

/* The runtime up (IDT, 8259s masked, LAPIC, its tick; interrupts off), edu found with memory
 * decode and bus mastering on, the virtio-iommu driven: edu's endpoint id (its requester id,
 * bus 0, function 0). */
static uint32_t start(void)
{
    idt_init();
    pic_disable(0x20, 0x28);
    lapic_enable();
    lapic_tick_start(TICK_VECTOR, TICK_US);
    cli();
    int dev = edu_find();
    if (dev < 0)
        fail("no edu");
    uint16_t cmd = pci_read16(0, (uint8_t)dev, 0, PCI_COMMAND);
    pci_write16(0, (uint8_t)dev, 0, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    const char *failed = viommu_init(&viommu);
    if (failed)
        fail("virtio-iommu: %s failed", failed);
    return (uint32_t)dev << 3;
}

static void expect(const char *what, int status, int wanted)
{
    if (status != wanted)
        fail("%s: status %d, not %d", what, status, wanted);
}

#endif
