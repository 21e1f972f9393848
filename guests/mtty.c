/* mtty: the kernel's sample mediated serial device (samples/vfio-mdev/mtty.c, 4348:3253),
 * passed through by the VMM: its first port's 16550 registers in an I/O BAR (trapped by the VMM:
 * every access goes to the device through the VFIO fd) and its interrupt, INTx only (mtty has no
 * MSI capability), which mtty masks each time it fires and does not let be unmasked by eventfd.
 * What is written to the port's TX comes back on its RX: each round writes one byte, waits for
 * the data-ready interrupt and reads the byte back in the handler. The protocol is in
 * guests/README.md. */
#include "mtty.h"

#define TICK_VECTOR 0x30
#define TICK_US     10000u
#define ROUNDS      3u
#define IRQ_TICKS   300u  /* 3 s for the interrupt */
#define GAP_TICKS   5u    /* between rounds: the VMM re-arms mtty's INTx after the EOI */

int main(void)
{
    idt_init();
    pic_disable(0x20, 0x28);
    lapic_enable();

    int dev = mtty_find("mtty");
    if (dev < 0)
        return 1;
    uint8_t pin = pci_read8(0, dev, 0, PCI_INTERRUPT_PIN);
    uint8_t line = pci_read8(0, dev, 0, PCI_INTERRUPT_LINE);
    printf("mtty: 00:%02x.0 bar0 io 0x%x irq pin %u line %u\n", dev, port, pin, line);
    if (pin < 1 || pin > 4 || line >= ioapic_pins()) {
        printf("mtty: no usable INTx (pin %u line %u)\n", pin, line);
        return 1;
    }

    idt_register(INTX_VECTOR, mtty_irq);
    lapic_tick_start(TICK_VECTOR, TICK_US);
    ioapic_route(line, INTX_VECTOR, lapic_id(), IOAPIC_LEVEL);
    outb(port + UART_LCR, UART_LCR_8N1);
    outb(port + UART_IIR, UART_FCR_ENABLE);
    outb(port + UART_IER, UART_IER_RDI);

    for (unsigned k = 1; k <= ROUNDS; k++) {
        uint8_t byte = (uint8_t)('a' + k - 1);
        uint32_t before = irq_count;
        outb(port + UART_RX, byte);
        if (lapic_tick_wait(&irq_count, before + 1, IRQ_TICKS) < 0) {
            printf("mtty: round %u failed: no interrupt\n", k);
            return 1;
        }
        if (got != byte) {
            printf("mtty: round %u failed: read 0x%x, wrote 0x%x\n", k, got, byte);
            return 1;
        }
        printf("mtty: round %u got %c\n", k, got);
        lapic_tick_sleep(GAP_TICKS);
        if (irq_count != before + 1) {
            printf("mtty: round %u failed: %u interrupts\n", k, irq_count - before);
            return 1;
        }
    }
    lapic_tick_stop();
    printf("mtty: done\n");
    return 0;
}
