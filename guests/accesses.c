/* accesses: every kind of access the exit loop decodes, checked from both sides.
 *
 * The harness (tests/test_exit_loop.py) claims ports SCRATCH_PORT..+7 and SCRATCH_MMIO..+15 with
 * a device whose reads answer pattern(offset, size) and which records every write; nothing
 * claims UNCLAIMED_PORT and UNCLAIMED_MMIO, whose reads must be all-ones. The guest checks
 * what it reads, the harness checks what was written, in order. Exits 0, or the number of the
 * first failed check. */
#include <pyvmmfw.h>

#define SCRATCH_PORT 0x520
#define UNCLAIMED_PORT 0x530
#define SCRATCH_MMIO 0xF8000000UL
#define UNCLAIMED_MMIO 0xF8100000UL

static uint64_t pattern(uint64_t offset, unsigned size)
{
    uint64_t value = 0x8877665544332211ULL + offset * 0x0101010101010101ULL;
    return size == 8 ? value : value & ((1ULL << (8 * size)) - 1);
}

static int failed;
static int check_number;

static void check(uint64_t got, uint64_t expected)
{
    check_number++;
    if (got != expected && !failed) {
        printf("accesses: check %d: read %lx, expected %lx\n", check_number, got, expected);
        failed = check_number;
    }
}

int main(void)
{
    /* port writes of each size, then a string write of bytes and one of words */
    outb(SCRATCH_PORT + 1, 0x5A);
    outw(SCRATCH_PORT + 2, 0xA55A);
    outl(SCRATCH_PORT + 4, 0xDEADBEEF);
    static const uint8_t bytes[3] = {1, 2, 3};
    static const uint16_t words[2] = {0x1234, 0x5678};
    const void *from = bytes;
    uint64_t n = 3;
    __asm__ volatile("rep outsb" : "+S"(from), "+c"(n) : "d"((uint16_t)SCRATCH_PORT) : "memory");
    from = words;
    n = 2;
    __asm__ volatile("rep outsw" : "+S"(from), "+c"(n) : "d"((uint16_t)(SCRATCH_PORT + 2))
                     : "memory");

    /* port reads of each size, and a string read */
    check(inb(SCRATCH_PORT + 1), pattern(1, 1));
    check(inw(SCRATCH_PORT + 2), pattern(2, 2));
    check(inl(SCRATCH_PORT + 4), pattern(4, 4));
    uint32_t dwords[3] = {0, 0, 0};
    void *to = dwords;
    n = 3;
    __asm__ volatile("rep insl" : "+D"(to), "+c"(n) : "d"((uint16_t)(SCRATCH_PORT + 4))
                     : "memory");
    for (int i = 0; i < 3; i++)
        check(dwords[i], pattern(4, 4));

    /* nothing decodes these: all-ones, single and string */
    check(inb(UNCLAIMED_PORT), 0xFF);
    check(inw(UNCLAIMED_PORT), 0xFFFF);
    check(inl(UNCLAIMED_PORT), 0xFFFFFFFF);
    uint16_t unclaimed[2] = {0, 0};
    to = unclaimed;
    n = 2;
    __asm__ volatile("rep insw" : "+D"(to), "+c"(n) : "d"((uint16_t)UNCLAIMED_PORT) : "memory");
    check(unclaimed[0], 0xFFFF);
    check(unclaimed[1], 0xFFFF);
    outl(UNCLAIMED_PORT, 1); /* (a write nothing decodes is dropped) */

    /* MMIO writes and reads of each size */
    mmio_write8(SCRATCH_MMIO + 1, 0x11);
    mmio_write16(SCRATCH_MMIO + 2, 0x2222);
    mmio_write32(SCRATCH_MMIO + 4, 0x33333333);
    mmio_write64(SCRATCH_MMIO + 8, 0x4444444455555555ULL);
    check(mmio_read8(SCRATCH_MMIO + 1), pattern(1, 1));
    check(mmio_read16(SCRATCH_MMIO + 2), pattern(2, 2));
    check(mmio_read32(SCRATCH_MMIO + 4), pattern(4, 4));
    check(mmio_read64(SCRATCH_MMIO + 8), pattern(8, 8));
    check(mmio_read8(UNCLAIMED_MMIO), 0xFF);
    check(mmio_read16(UNCLAIMED_MMIO), 0xFFFF);
    check(mmio_read32(UNCLAIMED_MMIO), 0xFFFFFFFF);
    check(mmio_read64(UNCLAIMED_MMIO), 0xFFFFFFFFFFFFFFFFULL);
    if (!failed)
        printf("accesses: %d checks ok\n", check_number);
    return failed;
}
