/* The two 8259 PICs (0x20/0x21 and 0xA0/0xA1). */
#ifndef FW_PIC_H
#define FW_PIC_H

#include <stdint.h>

/* Writes 0xFF to both interrupt-mask registers (OCW1). */
void pic_mask_all(void);
/* Re-initialises both PICs (ICW1-4) with vector bases master_base/slave_base (multiples of 8),
 * cascade on IRQ2, then masks every line. After it any stray 8259 interrupt shows up at those
 * vectors instead of looking like a CPU exception. */
void pic_disable(uint8_t master_base, uint8_t slave_base);

#endif
