/* mtty-state: an mtty's own state across a snapshot or a migration (VFIO device migration).
 * The guest programs the first port of a passed-through mtty (line settings, modem control,
 * scratch) and leaves a pattern in flight in its FIFO (mtty loops TX into RX; with the
 * receive interrupt off, nothing takes it out), says so, and waits with its vCPU halted until
 * the VMM sets the word at GO_ADDR. Then it reads the registers and the FIFO back, which only
 * the device's own saved state can give (a reset mtty has LCR 0 and an empty FIFO), and proves
 * the device keeps working: one byte looped back with its INTx taken. The protocol is in
 * guests/README.md. */
#include "mtty.h"

#define LINE_SETTINGS 0x1b  /* 8 data bits, even parity, 1 stop bit */
#define MODEM_CONTROL 0x0b  /* DTR, RTS, OUT2 */
#define SCRATCH       0xa5
#define DIVISOR       12    /* 9600 baud */
#define PATTERN       "pyvmm-42"
#define PATTERN_LEN   8

#define GO_ADDR     0x2000000UL  /* 32 MiB: the VMM writes a non-zero word here to go on */
#define TICK_VECTOR 0x30
#define TICK_US     10000u
#define IRQ_TICKS   300u  /* 3 s for the interrupt */

static void print_registers(const char *when)
{
    printf("mtty-state: %s lcr 0x%x mcr 0x%x scr 0x%x lsr 0x%x\n", when,
           inb(port + UART_LCR), inb(port + UART_MCR), inb(port + UART_SCR),
           inb(port + UART_LSR));
}

int main(void)
{
    idt_init();
    pic_disable(0x20, 0x28);
    lapic_enable();

    int dev = mtty_find("mtty-state");
    if (dev < 0)
        return 1;
    uint8_t line = pci_read8(0, dev, 0, PCI_INTERRUPT_LINE);
    if (line >= ioapic_pins()) {
        printf("mtty-state: no usable INTx (line %u)\n", line);
        return 1;
    }
    idt_register(INTX_VECTOR, mtty_irq);
    ioapic_route(line, INTX_VECTOR, lapic_id(), IOAPIC_LEVEL);

    outb(port + UART_LCR, UART_LCR_DLAB);
    outb(port + UART_RX, DIVISOR & 0xff);
    outb(port + UART_IER, DIVISOR >> 8);
    outb(port + UART_LCR, LINE_SETTINGS);
    outb(port + UART_IIR, UART_FCR_ENABLE);
    outb(port + UART_IER, 0);
    outb(port + UART_MCR, MODEM_CONTROL);
    outb(port + UART_SCR, SCRATCH);
    for (unsigned i = 0; i < PATTERN_LEN; i++)
        outb(port + UART_RX, (uint8_t)PATTERN[i]);
    print_registers("before");
    printf("mtty-state: ready\n");

    lapic_tick_start(TICK_VECTOR, TICK_US);
    while (!*(volatile uint32_t *)GO_ADDR)
        sti_hlt();  /* woken by each tick */
    cli();

    print_registers("after");
    char pattern[17];
    unsigned n = 0;
    while (n < 16 && (inb(port + UART_LSR) & UART_LSR_DR))
        pattern[n++] = (char)inb(port + UART_RX);
    pattern[n] = 0;
    printf("mtty-state: fifo '%s'\n", pattern);

    outb(port + UART_IER, UART_IER_RDI);
    uint32_t before = irq_count;
    outb(port + UART_RX, 'z');
    if (lapic_tick_wait(&irq_count, before + 1, IRQ_TICKS) < 0) {
        printf("mtty-state: no interrupt\n");
        return 1;
    }
    printf("mtty-state: looped back %c\n", got);
    lapic_tick_stop();
    printf("mtty-state: done\n");
    return 0;
}
