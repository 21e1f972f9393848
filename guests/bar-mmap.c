/* bar-mmap: BAR4 of pyvmm's PCI test device (5056:0001), 64 KiB: 0x0000-0x0FFF trapped registers
 * (the first 0x100 bytes scratch), 0x1000-0xFFFF device memory that the VMM maps into the guest
 * as a KVM memory slot. The guest fills and checks the device memory and the scratch dword,
 * moves the BAR to 0xD0000000 and checks again there (and that nothing is left at the old
 * address), then walks the extended capability list through ECAM. Two host checkpoints; the
 * exact protocol is in guests/README.md. */
#include <pyvmmfw.h>

#define TESTDEV_VENDOR 0x5056
#define TESTDEV_DEVICE 0x0001
#define BAR4           (PCI_BAR0 + 4 * 4)
#define BAR4_SIZE      0x10000u
#define NEW_BASE       0xD0000000u

#define SCRATCH_VALUE  0xCAFEF00Du
#define PAGE_SIZE      0x1000u
#define FIRST_PAGE     1u              /* page p of the BAR is at offset p * 0x1000 */
#define LAST_PAGE      15u
#define WORDS_PER_PAGE 16u
#define WORDS          ((LAST_PAGE - FIRST_PAGE + 1) * WORDS_PER_PAGE)   /* 240 */
#define EXTRA_OFFSET   (0x2008u + 0x100u)  /* page 2, past the pattern */
#define EXTRA_VALUE    0x5A5A5A5A5A5A5A5AULL
#define EXT_CAP_HOPS   64u

static uint8_t dev;

/* Word j (0..15) of page p (1..15) of the device memory. */
static uint64_t pattern(unsigned p, unsigned j)
{
    return 0x0101010101010101ULL * (p + 1) + j;
}

static void write_pattern(uintptr_t base)
{
    for (unsigned p = FIRST_PAGE; p <= LAST_PAGE; p++)
        for (unsigned j = 0; j < WORDS_PER_PAGE; j++)
            mmio_write64(base + p * PAGE_SIZE + 8 * j, pattern(p, j));
}

static void __attribute__((noreturn)) mismatch(const char *what, uintptr_t addr, uint64_t got)
{
    printf("bar-mmap: %s mismatch at 0x%lx: 0x%lx\n", what, addr, got);
    fw_exit(1);
}

/* All 240 pattern words at base, then the scratch dword; exits on the first mismatch. */
static void check(uintptr_t base, const char *pattern_what, const char *scratch_what)
{
    for (unsigned p = FIRST_PAGE; p <= LAST_PAGE; p++) {
        for (unsigned j = 0; j < WORDS_PER_PAGE; j++) {
            uintptr_t addr = base + p * PAGE_SIZE + 8 * j;
            uint64_t got = mmio_read64(addr);
            if (got != pattern(p, j))
                mismatch(pattern_what, addr, got);
        }
    }
    uint32_t got = mmio_read32(base);
    if (got != SCRATCH_VALUE)
        mismatch(scratch_what, base, got);
}

static unsigned walk_ext_caps(void)
{
    unsigned n = 0;
    uint32_t off = PCI_EXT_CAP_START;
    for (unsigned hops = 0; hops < EXT_CAP_HOPS; hops++) {
        uint32_t header = pci_ecam_read32(0, dev, 0, off);
        if (header == 0)
            return n;
        printf("bar-mmap: ext cap 0x%04x v%u at 0x%03x\n", PCI_EXT_CAP_ID(header),
               PCI_EXT_CAP_VER(header), off);
        n++;
        uint32_t next = PCI_EXT_CAP_NEXT(header);
        if (next == 0)
            return n;
        if (next < PCI_EXT_CAP_START || (next & 3)) {
            printf("bar-mmap: bad ext cap next 0x%03x at 0x%03x\n", next, off);
            fw_exit(1);
        }
        off = next;
    }
    printf("bar-mmap: ext cap list longer than %u\n", EXT_CAP_HOPS);
    fw_exit(1);
}

int main(void)
{
    idt_init();                       /* report any exception instead of triple-faulting */

    /* a. find the device and BAR4 */
    int found = pci_find_device(TESTDEV_VENDOR, TESTDEV_DEVICE);
    if (found < 0) {
        printf("bar-mmap: no test device\n");
        return 1;
    }
    dev = (uint8_t)found;
    uint32_t raw = pci_read32(0, dev, 0, BAR4);
    uint16_t cmd = pci_read16(0, dev, 0, PCI_COMMAND);
    uintptr_t old = raw & ~0xFu;
    /* A 32-bit memory BAR (bit 0 and type bits 2:1 clear), assigned, 64 KiB aligned, not
     * already where it is to be moved, with memory decode on. */
    if ((raw & 0x7) || old == 0 || (old & (BAR4_SIZE - 1)) || old == NEW_BASE
        || !(cmd & PCI_COMMAND_MEMORY)) {
        printf("bar-mmap: bar4 unusable 0x%x command 0x%x\n", raw, cmd);
        return 1;
    }
    printf("bar-mmap: testdev 00:%02x.0 bar4 0x%lx\n", dev, old);

    /* b. scratch register and device memory at the assigned address */
    mmio_write32(old, SCRATCH_VALUE);
    write_pattern(old);
    check(old, "pattern", "scratch");
    printf("bar-mmap: wrote %u words at 0x%lx\n", WORDS, old + FIRST_PAGE * PAGE_SIZE);

    /* c. */
    fw_checkpoint(1);

    /* d. move the BAR with memory decode off, as an OS would */
    pci_write16(0, dev, 0, PCI_COMMAND, cmd & ~PCI_COMMAND_MEMORY);
    pci_write32(0, dev, 0, BAR4, NEW_BASE);
    pci_write16(0, dev, 0, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY);
    uint32_t moved = pci_read32(0, dev, 0, BAR4);
    if ((moved & ~0xFu) != NEW_BASE) {
        printf("bar-mmap: bar4 reads 0x%x after the move\n", moved);
        return 1;
    }
    check(NEW_BASE, "moved pattern", "moved scratch");
    uint32_t stale = mmio_read32(old + FIRST_PAGE * PAGE_SIZE);
    if (stale != 0xFFFFFFFFu)
        mismatch("old address", old + FIRST_PAGE * PAGE_SIZE, stale);
    mmio_write64(NEW_BASE + EXTRA_OFFSET, EXTRA_VALUE);
    uint64_t extra = mmio_read64(NEW_BASE + EXTRA_OFFSET);
    if (extra != EXTRA_VALUE)
        mismatch("new word", NEW_BASE + EXTRA_OFFSET, extra);
    printf("bar-mmap: moved to 0x%x ok\n", NEW_BASE);

    /* e. */
    fw_checkpoint(2);

    /* f. extended capabilities, through ECAM */
    unsigned n = walk_ext_caps();
    printf("bar-mmap: %u extended capabilities\n", n);
    return 0;
}
