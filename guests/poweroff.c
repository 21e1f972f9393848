/* poweroff: powers the machine off the ACPI way, writing SLP_TYP(S5) | SLP_EN to the
 * hardware-reduced sleep control register (port 0x3C0), as Linux's poweroff does. See
 * guests/README.md. */
#include <pyvmmfw.h>

#define SLEEP_CONTROL_PORT 0x3C0
#define S5_SLEEP_TYPE      5
#define SLP_EN             0x20

int main(void)
{
    outb(SLEEP_CONTROL_PORT, S5_SLEEP_TYPE << 2 | SLP_EN);
    for (;;) {
        cli();
        hlt();
    }
}
