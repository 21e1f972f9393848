"""Bad guest images: one clear line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from guestbuild import guest, requires_kvm

pytestmark = [pytest.mark.kvm, requires_kvm]

E_MACHINE = 18  # offset of e_machine in the ELF header
EM_AARCH64 = 183


def run_pyvmm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _program_headers(data: bytes) -> list[int]:
    """File offsets of the PT_LOAD program headers of an ELF64 image."""
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    offsets = [phoff + i * phentsize for i in range(phnum)]
    return [o for o in offsets if struct.unpack_from("<I", data, o)[0] == 1]


def _mutated(tmp_path: Path, name: str, mutate) -> Path:
    data = bytearray(guest("hello").read_bytes())
    mutate(data)
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _move_data_segment(data: bytearray, paddr: int) -> None:
    ph = _program_headers(data)[-1]
    struct.pack_into("<Q", data, ph + 0x18, paddr)  # p_paddr


def _grow_last_segment(data: bytearray, memsz: int) -> None:
    ph = _program_headers(data)[-1]
    struct.pack_into("<Q", data, ph + 0x28, memsz)  # p_memsz


def _truncate(data: bytearray) -> None:
    del data[len(data) // 3 :]


CASES = {
    "not-elf": (lambda p: _write(p, b"this is not a kernel\n" * 10), r"not an ELF file"),
    "empty": (lambda p: _write(p, b""), r"not an ELF file"),
    "wrong-machine": (
        lambda p: _mutated(
            p, "arm.elf", lambda d: struct.pack_into("<H", d, E_MACHINE, EM_AARCH64)
        ),
        r"EM_AARCH64.*x86-64",
    ),
    "outside-ram": (
        lambda p: _mutated(p, "far.elf", lambda d: _move_data_segment(d, 0x8000_0000)),
        r"outside guest RAM",
    ),
    "larger-than-ram": (
        lambda p: _mutated(p, "huge.elf", lambda d: _grow_last_segment(d, 200 << 20)),
        r"needs \d+ MiB but guest RAM is 64 MiB",
    ),
    "truncated": (lambda p: _mutated(p, "cut.elf", _truncate), r"truncated|corrupt"),
    "missing": (lambda p: p / "nope.elf", r"no such file"),
}


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bad.img"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_image_gives_one_line_and_nonzero_exit(tmp_path: Path, case: str) -> None:
    make, expected = CASES[case]
    image = make(tmp_path)
    result = run_pyvmm(str(image), "-m", "64M")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyvmm: error: ")
    assert str(image) in lines[0]
    assert re.search(expected, lines[0]), lines[0]
    assert result.stdout == ""


def test_bad_options_are_one_line() -> None:
    result = run_pyvmm(str(guest("hello")), "-m", "1M")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "pyvmm: error: memory size 1048576 bytes: give at least 2M, a multiple of 4 KiB "
        "(e.g. -m 64M)"
    ]
    result = run_pyvmm(str(guest("hello")), "--console", "bogus")
    assert result.returncode != 0
    assert "bad --console 'bogus'" in result.stderr
    assert "Traceback" not in result.stderr
