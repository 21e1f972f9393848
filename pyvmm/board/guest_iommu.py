"""`--viommu virtio`: the machine's virtio-iommu, made by the first device that is to sit behind
it, with its guest domains kept in the machine's iommufd (pyvmm.vfio.iommufd.guest_domains) and
the ACPI VIOT table that tells Linux which PCI functions are its endpoints.

The virtio-iommu takes the first free slot when the first such device is assigned, so a machine
built again from the same configuration has it at the same place. It is not in the machine's
configuration itself: the devices that sit behind it bring it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmm.devices.virtio import iommu
from pyvmm.devices.virtio.iommu_domains import GuestDomains
from pyvmm.machine import acpi
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.iommufd.backend import IommufdContext
from pyvmm.vfio.iommufd.guest_domains import IommufdDomains

if TYPE_CHECKING:
    from pyvmm.board.machine import Machine
    from pyvmm.devices.virtio.pci import VirtioPciDevice
    from pyvmm.vfio.iommufd.objects import VfioBinding


class GuestIommu:
    def __init__(self, machine: Machine) -> None:
        context = machine.vfio("iommufd")
        if not isinstance(context, IommufdContext):
            raise VfioError("--viommu virtio needs the iommufd backend (--vfio-backend iommufd)")
        self.backing = IommufdDomains(context, machine.memory)
        self.domains = GuestDomains(
            self.backing,
            (),
            self.backing.in_ram,
            limits=self.backing.limits(),
            reserved=self.backing.reserved,
        )
        self.function: VirtioPciDevice = iommu.create(machine, self.domains)
        try:
            machine.pci.plug(self.function)
        except BaseException:
            self.function.close()
            raise
        # Restored before the devices behind it: their DMA finds the guest's domains in place.
        machine.components.add("viommu", self.domains)

    def add_endpoint(self, binding: VfioBinding, devfn: int) -> None:
        """A passed-through function (its iommufd binding) at `devfn` of bus 0 sits behind the
        virtio-iommu: its requester id is its endpoint id."""
        self.backing.add_endpoint(devfn, binding)
        self.domains.endpoints.add(devfn)

    def viot(self) -> bytes:
        """The ACPI VIOT table naming the virtio-iommu and its endpoints."""
        return acpi.viot(self.function.devfn, sorted(self.domains.endpoints))

    def close(self) -> None:
        self.backing.close()
