#include <pyvmmfw.h>

#define PIC1_CMD  0x20
#define PIC1_DATA 0x21
#define PIC2_CMD  0xA0
#define PIC2_DATA 0xA1

void pic_mask_all(void)
{
    outb(PIC1_DATA, 0xFF);
    outb(PIC2_DATA, 0xFF);
}

void pic_disable(uint8_t master_base, uint8_t slave_base)
{
    outb(PIC1_CMD, 0x11);            /* ICW1: edge, cascade, ICW4 follows */
    outb(PIC2_CMD, 0x11);
    outb(PIC1_DATA, master_base);    /* ICW2: vector base */
    outb(PIC2_DATA, slave_base);
    outb(PIC1_DATA, 0x04);           /* ICW3: slave on IRQ2 */
    outb(PIC2_DATA, 0x02);           /*       slave identity 2 */
    outb(PIC1_DATA, 0x01);           /* ICW4: 8086 mode */
    outb(PIC2_DATA, 0x01);
    pic_mask_all();
}
