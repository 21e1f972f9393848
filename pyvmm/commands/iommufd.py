"""`pyvmm iommufd info BDF | objects CONTROL`: what an IOMMU can do, and what a VM holds.

`info` binds the device's VFIO cdev to a new iommufd for as long as it takes to ask
IOMMU_GET_HW_INFO (so the device must be bound to vfio-pci and not in use); `objects` asks a
running pyvmm (`run --control CONTROL`) for the objects in its iommufd, one line each, children
indented under the object they hang on.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    iommufd = subparsers.add_parser("iommufd", help="inspect IOMMUs and a VM's iommufd objects")
    commands = iommufd.add_subparsers(dest="iommufd_command", required=True, metavar="COMMAND")
    info = commands.add_parser(
        "info",
        help="a device's IOMMU: type, capabilities, driver registers, nesting, dirty tracking",
    )
    info.add_argument("bdf", metavar="BDF", help="a PCI device bound to vfio-pci")
    info.set_defaults(func=cmd_info)
    objects = commands.add_parser(
        "objects", help="the iommufd objects of a running pyvmm, as a tree"
    )
    objects.add_argument("control", metavar="CONTROL", help="its control socket")
    objects.set_defaults(func=cmd_objects)


def cmd_info(args: argparse.Namespace) -> int:
    from pyvmm.vfio.errors import VfioError
    from pyvmm.vfio.iommufd.info import hw_info
    from pyvmm.vfio.iommufd.objects import Iommufd, VfioBinding, open_cdev
    from pyvmm.vfio.sysfs import Sysfs, SysfsError

    try:
        device = Sysfs("/").pci_device(args.bdf)
    except SysfsError as err:
        raise VfioError(str(err)) from None
    if not device.cdev:
        raise VfioError(
            f"{device.bdf} has no VFIO cdev: bind it to vfio-pci (pyvmm vfio bind {device.bdf}); "
            "the kernel needs CONFIG_VFIO_DEVICE_CDEV"
        )
    with Iommufd() as iommufd, open_cdev(device.cdev, device.bdf) as cdev:
        info = hw_info(VfioBinding(cdev, iommufd))
    print("\n".join(info.lines()))
    return 0


def cmd_objects(args: argparse.Namespace) -> int:
    from pyvmm.control.client import ControlClient

    with ControlClient(args.control) as client:
        objects = client.execute("iommufd-objects")["objects"]
    print("\n".join(tree_lines(objects)))
    return 0


def tree_lines(objects: list[dict[str, Any]]) -> list[str]:
    """Each object under its first parent (the one it is made over), oldest first."""
    by_parent: dict[int | None, list[dict[str, Any]]] = {}
    ids = {item["id"] for item in objects}
    for item in objects:
        parent = next((p for p in item["parents"] if p in ids), None)
        by_parent.setdefault(parent, []).append(item)
    lines: list[str] = []

    def add(parent: int | None, depth: int) -> None:
        for item in by_parent.get(parent, []):
            extra = {k: v for k, v in item.items() if k not in ("id", "type", "parents")}
            others = item["parents"][1:]
            also = f" (also on {', '.join(map(str, others))})" if others else ""
            details = " ".join(f"{k}={_text(k, v)}" for k, v in extra.items())
            lines.append(f"{'  ' * depth}{item['type']} {item['id']}{also} {details}".rstrip())
            add(item["id"], depth + 1)

    add(None, 0)
    return lines


HEX_FIELDS = frozenset({"iova", "length", "virt_id"})


def _text(name: str, value: object) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return hex(value) if name in HEX_FIELDS and isinstance(value, int) else str(value)
