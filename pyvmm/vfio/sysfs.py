"""What sysfs and /dev say about PCI devices, IOMMU groups, VFIO and mdevs; binding by override.

Every path is taken under a root directory (normally "/"), so the logic runs unchanged against a
fake tree in a temporary directory. Binding follows the kernel's documented way: write the driver
name to the device's `driver_override`, release it from its current driver, then ask the bus to
probe it again (`drivers_probe`); only the named driver may then take it.

SR-IOV: a physical function (PF) bound to its own driver gets virtual functions (VFs) by writing
their number to its `sriov_numvfs`; the PF's driver creates them, up to `sriov_totalvfs` (which
the driver may set below the capability's count). Each VF is a PCI device of its own, linked
from the PF as `virtfnN` and back as `physfn`, with its own IOMMU group where the topology
isolates it; it is the VFs, not the PF, that go to vfio-pci.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import uuid as uuidlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

VFIO_PCI = "vfio-pci"

_BDF = re.compile(r"^(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")
_PCI_IDS = ("usr/share/misc/pci.ids", "usr/share/hwdata/pci.ids")


class SysfsError(Exception):
    """A sysfs operation failed for a reason the user can act on; the message is one line."""


class NoSuchDevice(SysfsError):
    pass


class NotPermitted(SysfsError):
    pass


class DeviceBusy(SysfsError):
    pass


def normalize_bdf(bdf: str) -> str:
    """ "00:03.0" or "0000:00:03.0" -> "0000:00:03.0"; anything else is `NoSuchDevice`."""
    match = _BDF.match(bdf.strip().lower())
    if match is None:
        raise NoSuchDevice(f"{bdf!r} is not a PCI address (expected DDDD:BB:SS.F or BB:SS.F)")
    domain, bus, slot, function = match.groups()
    return f"{domain or '0000'}:{bus}:{slot}.{function}"


@dataclass(frozen=True)
class PciDevice:
    bdf: str
    vendor: int
    device: int
    class_code: int  # 24 bits: base class, subclass, programming interface
    driver: str | None
    iommu_group: str | None
    group_node: bool  # /dev/vfio/<group> exists
    cdev: str | None  # "vfioN" when the device has a VFIO cdev in sysfs
    cdev_node: bool  # /dev/vfio/devices/vfioN exists
    name: str = ""  # from pci.ids, when that file is installed
    physfn: str | None = None  # for an SR-IOV VF: the address of its PF

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


@dataclass(frozen=True)
class MdevType:
    parent: str
    type_id: str  # the directory name, e.g. "mtty-2"
    name: str
    available: int
    device_api: str


@dataclass(frozen=True)
class Mdev:
    uuid: str
    parent: str
    type_id: str
    iommu_group: str | None
    cdev: str | None
    cdev_node: bool


class Sysfs:
    """The VFIO-relevant parts of sysfs and /dev under `root`."""

    def __init__(self, root: Path | str = "/") -> None:
        self.root = Path(root)
        self._pci = self.root / "sys/bus/pci"
        self._mdev_bus = self.root / "sys/class/mdev_bus"
        self._mdevs = self.root / "sys/bus/mdev/devices"
        self._vfio_dev = self.root / "dev/vfio"

    # -- reading -------------------------------------------------------------------------------

    @property
    def iommufd(self) -> bool:
        """/dev/iommu exists (CONFIG_IOMMUFD)."""
        return (self.root / "dev/iommu").exists()

    @property
    def vfio_container(self) -> bool:
        """/dev/vfio/vfio exists (the legacy container, CONFIG_VFIO_CONTAINER)."""
        return (self._vfio_dev / "vfio").exists()

    @property
    def vfio_cdevs(self) -> bool:
        """/dev/vfio/devices exists (CONFIG_VFIO_DEVICE_CDEV)."""
        return (self._vfio_dev / "devices").is_dir()

    def pci_devices(self) -> list[PciDevice]:
        directory = self._pci / "devices"
        if not directory.is_dir():
            return []
        devices = [self._read_pci(entry.name) for entry in sorted(directory.iterdir())]
        names = self._pci_names({(d.vendor, d.device) for d in devices})
        return [replace(d, name=names.get((d.vendor, d.device), "")) for d in devices]

    def pci_device(self, bdf: str) -> PciDevice:
        bdf = normalize_bdf(bdf)
        if not (self._pci / "devices" / bdf).exists():
            raise NoSuchDevice(f"no PCI device {bdf}")
        return self._read_pci(bdf)

    def group_members(self, group: str) -> list[PciDevice]:
        """The PCI devices of IOMMU group `group`, in address order."""
        directory = self.root / "sys/kernel/iommu_groups" / group / "devices"
        if not directory.is_dir():
            return []
        return [
            self._read_pci(entry.name)
            for entry in sorted(directory.iterdir())
            if _BDF.match(entry.name)
        ]

    def mdev(self, uuid: str) -> Mdev:
        for mdev in self.mdevs():
            if mdev.uuid == uuid:
                return mdev
        raise NoSuchDevice(f"no mdev {uuid} (see pyvmm vfio mdev list)")

    def find(self, vendor: int, device: int) -> list[PciDevice]:
        """Devices with these IDs, in address order."""
        return [d for d in self.pci_devices() if (d.vendor, d.device) == (vendor, device)]

    def _read_pci(self, bdf: str) -> PciDevice:
        path = self._pci / "devices" / bdf
        group = _link_name(path / "iommu_group")
        cdev = _vfio_cdev(path)
        return PciDevice(
            bdf=bdf,
            vendor=int(_read(path / "vendor"), 16),
            device=int(_read(path / "device"), 16),
            class_code=int(_read(path / "class"), 16),
            driver=_link_name(path / "driver"),
            iommu_group=group,
            group_node=group is not None and (self._vfio_dev / group).exists(),
            cdev=cdev,
            cdev_node=cdev is not None and (self._vfio_dev / "devices" / cdev).exists(),
            physfn=_link_name(path / "physfn"),
        )

    def vfs(self, bdf: str) -> list[str]:
        """The addresses of the VFs the PF has now (its `virtfnN` links), VF 0 first."""
        path = self._pci / "devices" / normalize_bdf(bdf)
        links = [(int(e.name.removeprefix("virtfn")), e) for e in path.glob("virtfn[0-9]*")]
        return [os.readlink(link).rsplit("/", 1)[-1] for _, link in sorted(links)]

    def _pci_names(self, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], str]:
        """Names from pci.ids for the (vendor, device) pairs wanted, if the file exists."""
        ids_file = next((self.root / p for p in _PCI_IDS if (self.root / p).is_file()), None)
        if ids_file is None or not wanted:
            return {}
        return _parse_pci_ids(ids_file.read_text(errors="replace").splitlines(), wanted)

    def mdev_types(self) -> list[MdevType]:
        types = []
        if not self._mdev_bus.is_dir():
            return types
        for parent in sorted(self._mdev_bus.iterdir()):
            supported = parent / "mdev_supported_types"
            if not supported.is_dir():
                continue
            for type_dir in sorted(supported.iterdir()):
                types.append(
                    MdevType(
                        parent=parent.name,
                        type_id=type_dir.name,
                        name=_read_optional(type_dir / "name"),
                        available=int(_read_optional(type_dir / "available_instances") or 0),
                        device_api=_read_optional(type_dir / "device_api"),
                    )
                )
        return types

    def mdevs(self) -> list[Mdev]:
        if not self._mdevs.is_dir():
            return []
        result = []
        for entry in sorted(self._mdevs.iterdir()):
            cdev = _vfio_cdev(entry)
            result.append(
                Mdev(
                    uuid=entry.name,
                    parent=entry.resolve().parent.name,
                    type_id=_link_name(entry / "mdev_type") or "",
                    iommu_group=_link_name(entry / "iommu_group"),
                    cdev=cdev,
                    cdev_node=cdev is not None and (self._vfio_dev / "devices" / cdev).exists(),
                )
            )
        return result

    # -- changing ------------------------------------------------------------------------------

    def bind_vfio(self, bdf: str) -> PciDevice:
        """Hand the device to vfio-pci; returns its new state."""
        current = self.pci_device(bdf)
        if current.driver == VFIO_PCI:
            return current
        if not (self._pci / "drivers" / VFIO_PCI).is_dir():
            raise SysfsError("the vfio-pci driver is not available (CONFIG_VFIO_PCI, or modprobe)")
        self._rebind(current, VFIO_PCI)
        after = self._read_pci(current.bdf)
        if after.driver != VFIO_PCI:
            why = "" if after.iommu_group else " (it has no IOMMU group: is the IOMMU on?)"
            raise SysfsError(f"{current.bdf}: vfio-pci did not take the device{why}")
        return after

    def unbind(self, bdf: str) -> PciDevice:
        """Clear the override and give the device back to whichever driver claims it."""
        return self._rebind(self.pci_device(bdf), None)

    def _rebind(self, current: PciDevice, driver: str | None) -> PciDevice:
        path = self._pci / "devices" / current.bdf
        self._write(path / "driver_override", driver or "\n")
        if current.driver is not None:
            log.info("releasing %s from %s", current.bdf, current.driver)
            self._write(path / "driver" / "unbind", current.bdf)
        self._write(self._pci / "drivers_probe", current.bdf)
        return self._read_pci(current.bdf)

    def enable_vfs(self, bdf: str, count: int, *, probe: bool = True) -> list[str]:
        """Have the PF's driver make `count` VFs (0: remove them); returns their addresses.

        With `probe=False` the new VFs are left without a driver (`sriov_drivers_autoprobe` 0),
        so that they can go to vfio-pci without a VF driver taking them first. A PF that has
        some other number of VFs already is refused: the kernel only changes the number through
        0, which would remove VFs that may be in use.
        """
        pf = self.pci_device(bdf)
        path = self._pci / "devices" / pf.bdf
        total = _read_optional(path / "sriov_totalvfs")
        if not total:
            raise SysfsError(f"{pf.bdf} has no SR-IOV capability (no sriov_totalvfs)")
        if not 0 <= count <= int(total):
            raise SysfsError(f"{pf.bdf} can have 0 to {total} VFs (sriov_totalvfs), not {count}")
        current = int(_read(path / "sriov_numvfs"))
        if current == count:
            return self.vfs(pf.bdf)
        if current and count:
            raise DeviceBusy(
                f"{pf.bdf} has {current} VFs already; remove them first (0 VFs) to have {count}"
            )
        if pf.driver is None:
            raise SysfsError(f"{pf.bdf} has no driver; its VFs are made by the PF's own driver")
        autoprobe = path / "sriov_drivers_autoprobe"
        if count and autoprobe.exists() and _read(autoprobe) != str(int(probe)):
            self._write(autoprobe, str(int(probe)))
        try:
            self._write(path / "sriov_numvfs", str(count))
        except SysfsError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno in (errno.ENOENT, errno.EOPNOTSUPP):
                raise SysfsError(
                    f"{pf.bdf}: its driver {pf.driver} does not make VFs ({cause.strerror})"
                ) from cause
            raise
        made = self.vfs(pf.bdf)
        if len(made) != count:
            raise SysfsError(f"{pf.bdf}: asked for {count} VFs, the kernel made {len(made)}")
        return made

    def create_mdev(self, type_id: str, parent: str | None = None, uuid: str | None = None) -> str:
        """Create an mdev of `type_id` (e.g. "mtty-2"); returns its UUID."""
        candidates = [
            t for t in self.mdev_types() if t.type_id == type_id and parent in (None, t.parent)
        ]
        if not candidates:
            where = f" under parent {parent}" if parent else ""
            raise NoSuchDevice(f"no mdev type {type_id}{where}")
        if len(candidates) > 1:
            parents = ", ".join(t.parent for t in candidates)
            raise SysfsError(f"mdev type {type_id} exists under {parents}: choose with --parent")
        chosen = candidates[0]
        if chosen.available <= 0:
            raise DeviceBusy(f"mdev type {type_id} under {chosen.parent} has no instances left")
        uuid = uuid or str(uuidlib.uuid4())
        create = self._mdev_bus / chosen.parent / "mdev_supported_types" / type_id / "create"
        self._write(create, uuid)
        return uuid

    def remove_mdev(self, uuid: str) -> None:
        path = self._mdevs / uuid
        if not path.exists():
            raise NoSuchDevice(f"no mdev {uuid}")
        self._write(path / "remove", "1")

    def _write(self, path: Path, text: str) -> None:
        """One write(2) of `text`, as sysfs attributes want, with errors made into one line."""
        log.debug("write %r to %s", text, path)
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise _error(path, text, exc) from exc


def _error(path: Path, text: str, exc: OSError) -> SysfsError:
    what = f"writing {text.strip()!r} to {path}: {exc.strerror}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return NotPermitted(f"{what} (needs root)")
    if exc.errno == errno.EBUSY:
        return DeviceBusy(f"{what} (the device is in use)")
    if exc.errno == errno.ENOENT:
        return NoSuchDevice(what)
    return SysfsError(what)


def _read(path: Path) -> str:
    return path.read_text().strip()


def _read_optional(path: Path) -> str:
    try:
        return _read(path)
    except OSError:
        return ""


def _link_name(path: Path) -> str | None:
    """The last component of a symlink's target (a driver, a group number), or None."""
    try:
        return Path(os.readlink(path)).name
    except OSError:
        return None


def _vfio_cdev(device_path: Path) -> str | None:
    """The "vfioN" of a device's VFIO cdev: the only entry of its `vfio-dev/` directory.

    The directory exists even when the kernel has no cdev support; callers that care whether the
    cdev can be opened look at /dev/vfio/devices/vfioN.
    """
    try:
        entries = sorted(e.name for e in (device_path / "vfio-dev").iterdir())
    except OSError:
        return None
    return entries[0] if entries else None


def _parse_pci_ids(
    lines: Iterable[str], wanted: set[tuple[int, int]]
) -> dict[tuple[int, int], str]:
    """The "vendor device" names of `wanted` from a pci.ids file's lines."""
    vendors = {v for v, _ in wanted}
    names: dict[tuple[int, int], str] = {}
    vendor: int | None = None
    vendor_name = ""
    for line in lines:
        if not line or line.startswith("#"):
            continue
        if line.startswith("C "):
            break  # the class list follows the vendors
        if not line.startswith("\t"):
            ident, _, rest = line.partition("  ")
            vendor = int(ident, 16) if int(ident, 16) in vendors else None
            vendor_name = rest.strip()
        elif vendor is not None and not line.startswith("\t\t"):
            ident, _, rest = line.strip().partition("  ")
            if (vendor, int(ident, 16)) in wanted:
                names[(vendor, int(ident, 16))] = f"{vendor_name} {rest.strip()}"
    return names
