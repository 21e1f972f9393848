"""Only what pyproject.toml cannot say: the cffi-built C exit loop (pyvmm/kvm/exitloop_build.py),
and, in a wheel, the firmware runtime's sources and the demo guest as package data under
pyvmm/_data (pyvmm.guest_files finds them there, or in a checkout's firmware/ and guests/)."""

import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
FIRMWARE_FILES = ("Makefile", "fw.mk", "guest.mk", "guest.ld", "README.md", "include/**/*.h")
FIRMWARE_FILES += ("src/*.c", "src/*.S")


class BuildPyWithGuests(build_py):
    """build_py, and the runtime's sources, the project's guests' sources (examples) and a
    prebuilt hello guest (`pyvmm run --demo`, without a compiler) copied into the package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # (a checkout has them where guest_files looks)
            return
        data = Path(self.build_lib) / "pyvmm" / "_data"
        firmware = ROOT / "firmware"
        for pattern in FIRMWARE_FILES:
            for path in firmware.glob(pattern):
                target = data / "firmware" / path.relative_to(firmware)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        subprocess.run(["make", "-s", "-C", str(ROOT / "guests"), "hello"], check=True)
        guests = data / "guests"
        guests.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "guests" / "build" / "hello.elf", guests / "hello.elf")
        for source in (ROOT / "guests").glob("*.[ch]"):
            shutil.copy2(source, guests / source.name)


setup(
    cmdclass={"build_py": BuildPyWithGuests},
    cffi_modules=["pyvmm/kvm/exitloop_build.py:ffibuilder"],
)
