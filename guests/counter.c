/* counter: counts forever in r12, storing the count to guest-physical 0x1F00000 after every
 * increment and printing it every 1024 increments; for the VMM's pause/resume tests. Never exits.
 *
 * r12 belongs to the count in this whole file: a global register variable, so gcc allocates it
 * to nothing else here. The only code the loop calls is counter_report() below, which writes the
 * UART itself rather than through the runtime (whose code is not under that rule), so r12 holds
 * the count at every instruction boundary, also in the middle of printing. */
#include <pyvmmfw.h>

#define COUNTER_ADDR 0x1F00000UL
#define RAM_NEEDED   0x2000000UL      /* 32 MiB: the counter's page is the last but 256 */

register uint64_t count __asm__("r12");

/* putchar_serial's protocol (firmware/README.md): poll LSR.THRE at most 1000 times, write THR. */
static void out_char(char c)
{
    for (int i = 0; i < 1000; i++) {
        if (inb(COM1_PORT + 5) & 0x20)
            break;
    }
    outb(COM1_PORT, (uint8_t)c);
}

/* Called from the loop below with RSP 16-byte aligned (the SysV ABI at a call); prints
 * "count <r12, decimal>\n". */
void counter_report(void) __attribute__((used, noinline));
void counter_report(void)
{
    char line[32];
    char *p = line + sizeof(line);
    uint64_t v = count;

    *--p = '\n';
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    const char *prefix = "count ";
    for (unsigned i = 6; i-- > 0;)
        *--p = prefix[i];
    while (p < line + sizeof(line))
        out_char(*p++);
}

int main(void)
{
    idt_init();                       /* report any exception instead of triple-faulting */
    extern char __image_end[];
    if ((uintptr_t)__image_end > COUNTER_ADDR) {
        printf("counter: image overlaps 0x%lx\n", COUNTER_ADDR);
        return 2;
    }
    if (fw_ram_bytes < RAM_NEEDED) {
        printf("counter: need at least %luM of RAM\n", RAM_NEEDED >> 20);
        return 1;
    }
    printf("counter: at 0x%lx in r12\n", COUNTER_ADDR);

    /* Never returns. RSP is aligned once (nothing of main's frame is used after this). The
     * first store makes the page hold the count (0) before the first increment. */
    __asm__ volatile(
        "andq   $-16, %%rsp\n\t"
        "xorl   %%r12d, %%r12d\n\t"
        "movq   %%r12, %c[addr]\n"
        "1:\n\t"
        "incq   %%r12\n\t"
        "movq   %%r12, %c[addr]\n\t"
        "testq  $0x3ff, %%r12\n\t"
        "jnz    1b\n\t"
        "call   counter_report\n\t"
        "jmp    1b"
        :
        : [addr] "i"(COUNTER_ADDR)
        : "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory", "cc");
    __builtin_unreachable();
}
