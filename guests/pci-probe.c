/* pci-probe: lists every function on bus 0 and its BARs through CF8/CFC. */
#include <pyvmmfw.h>

static const char *const kind_name[] = {
    [PCI_BAR_IO] = "io",
    [PCI_BAR_MEM32] = "mem",
    [PCI_BAR_MEM64] = "mem64",
};

static void show_function(uint8_t dev, uint8_t fn)
{
    uint32_t id = pci_read32(0, dev, fn, PCI_VENDOR_ID);
    uint32_t class = pci_read32(0, dev, fn, PCI_REVISION) >> 8;
    printf("pci 00:%02x.%u %04x:%04x class %06x\n", dev, fn, id & 0xFFFF, id >> 16, class);

    unsigned n = pci_bar_count(0, dev, fn);
    for (unsigned i = 0; i < n;) {
        struct pci_bar bar;
        unsigned used = pci_bar_probe(0, dev, fn, i, &bar);
        if (bar.kind != PCI_BAR_NONE)
            printf("  bar%u %s 0x%lx size 0x%lx\n", i, kind_name[bar.kind], bar.base, bar.size);
        i += used;
    }
}

int main(void)
{
    idt_init();                       /* report any exception instead of triple-faulting */
    unsigned found = 0;
    for (uint8_t dev = 0; dev < 32; dev++) {
        if (pci_read16(0, dev, 0, PCI_VENDOR_ID) == 0xFFFF)
            continue;
        unsigned fns = (pci_read8(0, dev, 0, PCI_HEADER_TYPE) & 0x80) ? 8 : 1;
        for (uint8_t fn = 0; fn < fns; fn++) {
            if (fn && pci_read16(0, dev, fn, PCI_VENDOR_ID) == 0xFFFF)
                continue;
            show_function(dev, fn);
            found++;
        }
    }
    printf("pci: %u functions\n", found);
    return 0;
}
