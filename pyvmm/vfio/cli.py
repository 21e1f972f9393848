"""`pyvmm vfio list|bind|unbind|sriov|info|mdev|migration ...`: look at and prepare devices for
VFIO."""

from __future__ import annotations

import argparse
import enum
import errno
import functools
import sys
from collections.abc import Callable, Sequence

from pyvmm.uapi import vfio as uapi
from pyvmm.uapi.ioctl import IoctlError
from pyvmm.vfio.backends import BACKENDS, default_backend, open_context
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.dma_space import DmaSpace
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.migration.device import DeviceMigration
from pyvmm.vfio.passthrough.assign import host_device
from pyvmm.vfio.sysfs import PciDevice, Sysfs, SysfsError, normalize_bdf

#: PCI base class names (PCI Code and ID Assignment Specification), for the CLASS column.
_BASE_CLASSES = {
    0x00: "unclassified",
    0x01: "storage",
    0x02: "network",
    0x03: "display",
    0x04: "multimedia",
    0x05: "memory",
    0x06: "bridge",
    0x07: "communication",
    0x08: "system",
    0x09: "input",
    0x0A: "docking",
    0x0B: "processor",
    0x0C: "serial bus",
    0x0D: "wireless",
    0x0E: "intelligent I/O",
    0x0F: "satellite",
    0x10: "encryption",
    0x11: "signal processing",
    0x12: "accelerator",
    0x13: "instrumentation",
    0xFF: "unassigned",
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `vfio ...` to a top-level argparse subparsers object."""
    vfio = subparsers.add_parser("vfio", help="list PCI devices and bind them to vfio-pci")
    vfio.add_argument(
        "--root",
        default="/",
        metavar="DIR",
        help="read sysfs and /dev under DIR instead of / (for tests)",
    )
    commands = vfio.add_subparsers(dest="vfio_command", required=True, metavar="COMMAND")

    listing = commands.add_parser(
        "list", help="PCI devices with their IOMMU group, driver and VFIO nodes"
    )
    listing.set_defaults(func=_list)

    bind = commands.add_parser("bind", help="bind a PCI device to vfio-pci (driver_override)")
    bind.add_argument("bdf", metavar="BDF", help="the device's address, e.g. 0000:00:04.0")
    bind.set_defaults(func=_bind)

    unbind = commands.add_parser(
        "unbind", help="release a PCI device from vfio-pci back to its own driver"
    )
    unbind.add_argument("bdf", metavar="BDF")
    unbind.set_defaults(func=_unbind)

    sriov = commands.add_parser(
        "sriov",
        help="have an SR-IOV PF's driver make N virtual functions (0: remove them)",
        description="Write N to the PF's sriov_numvfs; its own driver makes the VFs. "
        "Prints one line per VF.",
    )
    sriov.add_argument("bdf", metavar="BDF", help="the physical function, bound to its driver")
    sriov.add_argument("count", metavar="N", type=int, help="how many VFs (0 removes them)")
    sriov.add_argument(
        "--vfio",
        action="store_true",
        help="bind the new VFs to vfio-pci (no VF driver probes them first)",
    )
    sriov.set_defaults(func=_sriov)

    info = commands.add_parser(
        "info", help="open a device through a VFIO backend and show its regions and IRQs"
    )
    info.add_argument("bdf", metavar="BDF", help="a device bound to vfio-pci")
    info.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        help="how to open it (default: iommufd where /dev/iommu and VFIO cdevs exist)",
    )
    info.set_defaults(func=_info)

    migration = commands.add_parser(
        "migration",
        help="show a device's VFIO migration flags and state; --to walks it to a state",
        description="Open the device (a PCI address, an mdev's UUID or sysfs path) and show its "
        "migration flags, state and STOP_COPY data size; with --to, take it to STATE one arc at "
        "a time, printing each. The device is closed when the command ends, and its driver "
        "then decides its state.",
    )
    migration.add_argument("device", metavar="DEVICE", help="BDF, mdev UUID or sysfs path")
    migration.add_argument(
        "--to",
        type=str.upper,
        choices=[state.name for state in uapi.VfioDeviceState if state.name != "ERROR"],
        help="the state to walk the device to",
    )
    migration.add_argument("--backend", choices=sorted(BACKENDS), help="how to open it")
    migration.set_defaults(func=_migration)

    mdev = commands.add_parser("mdev", help="mediated devices").add_subparsers(
        dest="mdev_command", required=True, metavar="COMMAND"
    )
    create = mdev.add_parser("create", help="create an mdev of TYPE; prints its UUID")
    create.add_argument("type_id", metavar="TYPE", help="an mdev type, e.g. mtty-2")
    create.add_argument("--parent", help="the parent device, when several offer TYPE")
    create.add_argument("--uuid", help="the new mdev's UUID (default: a random one)")
    create.set_defaults(func=_mdev_create)
    mdev.add_parser("list", help="mdev types and mdevs").set_defaults(func=_mdev_list)
    remove = mdev.add_parser("remove", help="remove the mdev UUID")
    remove.add_argument("uuid", metavar="UUID")
    remove.set_defaults(func=_mdev_remove)


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    head = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    return "\n".join(line.rstrip() for line in [head, *lines])


def _class(code: int) -> str:
    return f"{code >> 8:04x} {_BASE_CLASSES.get(code >> 16, '')}".rstrip()


def device_row(device: PciDevice) -> list[str]:
    return [
        device.bdf,
        device.ids,
        _class(device.class_code),
        device.driver or "-",
        device.iommu_group or "-",
        f"/dev/vfio/{device.iommu_group}" if device.group_node else "-",
        f"/dev/vfio/devices/{device.cdev}" if device.cdev_node else "-",
        device.name,
    ]


def _present(flag: bool) -> str:
    return "present" if flag else "absent"


def format_list(sysfs: Sysfs) -> str:
    header = ("BDF", "ID", "CLASS", "DRIVER", "GROUP", "GROUP NODE", "CDEV NODE", "NAME")
    rows = [device_row(d) for d in sysfs.pci_devices()]
    body = _table(header, rows) if rows else "no PCI devices"
    return (
        f"{body}\n"
        f"/dev/iommu (iommufd): {_present(sysfs.iommufd)}; "
        f"/dev/vfio/vfio (container): {_present(sysfs.vfio_container)}; "
        f"/dev/vfio/devices (cdevs): {_present(sysfs.vfio_cdevs)}"
    )


def format_mdevs(sysfs: Sysfs) -> str:
    types = [
        (t.parent, t.type_id, t.name, str(t.available), t.device_api) for t in sysfs.mdev_types()
    ]
    mdevs = [
        (
            m.uuid,
            m.parent,
            m.type_id,
            m.iommu_group or "-",
            f"/dev/vfio/devices/{m.cdev}" if m.cdev_node else "-",
        )
        for m in sysfs.mdevs()
    ]
    parts = [
        _table(("PARENT", "TYPE", "NAME", "AVAILABLE", "API"), types) if types else "no mdev types",
        _table(("UUID", "PARENT", "TYPE", "GROUP", "CDEV NODE"), mdevs) if mdevs else "no mdevs",
    ]
    return "\n\n".join(parts)


# How the PCI spec writes these; other indexes go by their uAPI names.
_IRQ_SPELLING = {uapi.VfioPciIrq.INTX: "INTx", uapi.VfioPciIrq.MSIX: "MSI-X"}


def _index_name(enum_type: type[enum.IntEnum], index: int) -> str:
    """The uAPI's name for a region or IRQ index ("" for a device-specific one)."""
    return enum_type(index).name if index in enum_type._value2member_map_ else ""


def _flag_names(flags: enum.Flag) -> str:
    return ",".join(f.name.lower() for f in type(flags) if f in flags and f.name) or "-"


def format_device_info(device: VfioDevice, space: DmaSpace, backend: str) -> str:
    """A device as VFIO shows it: flags, every region with its mmap areas, every IRQ index, and
    the IOVA ranges DMA can use."""
    info = device.info()
    regions = []
    for index in range(info.num_regions):
        try:
            region = device.region(index)
        except IoctlError as err:
            if err.errno != errno.EINVAL:
                raise
            continue  # an index the device does not implement (VGA on a non-VGA function)
        if not region.size:
            continue
        areas = " ".join(f"{a:#x}+{s:#x}" for a, s in region.mmap_areas) or "-"
        regions.append(
            (
                str(index),
                _index_name(uapi.VfioPciRegion, index),
                f"{region.size:#x}",
                _flag_names(region.flags),
                areas,
                f"{region.type[0]:#x}:{region.type[1]:#x}" if region.type else "-",
            )
        )
    irqs = []
    for index in range(info.num_irqs):
        irq = device.irq(index)
        name = _IRQ_SPELLING.get(index) or _index_name(uapi.VfioPciIrq, index)
        irqs.append((str(index), name, str(irq.count), _flag_names(irq.flags)))
    ranges = " ".join(f"{start:#x}-{last:#x}" for start, last in space.iova_ranges()) or "-"
    return "\n".join(
        [
            f"{device.name} through {backend}: {_flag_names(info.flags)}",
            "",
            _table(("REGION", "NAME", "SIZE", "FLAGS", "MMAP AREAS", "TYPE"), regions),
            "",
            _table(("IRQ", "NAME", "COUNT", "FLAGS"), irqs),
            "",
            f"usable IOVA ranges: {ranges}",
        ]
    )


def _command(action: Callable[[Sysfs, argparse.Namespace], None]) -> Callable[..., int]:
    """Make `action` an argparse `func`: user errors become one line and exit status 1."""

    @functools.wraps(action)
    def run(args: argparse.Namespace) -> int:
        try:
            action(Sysfs(args.root), args)
        except (SysfsError, VfioError, OSError) as exc:
            print(f"pyvmm vfio: {exc}", file=sys.stderr)
            return 1
        return 0

    return run


@_command
def _list(sysfs: Sysfs, args: argparse.Namespace) -> None:
    print(format_list(sysfs))


@_command
def _bind(sysfs: Sysfs, args: argparse.Namespace) -> None:
    device = sysfs.bind_vfio(args.bdf)
    node = f"/dev/vfio/{device.iommu_group}" if device.group_node else "no group node"
    print(f"{device.bdf}: vfio-pci (IOMMU group {device.iommu_group}, {node})")


@_command
def _unbind(sysfs: Sysfs, args: argparse.Namespace) -> None:
    device = sysfs.unbind(args.bdf)
    print(f"{device.bdf}: {device.driver or 'no driver'}")


@_command
def _sriov(sysfs: Sysfs, args: argparse.Namespace) -> None:
    pf = normalize_bdf(args.bdf)
    vfs = sysfs.enable_vfs(pf, args.count, probe=not args.vfio)
    if not vfs:
        print(f"{pf}: no VFs")
    for index, bdf in enumerate(vfs):
        vf = sysfs.bind_vfio(bdf) if args.vfio else sysfs.pci_device(bdf)
        print(
            f"{vf.bdf}: VF {index} of {pf}, {vf.ids}, {vf.driver or 'no driver'}, "
            f"IOMMU group {vf.iommu_group or '-'}"
        )


@_command
def _mdev_create(sysfs: Sysfs, args: argparse.Namespace) -> None:
    print(sysfs.create_mdev(args.type_id, args.parent, args.uuid))


@_command
def _mdev_list(sysfs: Sysfs, args: argparse.Namespace) -> None:
    print(format_mdevs(sysfs))


@_command
def _mdev_remove(sysfs: Sysfs, args: argparse.Namespace) -> None:
    sysfs.remove_mdev(args.uuid)


@_command
def _info(sysfs: Sysfs, args: argparse.Namespace) -> None:
    backend = args.backend or default_backend()
    with open_context(backend) as context:
        device = context.open_pci(sysfs.pci_device(args.bdf))
        print(format_device_info(device, context.dma, backend))


@_command
def _migration(sysfs: Sysfs, args: argparse.Namespace) -> None:
    host, _ = host_device(sysfs, args.device)
    with open_context(args.backend or default_backend()) as context:
        migration = DeviceMigration(context.open(host))
        if missing := migration.missing():
            raise VfioError(f"{host.name}: {missing}")
        flags = "|".join(
            flag.name or "" for flag in uapi.VfioMigrationFlag if flag in migration.flags
        )
        print(
            f"{host.name}: migration flags {flags}, state {migration.state.name}, "
            f"STOP_COPY data {migration.data_size()} bytes"
        )
        if args.to is None:
            return
        data = migration.move_to(uapi.VfioDeviceState[args.to])
        for start, end in migration.arcs:
            print(f"  {start.name} -> {end.name}")
        opened = f", data fd open for {data.opened_in.name}" if data is not None else ""
        print(f"{host.name}: state {migration.state.name}{opened}")
        if data is not None:
            data.close()
