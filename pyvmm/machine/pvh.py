"""PVH boot of an uncompressed Linux vmlinux (an ELF with a Xen PHYS32_ENTRY note).

The PVH boot ABI (xen/include/public/arch-x86/hvm/start_info.h, used by Linux's
arch/x86/platform/pvh): the kernel's ELF segments are loaded at their physical addresses, and the
vCPU starts at the note's 32-bit entry in flat protected mode with paging off and EBX holding the
address of a `struct hvm_start_info` (command line, initrd as module 0, RSDP, e820-style memory
map). No decompressor and no real-mode setup code run, which makes it the fastest way in.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.errors import BootError
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.machine import cpu, layout
from pyvmm.machine.bzimage import load_initrd, place_initrd
from pyvmm.machine.elf import ElfImage, elf_notes, load_elf, parse_elf
from pyvmm.machine.memory import GuestMemory

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
START_INFO = 0x6000
MODLIST = START_INFO + 0x40
MEMMAP = START_INFO + 0x80
MAX_MEMMAP_ENTRIES = (layout.ZERO_PAGE - MEMMAP) // 24

# GDT descriptors for flat 32-bit protected mode
CODE32 = 0x00CF9B000000FFFF
DATA32 = 0x00CF93000000FFFF
TSS32 = 0x008F8B000000FFFF


@dataclass(frozen=True)
class PvhBoot:
    entry: int
    start_info: int
    initrd_address: int
    initrd_size: int


def pvh_entry(path: str) -> int | None:
    """The PHYS32_ENTRY address from an ELF's Xen notes, or None when it has none."""
    for name, note_type, desc in elf_notes(path):
        if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) >= 4:
            return int.from_bytes(desc[:4], "little")
    return None


def load_pvh(
    path: str,
    entry: int,
    memory: GuestMemory,
    mem_size: int,
    cmdline: str,
    initrd_path: str | None,
    rsdp_address: int,
) -> PvhBoot:
    image: ElfImage = parse_elf(path, entry_must_be_in_image=False)
    encoded = cmdline.encode() + b"\0"
    if len(encoded) > layout.CMDLINE_MAX:
        raise BootError(f"kernel command line is longer than {layout.CMDLINE_MAX - 1} bytes")
    load_elf(image, memory)
    kernel_end = max(s.paddr + s.memsz for s in image.segments)
    low_ram_end = min(mem_size, layout.LOW_RAM_LIMIT)
    initrd_address, initrd_size = place_initrd(initrd_path, kernel_end, low_ram_end, mem_size)
    if initrd_path is not None:
        load_initrd(memory, initrd_path, initrd_address, initrd_size)
        memory.write(MODLIST, struct.pack("<QQQQ", initrd_address, initrd_size, 0, 0))
    memory.write(layout.CMDLINE_START, encoded)
    e820 = layout.e820_map(mem_size)[:MAX_MEMMAP_ENTRIES]
    for i, (address, size, kind) in enumerate(e820):
        memory.write(MEMMAP + 24 * i, struct.pack("<QQII", address, size, kind, 0))
    start_info = struct.pack(
        "<IIIIQQQQII",
        HVM_START_MAGIC,
        1,  # version: has the memory map
        0,
        1 if initrd_path is not None else 0,
        MODLIST if initrd_path is not None else 0,
        layout.CMDLINE_START,
        rsdp_address,
        MEMMAP,
        len(e820),
        0,
    )
    memory.write(START_INFO, start_info)
    return PvhBoot(entry, START_INFO, initrd_address, initrd_size)


def enter_protected_mode(memory: GuestMemory, vcpu: Vcpu, boot: PvhBoot) -> None:
    """Flat 32-bit protected mode, paging off, EBX = start info: the PVH entry state."""
    memory.write(layout.BOOT_GDT, struct.pack("<4Q", 0, CODE32, DATA32, TSS32))
    sregs = vcpu.get_sregs()
    sregs.cs = cpu.segment_from_descriptor(cpu.CODE_SELECTOR, CODE32)
    data = cpu.segment_from_descriptor(cpu.DATA_SELECTOR, DATA32)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = cpu.segment_from_descriptor(cpu.TSS_SELECTOR, TSS32)
    sregs.gdt.base = layout.BOOT_GDT
    sregs.gdt.limit = 4 * 8 - 1
    sregs.cr0 = cpu.X86_CR0_PE | cpu.X86_CR0_ET
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = boot.entry
    regs.rbx = boot.start_info
    regs.rflags = 0x2
    vcpu.set_regs(regs)
