"""Where the firmware runtime's sources and the packaged test guests are: in an installed wheel,
under pyvmm/_data/ (setup.py puts them there); in a checkout, its firmware/ and guests/."""

from __future__ import annotations

import os

from pyvmm.errors import PyvmmError

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_PACKAGED = os.path.join(_PACKAGE, "_data")
_CHECKOUT = os.path.dirname(_PACKAGE)


def _find(name: str, marker: str) -> str:
    for base in (_PACKAGED, _CHECKOUT):
        path = os.path.join(base, name)
        if os.path.exists(os.path.join(path, marker)):
            return path
    raise PyvmmError(
        f"pyvmm's {name} files are missing (not in {_PACKAGED} nor a checkout at {_CHECKOUT}): "
        "reinstall pyvmm"
    )


def firmware_dir() -> str:
    """The runtime's sources: include/pyvmmfw.h, src/, fw.mk, guest.mk, guest.ld."""
    return _find("firmware", "guest.mk")


def demo_guest() -> str:
    """The prebuilt hello guest: packaged in a wheel; in a checkout, guests/build's (built by
    `make -C guests`)."""
    packaged = os.path.join(_PACKAGED, "guests", "hello.elf")
    if os.path.exists(packaged):
        return packaged
    built = os.path.join(_CHECKOUT, "guests", "build", "hello.elf")
    if os.path.exists(built):
        return built
    raise PyvmmError(
        "the demo guest is not built: in a checkout, run `make -C guests` (an installed pyvmm "
        "has it packaged: reinstall it)"
    )
