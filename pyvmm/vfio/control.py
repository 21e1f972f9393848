"""Control-socket commands for a machine's iommufd objects (docs/control.md):

    iommufd-objects                              every object: id, type, parents, details
    hwpt-alloc device=BDF [nest_parent=true] [dirty_tracking=true]   a HWPT over the RAM IOAS
    hwpt-attach device=BDF id=N                  move a device to the IOAS or a HWPT over it
    iommufd-destroy id=N                         destroy a HWPT (or what hangs on it) made so

Each acts on the machine's IOMMU context; a machine without one, or on the legacy container,
gets an error saying so. A replace takes effect while the guest runs: every HWPT over the
guest-RAM IOAS translates the same RAM, so the guest's DMA goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvmm.vfio.errors import VfioError

if TYPE_CHECKING:
    from pyvmm.vfio.context import VfioHost
    from pyvmm.vfio.iommufd.backend import IommufdContext


def commands(machine: VfioHost) -> dict[str, Callable[..., dict[str, Any]]]:
    """The commands, by name, for the control server of `machine`."""

    def context() -> IommufdContext:
        from pyvmm.vfio.iommufd.backend import (
            IommufdContext,
        )  # only when asked: start-up time counts

        backend = machine.vfio_backend
        if backend is None:
            raise VfioError("the machine has no assigned device, so no iommufd")
        found = machine.vfio()
        if not isinstance(found, IommufdContext):
            raise VfioError(f"the machine's devices use the {backend} backend, not iommufd")
        return found

    def iommufd_objects() -> dict[str, Any]:
        return {"objects": context().iommufd.describe()}

    def hwpt_alloc(
        device: str, nest_parent: bool = False, dirty_tracking: bool = False
    ) -> dict[str, Any]:
        hwpt = context().alloc_hwpt(device, nest_parent=nest_parent, dirty_tracking=dirty_tracking)
        return {"id": hwpt.id}

    def hwpt_attach(device: str, id: int) -> dict[str, Any]:
        return {"hwpt": context().attach(device, id)}

    def iommufd_destroy(id: int) -> dict[str, Any]:
        context().destroy(id)
        return {}

    return {
        "iommufd-objects": iommufd_objects,
        "hwpt-alloc": hwpt_alloc,
        "hwpt-attach": hwpt_attach,
        "iommufd-destroy": iommufd_destroy,
    }
