"""A fake sysfs and /dev tree in a directory, and a Sysfs whose writes have the kernel's effects
(binding, mdevs, SR-IOV VFs): for the tests of pyvmm.vfio.sysfs, its CLI and the lab's agent."""

from __future__ import annotations

import os
from pathlib import Path

from pyvmm.vfio.sysfs import Sysfs, _error

EDU = "0000:00:04.0"
NVME = "0000:00:05.0"
IGB = "0000:01:00.0"  # an 82576 PF behind a root port, as in the lab
IGB_VFS = ["0000:01:10.0", "0000:01:10.2"]  # its VF offset is 0x80, its stride 2


class FakeTree:
    """The sysfs and /dev files the module reads, laid out as Linux lays them out."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pci = root / "sys/bus/pci"
        (self.pci / "devices").mkdir(parents=True)
        (self.pci / "drivers_probe").touch()
        (root / "dev/vfio/devices").mkdir(parents=True)
        (root / "sys/kernel/iommu_groups").mkdir(parents=True)

    def driver(self, name: str) -> Path:
        path = self.pci / "drivers" / name
        path.mkdir(parents=True, exist_ok=True)
        for attr in ("bind", "unbind"):
            (path / attr).touch()
        return path

    def device(
        self,
        bdf: str,
        ids: tuple[int, int],
        class_code: int = 0x00FF00,
        driver: str | None = None,
        group: str | None = None,
    ) -> Path:
        path = self.pci / "devices" / bdf
        path.mkdir()
        (path / "vendor").write_text(f"{ids[0]:#06x}\n")
        (path / "device").write_text(f"{ids[1]:#06x}\n")
        (path / "class").write_text(f"{class_code:#08x}\n")
        (path / "driver_override").write_text("(null)\n")
        if driver:
            self.bind(bdf, driver)
        if group:
            (self.root / "sys/kernel/iommu_groups" / group).mkdir(exist_ok=True)
            (path / "iommu_group").symlink_to(f"../../../../kernel/iommu_groups/{group}")
        return path

    def bind(self, bdf: str, driver: str) -> None:
        (self.pci / "devices" / bdf / "driver").symlink_to(self.driver(driver))

    def physical_function(self, bdf: str, ids: tuple[int, int], total: int, **kw: str) -> Path:
        """An SR-IOV PF with no VFs yet, whose driver (if any) allows `total`."""
        path = self.device(bdf, ids, class_code=0x020000, **kw)
        (path / "sriov_totalvfs").write_text(f"{total}\n")
        (path / "sriov_numvfs").write_text("0\n")
        (path / "sriov_drivers_autoprobe").write_text("1\n")
        return path

    def mdev_type(self, parent: str, type_id: str, name: str, available: int) -> Path:
        parent_dir = self.root / "sys/devices/virtual" / parent / parent
        type_dir = parent_dir / "mdev_supported_types" / type_id
        type_dir.mkdir(parents=True)
        (type_dir / "name").write_text(f"{name}\n")
        (type_dir / "available_instances").write_text(f"{available}\n")
        (type_dir / "device_api").write_text("vfio-pci\n")
        (type_dir / "create").touch()
        bus = self.root / "sys/class/mdev_bus"
        bus.mkdir(parents=True, exist_ok=True)
        if not (bus / parent).exists():
            (bus / parent).symlink_to(parent_dir)
        return type_dir


class FakeKernel(Sysfs):
    """Sysfs whose writes also have the effects the kernel would give them."""

    def __init__(self, tree: FakeTree, default_drivers: dict[str, str]) -> None:
        super().__init__(tree.root)
        self.tree = tree
        self.default_drivers = default_drivers
        self.overrides: dict[str, str] = {}
        self.writes: list[tuple[str, str]] = []
        self.next_cdev = 0
        self.next_group = 100
        #: attribute name -> errno its writes fail with (as the kernel, or a non-root caller, gets)
        self.refuse: dict[str, int] = {}

    def _write(self, path: Path, text: str) -> None:
        if path.name in self.refuse:
            code = self.refuse[path.name]
            try:
                raise OSError(code, os.strerror(code))
            except OSError as exc:
                raise _error(path, text, exc) from exc
        super()._write(path, text)
        self.writes.append((str(path.relative_to(self.root)), text))
        device = path.parent.name
        if path.name == "driver_override":
            self.overrides[device] = text.strip()
        elif path.name == "sriov_numvfs":
            self._set_vfs(path.parent, int(text))
        elif path.name == "unbind":
            (self.tree.pci / "devices" / text / "driver").unlink()
        elif path.name == "drivers_probe":
            self._probe(text)
        elif path.name == "create":
            self._create_mdev(path.parent, text)
        elif path.name == "remove":
            target = path.parent.resolve()
            path.parent.unlink()
            for entry in target.iterdir():
                if entry.is_symlink():
                    entry.unlink()
                elif entry.is_dir():
                    os.rmdir(entry)
                else:
                    entry.unlink()
            target.rmdir()

    def _probe(self, bdf: str) -> None:
        driver = self.overrides.get(bdf) or self.default_drivers.get(bdf)
        device = self.tree.pci / "devices" / bdf
        if driver is None or not (self.tree.pci / "drivers" / driver).is_dir():
            return
        if driver == "vfio-pci" and not (device / "iommu_group").exists():
            return  # vfio-pci's probe fails without an IOMMU group
        self.tree.bind(bdf, driver)
        if driver == "vfio-pci":
            group = os.readlink(device / "iommu_group").rsplit("/", 1)[1]
            (self.root / "dev/vfio" / group).touch()
            cdev = f"vfio{self.next_cdev}"
            self.next_cdev += 1
            (device / "vfio-dev" / cdev).mkdir(parents=True)
            (self.root / "dev/vfio/devices" / cdev).touch()

    def _set_vfs(self, pf: Path, count: int) -> None:
        """What the PF driver and the PCI core do: VFs at offset 0x80, stride 2, each in an IOMMU
        group of its own and probed if the PF's sriov_drivers_autoprobe says so."""
        for link in pf.glob("virtfn*"):
            vf = link.resolve()
            for entry in vf.iterdir():
                if entry.is_symlink() or entry.is_file():
                    entry.unlink()
            vf.rmdir()
            link.unlink()
        domain, bus, devfn = pf.name[:4], pf.name[5:7], int(pf.name[8:10], 16) << 3
        ids = (int((pf / "vendor").read_text(), 16), 0x10CA)
        for index in range(count):
            vf_devfn = devfn + 0x80 + 2 * index
            bdf = f"{domain}:{bus}:{vf_devfn >> 3:02x}.{vf_devfn & 7}"
            vf = self.tree.device(bdf, ids, class_code=0x020000, group=str(self.next_group))
            self.next_group += 1
            (vf / "physfn").symlink_to(f"../{pf.name}")
            (pf / f"virtfn{index}").symlink_to(f"../{bdf}")
            if (pf / "sriov_drivers_autoprobe").read_text().strip() == "1":
                self._probe(bdf)

    def _create_mdev(self, type_dir: Path, uuid: str) -> None:
        parent_dir = type_dir.parent.parent
        mdev = parent_dir / uuid
        mdev.mkdir()
        (mdev / "mdev_type").symlink_to(type_dir)
        (mdev / "remove").touch()
        (mdev / "iommu_group").symlink_to(self.root / "sys/kernel/iommu_groups")
        bus = self.root / "sys/bus/mdev/devices"
        bus.mkdir(parents=True, exist_ok=True)
        (bus / uuid).symlink_to(mdev)
        count = type_dir / "available_instances"
        count.write_text(f"{int(count.read_text()) - 1}\n")
