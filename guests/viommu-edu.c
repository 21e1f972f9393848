/* viommu-edu: edu's DMA through the guest's own virtio-iommu (pyvmm run --viommu virtio). A small
 * virtio-iommu driver (firmware's fw/viommu.h) puts edu, endpoint = its requester id, in a
 * domain, maps one page, and edu's DMA lands where the page is mapped, not where it is not, and
 * no longer once it is unmapped; the configuration's bypass bit lets edu reach guest memory
 * untranslated, or nothing. The protocol is in guests/README.md. */
#include "edu.h"

#define TICK_VECTOR 0x30
#define TICK_US     10000u     /* 10 ms */
#define WORDS       (4096 / 8)
#define DOMAIN      1
#define IOVA        0x100000u  /* where the domain maps buf_a: below edu's 28-bit DMA mask */

static struct viommu viommu;
static uint64_t source[WORDS] __attribute__((aligned(4096)));
static uint64_t buf_a[WORDS] __attribute__((aligned(4096)));
static uint64_t buf_b[WORDS] __attribute__((aligned(4096)));

static void __attribute__((noreturn, format(printf, 1, 2))) fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    puts_serial("viommu-edu: ");
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

/* How many words of buf hold the pattern (edu's buffer holds it from step 3 on). */
static unsigned landed(const uint64_t *buf)
{
    unsigned n = 0;
    for (unsigned i = 0; i < WORDS; i++)
        n += ((const volatile uint64_t *)buf)[i] == pattern(i);
    return n;
}

static void dma(uint32_t src, uint32_t dst, uint32_t cmd)
{
    uint32_t last;
    if (edu_dma(src, dst, sizeof(source), cmd, &last) < 0)
        fail("dma 0x%x -> 0x%x still running, command 0x%x", src, dst, last);
}

/* edu's buffer to bus address `to`; says how many words landed in buf. */
static void dma_out(const char *step, uint32_t to, uint64_t *buf)
{
    clear(buf);
    dma(EDU_BUFFER, to, EDU_DMA_TO_RAM);
    printf("viommu-edu: %s %u words landed\n", step, landed(buf));
}

static void expect(const char *what, int status, int wanted)
{
    if (status != wanted)
        fail("%s: status %d, not %d", what, status, wanted);
}

int main(void)
{
    idt_init();
    pic_disable(0x20, 0x28);
    lapic_enable();
    lapic_tick_start(TICK_VECTOR, TICK_US);
    cli();

    /* 1. the devices */
    int dev = edu_find();
    if (dev < 0)
        fail("no edu");
    uint32_t endpoint = (uint32_t)dev << 3;  /* its requester id: bus 0, function 0 */
    uint16_t cmd = pci_read16(0, (uint8_t)dev, 0, PCI_COMMAND);
    pci_write16(0, (uint8_t)dev, 0, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    const char *failed = viommu_init(&viommu);
    if (failed)
        fail("virtio-iommu: %s failed", failed);
    printf("viommu-edu: edu endpoint 0x%x, virtio-iommu 00:%02x.0\n", endpoint, viommu.d.dev);

    uintptr_t a = (uintptr_t)buf_a, b = (uintptr_t)buf_b, s = (uintptr_t)source;
    if (a >= EDU_DMA_LIMIT || b >= EDU_DMA_LIMIT || s >= EDU_DMA_LIMIT)
        fail("buffers above edu's 28-bit DMA mask");

    /* 2. bypass (as at reset): edu reaches guest memory untranslated */
    for (unsigned i = 0; i < WORDS; i++)
        source[i] = pattern(i);
    dma((uint32_t)s, EDU_BUFFER, 0);
    dma_out("bypass", (uint32_t)b, buf_b);

    /* 3. bypass off, in no domain: edu reaches nothing */
    viommu_set_bypass(&viommu, 0);
    dma_out("blocked", (uint32_t)b, buf_b);

    /* 4. in a domain that maps buf_a at IOVA: DMA to IOVA lands in buf_a; to buf_b's address,
     * which the domain does not map, nowhere */
    expect("attach", viommu_attach(&viommu, DOMAIN, endpoint), VIOMMU_S_OK);
    expect("map", viommu_map(&viommu, DOMAIN, IOVA, a, sizeof(buf_a),
                             VIOMMU_MAP_READ | VIOMMU_MAP_WRITE), VIOMMU_S_OK);
    dma_out("mapped", IOVA, buf_a);
    dma_out("unmapped address", (uint32_t)b, buf_b);

    /* 5. what the device refuses: an overlapping map, an endpoint that is not there */
    expect("overlapping map", viommu_map(&viommu, DOMAIN, IOVA, b, sizeof(buf_b),
                                         VIOMMU_MAP_READ), VIOMMU_S_INVAL);
    expect("attach of no endpoint", viommu_attach(&viommu, DOMAIN, 0xFFFF), VIOMMU_S_NOENT);
    printf("viommu-edu: refusals ok\n");

    /* 6. unmapped: the same DMA lands nowhere */
    expect("unmap", viommu_unmap(&viommu, DOMAIN, IOVA, sizeof(buf_a)), VIOMMU_S_OK);
    dma_out("after unmap", IOVA, buf_a);

    /* 7. detached, bypass back on: untranslated again */
    expect("detach", viommu_detach(&viommu, DOMAIN, endpoint), VIOMMU_S_OK);
    viommu_set_bypass(&viommu, 1);
    dma_out("bypass again", (uint32_t)b, buf_b);

    lapic_tick_stop();
    printf("viommu-edu: done\n");
    return 0;
}
