"""What the lab's passthrough tests share: the VFIO backends each of them runs under, in a
steady order (`BACKENDS`), and the guests they run, built on the host before the lab boots
(`build_passthrough_guests`, a `before` of their `lab` marks)."""

from __future__ import annotations

from guestbuild import guest

from pyvmm.vfio.backends import BACKENDS as _BACKENDS

BACKENDS = sorted(_BACKENDS)


def build_passthrough_guests() -> None:
    """Build the guests on the host: inside the lab the checkout is read-only."""
    for name in ("pci-probe", "edu", "e1000e-msix", "mtty"):
        guest(name)
