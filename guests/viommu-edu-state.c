/* viommu-edu-state: the guest's virtio-iommu domain across a snapshot or a migration. edu goes
 * into a domain that maps a source page (read) and a target page (read and write), bypass off;
 * the guest says it is ready and waits for the VMM's go (the word at 32 MiB). Then, on what may
 * be a restored machine whose edu was reset, it DMAs the source through the domain into edu and
 * back out to the target's IOVA, and to an address the domain does not map: only the restored
 * domain can put the pattern where it lands. The protocol is in guests/README.md. */
#define GUEST "viommu-edu-state"
#include "viommu-edu.h"

#define GO_TICKS    6000u      /* 60 s for the VMM's go */
#define DOMAIN      7
#define IOVA_SOURCE 0x300000u
#define IOVA_TARGET 0x100000u
#define GO_ADDR     0x2000000u

static uint64_t source[WORDS] __attribute__((aligned(4096)));
static uint64_t target[WORDS] __attribute__((aligned(4096)));
static uint64_t other[WORDS] __attribute__((aligned(4096)));

int main(void)
{
    uint32_t endpoint = start();
    uintptr_t s = (uintptr_t)source, t = (uintptr_t)target, o = (uintptr_t)other;
    if (s >= EDU_DMA_LIMIT || t >= EDU_DMA_LIMIT || o >= EDU_DMA_LIMIT)
        fail("buffers above edu's 28-bit DMA mask");

    viommu_set_bypass(&viommu, 0);
    expect("attach", viommu_attach(&viommu, DOMAIN, endpoint), VIOMMU_S_OK);
    expect("map source", viommu_map(&viommu, DOMAIN, IOVA_SOURCE, s, sizeof(source),
                                     VIOMMU_MAP_READ), VIOMMU_S_OK);
    expect("map target", viommu_map(&viommu, DOMAIN, IOVA_TARGET, t, sizeof(target),
                                     VIOMMU_MAP_READ | VIOMMU_MAP_WRITE), VIOMMU_S_OK);
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
