/* What the edu guests share: QEMU's educational PCI device (1234:11e8, hw/misc/edu.c,
 * docs/specs/edu.rst), its BAR0 registers, finding it on bus 0, polling a register bounded by
 * the LAPIC tick, and a DMA between its 4 KiB buffer and a bus address. */
#ifndef GUESTS_EDU_H
#define GUESTS_EDU_H

#include <pyvmmfw.h>

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11E8

/* BAR0 registers (32-bit accesses; the device ignores other sizes below 0x80). */
#define EDU_ID          0x00    /* 0xRRrr00ed: major RR, minor rr */
#define EDU_LIVENESS    0x04    /* reads back the complement of what was written */
#define EDU_FACTORIAL   0x08    /* write n, read n! when STATUS_COMPUTING is clear */
#define EDU_STATUS      0x20
#define EDU_STATUS_COMPUTING 0x01
#define EDU_STATUS_IRQFACT   0x80  /* raise FACT_IRQ when the factorial is done */
#define EDU_IRQ_STATUS  0x24
#define EDU_IRQ_RAISE   0x60    /* irq status |= value, interrupt */
#define EDU_IRQ_ACK     0x64    /* irq status &= ~value; INTx drops when it reaches 0 */
#define EDU_DMA_SRC     0x80    /* a 32-bit write sets the whole 64-bit address (top half 0) */
#define EDU_DMA_DST     0x88
#define EDU_DMA_COUNT   0x90
#define EDU_DMA_CMD     0x98
#define EDU_DMA_RUN     0x1     /* cleared by the device when done (100 ms after the start) */
#define EDU_DMA_TO_RAM  0x2     /* direction: 1 = edu buffer -> RAM, 0 = RAM -> edu buffer */
#define EDU_DMA_IRQ     0x4
#define EDU_FACT_IRQ    0x00000001
#define EDU_ID_V1       0x010000EDu

#define EDU_BUFFER      0x40000u  /* the device's 4 KiB DMA buffer, as a DMA address */
#define EDU_DMA_LIMIT   (1u << 28) /* the device's DMA mask is 28 bits */
#define EDU_QUICK_POLLS 16u       /* back-to-back reads before halting between polls */
#define EDU_DMA_TICKS   500u      /* 5 s at a 10 ms tick for a DMA (the device takes 100 ms) */

static uintptr_t bar0;

static uint32_t edu_read(uint32_t reg)
{
    return mmio_read32(bar0 + reg);
}

static void edu_write(uint32_t reg, uint32_t v)
{
    mmio_write32(bar0 + reg, v);
}

/* The device number of the edu on bus 0, its BAR0 in `bar0`; -1 if there is none. */
static int edu_find(void)
{
    int found = pci_find_device(EDU_VENDOR, EDU_DEVICE);
    if (found >= 0)
        bar0 = pci_bar_address(0, (uint8_t)found, 0, 0);
    return found;
}

/* Reads reg until (value & mask) == want: EDU_QUICK_POLLS reads back to back, then one read per
 * tick for at most max_ticks ticks (interrupts off; sti; hlt between). Returns 0 and the last
 * value in *last, or -1 on the time-out. */
static int edu_poll(uint32_t reg, uint32_t mask, uint32_t want, uint32_t max_ticks,
                    uint32_t *last)
{
    for (unsigned i = 0; i < EDU_QUICK_POLLS; i++) {
        *last = edu_read(reg);
        if ((*last & mask) == want)
            return 0;
    }
    uint32_t start = lapic_ticks;
    for (;;) {
        *last = edu_read(reg);
        if ((*last & mask) == want)
            return 0;
        if (lapic_ticks - start >= max_ticks)
            return -1;
        sti_hlt();
        cli();
    }
}

/* One DMA of `bytes` from src to dst (bus addresses; `cmd` EDU_DMA_TO_RAM or 0), waited for.
 * Returns 0, or -1 if it still ran after EDU_DMA_TICKS (the last command in *last). */
static int edu_dma(uint32_t src, uint32_t dst, uint32_t bytes, uint32_t cmd, uint32_t *last)
{
    edu_write(EDU_DMA_SRC, src);
    edu_write(EDU_DMA_DST, dst);
    edu_write(EDU_DMA_COUNT, bytes);
    edu_write(EDU_DMA_CMD, cmd | EDU_DMA_RUN);
    return edu_poll(EDU_DMA_CMD, EDU_DMA_RUN, 0, EDU_DMA_TICKS, last);
}

#endif
