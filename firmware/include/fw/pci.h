/* PCI configuration access through mechanism #1 (0xCF8 address, 0xCFC data) and ECAM
 * (memory-mapped, at 0xE0000000), finding a function, BAR sizing, capability lists. */
#ifndef FW_PCI_H
#define FW_PCI_H

#include <stdint.h>

#define PCI_CONFIG_ADDRESS 0xCF8
#define PCI_CONFIG_DATA    0xCFC

#define PCI_VENDOR_ID   0x00
#define PCI_DEVICE_ID   0x02
#define PCI_COMMAND     0x04
#define PCI_STATUS      0x06
#define PCI_REVISION    0x08   /* class code: 0x09 prog-if, 0x0A subclass, 0x0B base class */
#define PCI_HEADER_TYPE 0x0E
#define PCI_BAR0        0x10
#define PCI_CAPABILITY_LIST 0x34
#define PCI_COMMAND_IO     0x1
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_STATUS_CAP_LIST 0x10

#define PCI_CAP_ID_VNDR 0x09
#define PCI_CAP_ID_MSIX 0x11

/* ECAM (enhanced configuration access, "MMCONFIG"): 4 KiB of config space per function at
 * PCI_ECAM_BASE + (bus << 20 | dev << 15 | fn << 12) + offset. The only way to reach offsets
 * 0x100-0xFFF, where the extended capability list lives. */
#define PCI_ECAM_BASE 0xE0000000UL
#define PCI_EXT_CAP_START 0x100
/* An extended capability header: bits 15:0 ID, 19:16 version, 31:20 next offset (0 ends). */
#define PCI_EXT_CAP_ID(header)   ((header) & 0xFFFFu)
#define PCI_EXT_CAP_VER(header)  (((header) >> 16) & 0xFu)
#define PCI_EXT_CAP_NEXT(header) (((header) >> 20) & 0xFFFu)

uint32_t pci_read32(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off);
uint16_t pci_read16(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off);
uint8_t  pci_read8(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off);
void pci_write32(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off, uint32_t v);
void pci_write16(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off, uint16_t v);
void pci_write8(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off, uint8_t v);

/* ECAM accesses: one 32-bit mov each; off is masked to 0xFFC (dword aligned, below 4 KiB). */
uintptr_t pci_ecam_address(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off);
uint32_t pci_ecam_read32(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off);
void pci_ecam_write32(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t off, uint32_t v);

/* The device number of the first device on bus 0 whose function 0 has this vendor:device id
 * (through 0xCF8/0xCFC, devices 0-31 in order), or -1 if there is none. */
int pci_find_device(uint16_t vendor, uint16_t device);

enum pci_bar_kind { PCI_BAR_NONE = 0, PCI_BAR_IO, PCI_BAR_MEM32, PCI_BAR_MEM64 };

struct pci_bar {
    enum pci_bar_kind kind;
    int prefetchable;
    uint64_t base;
    uint64_t size;
};

/* Number of BAR slots in the function's header: 6 (type 0), 2 (type 1 bridge), 0 otherwise. */
unsigned pci_bar_count(uint8_t bus, uint8_t dev, uint8_t fn);
/* Reads and sizes BAR idx (writes all ones, reads back, restores) with I/O and memory decode off
 * in PCI_COMMAND for the duration. Returns the number of slots it used: 2 for a 64-bit memory BAR,
 * else 1. An unimplemented BAR gives kind PCI_BAR_NONE. */
unsigned pci_bar_probe(uint8_t bus, uint8_t dev, uint8_t fn, unsigned idx, struct pci_bar *bar);
/* The memory address BAR idx is programmed with (both halves of a 64-bit BAR), without sizing;
 * 0 for an I/O BAR. */
uint64_t pci_bar_address(uint8_t bus, uint8_t dev, uint8_t fn, unsigned idx);

/* Offset of the first capability with ID id whose offset is after `after` (0: from the start of
 * the list), or 0 if there is none. Stops after 48 hops, so a looping list ends too. */
uint8_t pci_find_cap(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t id, uint8_t after);

/* MSI-X, for the capability at offset cap (see pci_find_cap). */
#define PCI_MSIX_FLAGS         2        /* Message Control, 16 bits */
#define PCI_MSIX_FLAGS_QSIZE   0x07FF   /* table size - 1 */
#define PCI_MSIX_FLAGS_MASKALL 0x4000
#define PCI_MSIX_FLAGS_ENABLE  0x8000
#define PCI_MSIX_TABLE         4        /* BAR index (bits 2:0) | offset */
#define PCI_MSIX_ENTRY_SIZE    16
#define PCI_MSIX_ENTRY_CTRL_MASKBIT 1

/* Guest-physical address of the MSI-X table (its BAR's address + offset). */
uint64_t pci_msix_table(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap);
/* Sets MSI-X Enable and clears Function Mask in Message Control. */
void pci_msix_enable(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap);
/* Points table entry `entry` at `vector` on the local APIC `apic_id` (fixed delivery, physical
 * destination, edge) and unmasks it. */
void msix_set_vector(uint64_t table, unsigned entry, uint8_t apic_id, uint8_t vector);

#endif
