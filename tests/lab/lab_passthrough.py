"""What the lab's passthrough tests share: the VFIO backends each of them runs under, in a
steady order (`BACKENDS`), the guests they run, built on the host before the lab boots
(`build_passthrough_guests`, a `before` of their `lab` marks), and one boot of the lab kernel
under pyvmm with a busybox init (`boot_linux`)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from guestbuild import guest
from linuxkernel import lab_kernel

from pyvmm.initramfs import busybox_initramfs
from pyvmm.lab.launcher import find_busybox
from pyvmm.vfio.backends import BACKENDS as _BACKENDS

BACKENDS = sorted(_BACKENDS)


def build_passthrough_guests() -> None:
    """Build the guests on the host: inside the lab the checkout is read-only."""
    for name in ("pci-probe", "edu", "e1000e-msix", "mtty"):
        guest(name)


def boot_linux(
    tmp_path: Path, init: str, *args: str, cpus: int = 2
) -> subprocess.CompletedProcess[str]:
    """Boot the lab kernel once with `init` as its busybox init: a guest that crashes or hangs
    fails the test (pyvmm's crash report is in its stderr)."""
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(find_busybox(), init))
    command = [
        sys.executable, "-m", "pyvmm", "run", "--timeout", "150",
        "-k", str(lab_kernel()), "-i", str(initrd), "-m", "256M", "-c", str(cpus),
        "-p", "console=ttyS0 quiet panic=-1", *args,
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, errors="replace", timeout=200, check=False
    )
    print(f"boot: exit {result.returncode} after {time.monotonic() - started:.1f} s")
    return result
