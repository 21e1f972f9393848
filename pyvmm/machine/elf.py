"""Loading ELF64 x86-64 executables (test guests, PVH kernels) into guest RAM with pyelftools.

Every check that can fail on a user's file fails with a `BootError` naming the file and the fix;
nothing is written to guest RAM until the whole image has been validated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pyvmm.errors import BootError
from pyvmm.machine.layout import HIMEM_START, MiB
from pyvmm.machine.memory import GuestMemory, GuestMemoryError

PT_LOAD = "PT_LOAD"
PF_X = 1


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
    # Imported here, not at the top: pyelftools costs a second of start-up in the lab (nested
    # KVM under TCG), and bzImage boots never need it.
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != b"\x7fELF":
                raise BootError(f"{path}: not an ELF file (expected an ELF64 x86-64 executable)")
            f.seek(0)
            elf = ELFFile(f)
            file_size = os.fstat(f.fileno()).st_size
            if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
                raise BootError(
                    f"{path}: ELF for {elf['e_machine']} ({elf.elfclass}-bit), "
                    "but pyvmm boots x86-64 (ELF64, EM_X86_64) images"
                )
            if elf["e_type"] != "ET_EXEC":
                raise BootError(f"{path}: ELF type {elf['e_type']}; link a static ET_EXEC image")
            segments = []
            for phdr in elf.iter_segments():
                if phdr["p_type"] != PT_LOAD or phdr["p_memsz"] == 0:
                    continue
                seg = Segment(
                    paddr=phdr["p_paddr"],
                    offset=phdr["p_offset"],
                    filesz=phdr["p_filesz"],
                    memsz=phdr["p_memsz"],
                    executable=bool(phdr["p_flags"] & PF_X),
                )
                if seg.filesz > seg.memsz:
                    raise BootError(f"{path}: segment at {seg.paddr:#x} has filesz > memsz")
                if seg.offset + seg.filesz > file_size:
                    raise BootError(
                        f"{path}: truncated: segment at {seg.paddr:#x} needs bytes up to "
                        f"{seg.offset + seg.filesz} but the file has {file_size}"
                    )
                segments.append(seg)
            entry = elf["e_entry"]
    except FileNotFoundError:
        raise BootError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BootError(f"{path}: is a directory, not a guest image") from None
    except PermissionError:
        raise BootError(f"{path}: permission denied") from None
    except (ELFError, ValueError, OSError) as err:
        if isinstance(err, BootError):
            raise
        raise BootError(f"{path}: corrupt or truncated ELF image ({err})") from None
    if not segments:
        raise BootError(f"{path}: no loadable (PT_LOAD) segments")
    inside = any(s.executable and s.paddr <= entry < s.paddr + s.memsz for s in segments)
    if entry_must_be_in_image and not inside:
        raise BootError(f"{path}: entry point {entry:#x} is not inside an executable segment")
    return ElfImage(path, entry, tuple(segments))


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
