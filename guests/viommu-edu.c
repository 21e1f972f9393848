/* viommu-edu: edu's DMA through the guest's own virtio-iommu (pyvmm run --viommu virtio). A small
 * virtio-iommu driver (firmware's fw/viommu.h) puts edu, endpoint = its requester id, in a
 * domain, maps one page, and edu's DMA lands where the page is mapped, not where it is not, and
 * no longer once it is unmapped; the configuration's bypass bit lets edu reach guest memory
 * untranslated, or nothing. The protocol is in guests/README.md. */
#define GUEST "viommu-edu"
#include "viommu-edu.h"

#define DOMAIN      1
#define IOVA        0x100000u  /* where the domain maps buf_a: below edu's 28-bit DMA mask */

static uint64_t source[WORDS] __attribute__((aligned(4096)));
static uint64_t buf_a[WORDS] __attribute__((aligned(4096)));
static uint64_t buf_b[WORDS] __attribute__((aligned(4096)));

/* edu's buffer to bus address `to`; says how many words landed in buf. */
static void dma_out(const char *step, uint32_t to, uint64_t *buf)
{
    clear(buf);
    dma(EDU_BUFFER, to, EDU_DMA_TO_RAM);
    printf("viommu-edu: %s %u words landed\n", step, landed(buf));
}

int main(void)
{
    /* 1. the devices */
    uint32_t endpoint = start();
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
