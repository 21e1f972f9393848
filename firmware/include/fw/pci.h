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
#define PCI_INTERRUPT_LINE 0x3C  /* 8 bits: the IOAPIC pin (GSI) INTx is wired to; 0xFF: none */
#define PCI_INTERRUPT_PIN  0x3D  /* 8 bits: 0 none, 1-4 INTA#-INTD# */
#define PCI_COMMAND_IO     0x1
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_COMMAND_INTX_DISABLE 0x400
#define PCI_STATUS_INTERRUPT 0x8 /* INTx asserted (read-only) */
#define PCI_STATUS_CAP_LIST 0x10

#define PCI_CAP_ID_PM   0x01
#define PCI_CAP_ID_MSI  0x05
#define PCI_CAP_ID_VNDR 0x09
#define PCI_CAP_ID_EXP  0x10
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

/* MSI, for the capability at offset cap (see pci_find_cap). The layout after the message address
 * depends on Message Control: 64-bit capable (bit 7) puts the upper address at +8 and the data
 * at +0xC, else the data is at +8; per-vector masking (bit 8) adds the mask bits after the data
 * (+0x10 or +0xC). */
#define PCI_MSI_FLAGS          2        /* Message Control, 16 bits */
#define PCI_MSI_FLAGS_ENABLE   0x0001
#define PCI_MSI_FLAGS_QMASK    0x000E   /* multiple message capable */
#define PCI_MSI_FLAGS_QSIZE    0x0070   /* multiple message enable */
#define PCI_MSI_FLAGS_64BIT    0x0080
#define PCI_MSI_FLAGS_MASKBIT  0x0100
#define PCI_MSI_ADDRESS_LO     4
#define PCI_MSI_ADDRESS_HI     8        /* 64-bit capable only */
#define PCI_MSI_DATA_32        8
#define PCI_MSI_DATA_64        0xC
#define PCI_MSI_MASK_32        0xC
#define PCI_MSI_MASK_64        0x10

/* Programs one message (address 0xFEE00000 | apic_id << 12: fixed delivery, physical
 * destination; data = vector: edge) with one vector enabled (multiple message enable 0), clears
 * the mask bit of vector 0 if the function has per-vector masking, then sets MSI Enable. 16-bit
 * writes for Message Control and the data, 32-bit for the address. */
void pci_msi_enable(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap, uint8_t apic_id,
                    uint8_t vector);
/* Clears MSI Enable (the function goes back to INTx, unless PCI_COMMAND disables it). */
void pci_msi_disable(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap);

/* MSI-X, for the capability at offset cap (see pci_find_cap). */
#define PCI_MSIX_FLAGS         2        /* Message Control, 16 bits */
#define PCI_MSIX_FLAGS_QSIZE   0x07FF   /* table size - 1 */
#define PCI_MSIX_FLAGS_MASKALL 0x4000
#define PCI_MSIX_FLAGS_ENABLE  0x8000
#define PCI_MSIX_TABLE         4        /* BAR index (bits 2:0) | offset */
#define PCI_MSIX_PBA           8        /* BAR index (bits 2:0) | offset */
#define PCI_MSIX_BIR_MASK      7u
#define PCI_MSIX_ENTRY_SIZE    16
#define PCI_MSIX_ENTRY_VECTOR_CTRL 12
#define PCI_MSIX_ENTRY_CTRL_MASKBIT 1

/* Number of MSI-X table entries (Message Control's table size + 1). */
unsigned pci_msix_table_size(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap);
/* Guest-physical address of the MSI-X table (its BAR's address + offset). */
uint64_t pci_msix_table(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap);
/* Guest-physical address of the Pending Bit Array (its BAR's address + offset). */
uint64_t pci_msix_pba(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap);
/* Sets MSI-X Enable and clears Function Mask in Message Control. */
void pci_msix_enable(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap);
/* Clears MSI-X Enable. */
void pci_msix_disable(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap);

/* The table and PBA accessors below use one 32-bit access per dword (a VMM traps these). */
/* Points table entry `entry` at `vector` on the local APIC `apic_id` (fixed delivery, physical
 * destination, edge) and unmasks it: address, upper address, data, then vector control 0. */
void msix_set_vector(uint64_t table, unsigned entry, uint8_t apic_id, uint8_t vector);
/* The same message, but the entry stays masked: vector control 1 is written first, then the
 * address, upper address and data (4 writes). Unmask it later with msix_unmask_entry. */
void msix_set_vector_masked(uint64_t table, unsigned entry, uint8_t apic_id, uint8_t vector);
/* Vector control = 1 (masked) or 0 (unmasked): one 32-bit write each, without reading first
 * (the other bits of vector control are reserved, 0). */
void msix_mask_entry(uint64_t table, unsigned entry);
void msix_unmask_entry(uint64_t table, unsigned entry);
/* Entry's bit of the Pending Bit Array (one 32-bit read): 1 if a message is pending. */
int msix_pending(uint64_t pba, unsigned entry);

#endif
