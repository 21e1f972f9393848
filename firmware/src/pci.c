#include <pyvmmfw.h>

static uint32_t cfg_address(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off)
{
    return 0x80000000u | ((uint32_t)bus << 16) | ((uint32_t)(dev & 0x1F) << 11)
           | ((uint32_t)(fn & 0x7) << 8) | (off & 0xFC);
}

uint32_t pci_read32(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off)
{
    outl(PCI_CONFIG_ADDRESS, cfg_address(bus, dev, fn, off));
    return inl(PCI_CONFIG_DATA);
}

uint16_t pci_read16(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off)
{
    outl(PCI_CONFIG_ADDRESS, cfg_address(bus, dev, fn, off));
    return inw(PCI_CONFIG_DATA + (off & 2));
}

uint8_t pci_read8(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off)
{
    outl(PCI_CONFIG_ADDRESS, cfg_address(bus, dev, fn, off));
    return inb(PCI_CONFIG_DATA + (off & 3));
}

void pci_write32(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off, uint32_t v)
{
    outl(PCI_CONFIG_ADDRESS, cfg_address(bus, dev, fn, off));
    outl(PCI_CONFIG_DATA, v);
}

void pci_write16(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off, uint16_t v)
{
    outl(PCI_CONFIG_ADDRESS, cfg_address(bus, dev, fn, off));
    outw(PCI_CONFIG_DATA + (off & 2), v);
}

void pci_write8(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off, uint8_t v)
{
    outl(PCI_CONFIG_ADDRESS, cfg_address(bus, dev, fn, off));
    outb(PCI_CONFIG_DATA + (off & 3), v);
}

uintptr_t pci_ecam_address(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off)
{
    return PCI_ECAM_BASE + ((uintptr_t)bus << 20 | (uintptr_t)(dev & 0x1F) << 15
                            | (uintptr_t)(fn & 0x7) << 12 | (off & 0xFFC));
}

uint32_t pci_ecam_read32(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off)
{
    return mmio_read32(pci_ecam_address(bus, dev, fn, off));
}

void pci_ecam_write32(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off, uint32_t v)
{
    mmio_write32(pci_ecam_address(bus, dev, fn, off), v);
}

int pci_find_device(uint16_t vendor, uint16_t device)
{
    uint32_t want = vendor | (uint32_t)device << 16;
    for (int dev = 0; dev < 32; dev++) {
        if (pci_read32(0, dev, 0, PCI_VENDOR_ID) == want)
            return dev;
    }
    return -1;
}

unsigned pci_bar_count(uint8_t bus, uint8_t dev, uint8_t fn)
{
    switch (pci_read8(bus, dev, fn, PCI_HEADER_TYPE) & 0x7F) {
    case 0:
        return 6;
    case 1:
        return 2;
    default:
        return 0;
    }
}

/* Writes all ones to the BAR at off, returns what reads back, restores the original. */
static uint32_t size_probe(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off, uint32_t orig)
{
    pci_write32(bus, dev, fn, off, 0xFFFFFFFFu);
    uint32_t v = pci_read32(bus, dev, fn, off);
    pci_write32(bus, dev, fn, off, orig);
    return v;
}

unsigned pci_bar_probe(uint8_t bus, uint8_t dev, uint8_t fn, unsigned idx, struct pci_bar *bar)
{
    uint16_t off = PCI_BAR0 + 4 * idx;
    unsigned used = 1;

    bar->kind = PCI_BAR_NONE;
    bar->prefetchable = 0;
    bar->base = 0;
    bar->size = 0;

    uint16_t cmd = pci_read16(bus, dev, fn, PCI_COMMAND);
    pci_write16(bus, dev, fn, PCI_COMMAND, cmd & ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY));

    uint32_t lo = pci_read32(bus, dev, fn, off);
    uint32_t lo_mask = size_probe(bus, dev, fn, off, lo);

    if (lo & 1) {
        /* I/O BAR. Decoders of only 16 bits read back zeros in the top half. */
        uint32_t mask = lo_mask & ~0x3u;
        if ((mask & 0xFFFF0000u) == 0)
            mask |= 0xFFFF0000u;
        if (lo_mask & ~0x3u) {
            bar->kind = PCI_BAR_IO;
            bar->base = lo & ~0x3u;
            bar->size = (uint32_t)(~mask + 1);
        }
    } else if (((lo >> 1) & 3) == 2 && idx + 1 < 6) {
        /* 64-bit memory BAR: this slot and the next. */
        uint16_t off_hi = off + 4;
        uint32_t hi = pci_read32(bus, dev, fn, off_hi);
        uint32_t hi_mask = size_probe(bus, dev, fn, off_hi, hi);
        uint64_t mask = ((uint64_t)hi_mask << 32) | (lo_mask & ~0xFu);
        used = 2;
        if (mask) {
            bar->kind = PCI_BAR_MEM64;
            bar->prefetchable = (lo >> 3) & 1;
            bar->base = ((uint64_t)hi << 32) | (lo & ~0xFu);
            bar->size = ~mask + 1;
        }
    } else {
        uint32_t mask = lo_mask & ~0xFu;
        if (mask) {
            bar->kind = PCI_BAR_MEM32;
            bar->prefetchable = (lo >> 3) & 1;
            bar->base = lo & ~0xFu;
            bar->size = (uint32_t)(~mask + 1);
        }
    }

    pci_write16(bus, dev, fn, PCI_COMMAND, cmd);
    return used;
}

uint64_t pci_bar_address(uint8_t bus, uint8_t dev, uint8_t fn, unsigned idx)
{
    uint16_t off = PCI_BAR0 + 4 * idx;
    uint32_t lo = pci_read32(bus, dev, fn, off);
    if (lo & 1)
        return 0;
    uint64_t base = lo & ~0xFu;
    if (((lo >> 1) & 3) == 2 && idx + 1 < 6)
        base |= (uint64_t)pci_read32(bus, dev, fn, off + 4) << 32;
    return base;
}

uint8_t pci_find_cap(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t id, uint8_t after)
{
    if (!(pci_read16(bus, dev, fn, PCI_STATUS) & PCI_STATUS_CAP_LIST))
        return 0;
    uint8_t pos = pci_read8(bus, dev, fn, PCI_CAPABILITY_LIST) & 0xFC;
    for (unsigned hops = 0; pos >= 0x40 && hops < 48; hops++) {
        if (pos > after && pci_read8(bus, dev, fn, pos) == id)
            return pos;
        pos = pci_read8(bus, dev, fn, pos + 1) & 0xFC;
    }
    return 0;
}

void pci_msi_enable(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap, uint8_t apic_id,
                    uint8_t vector)
{
    uint16_t ctrl = pci_read16(bus, dev, fn, cap + PCI_MSI_FLAGS);
    /* Off while the message is written; one vector. */
    ctrl &= ~(PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE);
    pci_write16(bus, dev, fn, cap + PCI_MSI_FLAGS, ctrl);
    pci_write32(bus, dev, fn, cap + PCI_MSI_ADDRESS_LO, 0xFEE00000u | ((uint32_t)apic_id << 12));
    uint16_t data = PCI_MSI_DATA_32, mask = PCI_MSI_MASK_32;
    if (ctrl & PCI_MSI_FLAGS_64BIT) {
        pci_write32(bus, dev, fn, cap + PCI_MSI_ADDRESS_HI, 0);
        data = PCI_MSI_DATA_64;
        mask = PCI_MSI_MASK_64;
    }
    pci_write16(bus, dev, fn, cap + data, vector);
    if (ctrl & PCI_MSI_FLAGS_MASKBIT)
        pci_write32(bus, dev, fn, cap + mask, 0);
    pci_write16(bus, dev, fn, cap + PCI_MSI_FLAGS, ctrl | PCI_MSI_FLAGS_ENABLE);
}

void pci_msi_disable(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap)
{
    uint16_t ctrl = pci_read16(bus, dev, fn, cap + PCI_MSI_FLAGS);
    pci_write16(bus, dev, fn, cap + PCI_MSI_FLAGS, ctrl & ~PCI_MSI_FLAGS_ENABLE);
}

unsigned pci_msix_table_size(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap)
{
    return (pci_read16(bus, dev, fn, cap + PCI_MSIX_FLAGS) & PCI_MSIX_FLAGS_QSIZE) + 1;
}

/* The BAR address + offset that the dword at cap + off (table or PBA) names. */
static uint64_t msix_structure(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap, uint8_t off)
{
    uint32_t v = pci_read32(bus, dev, fn, cap + off);
    return pci_bar_address(bus, dev, fn, v & PCI_MSIX_BIR_MASK) + (v & ~PCI_MSIX_BIR_MASK);
}

uint64_t pci_msix_table(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap)
{
    return msix_structure(bus, dev, fn, cap, PCI_MSIX_TABLE);
}

uint64_t pci_msix_pba(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap)
{
    return msix_structure(bus, dev, fn, cap, PCI_MSIX_PBA);
}

void pci_msix_enable(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap)
{
    uint16_t ctrl = pci_read16(bus, dev, fn, cap + PCI_MSIX_FLAGS);
    ctrl = (ctrl | PCI_MSIX_FLAGS_ENABLE) & ~PCI_MSIX_FLAGS_MASKALL;
    pci_write16(bus, dev, fn, cap + PCI_MSIX_FLAGS, ctrl);
}

void pci_msix_disable(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap)
{
    uint16_t ctrl = pci_read16(bus, dev, fn, cap + PCI_MSIX_FLAGS);
    pci_write16(bus, dev, fn, cap + PCI_MSIX_FLAGS, ctrl & ~PCI_MSIX_FLAGS_ENABLE);
}

static uintptr_t msix_entry(uint64_t table, unsigned entry)
{
    return (uintptr_t)table + entry * PCI_MSIX_ENTRY_SIZE;
}

void msix_set_vector(uint64_t table, unsigned entry, uint8_t apic_id, uint8_t vector)
{
    uintptr_t e = msix_entry(table, entry);
    mmio_write32(e + 0, 0xFEE00000u | ((uint32_t)apic_id << 12));
    mmio_write32(e + 4, 0);
    mmio_write32(e + 8, vector);
    mmio_write32(e + PCI_MSIX_ENTRY_VECTOR_CTRL, 0);             /* unmask */
}

void msix_set_vector_masked(uint64_t table, unsigned entry, uint8_t apic_id, uint8_t vector)
{
    uintptr_t e = msix_entry(table, entry);
    mmio_write32(e + PCI_MSIX_ENTRY_VECTOR_CTRL, PCI_MSIX_ENTRY_CTRL_MASKBIT);
    mmio_write32(e + 0, 0xFEE00000u | ((uint32_t)apic_id << 12));
    mmio_write32(e + 4, 0);
    mmio_write32(e + 8, vector);
}

void msix_mask_entry(uint64_t table, unsigned entry)
{
    mmio_write32(msix_entry(table, entry) + PCI_MSIX_ENTRY_VECTOR_CTRL,
                 PCI_MSIX_ENTRY_CTRL_MASKBIT);
}

void msix_unmask_entry(uint64_t table, unsigned entry)
{
    mmio_write32(msix_entry(table, entry) + PCI_MSIX_ENTRY_VECTOR_CTRL, 0);
}

int msix_pending(uint64_t pba, unsigned entry)
{
    /* The PBA is an array of bits, entry i at bit i % 32 of dword i / 32. */
    return (mmio_read32((uintptr_t)pba + 4 * (entry / 32)) >> (entry % 32)) & 1;
}
