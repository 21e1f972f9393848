"""pyvmm's own ELF64 reader (pyvmm.machine.elf) against pyelftools, on every test guest and on
hostile notes."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from guestbuild import guest

from pyvmm.errors import BootError
from pyvmm.machine.elf import elf_notes, parse_elf
from pyvmm.machine.pvh import XEN_ELFNOTE_PHYS32_ENTRY, pvh_entry


def test_segments_and_entry_match_pyelftools_for_every_test_guest() -> None:
    images = sorted(guest("hello").parent.glob("*.elf"))
    assert len(images) > 10
    for path in images:
        image = parse_elf(str(path))
        with path.open("rb") as f:
            elf = ELFFile(f)
            expected = [
                (s["p_paddr"], s["p_offset"], s["p_filesz"], s["p_memsz"], bool(s["p_flags"] & 1))
                for s in elf.iter_segments()
                if s["p_type"] == "PT_LOAD" and s["p_memsz"]
            ]
            assert image.entry == elf["e_entry"], path.name
        found = [(s.paddr, s.offset, s.filesz, s.memsz, s.executable) for s in image.segments]
        assert found == expected, path.name


def _elf_with_notes(path: Path, notes: bytes) -> Path:
    """A minimal ET_EXEC x86-64 ELF: one PT_LOAD of one byte and one PT_NOTE of `notes`."""
    ehdr = struct.Struct("<16sHHIQQQIHHHHHH")
    phdr = struct.Struct("<IIQQQQQQ")
    phoff = ehdr.size
    load_at = phoff + 2 * phdr.size
    ident = b"\x7fELF\x02\x01\x01".ljust(16, b"\0")
    header = ehdr.pack(ident, 2, 62, 1, 0x100000, phoff, 0, 0, ehdr.size, phdr.size, 2, 0, 0, 0)
    load = phdr.pack(1, 5, load_at, 0x100000, 0x100000, 1, 1, 0x1000)
    note = phdr.pack(4, 4, load_at + 1, 0, 0, len(notes), len(notes), 4)
    path.write_bytes(header + load + note + b"\xf4" + notes)
    return path


def _note(name: bytes, note_type: int, desc: bytes) -> bytes:
    def padded(data: bytes) -> bytes:
        return data + bytes(-len(data) % 4)

    return struct.pack("<III", len(name), len(desc), note_type) + padded(name) + padded(desc)


def test_the_pvh_entry_is_found_among_other_notes(tmp_path: Path) -> None:
    notes = _note(b"GNU\0", 3, b"\x01\x02\x03") + _note(
        b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x1000000)
    )
    path = _elf_with_notes(tmp_path / "pvh.elf", notes)
    assert pvh_entry(str(path)) == 0x1000000
    with path.open("rb") as f:  # (pyelftools names the types it knows: compare the rest)
        expected = [
            (n["n_name"], n["n_descsz"])
            for s in ELFFile(f).iter_segments()
            if s["p_type"] == "PT_NOTE"
            for n in s.iter_notes()
        ]
    found = list(elf_notes(str(path)))
    assert [(name.decode(), len(desc)) for name, _, desc in found] == expected
    assert [note_type for _, note_type, _ in found] == [3, XEN_ELFNOTE_PHYS32_ENTRY]


def test_no_xen_note_means_no_pvh_entry(tmp_path: Path) -> None:
    path = _elf_with_notes(tmp_path / "plain.elf", _note(b"GNU\0", 1, b"\0" * 16))
    assert pvh_entry(str(path)) is None


def test_a_note_running_past_its_segment_is_refused(tmp_path: Path) -> None:
    cut = _note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x1000000))[:-4]
    path = _elf_with_notes(tmp_path / "cut.elf", cut)
    with pytest.raises(BootError, match="corrupt ELF note"):
        pvh_entry(str(path))


E_PHOFF, E_PHNUM = 32, 56  # offsets in Elf64_Ehdr
PHDR_SIZE = 56


@pytest.mark.parametrize(
    ("field", "offset", "fmt", "value", "message"),
    [
        ("e_phoff past the file", E_PHOFF, "<Q", 1 << 62, "program headers cut short"),
        ("65535 program headers", E_PHNUM, "<H", 0xFFFF, "program headers cut short"),
        ("a note at 2**62", 64 + PHDR_SIZE + 8, "<Q", 1 << 62, "past the end of the file"),
        ("a note of 2**62 bytes", 64 + PHDR_SIZE + 32, "<Q", 1 << 62, "past the end of the file"),
        ("a segment of 2**62 bytes", 64 + 32, "<Q", 1 << 62, "truncated|filesz > memsz"),
    ],
)
def test_a_hostile_header_is_refused_in_one_line(
    tmp_path: Path, field: str, offset: int, fmt: str, value: int, message: str
) -> None:
    """(A kernel or guest image is the user's file, any of it may lie: nothing it says is
    sought or read before it is checked against the file.)"""
    notes = _note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x1000000))
    path = _elf_with_notes(tmp_path / "bad.elf", notes)
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    with pytest.raises(BootError, match=message):
        pvh_entry(str(path))
        parse_elf(str(path))
