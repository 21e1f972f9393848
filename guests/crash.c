/* crash: prints a line, then executes ud2 with no IDT loaded (the boot IDT's limit is 0), so the
 * #UD cannot be delivered: #GP, then #DF, then a triple fault. See guests/README.md. */
#include <pyvmmfw.h>

int main(void)
{
    printf("crash: about to fault\n");
    __asm__ volatile("ud2");
    return 1;
}
