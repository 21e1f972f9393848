"""The x86 Linux boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry.

pyvmm loads the protected-mode kernel of a bzImage at its preferred address, fills a zero page
(struct boot_params: the setup header, an e820 map, the command line, the initrd, the RSDP) and
enters the kernel's 64-bit entry point (load address + 0x200) with RSI pointing at the zero page,
on identity-mapped page tables, as `startup_64` expects.

Every check on the user's files gives a `BootError` that names the file and the fix.
"""

from __future__ import annotations

import gzip
import lzma
import os
import struct
from dataclasses import dataclass

from pyvmm.errors import BootError
from pyvmm.machine import layout
from pyvmm.machine.memory import GuestMemory

SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, the 64-bit entry
XLF_KERNEL_64 = 1 << 0
LOADFLAG_LOADED_HIGH = 1 << 0
LOADFLAG_CAN_USE_HEAP = 1 << 7
TYPE_OF_LOADER_UNDEFINED = 0xFF
ENTRY_64_OFFSET = 0x200

# struct boot_params offsets (arch/x86/include/uapi/asm/bootparam.h)
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
# setup_header offsets, the same in the image and in boot_params
HDR_SETUP_SECTS = 0x1F1
HDR_VID_MODE = 0x1FA
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_HEADER = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_PAYLOAD_OFFSET = 0x248
HDR_PAYLOAD_LENGTH = 0x24C
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260


@dataclass(frozen=True)
class BzImage:
    path: str
    setup_header: bytes  # from 0x1F1 to the end of the header
    kernel_offset: int  # where the protected-mode kernel starts in the file
    kernel_size: int
    version: int
    pref_address: int
    init_size: int
    kernel_alignment: int
    cmdline_size: int
    initrd_addr_max: int


def parse_bzimage(path: str) -> BzImage:
    """Read and validate a bzImage's setup header."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x400)
            size = os.fstat(f.fileno()).st_size
    except OSError as err:
        raise BootError(f"{path}: cannot read kernel: {err.strerror}") from None
    if len(head) < 0x268 or struct.unpack_from("<H", head, HDR_BOOT_FLAG)[0] != BOOT_FLAG:
        raise BootError(f"{path}: not a Linux bzImage (no boot sector signature)")
    if head[HDR_HEADER : HDR_HEADER + 4] != HEADER_MAGIC:
        raise BootError(f"{path}: not a Linux bzImage (no 'HdrS' setup header)")
    version = struct.unpack_from("<H", head, HDR_VERSION)[0]
    if version < MIN_PROTOCOL:
        raise BootError(
            f"{path}: boot protocol {version >> 8}.{version & 0xFF} is too old; pyvmm needs "
            "2.12 or later (Linux 3.8+)"
        )
    if not struct.unpack_from("<H", head, HDR_XLOADFLAGS)[0] & XLF_KERNEL_64:
        raise BootError(f"{path}: kernel has no 64-bit entry point; build an x86_64 kernel")
    if not head[HDR_LOADFLAGS] & LOADFLAG_LOADED_HIGH:
        raise BootError(f"{path}: zImage kernels (not loaded high) are not supported")
    setup_sects = head[HDR_SETUP_SECTS] or 4
    kernel_offset = (setup_sects + 1) * 512
    if kernel_offset >= size:
        raise BootError(f"{path}: truncated: no protected-mode kernel after the setup code")
    header_end = HDR_JUMP + 2 + head[HDR_JUMP + 1]  # the jump at 0x200 skips the header
    return BzImage(
        path=path,
        setup_header=head[SETUP_HEADER_OFFSET:header_end],
        kernel_offset=kernel_offset,
        kernel_size=size - kernel_offset,
        version=version,
        pref_address=struct.unpack_from("<Q", head, HDR_PREF_ADDRESS)[0],
        init_size=struct.unpack_from("<I", head, HDR_INIT_SIZE)[0],
        kernel_alignment=struct.unpack_from("<I", head, HDR_KERNEL_ALIGNMENT)[0],
        cmdline_size=struct.unpack_from("<I", head, HDR_CMDLINE_SIZE)[0],
        initrd_addr_max=struct.unpack_from("<I", head, HDR_INITRD_ADDR_MAX)[0],
    )


@dataclass(frozen=True)
class LinuxBoot:
    """Where things went: for the vCPU set-up and for tests."""

    kernel_address: int
    entry: int
    zero_page: int
    initrd_address: int
    initrd_size: int


def place_initrd(path: str | None, low: int, high: int, mem_size: int) -> tuple[int, int]:
    """Where an initrd goes: page-aligned, as high as possible below `high`, above `low`.
    Returns (address, size), (0, 0) without an initrd."""
    if path is None:
        return 0, 0
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise BootError(f"{path}: cannot read initrd: {err.strerror}") from None
    if size == 0:
        raise BootError(f"{path}: initrd is empty")
    address = (high - size) & ~0xFFF
    if address < low:
        raise BootError(
            f"{path}: initrd of {(size + (1 << 20) - 1) >> 20} MiB does not fit above the kernel "
            f"in {mem_size >> 20} MiB of RAM; give more memory with -m"
        )
    return address, size


def load_initrd(memory: GuestMemory, path: str, address: int, size: int) -> None:
    with open(path, "rb") as f:
        if memory.fill_from(address, f, size) != size or f.read(1):
            raise BootError(f"{path}: changed while being read")


def load_linux(
    image: BzImage,
    memory: GuestMemory,
    mem_size: int,
    cmdline: str,
    initrd_path: str | None,
    rsdp_address: int,
) -> LinuxBoot:
    """Load kernel, command line and initrd; write the zero page. Validates sizes first."""
    low_ram_end = min(mem_size, layout.LOW_RAM_LIMIT)
    encoded_cmdline = cmdline.encode() + b"\0"
    if len(encoded_cmdline) > min(image.cmdline_size + 1, layout.CMDLINE_MAX):
        raise BootError(
            f"kernel command line is {len(encoded_cmdline) - 1} bytes; "
            f"{image.path} accepts at most {image.cmdline_size}"
        )
    alignment = max(image.kernel_alignment, 0x200000)
    kernel_address = max(image.pref_address, layout.HIMEM_START)
    kernel_address = (kernel_address + alignment - 1) & ~(alignment - 1)
    kernel_end = kernel_address + max(image.init_size, image.kernel_size)
    if kernel_end > low_ram_end:
        raise BootError(
            f"{image.path}: the kernel needs RAM up to {kernel_end >> 20} MiB (it decompresses "
            f"in place) but the guest has {mem_size >> 20} MiB; give more memory with -m"
        )

    initrd_address, initrd_size = place_initrd(
        initrd_path, kernel_end, min(low_ram_end, image.initrd_addr_max + 1), mem_size
    )
    with open(image.path, "rb") as f:
        f.seek(image.kernel_offset)
        if memory.fill_from(kernel_address, f, image.kernel_size) != image.kernel_size:
            raise BootError(f"{image.path}: changed while being read")
    if initrd_path is not None:
        load_initrd(memory, initrd_path, initrd_address, initrd_size)
    memory.write(layout.CMDLINE_START, encoded_cmdline)

    zero_page = bytearray(4096)
    zero_page[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(image.setup_header)] = (
        image.setup_header
    )
    struct.pack_into("<H", zero_page, HDR_VID_MODE, 0xFFFF)
    zero_page[HDR_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    zero_page[HDR_LOADFLAGS] |= LOADFLAG_CAN_USE_HEAP
    struct.pack_into("<H", zero_page, HDR_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", zero_page, HDR_CMD_LINE_PTR, layout.CMDLINE_START)
    struct.pack_into("<I", zero_page, HDR_RAMDISK_IMAGE, initrd_address & 0xFFFFFFFF)
    struct.pack_into("<I", zero_page, HDR_RAMDISK_SIZE, initrd_size & 0xFFFFFFFF)
    struct.pack_into("<I", zero_page, BP_EXT_RAMDISK_IMAGE, initrd_address >> 32)
    struct.pack_into("<I", zero_page, BP_EXT_RAMDISK_SIZE, initrd_size >> 32)
    struct.pack_into("<Q", zero_page, BP_ACPI_RSDP_ADDR, rsdp_address)
    e820 = layout.e820_map(mem_size)
    zero_page[BP_E820_ENTRIES] = len(e820)
    for i, (address, size, kind) in enumerate(e820):
        struct.pack_into("<QQI", zero_page, BP_E820_TABLE + 20 * i, address, size, kind)
    memory.write(layout.ZERO_PAGE, bytes(zero_page))
    return LinuxBoot(
        kernel_address=kernel_address,
        entry=kernel_address + ENTRY_64_OFFSET,
        zero_page=layout.ZERO_PAGE,
        initrd_address=initrd_address,
        initrd_size=initrd_size,
    )


def extract_vmlinux(path: str) -> bytes:
    """The uncompressed vmlinux ELF inside a bzImage (for PVH boots), like the kernel's
    scripts/extract-vmlinux: the setup header says where the compressed payload is."""
    image = parse_bzimage(path)
    with open(path, "rb") as f:
        f.seek(SETUP_HEADER_OFFSET)
        header = f.read(0x80)
        offset, length = struct.unpack_from("<II", header, HDR_PAYLOAD_OFFSET - SETUP_HEADER_OFFSET)
        f.seek(image.kernel_offset + offset)
        payload = f.read(length)
    try:
        if payload.startswith(b"\x1f\x8b"):
            data = gzip.decompress(payload)
        elif payload.startswith(b"\xfd7zXZ"):
            data = lzma.decompress(payload)
        else:
            raise BootError(
                f"{path}: kernel payload compression {payload[:4].hex()} is not supported "
                "(gzip and xz are)"
            )
    except (OSError, lzma.LZMAError, EOFError) as err:
        raise BootError(f"{path}: corrupt kernel payload ({err})") from None
    if not data.startswith(b"\x7fELF"):
        raise BootError(f"{path}: the kernel payload is not an ELF vmlinux")
    return data
