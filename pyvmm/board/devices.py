"""Device wiring: the devices every machine has, and the optional ones named by kind.

Every machine has COM1 (8250), the CMOS RTC, the debug-exit port, the i8042 reset line, the ACPI
sleep registers and PCI bus 0 with its host bridge (CF8/CFC and ECAM); `wire_platform` registers
them on the buses and their state with the machine's components.

Optional devices are PCI functions, each made by the `create(machine, **options)` of its own
module; `DEVICE_KINDS` says which module makes which kind, and a module is imported only when
its kind is asked for (start-up time counts: ~20x in the lab). Adding a kind of device is
adding its module and one line here.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyvmm.devices.acpi_pm import AcpiSleepRegisters
from pyvmm.devices.debug_exit import DebugExit
from pyvmm.devices.i8042 import I8042
from pyvmm.devices.pci.bus import PciBus
from pyvmm.devices.pci.device import PciFunction
from pyvmm.devices.pci.host import ConfigPorts, Ecam, HostBridge
from pyvmm.devices.rtc import CmosRtc
from pyvmm.devices.serial import Serial8250
from pyvmm.errors import ConfigError
from pyvmm.machine import acpi, layout
from pyvmm.machine.vcpus import StopReason

if TYPE_CHECKING:
    from pyvmm.board.machine import Machine

DEVICE_KINDS = {
    "virtio-blk": "pyvmm.devices.virtio.blk",
    "virtio-net": "pyvmm.devices.virtio.net",
    "virtio-rng": "pyvmm.devices.virtio.rng",
    "vfio-pci": "pyvmm.vfio.passthrough.assign",
    "pci-testdev": "pyvmm.devices.pci.testdev",
}


@dataclass(frozen=True)
class Platform:
    serial: Serial8250
    rtc: CmosRtc
    pci: PciBus


def wire_platform(machine: Machine) -> Platform:
    """Create the standard devices on `machine`'s buses; register their state."""

    def reset() -> None:
        machine.stop(StopReason.RESET, 0, "guest requested a reset")

    def poweroff() -> None:
        machine.stop(StopReason.POWEROFF, 0, "guest powered off")

    serial = Serial8250(machine.console_tail.write, machine.irq_line(layout.COM1_IRQ))
    machine.pio.register(layout.COM1_PORT, 8, serial, "COM1")
    machine.pio.register(
        layout.DEBUG_EXIT_PORT,
        1,
        DebugExit(lambda code: machine.stop(StopReason.DEBUG_EXIT, code)),
        "debug-exit",
    )
    machine.pio.register(layout.I8042_DATA_PORT, 5, I8042(reset), "i8042")
    rtc = CmosRtc()
    machine.pio.register(layout.RTC_PORT, 2, rtc, "rtc")
    pci = PciBus(
        machine.pio,
        machine.mmio,
        machine.address_space,
        (layout.PCI_MMIO_BASE, layout.PCI_MMIO_BASE + layout.PCI_MMIO_SIZE),
        (layout.PCI_IO_BASE, layout.PCI_IO_BASE + layout.PCI_IO_SIZE),
        mmio64_window=(layout.pci_mmio64_base(machine.memory.size), machine.address_space.limit),
        on_plug=lambda function: machine.components.add(f"pci/{function.bdf}", function),
    )
    machine.components.add("com1", serial)
    machine.components.add("rtc", rtc)
    machine.components.add("pci-bus", pci)
    pci.plug(HostBridge(), slot=0)
    sleep = AcpiSleepRegisters(poweroff, acpi.S5_SLEEP_TYPE)
    machine.pio.register(acpi.SLEEP_CONTROL_PORT, 2, sleep, "acpi-sleep")
    machine.pio.register(layout.PCI_CONFIG_PORT, 8, ConfigPorts(pci, reset), "pci-config")
    machine.mmio.register(layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE, Ecam(pci), "ecam")
    return Platform(serial, rtc, pci)


def pins_guest_ram(kind: str) -> bool:
    """Whether a device of `kind` pins all guest RAM for its DMA (its module says so with
    PINS_GUEST_RAM): an assigned device, for which a lazily loaded RAM is loaded in full at
    once (snapshot.restore picks its RAM source by this)."""
    module_name = DEVICE_KINDS.get(kind)
    return module_name is not None and getattr(
        importlib.import_module(module_name), "PINS_GUEST_RAM", False
    )


def create_device(machine: Machine, kind: str, options: dict[str, Any]) -> PciFunction:
    """The PCI function of an optional device (not plugged yet); ConfigError if the kind or
    its options are wrong."""
    module_name = DEVICE_KINDS.get(kind)
    if module_name is None:
        raise ConfigError(f"unknown device kind {kind!r}: choose from {', '.join(DEVICE_KINDS)}")
    create = importlib.import_module(module_name).create
    signature = inspect.signature(create)
    try:
        signature.bind(machine, **options)
    except TypeError as err:
        raise ConfigError(f"{kind}: {err}") from None
    for name, value in options.items():
        # (a configuration read from a stream may give any JSON value)
        annotation = signature.parameters[name].annotation
        wanted = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
        if not _of_type(value, wanted):
            raise ConfigError(
                f"{kind}: option {name} must be {wanted}, not {type(value).__name__} {value!r}"
            )
    return create(machine, **options)


_OPTION_TYPES: dict[str, type] = {"str": str, "int": int, "bool": bool, "None": type(None)}


def _of_type(value: object, annotation: str) -> bool:
    """Whether `value` is of the plain type a device factory's option is annotated with
    ("str", "bool", "int | None", ...); a bool is not an int here."""
    for name in (part.strip() for part in annotation.split("|")):
        if name not in _OPTION_TYPES:
            raise TypeError(f"a device option must be annotated with plain types, not {name}")
        if type(value) is _OPTION_TYPES[name]:
            return True
    return False
