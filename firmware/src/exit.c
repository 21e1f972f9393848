#include <pyvmmfw.h>

void fw_exit(uint32_t code)
{
    outl(DEBUG_EXIT_PORT, code);
    for (;;) {
        cli();
        hlt();
    }
}

void fw_checkpoint(uint32_t phase)
{
    outl(CHECKPOINT_PORT, phase);
}

void fw_reset(void)
{
    outb(0x64, 0xFE);
    outb(0xCF9, 0x06);
    for (;;) {
        cli();
        hlt();
    }
}
