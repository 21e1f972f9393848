"""The guest's virtio-iommu domains in the host IOMMU, through the machine's iommufd (`--viommu
virtio`): the `DomainBacking` of pyvmm.devices.virtio.iommu_domains.

- A translating guest domain is an IOAS of its own and a paging HWPT over it, made against the
  first device attached to it (a later device whose IOMMU cannot use that HWPT is attached to
  the IOAS, and the kernel gives it one of its own).
- Attaching an endpoint is a HWPT replace on its VFIO cdev: its DMA moves to the new page
  table at once, with no window where it reaches nothing.
- An endpoint in no domain with bypass on, or in a bypass domain, is attached to the machine's
  guest-RAM IOAS (IOVA = guest-physical address), where it started; one blocked is detached.
- A guest MAP of guest-physical pages copies what the guest-RAM IOAS maps at those addresses
  to the guest's IOVA in the domain's IOAS (IOMMU_IOAS_COPY: the pages are pinned once, by the
  guest-RAM IOAS, however many domains map them); an UNMAP is done in the host IOMMU (the
  kernel has flushed its IOTLB) before the ioctl returns, so before the guest is answered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pyvmm.devices.virtio.iommu_domains import BackingError, Limits
from pyvmm.uapi.ioctl import IoctlError
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.iommufd.hwpt import Hwpt
from pyvmm.vfio.iommufd.objects import IoAddressSpace

T = TypeVar("T")

if TYPE_CHECKING:
    from pyvmm.machine.memory import GuestMemory
    from pyvmm.vfio.iommufd.backend import IommufdContext
    from pyvmm.vfio.iommufd.objects import VfioBinding


class IommufdDomains:
    """Guest domains as iommufd objects of the machine's context; endpoints are added (by
    requester id) as their devices are assigned, before the guest runs."""

    def __init__(self, context: IommufdContext, memory: GuestMemory) -> None:
        self.context = context
        self.memory = memory
        self.endpoints: dict[int, VfioBinding] = {}
        self.spaces: dict[int, IoAddressSpace] = {}
        self.hwpts: dict[int, Hwpt] = {}

    def add_endpoint(self, endpoint: int, binding: VfioBinding) -> None:
        self.endpoints[endpoint] = binding

    def limits(self) -> Limits:
        """The IOVAs a guest mapping may use: up to the highest one the host IOMMU takes for
        the machine's devices as they are when the virtio-iommu is made, with its first
        device (QEMU's intel-iommu, say, has 39 bits)."""
        ranges = self._host(self.context.ioas.iova_ranges)
        top = max((last for _, last in ranges), default=(1 << 48) - 1)
        return Limits(input_range=(0, min(top, (1 << 64) - 1)))

    def reserved(self, endpoint: int) -> list[tuple[int, int]]:
        """The IOVAs below the top that the host IOMMU will not map for the machine's devices
        (its reserved regions: the MSI window, the IOMMU's own), inclusive: those of all the
        devices attached to the guest-RAM IOAS, which every endpoint starts on."""
        ranges = sorted(self._host(self.context.ioas.iova_ranges))
        holes, cursor = [], 0
        for start, last in ranges:
            if start > cursor:
                holes.append((cursor, start - 1))
            cursor = max(cursor, last + 1)
        return holes

    def in_ram(self, gpa: int, size: int) -> bool:
        return any(region.contains(gpa, size) for region in self.memory.regions)

    # DomainBacking

    def create(self, domain: int) -> None:
        self.spaces[domain] = self._host(self.context.iommufd.alloc_ioas)

    def destroy(self, domain: int) -> None:
        hwpt = self.hwpts.get(domain)
        if hwpt is not None:
            self._host(hwpt.close)
            del self.hwpts[domain]
        self._host(self.spaces[domain].close)
        del self.spaces[domain]

    def attach(self, endpoint: int, domain: int | None) -> None:
        binding = self.endpoints[endpoint]
        if domain is None:
            if binding.attached is not self.context.ioas:
                self._host(binding.attach, self.context.ioas)
            return
        hwpt = self.hwpts.get(domain)
        if hwpt is None:
            hwpt = self._host(Hwpt.paging, self.spaces[domain], binding)
            self.hwpts[domain] = hwpt
        try:
            binding.attach(hwpt)
        except VfioError:  # another IOMMU's format: the kernel makes it a HWPT of its own
            self._host(binding.attach, self.spaces[domain])

    def block(self, endpoint: int) -> None:
        binding = self.endpoints[endpoint]
        if binding.attached is not None:
            self._host(binding.detach)

    def map(self, domain: int, iova: int, gpa: int, size: int, writable: bool) -> None:
        self._host(
            self.context.ioas.copy_to, self.spaces[domain], gpa, iova, size, writable=writable
        )

    def unmap(self, domain: int, iova: int, size: int) -> None:
        self._host(self.spaces[domain].unmap, iova, size)

    def close(self) -> None:
        """The domains' objects go (the endpoints back to the guest-RAM IOAS first). What
        cannot go now goes with the iommufd, which the context closes after this."""
        for binding in self.endpoints.values():
            if binding.attached is not self.context.ioas:
                with contextlib.suppress(VfioError):  # (its own close detaches it)
                    binding.attach(self.context.ioas)
        for domain in list(self.spaces):
            with contextlib.suppress(BackingError):
                self.destroy(domain)

    @staticmethod
    def _host(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return call(*args, **kwargs)
        except (VfioError, IoctlError, OSError) as err:
            raise BackingError(str(err)) from None
