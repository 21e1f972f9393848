"""The VFIO backends by name (each a VfioContext of its own module: add one here), and which one
a host gets unless told."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from pyvmm.errors import ConfigError
from pyvmm.vfio.container import ContainerContext
from pyvmm.vfio.context import VfioContext
from pyvmm.vfio.iommufd.backend import IommufdContext
from pyvmm.vfio.iommufd.objects import CDEV_DIR, IOMMUFD_PATH

if TYPE_CHECKING:
    from pyvmm.kvm.vm import Vm
    from pyvmm.machine.address_space import AddressSpace

log = logging.getLogger(__name__)

BACKENDS: dict[str, type[VfioContext]] = {"iommufd": IommufdContext, "container": ContainerContext}


def default_backend() -> str:
    """iommufd where the kernel has /dev/iommu and VFIO device cdevs, else the container."""
    return "iommufd" if os.path.exists(IOMMUFD_PATH) and os.path.isdir(CDEV_DIR) else "container"


def open_context(
    backend: str | None = None, vm: Vm | None = None, address_space: AddressSpace | None = None
) -> VfioContext:
    """A new IOMMU context of `backend` (by default what this host supports, logged)."""
    if backend is None:
        backend = default_backend()
        log.info("VFIO backend: %s (the default on this host)", backend)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown VFIO backend {backend!r}: use {' or '.join(BACKENDS)}")
    return BACKENDS[backend](vm, address_space)
