/* reset: asks the machine to reset (i8042 pulse, then the 0xCF9 reset control register), as a
 * guest rebooting does. See guests/README.md. */
#include <pyvmmfw.h>

int main(void)
{
    fw_reset();
    return 1;
}
