"""The VFIO backends by name: each opens a vfio-pci device and gives its DMA space.

    with contextlib.ExitStack() as stack:
        space, device = BACKENDS["iommufd"](sysfs.pci_device(bdf), stack)

A backend is a module with `open_pci(device, stack)`; adding one is adding it here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from pyvmm.vfio import container, iommufd
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.dma import DmaSpace
from pyvmm.vfio.sysfs import PciDevice

OpenPci = Callable[[PciDevice, contextlib.ExitStack], tuple[DmaSpace, VfioDevice]]

BACKENDS: dict[str, OpenPci] = {
    "iommufd": iommufd.open_pci,
    "container": container.open_pci,
}
DEFAULT_BACKEND = "iommufd"
