/* dirty: byte stores to chosen pages of a 256-page region at 32 MiB, in two phases separated by
 * host checkpoints. Page rules (guests/README.md): phase 1 writes pages i with i % 3 == 0; phase 2
 * writes pages i with i % 7 == 1, and page 255. Nothing else touches the region. */
#include <pyvmmfw.h>

#define REGION     0x2000000UL
#define PAGE_SIZE  4096UL
#define PAGES      256u

static void touch(unsigned page, uint8_t value)
{
    volatile uint8_t *p = (volatile uint8_t *)(REGION + page * PAGE_SIZE);
    *p = value;
}

int main(void)
{
    idt_init();                       /* report any exception instead of triple-faulting */
    extern char __image_end[];
    if ((uintptr_t)__image_end > REGION) {
        printf("dirty: image overlaps the region\n");
        return 2;
    }
    if (fw_ram_bytes < REGION + PAGES * PAGE_SIZE) {
        printf("dirty: need at least %luM of RAM\n", (REGION + PAGES * PAGE_SIZE) >> 20);
        return 1;
    }

    unsigned n = 0;
    for (unsigned i = 0; i < PAGES; i++) {
        if (i % 3 == 0) {
            touch(i, 0x11);
            n++;
        }
    }
    printf("dirty: phase 1 count %u\n", n);
    fw_checkpoint(1);

    n = 0;
    for (unsigned i = 0; i < PAGES; i++) {
        if (i % 7 == 1 || i == PAGES - 1) {
            touch(i, 0x22);
            n++;
        }
    }
    printf("dirty: phase 2 count %u\n", n);
    fw_checkpoint(2);
    return 0;
}
