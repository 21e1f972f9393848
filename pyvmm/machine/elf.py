"""Loading ELF64 x86-64 executables (test guests, PVH kernels) into guest RAM.

Only the file header, the program headers and notes are read, with `struct`: the layouts are
fixed by the ELF64 ABI, and a full ELF library costs more start-up than booting a test guest.
Every check that can fail on a user's file fails with a `BootError` naming the file and the fix;
nothing is written to guest RAM until the whole image has been validated.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from pyvmm.errors import BootError
from pyvmm.machine.layout import HIMEM_START, MiB
from pyvmm.machine.memory import GuestMemory, GuestMemoryError

ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PF_X = 1
# e_machine values a wrong image is likely to carry, named in the error
MACHINES = {3: "EM_386", 8: "EM_MIPS", 20: "EM_PPC", 21: "EM_PPC64", 22: "EM_S390", 40: "EM_ARM"}
MACHINES |= {62: "EM_X86_64", 183: "EM_AARCH64", 243: "EM_RISCV", 258: "EM_LOONGARCH"}

# Elf64_Ehdr: e_ident[16], e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags,
# e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# Elf64_Phdr: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
_PHDR = struct.Struct("<IIQQQQQQ")
# Elf64_Nhdr: n_namesz, n_descsz, n_type
_NHDR = struct.Struct("<III")


class _ElfHeader(NamedTuple):
    entry: int
    phoff: int
    phentsize: int
    phnum: int


@dataclass(frozen=True)
class Segment:
    paddr: int
    offset: int
    filesz: int
    memsz: int
    executable: bool


@dataclass(frozen=True)
class ElfImage:
    path: str
    entry: int
    segments: tuple[Segment, ...]


def is_elf(path: str) -> bool:
    """Whether the file starts with the ELF magic (a missing file is not)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def parse_elf(path: str, *, entry_must_be_in_image: bool = True) -> ElfImage:
    """Read and validate an ELF executable's header and program headers.

    A PVH kernel enters through its ELF note, not e_entry: it passes
    `entry_must_be_in_image=False`."""
    try:
        with open(path, "rb") as f:
            data = f.read(_EHDR.size)
            if data[:4] != b"\x7fELF":
                raise BootError(f"{path}: not an ELF file (expected an ELF64 x86-64 executable)")
            header = _header(path, data)
            file_size = os.fstat(f.fileno()).st_size
            segments = []
            for phdr in _program_headers(path, f, header, file_size):
                p_type, p_flags, offset, _vaddr, paddr, filesz, memsz, _align = phdr
                if p_type != PT_LOAD or memsz == 0:
                    continue
                seg = Segment(paddr, offset, filesz, memsz, executable=bool(p_flags & PF_X))
                if seg.filesz > seg.memsz:
                    raise BootError(f"{path}: segment at {seg.paddr:#x} has filesz > memsz")
                if seg.offset + seg.filesz > file_size:
                    raise BootError(
                        f"{path}: truncated: segment at {seg.paddr:#x} needs bytes up to "
                        f"{seg.offset + seg.filesz} but the file has {file_size}"
                    )
                segments.append(seg)
    except FileNotFoundError:
        raise BootError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BootError(f"{path}: is a directory, not a guest image") from None
    except PermissionError:
        raise BootError(f"{path}: permission denied") from None
    except OSError as err:
        raise BootError(f"{path}: cannot read the image ({err})") from None
    if not segments:
        raise BootError(f"{path}: no loadable (PT_LOAD) segments")
    entry = header.entry
    inside = any(s.executable and s.paddr <= entry < s.paddr + s.memsz for s in segments)
    if entry_must_be_in_image and not inside:
        raise BootError(f"{path}: entry point {entry:#x} is not inside an executable segment")
    return ElfImage(path, entry, tuple(segments))


def elf_notes(path: str) -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, descriptor) of each note in the PT_NOTE segments of an ELF64 x86-64 file."""
    try:
        with open(path, "rb") as f:
            header = _header(path, f.read(_EHDR.size))
            file_size = os.fstat(f.fileno()).st_size
            headers = _program_headers(path, f, header, file_size)
            notes = [p for p in headers if p[0] == PT_NOTE]
            for _type, _flags, offset, _vaddr, _paddr, filesz, _memsz, align in notes:
                if offset + filesz > file_size:
                    raise BootError(f"{path}: corrupt ELF note segment (past the end of the file)")
                f.seek(offset)
                yield from _parse_notes(path, f.read(filesz), 8 if align == 8 else 4)
    except OSError as err:
        raise BootError(f"{path}: cannot read ELF notes ({err})") from None


def _header(path: str, data: bytes) -> _ElfHeader:
    if len(data) < _EHDR.size:
        raise BootError(f"{path}: corrupt or truncated ELF image (header cut short)")
    fields = _EHDR.unpack(data)
    ident, e_type, machine, _version, entry, phoff = fields[:6]
    phentsize, phnum = fields[9], fields[10]
    elf_class, encoding = ident[4], ident[5]
    if elf_class != ELFCLASS64 or encoding != ELFDATA2LSB or machine != EM_X86_64:
        bits = {1: "32-bit", 2: "64-bit"}.get(elf_class, f"class {elf_class}")
        order = {1: "little-endian", 2: "big-endian"}.get(encoding, f"encoding {encoding}")
        raise BootError(
            f"{path}: ELF for {MACHINES.get(machine, f'machine {machine}')} ({bits}, {order}), "
            "but pyvmm boots x86-64 (ELF64, little-endian, EM_X86_64) images"
        )
    if e_type != ET_EXEC:
        raise BootError(f"{path}: ELF type {e_type} is not ET_EXEC; link a static executable")
    if phnum and phentsize < _PHDR.size:
        raise BootError(f"{path}: corrupt ELF image (program headers of {phentsize} bytes)")
    return _ElfHeader(entry, phoff, phentsize, phnum)


def _program_headers(
    path: str, f: BinaryIO, header: _ElfHeader, file_size: int
) -> list[tuple[int, int, int, int, int, int, int, int]]:
    """The program header table, checked to lie inside the file before it is read (a hostile
    header may name any offset and size)."""
    size = header.phentsize * header.phnum
    if header.phoff + size > file_size:
        raise BootError(f"{path}: corrupt or truncated ELF image (program headers cut short)")
    f.seek(header.phoff)
    table = f.read(size)
    if len(table) != size:
        raise BootError(f"{path}: corrupt or truncated ELF image (program headers cut short)")
    return [_PHDR.unpack_from(table, i * header.phentsize) for i in range(header.phnum)]


def _parse_notes(path: str, data: bytes, align: int) -> Iterator[tuple[bytes, int, bytes]]:
    """The notes of one segment, each name and descriptor padded to `align` bytes (4, or 8 in a
    segment aligned so: the gABI's two kinds)."""
    pos = 0
    while pos + _NHDR.size <= len(data):
        namesz, descsz, note_type = _NHDR.unpack_from(data, pos)
        name_at = pos + _NHDR.size
        desc_at = name_at + _aligned(namesz, align)
        pos = desc_at + _aligned(descsz, align)
        if pos > len(data):
            raise BootError(f"{path}: corrupt ELF note (runs past its segment)")
        yield data[name_at : name_at + namesz].rstrip(b"\0"), note_type, data[desc_at:][:descsz]


def _aligned(size: int, align: int) -> int:
    return (size + align - 1) & ~(align - 1)


def load_elf(image: ElfImage, memory: GuestMemory) -> None:
    """Copy an image's segments into guest RAM (zero-filling .bss), after checking they fit."""
    needed = sum(seg.memsz for seg in image.segments)
    if needed > memory.size:
        raise BootError(
            f"{image.path}: image needs {(needed + MiB - 1) // MiB} MiB but guest RAM is "
            f"{memory.size // MiB} MiB; give more memory with -m"
        )
    for seg in image.segments:
        if seg.paddr < HIMEM_START:
            raise BootError(
                f"{image.path}: segment at {seg.paddr:#x} is below 1 MiB, which pyvmm "
                "reserves for boot structures; link the image at 0x100000 or above"
            )
        try:
            memory.region_for(seg.paddr, seg.memsz)
        except GuestMemoryError:
            raise BootError(
                f"{image.path}: segment {seg.paddr:#x}-{seg.paddr + seg.memsz:#x} lies outside "
                f"guest RAM ({memory.size // MiB} MiB); give more memory with -m or relink"
            ) from None
    with open(image.path, "rb") as f:
        for seg in image.segments:
            f.seek(seg.offset)
            data = f.read(seg.filesz)
            if len(data) != seg.filesz:
                raise BootError(f"{image.path}: truncated while reading segment {seg.paddr:#x}")
            memory.write(seg.paddr, data)
            memory.slice(seg.paddr + seg.filesz, seg.memsz - seg.filesz)[:] = bytes(
                seg.memsz - seg.filesz
            )
