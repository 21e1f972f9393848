"""A machine with a passed-through edu, snapshotted and restored in the lab, by mmap and as
restore chooses for it (a copy), under each VFIO backend: the restored function has the config
space the guest had set up, and the device's DMA goes to and from the restored RAM the vCPUs see
(a page from the snapshot, and a page written after the restore), then the guest runs on.

This is the memory path a restore by mmap must keep correct: the RAM is a private mapping of the
memory file, and pinning it for the IOMMU breaks its copy-on-write page by page, so the device
and the vCPUs share the same copies (README, "snapshot")."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from counting import assert_consecutive, counts
from guestbuild import guest
from lab_edu import EDU_BUFFER, bar0, dma
from lab_passthrough import BACKENDS

from pyvmm.board.machine import Machine, RunState
from pyvmm.devices.pci.device import PCI_COMMAND
from pyvmm.machine.console import CaptureConsole
from pyvmm.migration import snapshot
from pyvmm.migration.snapshot import SnapshotError
from pyvmm.migration.source import Migration
from pyvmm.migration.transport import Endpoint, MigrationError
from pyvmm.vfio.passthrough.function import VfioPciFunction

MiB = 1 << 20
PAGE = 4096
KEPT = 0x2000000  # written before the snapshot, never after: the memory file's page
WRITTEN = KEPT + PAGE  # written after the restore, through pyvmm's mapping (the vCPUs' too)
COPY_OF_KEPT, COPY_OF_WRITTEN = KEPT + 2 * PAGE, KEPT + 3 * PAGE  # where the device copies them
MEMORY_AND_MASTER = 0x6


def build_guests() -> None:
    guest("counter")  # on the host: inside the lab the checkout is read-only


def passed_through(machine: Machine) -> VfioPciFunction:
    (function,) = [f for f in machine.pci.functions.values() if isinstance(f, VfioPciFunction)]
    return function


@pytest.mark.lab(before=build_guests)
@pytest.mark.parametrize("copy", [False, None], ids=["mmap", "default"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_restored_machines_edu_dmas_to_and_from_the_ram_its_vcpus_see(
    backend: str, copy: bool, lab_devices, tmp_path: Path
) -> None:
    kept, written = os.urandom(PAGE), os.urandom(PAGE)
    with Machine(mem_size=64 * MiB, console=CaptureConsole()) as machine:
        function = machine.add_device("vfio-pci", host=lab_devices["edu"], backend=backend)
        machine.load_elf(str(guest("counter")))
        command = function.config_read(PCI_COMMAND, 2)
        function.config_write(PCI_COMMAND, 2, command | MEMORY_AND_MASTER)  # as a driver does
        machine.memory.write(KEPT, kept)
        machine.start()
        machine.console.wait_for(r"count 2048\n", 60)  # type: ignore[attr-defined]
        assert machine.pause()
        config, bar = bytes(function.config), function.bar_address(0)
        # edu's driver (vfio-pci) has no migration: refused at once, in one line naming it
        edu = lab_devices["edu"]
        lacks = (
            rf"^pci/00:0\d\.0: vfio {edu}: its own state \(registers, buffers, queues\) cannot "
            r"be saved: its driver has no VFIO migration \(VFIO_DEVICE_FEATURE_MIGRATION\); "
        )
        with pytest.raises(SnapshotError, match=lacks + r".*--allow-device-reset") as refused:
            snapshot.write(machine, tmp_path / "refused", {})
        assert "\n" not in str(refused.value)
        assert not (tmp_path / "refused").exists()
        migration = Migration(machine, Endpoint.parse(f"unix:{tmp_path / 'nowhere'}"), info={})
        with pytest.raises(MigrationError, match="^cannot migrate this machine: " + lacks[1:]):
            migration.run()
        assert machine.state is RunState.PAUSED  # (as it was: nothing was tried)
        snapshot.write(machine, tmp_path / "snap", {}, allow_device_reset=True)
        before = machine.console.text  # type: ignore[attr-defined]
        machine.stop()
    started = time.perf_counter()
    restored = snapshot.restore(snapshot.read(tmp_path / "snap"), CaptureConsole(), copy=copy)
    took = (time.perf_counter() - started) * 1000
    mode = "mmap" if copy is False else "default"
    print(f"restore of 64 MiB with edu ({backend}, {mode}): {took:.1f} ms")
    with restored:
        copied = all(region.shared for region in restored.memory.regions)
        assert copied == (copy is None)  # a machine that pins its RAM gets a copy by default
        function = passed_through(restored)
        assert bytes(function.config) == config and function.bar_address(0) == bar
        live = function.device_config_read(PCI_COMMAND, 2)
        assert live & MEMORY_AND_MASTER == MEMORY_AND_MASTER  # replayed onto the reset device
        registers = bar0(function.device)
        dma(registers, KEPT, EDU_BUFFER, PAGE, to_ram=False)
        dma(registers, EDU_BUFFER, COPY_OF_KEPT, PAGE, to_ram=True)
        assert restored.memory.read(COPY_OF_KEPT, PAGE) == kept
        restored.memory.write(WRITTEN, written)
        dma(registers, WRITTEN, EDU_BUFFER, PAGE, to_ram=False)
        dma(registers, EDU_BUFFER, COPY_OF_WRITTEN, PAGE, to_ram=True)
        assert restored.memory.read(COPY_OF_WRITTEN, PAGE) == written
        restored.start()
        last = counts(before)[-1]
        restored.console.wait_for(rf"count {last + 2048}\n", 60)  # type: ignore[attr-defined]
        restored.stop()
        restored.wait()
        after = restored.console.text  # type: ignore[attr-defined]
    assert_consecutive(counts(before + after))  # a line the pause split is whole again
    if copy is False:
        memory_file = (tmp_path / "snap" / "memory").read_bytes()
        assert written not in memory_file  # the private mapping never wrote the file
