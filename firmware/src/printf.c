/* A small printf onto COM1. Numbers are formatted with shifts for hex and one 64-bit divide per
 * digit for decimal; nothing here needs libgcc. */
#include <pyvmmfw.h>

struct out {
    int count;
};

static void emit(struct out *o, char c)
{
    putchar_serial(c);
    o->count++;
}

static void emit_padded(struct out *o, const char *s, int len, int width, int left, char pad)
{
    if (!left && pad == '0' && (*s == '-') && len > 0) {
        /* sign goes before the zeros */
        emit(o, *s++);
        len--;
        width--;
    }
    if (!left) {
        for (int i = len; i < width; i++)
            emit(o, pad);
    }
    for (int i = 0; i < len; i++)
        emit(o, s[i]);
    if (left) {
        for (int i = len; i < width; i++)
            emit(o, ' ');
    }
}

/* Writes the digits of v in base 16 or 10 at the end of buf[24]; returns the first index. */
static int format_unsigned(char *buf, uint64_t v, int base, int upper)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    int i = 24;
    do {
        if (base == 16) {
            buf[--i] = digits[v & 0xF];
            v >>= 4;
        } else {
            buf[--i] = digits[v % 10];
            v /= 10;
        }
    } while (v);
    return i;
}

int vprintf(const char *fmt, va_list ap)
{
    struct out o = { 0 };
    char buf[26];

    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            emit(&o, *fmt);
            continue;
        }
        fmt++;
        int left = 0;
        char pad = ' ';
        for (;; fmt++) {
            if (*fmt == '-')
                left = 1;
            else if (*fmt == '0')
                pad = '0';
            else
                break;
        }
        int width = 0;
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        int lng = 0;
        for (;; fmt++) {
            if (*fmt == 'l' || *fmt == 'z')
                lng = 1;
            else if (*fmt != 'h')
                break;
        }

        uint64_t u;
        int64_t s;
        int i;
        switch (*fmt) {
        case 'd':
        case 'i':
            s = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            u = s < 0 ? (uint64_t)0 - (uint64_t)s : (uint64_t)s;
            i = format_unsigned(buf, u, 10, 0);
            if (s < 0)
                buf[--i] = '-';
            emit_padded(&o, buf + i, 24 - i, width, left, pad);
            break;
        case 'u':
        case 'x':
        case 'X':
            u = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned int);
            i = format_unsigned(buf, u, *fmt == 'u' ? 10 : 16, *fmt == 'X');
            emit_padded(&o, buf + i, 24 - i, width, left, pad);
            break;
        case 'p':
            u = (uint64_t)(uintptr_t)va_arg(ap, void *);
            i = format_unsigned(buf, u, 16, 0);
            while (i > 8)
                buf[--i] = '0';
            buf[--i] = 'x';
            buf[--i] = '0';
            emit_padded(&o, buf + i, 24 - i, width, left, ' ');
            break;
        case 's': {
            const char *str = va_arg(ap, const char *);
            if (!str)
                str = "(null)";
            emit_padded(&o, str, (int)strlen(str), width, left, ' ');
            break;
        }
        case 'c':
            buf[0] = (char)va_arg(ap, int);
            emit_padded(&o, buf, 1, width, left, ' ');
            break;
        case '%':
            emit(&o, '%');
            break;
        case '\0':
            return o.count;
        default:
            emit(&o, '%');
            emit(&o, *fmt);
            break;
        }
    }
    return o.count;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}
