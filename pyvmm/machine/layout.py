"""The guest-physical memory map and fixed I/O assignments of a pyvmm machine (x86-64).

0x0000_0000  low RAM: real-mode area; boot structures below 1 MiB (see below)
0x0010_0000  kernel / ELF images load here (1 MiB)
...          RAM up to min(memory size, 3 GiB)
0xC000_0000  PCI MMIO window (32-bit BARs), 512 MiB
0xE000_0000  PCI ECAM (MMCONFIG), 256 MiB: bus 0-255, 1 MiB each
0xFEC0_0000  IOAPIC
0xFEE0_0000  local APIC
0x1_0000_0000  RAM above 4 GiB, when memory size exceeds 3 GiB
0x10_0000_0000 PCI MMIO window for 64-bit BARs, up to the CPU's physical address limit
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Boot structures below 1 MiB (the same places kvmtool and Firecracker use).
BOOT_GDT = 0x500
BOOT_IDT = 0x520
ZERO_PAGE = 0x7000
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000  # four pages: 0xB000-0xEFFF, 2 MiB pages for the first 4 GiB
CMDLINE_START = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00
HIMEM_START = 0x100000
# Where a PC's reset jumps (F000:FFF0, in real mode). A Linux guest jumps there when it reboots
# "through the BIOS"; its default in hardware-reduced ACPI (after EFI, which it lacks).
RESET_VECTOR = 0xFFFF0

LOW_RAM_LIMIT = 0xC000_0000
PCI_MMIO_BASE = 0xC000_0000
PCI_MMIO_SIZE = 0x2000_0000
# 64-bit BARs that are large or no longer fit below 4 GiB go from here (or from above RAM, if RAM
# reaches that far) up to the CPU's physical address limit: see pci_mmio64_base().
PCI_MMIO64_BASE = 0x10_0000_0000
PCI_ECAM_BASE = 0xE000_0000
PCI_ECAM_SIZE = 0x1000_0000
IOAPIC_BASE = 0xFEC0_0000
LAPIC_BASE = 0xFEE0_0000
HIGH_RAM_START = 0x1_0000_0000

# KVM needs three pages for the VMX TSS and one for the identity map, outside RAM and MMIO.
KVM_IDENTITY_MAP = 0xFFFB_C000
KVM_TSS = 0xFFFB_D000

# Guest-physical ranges that no RAM or device memory (a BAR a guest moves there) may cover: the
# address space holds them as RESERVED regions.
RESERVED_RANGES = (
    (PCI_ECAM_BASE, PCI_ECAM_SIZE, "ecam"),
    (IOAPIC_BASE, 0x1000, "ioapic"),
    (LAPIC_BASE, 0x1000, "lapic"),
    (KVM_IDENTITY_MAP, 0x4000, "kvm-tss"),  # the identity-map page and the three TSS pages
)

# INTx: pin p (1 = INTA# .. 4 = INTD#) of a function in slot s of bus 0 is wired to IOAPIC input
# 16 + (s + p - 1) mod 8, the usual swizzle (the DSDT's _PRT says the same to Linux).
PCI_INTX_GSI_BASE = 16
PCI_INTX_GSIS = 8


def pci_intx_gsi(slot: int, pin: int) -> int:
    """The GSI that INTx `pin` (1-4) of the function in `slot` raises."""
    return PCI_INTX_GSI_BASE + (slot + pin - 1) % PCI_INTX_GSIS


PCI_IO_BASE = 0xC000
PCI_IO_SIZE = 0x4000

# Legacy and pyvmm-specific I/O ports.
COM1_PORT = 0x3F8
COM1_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
RTC_PORT = 0x70
RTC_CENTURY = 0x32  # the CMOS register of the century: the FADT points the guest at it
DEBUG_EXIT_PORT = 0x501
CHECKPOINT_PORT = 0x502
BENCH_SINK_PORT = 0x510
PCI_CONFIG_PORT = 0xCF8
RESET_PORT = PCI_CONFIG_PORT + 1  # 0xCF9, the reset control register (pyvmm.devices.pci.host)
RESET_VALUE = 0x06  # a hard reset: what the FADT and the reset vector write there


E820_RAM = 1
E820_RESERVED = 2


@dataclass(frozen=True)
class RamRange:
    """A guest-physical range of RAM."""

    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def ram_ranges(mem_size: int) -> list[RamRange]:
    """Where `mem_size` bytes of RAM go: below the PCI hole, the rest above 4 GiB."""
    low = min(mem_size, LOW_RAM_LIMIT)
    ranges = [RamRange(0, low)]
    if mem_size > low:
        ranges.append(RamRange(HIGH_RAM_START, mem_size - low))
    return ranges


def pci_mmio64_base(mem_size: int) -> int:
    """Where the 64-bit PCI window starts: at 64 GiB, or above RAM (1 GiB aligned) if RAM
    reaches that far."""
    ram_end = ram_ranges(mem_size)[-1].end
    return max(PCI_MMIO64_BASE, (ram_end + GiB - 1) & ~(GiB - 1))


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """(address, size, type) entries describing pyvmm's memory map to the guest."""
    entries = [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED),
        (0xE0000, HIMEM_START - 0xE0000, E820_RESERVED),  # ACPI tables, BIOS area
    ]
    for ram in ram_ranges(mem_size):
        start = max(ram.gpa, HIMEM_START)
        entries.append((start, ram.end - start, E820_RAM))
    entries.append((PCI_ECAM_BASE, PCI_ECAM_SIZE, E820_RESERVED))
    return sorted(entries)
