/* edu: QEMU's educational PCI device (1234:11e8, hw/misc/edu.c, docs/specs/edu.rst) passed
 * through by the VMM: BAR0 registers (id, liveness, factorial), DMA to and from its 4 KiB buffer,
 * then its interrupt through MSI and through INTx (level, IOAPIC). Two host checkpoints; the exact
 * protocol is in guests/README.md.
 *
 * Waits are bounded in time by a 10 ms LAPIC-timer tick (in-kernel under KVM: no VMM exits): the
 * guest keeps interrupts off and halts with sti; hlt between polls, so each wake-up is a tick or
 * the device's interrupt. */
#include "edu.h"

#define DMA_BYTES       4096u
#define DMA_WORDS       (DMA_BYTES / 8)

#define TICK_VECTOR     0x30
#define TICK_US         10000u    /* 10 ms */
#define MSI_VECTOR      0x55
#define INTX_VECTOR     0x56
#define ROUNDS          3u
#define IRQ_TICKS       300u      /* 3 s for an interrupt to arrive */
#define POLL_TICKS      300u      /* 3 s for a factorial */

static uint8_t dev;
static uint64_t buf_a[DMA_WORDS] __attribute__((aligned(4096)));
static uint64_t buf_b[DMA_WORDS] __attribute__((aligned(4096)));

static volatile uint32_t irq_count;
static volatile uint32_t irq_status;   /* what the handler last read from EDU_IRQ_STATUS */

static void __attribute__((noreturn, format(printf, 1, 2))) fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    puts_serial("edu: ");
    vprintf(fmt, ap);
    va_end(ap);
    puts_serial("\n");
    fw_exit(1);
}

/* MSI and INTx alike: read the cause, acknowledge it in the device (for INTx that drops the
 * line, which must happen before the EOI: the VMM re-arms INTx on the EOI), count, EOI. */
static void edu_irq(struct int_frame *f)
{
    (void)f;
    uint32_t status = edu_read(EDU_IRQ_STATUS);
    edu_write(EDU_IRQ_ACK, status);
    irq_status = status;
    irq_count++;
    lapic_eoi();
}

static void factorial(uint32_t n, uint32_t want)
{
    uint32_t status;
    edu_write(EDU_FACTORIAL, n);
    if (edu_poll(EDU_STATUS, EDU_STATUS_COMPUTING, 0, POLL_TICKS, &status) < 0)
        fail("factorial failed: %u! still computing, status 0x%x", n, status);
    uint32_t got = edu_read(EDU_FACTORIAL);
    if (got != want)
        fail("factorial failed: %u! = %u, not %u", n, got, want);
    printf("edu: factorial %u! = %u\n", n, got);
}

static void dma(uint32_t src, uint32_t dst, uint32_t cmd)
{
    uint32_t last;
    if (edu_dma(src, dst, DMA_BYTES, cmd, &last) < 0)
        fail("dma failed: 0x%x -> 0x%x still running after %u ticks, command 0x%x", src, dst,
             EDU_DMA_TICKS, last);
}

static uint64_t pattern(unsigned i)
{
    return 0x0123456789ABCDEFULL ^ ((uint64_t)i * 0x9E3779B97F4A7C15ULL);
}

/* One interrupt round: raise `value`, halt until the handler has run once more, check what it
 * read. kind names the path in the lines ("msi", "intx"). */
static void irq_round(const char *kind, unsigned k, uint32_t value)
{
    uint32_t before = irq_count;
    edu_write(EDU_IRQ_RAISE, value);
    if (lapic_tick_wait(&irq_count, before + 1, IRQ_TICKS) < 0)
        fail("%s failed: round %u: no interrupt in %u ticks (irq status 0x%x)", kind, k,
             IRQ_TICKS, edu_read(EDU_IRQ_STATUS));
    if (irq_count != before + 1 || irq_status != value)
        fail("%s failed: round %u: %u interrupts, status 0x%x (raised 0x%x)", kind, k,
             irq_count - before, irq_status, value);
    printf("edu: %s %u status 0x%x\n", kind, k, irq_status);
}

int main(void)
{
    idt_init();
    pic_disable(0x20, 0x28);
    lapic_enable();

    /* a. find it */
    int found = edu_find();
    if (found < 0) {
        printf("edu: no device\n");
        return 1;
    }
    dev = (uint8_t)found;
    uint32_t bar = pci_read32(0, dev, 0, PCI_BAR0);
    uint16_t cmd = pci_read16(0, dev, 0, PCI_COMMAND);
    if ((bar & 1) || bar0 == 0 || !(cmd & PCI_COMMAND_MEMORY))
        fail("bar0 failed: 0x%x command 0x%x", bar, cmd);
    uint8_t pin = pci_read8(0, dev, 0, PCI_INTERRUPT_PIN);
    uint8_t line = pci_read8(0, dev, 0, PCI_INTERRUPT_LINE);
    printf("edu: 00:%02x.0 bar0 0x%lx irq pin %u line %u\n", dev, bar0, pin, line);

    idt_register(MSI_VECTOR, edu_irq);
    idt_register(INTX_VECTOR, edu_irq);
    lapic_tick_start(TICK_VECTOR, TICK_US);
    cli();

    /* b. id and liveness */
    uint32_t id = edu_read(EDU_ID);
    if (id != EDU_ID_V1)
        fail("id failed: 0x%x", id);
    static const uint32_t live[] = { 0x00000000u, 0xFFFFFFFFu, 0x12345678u, 0xA5A55A5Au };
    for (unsigned i = 0; i < sizeof(live) / sizeof(live[0]); i++) {
        edu_write(EDU_LIVENESS, live[i]);
        uint32_t got = edu_read(EDU_LIVENESS);
        if (got != ~live[i])
            fail("liveness failed: wrote 0x%x read 0x%x", live[i], got);
    }
    printf("edu: id 0x%x liveness ok\n", id);

    /* c. factorial, polling */
    factorial(5, 120);
    factorial(10, 3628800);

    /* d. DMA: A -> edu buffer -> B */
    uintptr_t a = (uintptr_t)buf_a, b = (uintptr_t)buf_b;
    if (a + DMA_BYTES > EDU_DMA_LIMIT || b + DMA_BYTES > EDU_DMA_LIMIT)
        fail("dma failed: buffers at 0x%lx and 0x%lx, not below 256M", a, b);
    for (unsigned i = 0; i < DMA_WORDS; i++) {
        buf_a[i] = pattern(i);
        buf_b[i] = ~0ULL;
    }
    pci_write16(0, dev, 0, PCI_COMMAND, cmd | PCI_COMMAND_MASTER);
    dma((uint32_t)a, EDU_BUFFER, 0);
    dma(EDU_BUFFER, (uint32_t)b, EDU_DMA_TO_RAM);
    volatile uint64_t *vb = buf_b;
    for (unsigned i = 0; i < DMA_WORDS; i++) {
        uint64_t got = vb[i];
        if (got != pattern(i))
            fail("dma failed: word %u of 0x%lx is 0x%lx, not 0x%lx", i, b, got, pattern(i));
    }
    printf("edu: dma %u bytes ok\n", DMA_BYTES);

    /* e. MSI */
    fw_checkpoint(1);
    uint8_t msi = pci_find_cap(0, dev, 0, PCI_CAP_ID_MSI, 0);
    if (!msi) {
        printf("edu: no msi capability\n");
        return 1;
    }
    pci_msi_enable(0, dev, 0, msi, (uint8_t)lapic_id(), MSI_VECTOR);
    for (unsigned k = 1; k <= ROUNDS; k++)
        irq_round("msi", k, 0x10u << (k - 1));          /* 0x10, 0x20, 0x40 */
    pci_msi_disable(0, dev, 0, msi);

    /* f. INTx, level triggered, through the IOAPIC pin in PCI_INTERRUPT_LINE */
    fw_checkpoint(2);
    if (pin < 1 || pin > 4 || line >= ioapic_pins())
        fail("intx failed: pin %u line %u (%u IOAPIC pins)", pin, line, ioapic_pins());
    cmd = pci_read16(0, dev, 0, PCI_COMMAND);
    if (cmd & PCI_COMMAND_INTX_DISABLE)
        pci_write16(0, dev, 0, PCI_COMMAND, cmd & ~PCI_COMMAND_INTX_DISABLE);
    ioapic_route(line, INTX_VECTOR, (uint8_t)lapic_id(), IOAPIC_LEVEL);
    for (unsigned k = 1; k <= ROUNDS; k++)
        irq_round("intx", k, 0x1000u << (k - 1));       /* 0x1000, 0x2000, 0x4000 */

    /* the factorial's own interrupt (FACT_IRQ) through INTx */
    uint32_t before = irq_count, status;
    edu_write(EDU_STATUS, EDU_STATUS_IRQFACT);
    edu_write(EDU_FACTORIAL, 6);
    if (lapic_tick_wait(&irq_count, before + 1, IRQ_TICKS) < 0)
        fail("factorial irq failed: no interrupt in %u ticks, status 0x%x", IRQ_TICKS,
             edu_read(EDU_STATUS));
    if (irq_count != before + 1 || irq_status != EDU_FACT_IRQ)
        fail("factorial irq failed: %u interrupts, irq status 0x%x", irq_count - before,
             irq_status);
    if (edu_poll(EDU_STATUS, EDU_STATUS_COMPUTING, 0, POLL_TICKS, &status) < 0
        || edu_read(EDU_FACTORIAL) != 720)
        fail("factorial irq failed: status 0x%x, 6! = %u", status, edu_read(EDU_FACTORIAL));
    edu_write(EDU_STATUS, 0);
    printf("edu: factorial irq ok\n");

    /* g. */
    ioapic_mask(line);
    lapic_tick_stop();
    printf("edu: done\n");
    return 0;
}
