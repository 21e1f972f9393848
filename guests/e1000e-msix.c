/* e1000e-msix: MSI-X delivery and per-vector masking through QEMU's e1000e (Intel 82574L,
 * 8086:10d3) passed through by the VMM. Nothing of networking: each of the five MSI-X vectors is
 * fired by setting its interrupt cause in ICS. The exact protocol is in guests/README.md.
 *
 * How QEMU's e1000e (hw/net/e1000e_core.c) turns an ICS write into an MSI-X message, and what
 * that means for the set-up below:
 *  - e1000e_set_ics -> e1000e_set_interrupt_cause -> e1000e_raise_interrupts(ICR, causes): ICR |=
 *    causes, then only the causes that are newly pending (IMS & ICR & ~(IMS & ICR before)) are
 *    sent, through e1000e_msix_notify when MSI-X is enabled in config space (msix_enabled()).
 *    So a cause fires again only after its ICR bit was cleared: the handler clears it.
 *  - e1000e_msix_notify sends one message per cause on the vector IVAR names for it: RxQ0 bits
 *    3:0, RxQ1 7:4, TxQ0 11:8, TxQ1 15:12, Other 19:16; bit 3 of each nibble is the valid bit,
 *    bits 2:0 the MSI-X entry. A cause whose nibble is not valid sends nothing.
 *  - After sending, e1000e_msix_notify_one auto-clears the cause from ICR if it is in EIAC, and
 *    from IMS as well unless CTRL_EXT.IAME; with CTRL_EXT.EIAME it clears the cause from IAM.
 *    EIAC stays 0 here (and IAME, EIAME clear, as after reset): the cause stays in ICR until the
 *    handler clears it, so the handler can tell a message for a cause from one without.
 *  - CTRL_EXT.PBA_CLR (PBA_support) only makes IMS writes clear the device's own MSI-X pending
 *    bits (e1000e_set_ims -> e1000e_msix_clear); left clear: IMS is written once, and the PBA
 *    this guest reads is the VMM's.
 *  - EITR: the reset value is 500 (128 us) and e1000e_set_eitr never stores less, so every
 *    message arms a throttling timer; in QEMU 10.0 its expiry (e1000e_intrmgr_on_msix_throttling_
 *    timer) sends the vector once more whether or not a cause is pending. The handler therefore
 *    reads ICS (which mirrors ICR without ICR's clear-on-read) and counts only a message whose
 *    cause is set, then writes that bit to ICR (write 1 to clear); a message with no cause is
 *    counted as unclaimed.
 *  - CTRL.RST (e1000e_set_ctrl -> e1000e_reset) resets the registers at once and self-clears. */
#include <pyvmmfw.h>

#define E1000E_VENDOR 0x8086
#define E1000E_DEVICE 0x10D3

/* BAR0 registers, 32-bit accesses */
#define E1000_CTRL     0x0000
#define E1000_CTRL_RST 0x04000000u
#define E1000_CTRL_EXT 0x0018
#define E1000_ICR      0x00C0  /* cause read; write 1 to clear */
#define E1000_ICS      0x00C8  /* cause set; reads as ICR without clearing it */
#define E1000_IMS      0x00D0  /* mask set (enable) */
#define E1000_IMC      0x00D8  /* mask clear (disable) */
#define E1000_EIAC     0x00DC  /* MSI-X auto-clear of causes */
#define E1000_IVAR     0x00E4  /* cause -> MSI-X entry */
#define E1000_ICR_RXQ0  0x00100000u
#define E1000_ICR_RXQ1  0x00200000u
#define E1000_ICR_TXQ0  0x00400000u
#define E1000_ICR_TXQ1  0x00800000u
#define E1000_ICR_OTHER 0x01000000u
#define IVAR_VALID      0x8u

#define VECTORS        5u
#define FIRST_VECTOR   0x60u     /* entry i -> IDT vector 0x60 + i */
#define MASKED_ENTRY   2u
#define TICK_VECTOR    0x30
#define TICK_US        10000u    /* 10 ms */
#define IRQ_TICKS      300u      /* 3 s for a message to arrive */
#define SETTLE_TICKS   2u        /* 20 ms for a stray second message to show up */
#define MASKED_TICKS   20u       /* 200 ms masked: a message in that time would have arrived */
#define RESET_POLLS    1000u

/* Entry i's cause: RxQ0, RxQ1, TxQ0, TxQ1, Other; IVAR maps each to entry i. */
static const uint32_t cause[VECTORS] = {
    E1000_ICR_RXQ0, E1000_ICR_RXQ1, E1000_ICR_TXQ0, E1000_ICR_TXQ1, E1000_ICR_OTHER,
};
#define IVAR_MAP ((IVAR_VALID | 0u) | (IVAR_VALID | 1u) << 4 | (IVAR_VALID | 2u) << 8 \
                  | (IVAR_VALID | 3u) << 12 | (IVAR_VALID | 4u) << 16)
#define ALL_CAUSES (E1000_ICR_RXQ0 | E1000_ICR_RXQ1 | E1000_ICR_TXQ0 | E1000_ICR_TXQ1 \
                    | E1000_ICR_OTHER)

static uintptr_t bar0;
static volatile uint32_t count[VECTORS];
static volatile uint32_t unclaimed;

static uint32_t reg_read(uint32_t reg)
{
    return mmio_read32(bar0 + reg);
}

static void reg_write(uint32_t reg, uint32_t v)
{
    mmio_write32(bar0 + reg, v);
}

static void __attribute__((noreturn, format(printf, 1, 2))) fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    puts_serial("e1000e-msix: ");
    vprintf(fmt, ap);
    va_end(ap);
    puts_serial("\n");
    fw_exit(1);
}

/* Vector 0x60 + i: claim the message if entry i's cause is pending, and clear that cause. */
static void on_vector(struct int_frame *f)
{
    unsigned i = (unsigned)(f->vector - FIRST_VECTOR);
    if (reg_read(E1000_ICS) & cause[i]) {
        reg_write(E1000_ICR, cause[i]);
        count[i]++;
    } else {
        unclaimed++;
    }
    lapic_eoi();
}

/* Every count as expected (want for entry i, the others unchanged from before[])? */
static void check_counts(const char *what, const uint32_t *before, unsigned i, uint32_t want)
{
    for (unsigned j = 0; j < VECTORS; j++) {
        uint32_t expect = j == i ? want : before[j];
        if (count[j] != expect)
            fail("%s failed: vector %u count %u, expected %u", what, j, count[j], expect);
    }
}

int main(void)
{
    idt_init();
    pic_disable(0x20, 0x28);
    lapic_enable();

    /* a. the function and its MSI-X capability */
    int found = pci_find_device(E1000E_VENDOR, E1000E_DEVICE);
    if (found < 0) {
        printf("e1000e-msix: no device\n");
        return 1;
    }
    uint8_t dev = (uint8_t)found;
    uint32_t bar = pci_read32(0, dev, 0, PCI_BAR0);
    bar0 = pci_bar_address(0, dev, 0, 0);
    if ((bar & 1) || bar0 == 0)
        fail("bar0 failed: 0x%x", bar);
    uint8_t cap = pci_find_cap(0, dev, 0, PCI_CAP_ID_MSIX, 0);
    if (!cap) {
        printf("e1000e-msix: no msi-x capability\n");
        return 1;
    }
    uint32_t table_reg = pci_read32(0, dev, 0, cap + PCI_MSIX_TABLE);
    uint32_t pba_reg = pci_read32(0, dev, 0, cap + PCI_MSIX_PBA);
    unsigned size = pci_msix_table_size(0, dev, 0, cap);
    printf("e1000e-msix: 00:%02x.0 bar0 0x%lx msix cap 0x%x\n", dev, bar0, cap);
    printf("e1000e-msix: table bar%u+0x%x pba bar%u+0x%x size %u\n",
           table_reg & PCI_MSIX_BIR_MASK, table_reg & ~PCI_MSIX_BIR_MASK,
           pba_reg & PCI_MSIX_BIR_MASK, pba_reg & ~PCI_MSIX_BIR_MASK, size);
    if (size < VECTORS)
        fail("msi-x failed: %u table entries, need %u", size, VECTORS);
    if (!pci_bar_address(0, dev, 0, table_reg & PCI_MSIX_BIR_MASK)
        || !pci_bar_address(0, dev, 0, pba_reg & PCI_MSIX_BIR_MASK))
        fail("msi-x failed: the table's or the pba's BAR is not assigned");
    uint64_t table = pci_msix_table(0, dev, 0, cap);
    uint64_t pba = pci_msix_pba(0, dev, 0, cap);

    for (unsigned i = 0; i < VECTORS; i++)
        idt_register(FIRST_VECTOR + i, on_vector);
    lapic_tick_start(TICK_VECTOR, TICK_US);
    cli();

    /* b. decode and bus mastering on, reset, MSI-X entries (masked first), causes -> entries */
    uint16_t cmd = pci_read16(0, dev, 0, PCI_COMMAND);
    pci_write16(0, dev, 0, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    reg_write(E1000_CTRL, reg_read(E1000_CTRL) | E1000_CTRL_RST);
    uint32_t ctrl = 0;
    for (unsigned i = 0; i < RESET_POLLS; i++) {
        ctrl = reg_read(E1000_CTRL);
        if (!(ctrl & E1000_CTRL_RST))
            break;
    }
    if (ctrl & E1000_CTRL_RST)
        fail("reset failed: ctrl 0x%x", ctrl);
    reg_write(E1000_IMC, 0xFFFFFFFFu);          /* every cause disabled */
    reg_write(E1000_ICR, 0xFFFFFFFFu);          /* and cleared */

    uint8_t apic = (uint8_t)lapic_id();
    for (unsigned i = 0; i < VECTORS; i++)
        msix_set_vector_masked(table, i, apic, FIRST_VECTOR + i);
    pci_msix_enable(0, dev, 0, cap);
    reg_write(E1000_EIAC, 0);                    /* no auto-clear: the handler clears ICR */
    reg_write(E1000_IVAR, IVAR_MAP);
    reg_write(E1000_IMS, ALL_CAUSES);
    for (unsigned i = 0; i < VECTORS; i++)
        msix_unmask_entry(table, i);
    printf("e1000e-msix: msi-x on, vectors 0x%x-0x%x, ivar 0x%x\n", FIRST_VECTOR,
           FIRST_VECTOR + VECTORS - 1, reg_read(E1000_IVAR));

    /* c. each cause once */
    uint32_t before[VECTORS];
    for (unsigned i = 0; i < VECTORS; i++) {
        for (unsigned j = 0; j < VECTORS; j++)
            before[j] = count[j];
        reg_write(E1000_ICS, cause[i]);
        if (lapic_tick_wait(&count[i], 1, IRQ_TICKS) < 0)
            fail("vector %u failed: no interrupt in %u ticks, icr 0x%x pending %u", i, IRQ_TICKS,
                 reg_read(E1000_ICS), msix_pending(pba, i));
        lapic_tick_sleep(SETTLE_TICKS);
        check_counts("vector", before, i, 1);
        printf("e1000e-msix: vector %u count %u\n", i, count[i]);
    }

    /* d. entry 2 masked: the message waits in the PBA; unmasked, it is delivered once */
    for (unsigned j = 0; j < VECTORS; j++)
        before[j] = count[j];
    msix_mask_entry(table, MASKED_ENTRY);
    reg_write(E1000_ICS, cause[MASKED_ENTRY]);
    /* At least MASKED_TICKS, so that a message the VMM wrongly delivered would have arrived;
     * then one PBA read per tick (a trapped access each) while the bit is not yet set. */
    lapic_tick_sleep(MASKED_TICKS);
    int pending = msix_pending(pba, MASKED_ENTRY);
    for (unsigned t = 0; !pending && count[MASKED_ENTRY] == 1 && t < IRQ_TICKS; t++) {
        lapic_tick_sleep(1);
        pending = msix_pending(pba, MASKED_ENTRY);
    }
    if (count[MASKED_ENTRY] != 1 || !pending)
        fail("masked failed: vector %u count %u pending %d", MASKED_ENTRY, count[MASKED_ENTRY],
             pending);
    check_counts("masked", before, MASKED_ENTRY, 1);
    printf("e1000e-msix: vector %u masked pending %d\n", MASKED_ENTRY, pending);

    msix_unmask_entry(table, MASKED_ENTRY);
    if (lapic_tick_wait(&count[MASKED_ENTRY], 2, IRQ_TICKS) < 0)
        fail("unmasked failed: vector %u count %u pending %d", MASKED_ENTRY, count[MASKED_ENTRY],
             msix_pending(pba, MASKED_ENTRY));
    lapic_tick_sleep(SETTLE_TICKS);
    pending = msix_pending(pba, MASKED_ENTRY);
    check_counts("unmasked", before, MASKED_ENTRY, 2);
    if (pending)
        fail("unmasked failed: vector %u count %u pending %d", MASKED_ENTRY, count[MASKED_ENTRY],
             pending);
    printf("e1000e-msix: vector %u unmasked count %u\n", MASKED_ENTRY, count[MASKED_ENTRY]);

    /* e. quiet the device */
    reg_write(E1000_IMC, 0xFFFFFFFFu);
    lapic_tick_stop();
    printf("e1000e-msix: unclaimed %u\n", unclaimed);
    printf("e1000e-msix: done\n");
    return 0;
}
