/* What the mtty guests share: the kernel's sample mediated serial device (4348:3253), its first
 * port's 16550 registers, finding it on bus 0, and the handler of its INTx, which reads the
 * bytes looped back into the port's receive FIFO. */
#ifndef GUESTS_MTTY_H
#define GUESTS_MTTY_H

#include <pyvmmfw.h>

#define MTTY_VENDOR 0x4348
#define MTTY_DEVICE 0x3253

#define UART_RX  0  /* read: RBR; write: THR; with DLAB: divisor latch low */
#define UART_IER 1  /* with DLAB: divisor latch high */
#define UART_IIR 2  /* read: IIR; write: FCR */
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_SCR 7
#define UART_IER_RDI 0x01
#define UART_FCR_ENABLE 0x01  /* FIFO on, trigger level 1 byte */
#define UART_LCR_8N1 0x03
#define UART_LCR_DLAB 0x80
#define UART_LSR_DR 0x01

#define INTX_VECTOR 0x57

static uint16_t port;  /* the first port's registers (BAR0, I/O) */
static volatile uint32_t irq_count;
static volatile uint8_t got;  /* the last byte the handler read */

static void mtty_irq(struct int_frame *f)
{
    (void)f;
    (void)inb(port + UART_IIR);
    while (inb(port + UART_LSR) & UART_LSR_DR)
        got = inb(port + UART_RX);
    irq_count++;
    lapic_eoi();
}

/* The first mtty function 0 on bus 0, its BAR0 an I/O BAR with I/O decode on: its device number,
 * `port` set; -1 after printing why not ("<who>: no device" or "<who>: bar0 unusable 0x<BAR0>"). */
static int mtty_find(const char *who)
{
    int dev = pci_find_device(MTTY_VENDOR, MTTY_DEVICE);
    if (dev < 0) {
        printf("%s: no device\n", who);
        return -1;
    }
    uint32_t bar0 = pci_read32(0, dev, 0, PCI_BAR0);
    if (!(bar0 & 1) || !(pci_read16(0, dev, 0, PCI_COMMAND) & PCI_COMMAND_IO)) {
        printf("%s: bar0 unusable 0x%x\n", who, bar0);
        return -1;
    }
    port = bar0 & ~3u;
    return dev;
}

#endif
