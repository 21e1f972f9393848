/* exits: the exit-cost benchmark. N = inl(0x510) (all-ones, i.e. no harness, means 0), then
 * outl(0x510, i) for i = 0 .. N-1, then debug-exit 0. The loop is four instructions: out, inc,
 * cmp, jne. Prints nothing. */
#include <pyvmmfw.h>

int main(void)
{
    uint32_t n = inl(BENCH_PORT);
    if (n == 0xFFFFFFFF)              /* nothing decodes the port: no harness, no loop */
        n = 0;
    __asm__ volatile(
        "    xorl %%eax, %%eax\n"
        "    testl %[n], %[n]\n"
        "    jz 2f\n"
        "1:  outl %%eax, %%dx\n"
        "    incl %%eax\n"
        "    cmpl %[n], %%eax\n"
        "    jne 1b\n"
        "2:\n"
        :
        : [n] "r"(n), "d"((uint16_t)BENCH_PORT)
        : "eax", "cc", "memory");
    return 0;
}
