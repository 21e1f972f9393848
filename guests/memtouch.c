/* memtouch: dirties guest RAM as fast as it can, for migration tests: forever, pass after pass,
 * it stores a running sequence number into the first quadword of every page of the 16 MiB at
 * 32 MiB, and prints "pass <n>" after each pass. Never exits. */
#include <pyvmmfw.h>

#define REGION     0x2000000UL
#define REGION_END 0x3000000UL
#define PAGE_SIZE  4096UL

int main(void)
{
    idt_init();                       /* report any exception instead of triple-faulting */
    extern char __image_end[];
    if ((uintptr_t)__image_end > REGION) {
        printf("memtouch: image overlaps the region\n");
        return 2;
    }
    if (fw_ram_bytes < REGION_END) {
        printf("memtouch: need at least %luM of RAM\n", REGION_END >> 20);
        return 1;
    }
    printf("memtouch: ready\n");
    uint64_t sequence = 0;
    for (uint64_t pass = 1;; pass++) {
        for (uintptr_t page = REGION; page < REGION_END; page += PAGE_SIZE)
            *(volatile uint64_t *)page = ++sequence;
        printf("pass %lu\n", pass);
    }
}
