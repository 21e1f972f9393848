#include <pyvmmfw.h>

#define LSR (COM1_PORT + 5)
#define LSR_THRE 0x20

void putchar_serial(char c)
{
    /* Poll THRE, but give up after a while rather than hang on a UART that never reports it. */
    for (int i = 0; i < 1000; i++) {
        if (inb(LSR) & LSR_THRE)
            break;
    }
    outb(COM1_PORT, (uint8_t)c);
}

void puts_serial(const char *s)
{
    while (*s)
        putchar_serial(*s++);
}
