/* COM1 (8250 UART at 0x3F8) output and a small printf. Lines end in '\n' only. */
#ifndef FW_SERIAL_H
#define FW_SERIAL_H

#include <stdarg.h>

#define COM1_PORT 0x3F8

void putchar_serial(char c);
void puts_serial(const char *s);          /* writes s as is: no newline added */

/* Supported: %d %i %u %x %X %p %s %c %%, flags '0' and '-', a decimal width, and the length
 * modifiers l, ll, z (h and hh are accepted and ignored). %p prints 0x followed by 16 digits. */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);

#endif
