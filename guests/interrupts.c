/* interrupts: an MSI to vector 0x40, then IOAPIC pin 10 to vector 0x41, both raised by the host.
 * See guests/README.md for the protocol. */
#include <pyvmmfw.h>

#define MSI_VECTOR    0x40
#define IOAPIC_VECTOR 0x41
#define IOAPIC_PIN    10

static volatile uint32_t msi_count;
static volatile uint32_t ioapic_count;

static void msi_handler(struct int_frame *f)
{
    (void)f;
    msi_count++;
    lapic_eoi();
}

static void ioapic_handler(struct int_frame *f)
{
    (void)f;
    ioapic_count++;
    lapic_eoi();
}

/* Halts until *count is non-zero. Interrupts are off while the count is checked, and STI;HLT
 * re-enables them atomically with the halt, so a wake-up can't slip in between. */
static void wait_for(volatile uint32_t *count)
{
    cli();
    while (*count == 0) {
        sti_hlt();
        cli();
    }
    sti();
}

int main(void)
{
    idt_init();
    idt_register(MSI_VECTOR, msi_handler);
    idt_register(IOAPIC_VECTOR, ioapic_handler);
    pic_disable(0x20, 0x28);
    lapic_enable();
    ioapic_route(IOAPIC_PIN, IOAPIC_VECTOR, (uint8_t)lapic_id(), 0);
    sti();

    printf("interrupts: ready\n");
    wait_for(&msi_count);
    printf("msi: vector 0x%x count %u\n", MSI_VECTOR, msi_count);
    wait_for(&ioapic_count);
    printf("ioapic: vector 0x%x count %u\n", IOAPIC_VECTOR, ioapic_count);
    return 0;
}
