"""Booting: putting an image into guest RAM and the boot vCPU at its entry.

Two kinds of image: an ELF64 test guest (entered in long mode, with RAM size and vCPU count in
RDI/RSI: the contract in firmware/README.md), and Linux, as a bzImage by the x86 boot protocol
(64-bit entry) or as an uncompressed vmlinux through its PVH entry note. Linux also gets ACPI
tables (CPUs, PCI root, power-off), its command line and its initrd.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyvmm.errors import BootError
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.machine import acpi, cpu, layout
from pyvmm.machine.elf import is_elf, load_elf, parse_elf
from pyvmm.machine.memory import GuestMemory

if TYPE_CHECKING:
    from pyvmm.machine.bzimage import LinuxBoot
    from pyvmm.machine.pvh import PvhBoot


def boot_linux(
    memory: GuestMemory,
    vcpus: list[Vcpu],
    kernel: str,
    initrd: str | None = None,
    cmdline: str = "",
    *,
    pci_memory: Sequence[tuple[int, int]],
    acpi_tables: Sequence[bytes] = (),
) -> LinuxBoot | PvhBoot:
    """Load Linux (bzImage, or vmlinux with a PVH note) and its initrd; set up the BSP.
    `pci_memory` is the PCI bus's memory windows, for the DSDT; `acpi_tables` more tables."""
    # (Imported here: a test guest's start-up, which is most of its run, never needs them.)
    from pyvmm.machine.bzimage import load_linux, parse_bzimage
    from pyvmm.machine.pvh import enter_protected_mode, load_pvh, pvh_entry

    tables = acpi.write_tables(memory, len(vcpus), pci_memory, acpi_tables)
    write_reset_vector(memory)
    for vcpu in vcpus:
        cpu.set_boot_msrs(vcpu)
    if is_elf(kernel):
        entry = pvh_entry(kernel)
        if entry is None:
            raise BootError(
                f"{kernel}: ELF without a PVH entry note; build Linux with CONFIG_PVH=y, "
                "or boot its bzImage"
            )
        pvh = load_pvh(kernel, entry, memory, memory.size, cmdline, initrd, tables.rsdp_address)
        enter_protected_mode(memory, vcpus[0], pvh)
        return pvh
    image = parse_bzimage(kernel)
    boot = load_linux(image, memory, memory.size, cmdline, initrd, tables.rsdp_address)
    cpu.write_boot_tables(memory)
    cpu.enter_long_mode(vcpus[0], boot.entry, rsi=boot.zero_page)
    return boot


def write_reset_vector(memory: GuestMemory) -> None:
    """What firmware's reset vector does, for a Linux that reboots by jumping to it (it does by
    default: with hardware-reduced ACPI, Linux picks EFI and then the BIOS before the ACPI
    reset register): real-mode code that writes the reset register, and halts."""
    code = bytes(
        [
            0xB0, layout.RESET_VALUE,  # mov al, RESET_VALUE
            0xBA, *layout.RESET_PORT.to_bytes(2, "little"),  # mov dx, RESET_PORT
            0xEE,  # out dx, al
            0xF4,  # hlt
            0xEB, 0xFD,  # jmp back to the hlt
        ]
    )  # fmt: skip
    memory.write(layout.RESET_VECTOR, code)


def boot_elf(memory: GuestMemory, vcpus: list[Vcpu], path: str) -> None:
    """Load an ELF64 test guest and point the BSP at its entry in long mode."""
    image = parse_elf(path)
    load_elf(image, memory)
    cpu.write_boot_tables(memory)
    low_ram = min(memory.size, layout.LOW_RAM_LIMIT)
    cpu.enter_long_mode(vcpus[0], image.entry, rdi=low_ram, rsi=len(vcpus))
