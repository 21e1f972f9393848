"""A machine's configuration as data: what a destination needs to build the same machine.

A `Machine` records its RAM size, its vCPU count and every device added with `add_device` (its
kind, its options and the PCI slot it got), so that `Machine.from_config(machine.config)`
builds an equivalent machine, on which the first one's saved state can be restored. Options are
plain values (str, int, bool), as a command line or a JSON document gives them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pyvmm.errors import ConfigError


@dataclass(frozen=True)
class DeviceConfig:
    """One optional device: its kind (a name in pyvmm.board.devices.DEVICE_KINDS), the
    options its `create` takes, and its PCI slot on bus 0."""

    kind: str
    options: dict[str, Any]
    slot: int


@dataclass(frozen=True)
class MachineConfig:
    VERSION: ClassVar[int] = 1

    mem_size: int
    vcpus: int
    devices: tuple[DeviceConfig, ...] = field(default_factory=tuple)

    def differences(self, other: MachineConfig) -> list[str]:
        """What differs from `other`, in words (empty when they build the same machine)."""
        found = []
        if self.mem_size != other.mem_size:
            found.append(f"RAM {self.mem_size >> 20} MiB, not {other.mem_size >> 20} MiB")
        if self.vcpus != other.vcpus:
            found.append(f"{self.vcpus} vCPUs, not {other.vcpus}")
        mine = {d.slot: d for d in self.devices}
        theirs = {d.slot: d for d in other.devices}
        for slot in sorted(mine.keys() | theirs.keys()):
            a, b = mine.get(slot), theirs.get(slot)
            if a != b:
                found.append(f"slot {slot}: {_describe(a)}, not {_describe(b)}")
        return found

    def with_hosts(self, hosts: Mapping[str, str]) -> MachineConfig:
        """This configuration with its assigned devices on other host devices: `hosts` maps
        the `host` a device was saved with (a PCI address, an mdev's UUID or sysfs path, or
        its last path component) to the one to open here, for a snapshot restored or a
        migration received where the devices have other addresses (a second mdev).
        ConfigError for a host that no device of the saved machine has."""
        unused = dict(hosts)
        devices = []
        for device in self.devices:
            saved = device.options.get("host")
            keys = (saved, os.path.basename(saved.rstrip("/"))) if isinstance(saved, str) else ()
            key = next((k for k in keys if k in hosts), None)
            if key is not None:
                unused.pop(key, None)
                device = dataclasses.replace(device, options={**device.options, "host": hosts[key]})
            devices.append(device)
        if unused:
            saved_hosts = [d.options["host"] for d in self.devices if "host" in d.options]
            raise ConfigError(
                f"no device of the saved machine is on host {next(iter(unused))} (its devices' "
                f"hosts: {', '.join(saved_hosts) or 'none'})"
            )
        return dataclasses.replace(self, devices=tuple(devices))


def _describe(device: DeviceConfig | None) -> str:
    if device is None:
        return "nothing"
    options = ",".join(f"{k}={v}" for k, v in sorted(device.options.items()))
    return f"{device.kind}({options})"
