"""The exit loop (C decoding, Python dispatch) against the `accesses` guest: port and MMIO
reads and writes of every size, string port I/O, and accesses nothing claims."""

from __future__ import annotations

import os

import pytest
from guestbuild import guest, requires_kvm
from processes import python_probe

from pyvmm.board.machine import Machine
from pyvmm.machine import layout
from pyvmm.machine.console import CaptureConsole

pytestmark = [pytest.mark.kvm, requires_kvm]

SCRATCH_PORT = 0x520
SCRATCH_MMIO = 0xF800_0000


def pattern(offset: int, size: int) -> int:
    """What the scratch device answers a read with (the guest expects the same)."""
    return (0x8877665544332211 + offset * 0x0101010101010101) & ((1 << (8 * size)) - 1)


class Scratch:
    """Answers reads with `pattern`, records writes as (offset, size, value)."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return pattern(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_every_access_kind_reaches_the_device_and_answers_the_guest() -> None:
    ports, mmio = Scratch(), Scratch()
    with Machine(mem_size=64 * layout.MiB, console=CaptureConsole()) as machine:
        machine.pio.register(SCRATCH_PORT, 8, ports, "scratch")
        machine.mmio.register(SCRATCH_MMIO, 16, mmio, "scratch")
        machine.load_elf(str(guest("accesses")))
        result = machine.run(timeout=60)
        text = machine.console.text  # type: ignore[attr-defined]
    assert result.exit_code == 0, text
    assert "accesses: 19 checks ok" in text
    assert ports.writes == [
        (1, 1, 0x5A),
        (2, 2, 0xA55A),
        (4, 4, 0xDEADBEEF),
        *((0, 1, value) for value in (1, 2, 3)),  # rep outsb
        (2, 2, 0x1234),  # rep outsw
        (2, 2, 0x5678),
    ]
    assert mmio.writes == [
        (1, 1, 0x11),
        (2, 2, 0x2222),
        (4, 4, 0x33333333),
        (8, 8, 0x4444444455555555),
    ]


def test_a_build_older_than_its_source_is_refused_in_one_line(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyvmm.kvm import exitloop
    from pyvmm.kvm.errors import KvmError

    exitloop._check_build()  # (this checkout's build is current)
    edited = []
    for path in exitloop._SOURCES:  # an edit of either the C source or the cdef
        copy = tmp_path / os.path.basename(path)
        with open(path) as source:
            copy.write_text(source.read() + "/* edited */\n")
        edited.append(str(copy))
    for index in range(2):
        sources = list(exitloop._SOURCES)
        sources[index] = edited[index]
        monkeypatch.setattr(exitloop, "_SOURCES", sources)
        with pytest.raises(KvmError, match=r"built from older sources: build it with scripts"):
            exitloop._check_build()


def test_pyvmm_without_its_built_exit_loop_says_so_in_one_line() -> None:
    """As on a checkout nobody installed: the extension cannot be imported."""
    probe = (
        "import sys\n"
        "class Unbuilt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'pyvmm.kvm._exitloop': raise ImportError('no module ' + name)\n"
        "sys.meta_path.insert(0, Unbuilt())\n"
        "from pyvmm.cli import main\n"
        "sys.exit(main(['run', sys.argv[1]]))\n"
    )
    result = python_probe(probe, str(guest("hello")))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "pyvmm: error: pyvmm's C exit loop is not built (no module pyvmm.kvm._exitloop): "
        "build it with scripts/setup (or pip install -e .), which needs gcc"
    ]
