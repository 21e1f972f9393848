"""What the lab's passthrough tests share: the VFIO backends each of them runs under, in a
steady order (`BACKENDS`), the guests they run, built on the host before the lab boots
(`build_passthrough_guests`, a `before` of their `lab` marks), and one boot of the lab kernel
under pyvmm with a busybox init (`boot_linux`)."""

from __future__ import annotations

import subprocess
import time

from guestbuild import guest
from linuxkernel import lab_kernel

from pyvmm.testing import linux
from pyvmm.vfio.backends import BACKENDS as _BACKENDS

BACKENDS = sorted(_BACKENDS)


def build_passthrough_guests() -> None:
    """Build the guests on the host: inside the lab the checkout is read-only."""
    for name in ("pci-probe", "edu", "e1000e-msix", "mtty"):
        guest(name)


def boot_linux(init: str, *args: str, cpus: int = 2) -> subprocess.CompletedProcess[str]:
    """Boot the lab kernel once with `init` as its busybox init: a guest that crashes or hangs
    fails the test (pyvmm's crash report is in its stderr)."""
    started = time.monotonic()
    result = linux.boot(init, kernel=lab_kernel(), cpus=cpus, pyvmm_args=args)
    print(f"boot: exit {result.returncode} after {time.monotonic() - started:.1f} s")
    return result
