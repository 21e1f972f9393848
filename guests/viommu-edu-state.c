/* viommu-edu-state: the guest's virtio-iommu domain across a snapshot or a migration. edu goes
 * into a domain that maps a source page (read) and a target page (read and write), bypass off;
 * the guest says it is ready and waits for the VMM's go (the word at 32 MiB). Then, on what may
 * be a restored machine whose edu was reset, it DMAs the source through the domain into edu and
 * back out to the target's IOVA, and to an address the domain does not map: only the restored
 * domain can put the pattern where it lands. The protocol is in guests/README.md. */
#include "edu.h"

#define TICK_VECTOR 0x30
#define TICK_US     10000u     /* 10 ms */
#define GO_TICKS    6000u      /* 60 s for the VMM's go */
#define WORDS       (4096 / 8)
#define DOMAIN      7
#define IOVA_SOURCE 0x300000u
#define IOVA_TARGET 0x100000u
#define GO_ADDR     0x2000000u

static struct viommu viommu;
static uint64_t source[WORDS] __attribute__((aligned(4096)));
static uint64_t target[WORDS] __attribute__((aligned(4096)));
static uint64_t other[WORDS] __attribute__((aligned(4096)));

static void __attribute__((noreturn, format(printf, 1, 2))) fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    puts_serial("viommu-edu-state: ");
    vprintf(fmt, ap);
    va_end(ap);
    puts_serial("\n");
    fw_exit(1);
}

static uint64_t pattern(unsigned i)
{
    return 0x0F1E2D3C4B5A6978ULL ^ ((uint64_t)i * 0x9E3779B97F4A7C15ULL);
}

static unsigned landed(uint64_t *buf)
{
    unsigned n = 0;
    for (unsigned i = 0; i < WORDS; i++)
        n += ((volatile uint64_t *)buf)[i] == pattern(i);
    return n;
}

static void clear(uint64_t *buf)
{
    for (unsigned i = 0; i < WORDS; i++)
        ((volatile uint64_t *)buf)[i] = 0;
}

static void dma(uint32_t src, uint32_t dst, uint32_t cmd)
{
    uint32_t last;
    if (edu_dma(src, dst, sizeof(source), cmd, &last) < 0)
        fail("dma 0x%x -> 0x%x still running, command 0x%x", src, dst, last);
}

static void expect(const char *what, int status)
{
    if (status != VIOMMU_S_OK)
        fail("%s: status %d", what, status);
}

int main(void)
{
    idt_init();
    pic_disable(0x20, 0x28);
    lapic_enable();
    lapic_tick_start(TICK_VECTOR, TICK_US);
    cli();

    int dev = edu_find();
    if (dev < 0)
        fail("no edu");
    uint32_t endpoint = (uint32_t)dev << 3;
    uint16_t cmd = pci_read16(0, (uint8_t)dev, 0, PCI_COMMAND);
    pci_write16(0, (uint8_t)dev, 0, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    const char *failed = viommu_init(&viommu);
    if (failed)
        fail("virtio-iommu: %s failed", failed);
    uintptr_t s = (uintptr_t)source, t = (uintptr_t)target, o = (uintptr_t)other;
    if (s >= EDU_DMA_LIMIT || t >= EDU_DMA_LIMIT || o >= EDU_DMA_LIMIT)
        fail("buffers above edu's 28-bit DMA mask");

    viommu_set_bypass(&viommu, 0);
    expect("attach", viommu_attach(&viommu, DOMAIN, endpoint));
    expect("map source", viommu_map(&viommu, DOMAIN, IOVA_SOURCE, s, sizeof(source),
                                     VIOMMU_MAP_READ));
    expect("map target", viommu_map(&viommu, DOMAIN, IOVA_TARGET, t, sizeof(target),
                                     VIOMMU_MAP_READ | VIOMMU_MAP_WRITE));
    for (unsigned i = 0; i < WORDS; i++)
        source[i] = pattern(i);
    printf("viommu-edu-state: ready\n");

    volatile uint32_t *go = (volatile uint32_t *)(uintptr_t)GO_ADDR;
    uint32_t start = lapic_ticks;
    while (*go == 0) {
        if (lapic_ticks - start >= GO_TICKS)
            fail("no go");
        sti_hlt();
        cli();
    }

    clear(target);
    clear(other);
    dma(IOVA_SOURCE, EDU_BUFFER, 0);
    dma(EDU_BUFFER, IOVA_TARGET, EDU_DMA_TO_RAM);
    printf("viommu-edu-state: mapped %u words landed\n", landed(target));
    dma(EDU_BUFFER, (uint32_t)o, EDU_DMA_TO_RAM);
    printf("viommu-edu-state: unmapped address %u words landed\n", landed(other));
    lapic_tick_stop();
    printf("viommu-edu-state: done\n");
    return 0;
}
