"""VFIO errors the user can act on."""

from __future__ import annotations

from pyvmm.errors import PyvmmError


class VfioError(PyvmmError):
    """A VFIO device, group or container cannot be used as asked; the message says why."""
