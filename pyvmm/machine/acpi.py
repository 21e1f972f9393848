"""ACPI tables for Linux guests: how the guest finds its CPUs, the PCI root and power control.

- MADT: one local APIC per vCPU, the IOAPIC, ISA IRQ0 -> GSI 2 (what SMP needs).
- FADT: *hardware-reduced* ACPI (no PM timer, no SCI, no PM1 blocks): power-off through the
  sleep control register (an 8-bit port, `pyvmm.devices.acpi_pm`), reset through 0xCF9.
- DSDT: the PCI root bridge PCI0 (bus 0, its I/O window and its MMIO windows below
  and above 4 GiB) and the \\_S5 sleep state.
- MCFG: ECAM for bus 0.
- VIOT, with `--viommu virtio`: the virtio-iommu and the PCI functions behind it.

Why ACPI rather than an MP table: SMP needs either, but an orderly guest power-off needs ACPI,
and with ACPI present Linux finds PCI roots through the DSDT, so all of it comes together.
Tables are written below 1 MiB (and below the reset vector), in the BIOS area Linux scans for
the RSDP.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pyvmm.machine import aml, layout
from pyvmm.machine.memory import GuestMemory

OEM_ID = b"PYVMM "
OEM_TABLE_ID = b"PYVMMACP"
CREATOR_ID = b"PYVM"

ACPI_TABLES_START = 0xE0000
ACPI_TABLES_END = layout.RESET_VECTOR  # the last 16 bytes below 1 MiB are the reset vector's

SLEEP_CONTROL_PORT = 0x3C0
SLEEP_STATUS_PORT = 0x3C1
S5_SLEEP_TYPE = 5

FADT_HW_REDUCED_ACPI = 1 << 20
FADT_RESET_REG_SUP = 1 << 10
FADT_PWR_BUTTON = 1 << 4
FADT_SLP_BUTTON = 1 << 5
IAPC_BOOT_ARCH_NO_VGA = 1 << 2
IAPC_BOOT_ARCH_LEGACY_DEVICES = 1 << 0
MADT_PCAT_COMPAT = 1
GAS_SYSTEM_IO = 1


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` sum to zero mod 256."""
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = 36 + len(body)
    header = bytearray(
        struct.pack(
            "<4sIBB6s8sI4sI",
            signature,
            length,
            revision,
            0,
            OEM_ID,
            OEM_TABLE_ID,
            1,
            CREATOR_ID,
            1,
        )
    )
    table = header + body
    table[9] = checksum(table)
    return bytes(table)


PCI_SLOTS = 32


def _gas(port: int, width_bits: int = 8) -> bytes:
    """A Generic Address Structure for an I/O port."""
    access_size = {8: 1, 16: 2, 32: 3}[width_bits]
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, width_bits, 0, access_size, port)


def pci_routing_table() -> bytes:
    """_PRT: where INTA#-INTD# of every slot of bus 0 go, as GSIs (no link devices): the
    swizzle of pyvmm.machine.layout.pci_intx_gsi. Entries are (slot << 16 | 0xFFFF, pin 0-3,
    source 0, GSI)."""
    entries = [
        aml.package(
            aml.integer(slot << 16 | 0xFFFF),
            aml.integer(pin),
            aml.integer(0),
            aml.integer(layout.pci_intx_gsi(slot, pin + 1)),
        )
        for slot in range(PCI_SLOTS)
        for pin in range(4)
    ]
    return aml.name("_PRT", aml.package(*entries))


def memory_window(start: int, end: int) -> bytes:
    """A PCI memory window [start, end) in _CRS: a DWord descriptor below 4 GiB, else a QWord."""
    if end <= 1 << 32:
        return aml.dword_memory(start, end - 1)
    return aml.qword_memory(start, end - 1)


def dsdt(pci_memory: Sequence[tuple[int, int]]) -> bytes:
    """The DSDT: the PCI root with its routing and windows (`pci_memory`: [start, end) each, the
    bus's memory windows), the RTC, COM1 and the S5 sleep state."""
    io_low, io_high = 0x0000, 0xFFFF
    pci0 = aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A03")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_SEG", aml.integer(0)),
        aml.name("_BBN", aml.integer(0)),
        aml.name("_ADR", aml.integer(0)),
        pci_routing_table(),
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.word_bus_number(0, 0),
                aml.io_port(layout.PCI_CONFIG_PORT, 8),
                aml.word_io(io_low, layout.PCI_CONFIG_PORT - 1),
                aml.word_io(layout.PCI_CONFIG_PORT + 8, io_high),
                *(memory_window(start, end) for start, end in pci_memory if start < end),
            ),
        ),
    )
    # The CMOS RTC, so Linux's rtc-cmos binds to it. With no IRQ in _CRS it offers no alarms
    # (the device raises no interrupts); that holds because the FADT is hardware-reduced: with
    # legacy IRQs, rtc-cmos would assume IRQ 8 and wait for interrupts that never come.
    cmos_rtc = aml.device(
        "RTC_",
        aml.name("_HID", aml.eisa_id("PNP0B00")),
        aml.name("_CRS", aml.resource_template(aml.io_port(layout.RTC_PORT, 2))),
    )
    # COM1, so Linux's 8250 gets its interrupt: in hardware-reduced ACPI, ISA IRQs are mapped
    # only for devices that declare them, and without one the UART is polled on a timer.
    com1 = aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(1)),
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.io_port(layout.COM1_PORT, 8), aml.irq_no_flags(layout.COM1_IRQ)
            ),
        ),
    )
    body = aml.scope("\\_SB_", pci0, cmos_rtc, com1) + aml.name(
        "\\_S5_", aml.package(aml.integer(S5_SLEEP_TYPE), aml.integer(0))
    )
    return _table(b"DSDT", 2, body)


def fadt(dsdt_address: int) -> bytes:
    """FADT revision 6 (276 bytes), hardware-reduced."""
    body = bytearray(276 - 36)

    def put(offset: int, fmt: str, *values: object) -> None:
        struct.pack_into(fmt, body, offset - 36, *values)

    put(40, "<I", dsdt_address)  # DSDT (32-bit)
    # No i8042 flag: Linux then skips probing a keyboard controller; it resets via RESET_REG.
    put(108, "<B", layout.RTC_CENTURY)  # the CMOS RTC's century register
    put(109, "<H", IAPC_BOOT_ARCH_LEGACY_DEVICES | IAPC_BOOT_ARCH_NO_VGA)
    put(112, "<I", FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP | FADT_PWR_BUTTON | FADT_SLP_BUTTON)
    body[116 - 36 : 128 - 36] = _gas(layout.RESET_PORT)
    put(128, "<B", layout.RESET_VALUE)
    put(131, "<B", 5)  # FADT minor version (6.5)
    put(140, "<Q", dsdt_address)  # X_DSDT
    body[244 - 36 : 256 - 36] = _gas(SLEEP_CONTROL_PORT)
    body[256 - 36 : 268 - 36] = _gas(SLEEP_STATUS_PORT)
    put(268, "<8s", b"PYVMMKVM")  # hypervisor vendor identity
    return _table(b"FACP", 6, bytes(body))


def madt(vcpus: int) -> bytes:
    body = struct.pack("<II", layout.LAPIC_BASE, MADT_PCAT_COMPAT)
    for cpu in range(vcpus):
        body += struct.pack("<BBBBI", 0, 8, cpu, cpu, 1)  # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, vcpus, 0, layout.IOAPIC_BASE, 0)  # IOAPIC, GSI 0
    body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)  # ISA IRQ0 -> GSI 2
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # NMI on LINT1 of every CPU
    return _table(b"APIC", 4, body)


def mcfg() -> bytes:
    body = bytes(8) + struct.pack("<QHBBI", layout.PCI_ECAM_BASE, 0, 0, 0, 0)
    return _table(b"MCFG", 1, body)


VIOT_NODE_PCI_RANGE = 1
VIOT_NODE_VIRTIO_IOMMU_PCI = 3
_VIOT_HEAD = struct.Struct("<HH8x")  # node count, offset of the first node
_VIOT_IOMMU = struct.Struct("<BxHHH8x")  # type, length, segment, bdf
_VIOT_RANGE = struct.Struct("<BxHIHHHHH6x")  # type, length, endpoint_start, segments, bdfs, output


def viot(iommu_devfn: int, endpoints: Sequence[int]) -> bytes:
    """The Virtual I/O Translation table (ACPI 6.4 §5.2.31): the virtio-iommu at `iommu_devfn`
    of bus 0, and for each endpoint devfn a PCI range of one function whose endpoint id is its
    requester id, translated by it."""
    iommu_node = 36 + _VIOT_HEAD.size
    nodes = [_VIOT_IOMMU.pack(VIOT_NODE_VIRTIO_IOMMU_PCI, _VIOT_IOMMU.size, 0, iommu_devfn)]
    for devfn in endpoints:
        nodes.append(
            _VIOT_RANGE.pack(
                VIOT_NODE_PCI_RANGE, _VIOT_RANGE.size, devfn, 0, 0, devfn, devfn, iommu_node
            )
        )
    return _table(b"VIOT", 0, _VIOT_HEAD.pack(len(nodes), iommu_node) + b"".join(nodes))


def xsdt(entries: list[int]) -> bytes:
    return _table(b"XSDT", 1, struct.pack(f"<{len(entries)}Q", *entries))


def rsdp(xsdt_address: int) -> bytes:
    first = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 2, 0))
    first[8] = checksum(first)
    whole = bytearray(first + struct.pack("<IQB3s", 36, xsdt_address, 0, bytes(3)))
    whole[32] = checksum(whole)
    return bytes(whole)


@dataclass(frozen=True)
class AcpiTables:
    rsdp_address: int
    tables: dict[str, int]


def write_tables(
    memory: GuestMemory,
    vcpus: int,
    pci_memory: Sequence[tuple[int, int]],
    extra: Sequence[bytes] = (),
) -> AcpiTables:
    """Build every table (and the `extra` ones the board's devices give, such as the VIOT),
    place them from ACPI_TABLES_START (16-byte aligned), return where."""
    cursor = ACPI_TABLES_START
    placed: dict[str, int] = {}

    def place(name: str, data: bytes) -> int:
        nonlocal cursor
        address = cursor
        if address + len(data) > ACPI_TABLES_END:
            raise ValueError("ACPI tables do not fit below the reset vector")
        memory.write(address, data)
        placed[name] = address
        cursor = (address + len(data) + 15) & ~15
        return address

    rsdp_slot = place("RSDP", bytes(36))
    dsdt_address = place("DSDT", dsdt(pci_memory))
    entries = [
        place("FACP", fadt(dsdt_address)),
        place("APIC", madt(vcpus)),
        place("MCFG", mcfg()),
        *(place(table[:4].decode(), table) for table in extra),
    ]
    xsdt_address = place("XSDT", xsdt(entries))
    memory.write(rsdp_slot, rsdp(xsdt_address))
    return AcpiTables(rsdp_slot, placed)
