"""The guest's own IOMMU (`--viommu virtio`), in the lab: Linux's virtio-iommu driver finds
pyvmm's virtio-iommu through the ACPI VIOT table, puts the passed-through NVMe in an IOMMU group
of its own with a translating domain, and its nvme driver's DMA goes through the mappings the
guest makes (each guest domain an IOAS and a HWPT of the machine's iommufd): the pattern it
writes reads back the same, past the page cache. Emulated devices are left outside it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from guestbuild import guest
from lab_passthrough import boot_linux

from pyvmm.board.machine import Machine
from pyvmm.initramfs import BUSYBOX_INIT_PRELUDE
from pyvmm.machine.console import CaptureConsole
from pyvmm.machine.vcpus import StopReason
from pyvmm.migration import snapshot

MARK = "pyvmm-guest:"
MiB = 1 << 20
PATTERN = "pyvmm viommu pattern"

INIT = rf"""{BUSYBOX_INIT_PRELUDE}echo "{MARK} init started"
dmesg | grep -i -E 'virtio.iommu|viot' | sed "s/^/{MARK} dmesg /"
for dev in /sys/bus/pci/drivers/nvme/0000:*; do
    name=$(basename $dev)
    group=$(basename $(readlink /sys/bus/pci/devices/$name/iommu_group))
    echo "{MARK} nvme $name group $group type $(cat /sys/kernel/iommu_groups/$group/type)"
    echo "{MARK} group $group has $(ls /sys/kernel/iommu_groups/$group/devices | wc -l) devices"
done
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x1af4 ] || continue
    [ -e $d/iommu_group ] && behind=behind || behind=outside
    echo "{MARK} virtio $(cat $d/device) $behind"
done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/nvme0n1 ] && break; sleep 1; done
i=0; while [ $i -lt 64 ]; do echo "{PATTERN} $i"; i=$((i+1)); done > /tmp/p
same() {{ dd if=/dev/nvme0n1 bs=4096 skip=200 count=1 iflag=direct 2>/dev/null \
    | head -c $(wc -c < /tmp/p) | cmp - /tmp/p && echo same; }}
dd if=/tmp/p of=/dev/nvme0n1 bs=4096 seek=200 conv=fsync 2>/dev/null
echo "{MARK} read back $(same)"
echo "{MARK} powering off"
sleep 1
poweroff -f
"""


@pytest.mark.parametrize(
    "lab_iommu",
    [
        pytest.param(
            iommu, marks=pytest.mark.lab(devices=("nvme",), iommu=iommu, session="linux-pass")
        )
        for iommu in ("intel", "virtio")
    ],
)
def test_linux_drives_an_nvme_behind_the_guests_virtio_iommu(
    lab_iommu: str, lab_devices: dict[str, str]
) -> None:
    """Under each of the lab's own IOMMUs (the host IOMMU the guest's domains are made in)."""
    nvme = lab_devices["nvme"]
    args = ("--vfio-pci", nvme, "--vfio-backend", "iommufd", "--viommu", "virtio", "--exit-stats")
    args += ("--rng",)  # an emulated device: outside the IOMMU (pyvmm.devices.virtio.iommu)
    result = boot_linux(INIT, *args, cpus=1)
    out = result.stdout
    assert result.returncode == 0, f"{out[-3000:]}\n{result.stderr[-3000:]}"
    found = re.search(rf"{MARK} nvme (0000:00:[0-9a-f]{{2}}\.0) group (\d+) type (\S+)", out)
    assert found, out[-3000:]
    assert found[3] in ("DMA", "DMA-FQ"), out[-3000:]  # translated, not identity
    assert f"{MARK} group {found[2]} has 1 devices" in out, out[-3000:]
    assert f"{MARK} read back same" in out, out[-3000:]
    # virtio-rng (0x1044) and the virtio-iommu itself (0x1057) are not behind it
    assert f"{MARK} virtio 0x1044 outside" in out, out[-3000:]
    assert f"{MARK} virtio 0x1057 outside" in out, out[-3000:]
    # pyvmm's view: the guest's DMA domain, its mappings made and removed as the I/O went
    stats = re.search(
        r"virtio-iommu: (\d+) domains made \(\d+ left\), (\d+) mappings made, (\d+) removed",
        result.stderr,
    )
    assert stats and int(stats[1]) >= 1 and int(stats[2]) > 0 and int(stats[3]) > 0, result.stderr


def build_viommu_edu() -> None:
    guest("viommu-edu")  # on the host: the checkout is read-only in the lab


@pytest.mark.lab(before=build_viommu_edu)
def test_a_test_guests_edu_dma_goes_only_where_its_domain_maps(lab_devices: dict[str, str]) -> None:
    """guests/viommu-edu.c with its small virtio-iommu driver: untranslated DMA with bypass on,
    none with it off, DMA to the IOVA its domain maps lands in the page behind it, DMA to an
    address the domain does not map lands nowhere (the host IOMMU drops it), and after UNMAP
    nothing lands; bad requests get their statuses."""
    result = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", str(guest("viommu-edu")), "--vfio-pci",
         lab_devices["edu"], "--vfio-backend", "iommufd", "--viommu", "virtio", "--exit-stats"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-3000:]}"
    steps = re.findall(r"viommu-edu: (.+?) (\d+) words landed", result.stdout)
    assert steps == [
        ("bypass", "512"),
        ("blocked", "0"),
        ("mapped", "512"),
        ("unmapped address", "0"),
        ("after unmap", "0"),
        ("bypass again", "512"),
    ], result.stdout
    assert "viommu-edu: refusals ok" in result.stdout and "viommu-edu: done" in result.stdout
    assert "virtio-iommu: 1 domains made (0 left), 1 mappings made, 1 removed" in result.stderr


GO_ADDR = 0x2000000  # guests/viommu-edu-state.c: the word the guest waits on


def build_viommu_edu_state() -> None:
    guest("viommu-edu-state")


@pytest.mark.lab(before=build_viommu_edu_state)
def test_a_vm_snapshotted_with_its_virtio_iommu_domain_finds_it_restored(
    lab_devices: dict[str, str], tmp_path: Path
) -> None:
    """viommu-edu-state sets up its domain (a source page read-only, a target page read-write,
    bypass off), the VM is snapshotted (edu does not migrate: reset at the restore) and
    restored, and edu's DMA through the IOVAs lands as the restored domain maps them: only the
    domain, made again in iommufd from the saved state, can put the pattern in the target."""
    machine = Machine(mem_size=64 * MiB, console=CaptureConsole())
    with machine:
        machine.add_device("vfio-pci", host=lab_devices["edu"], backend="iommufd", viommu="virtio")
        machine.load_elf(str(guest("viommu-edu-state")))
        machine.start()
        machine.console.wait_for(r"viommu-edu-state: ready\n", 120)  # type: ignore[attr-defined]
        assert machine.pause()
        saved = machine.viommu_domains
        snapshot.write(machine, tmp_path / "snap", {}, allow_device_reset=True)
        machine.stop()
    assert saved is not None and saved["bypass"] is False
    (domain,) = saved["domains"]  # type: ignore[misc]
    assert (domain["id"], domain["mappings"], domain["mapped_bytes"]) == (7, 2, 8192)

    restored = snapshot.restore(snapshot.read(tmp_path / "snap"), CaptureConsole())
    with restored:
        assert restored.viommu_domains == saved
        restored.memory.write(GO_ADDR, (1).to_bytes(4, "little"))
        restored.start()
        ended = restored.wait(timeout=120)
        out = restored.console.text  # type: ignore[attr-defined]
        assert (ended.reason, ended.exit_code) == (StopReason.DEBUG_EXIT, 0), out
        assert "viommu-edu-state: mapped 512 words landed\n" in out, out
        assert "viommu-edu-state: unmapped address 0 words landed\n" in out, out
