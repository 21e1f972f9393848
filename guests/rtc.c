/* rtc: reads the CMOS clock the way Linux's mc146818 code does (wait for UIP to clear, read the
 * time, read it again until two reads agree) and prints it, BCD decoded, with the status
 * registers. Exit 0, or 1 if UIP never cleared. */
#include <pyvmmfw.h>

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71

static uint8_t cmos(uint8_t index)
{
    outb(CMOS_INDEX, index);
    return inb(CMOS_DATA);
}

static unsigned bcd(uint8_t v) { return (v >> 4) * 10 + (v & 0xF); }

struct rtc_time {
    uint8_t sec, min, hour, mday, mon, year, century;
};

static void read_time(struct rtc_time *t)
{
    t->sec = cmos(0x00);
    t->min = cmos(0x02);
    t->hour = cmos(0x04);
    t->mday = cmos(0x07);
    t->mon = cmos(0x08);
    t->year = cmos(0x09);
    t->century = cmos(0x32);
}

int main(void)
{
    int tries = 0;
    while (cmos(0x0A) & 0x80) { /* update in progress */
        if (++tries == 1000) {
            printf("rtc: update-in-progress never cleared\n");
            return 1;
        }
    }
    struct rtc_time a, b;
    read_time(&b);
    do {
        a = b;
        read_time(&b);
    } while (a.sec != b.sec || a.min != b.min || a.hour != b.hour || a.mday != b.mday);
    printf("rtc: %u%02u-%02u-%02u %02u:%02u:%02u\n", bcd(b.century), bcd(b.year), bcd(b.mon),
           bcd(b.mday), bcd(b.hour), bcd(b.min), bcd(b.sec));
    printf("rtc: regB=0x%x regD=0x%x\n", cmos(0x0B), cmos(0x0D));
    return 0;
}
