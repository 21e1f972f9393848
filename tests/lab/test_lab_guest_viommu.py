"""The guest's own IOMMU (`--viommu virtio`), in the lab: Linux's virtio-iommu driver finds
pyvmm's virtio-iommu through the ACPI VIOT table, puts the passed-through NVMe in an IOMMU group
of its own with a translating domain, and its nvme driver's DMA goes through the mappings the
guest makes (each guest domain an IOAS and a HWPT of the machine's iommufd): the pattern it
writes reads back the same, past the page cache. Emulated devices are left outside it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from linuxkernel import lab_kernel

from pyvmm.initramfs import BUSYBOX_INIT_PRELUDE, busybox_initramfs
from pyvmm.lab.launcher import find_busybox

MARK = "pyvmm-guest:"
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


def boot(tmp_path: Path, init: str, *args: str) -> subprocess.CompletedProcess[str]:
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(find_busybox(), init))
    command = [
        sys.executable, "-m", "pyvmm", "run", "--timeout", "150",
        "-k", str(lab_kernel()), "-i", str(initrd), "-m", "256M", "-c", "2",
        "-p", "console=ttyS0 quiet panic=-1", *args,
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, errors="replace", timeout=200, check=False
    )
    print(f"boot: exit {result.returncode} after {time.monotonic() - started:.1f} s")
    return result


@pytest.mark.parametrize(
    "lab_iommu",
    [
        pytest.param(iommu, marks=pytest.mark.lab(devices=("nvme",), iommu=iommu, session="viommu"))
        for iommu in ("intel", "virtio")
    ],
)
def test_linux_drives_an_nvme_behind_the_guests_virtio_iommu(
    lab_iommu: str, lab_devices: dict[str, str], tmp_path: Path
) -> None:
    """Under each of the lab's own IOMMUs (the host IOMMU the guest's domains are made in)."""
    nvme = lab_devices["nvme"]
    args = ("--vfio-pci", nvme, "--vfio-backend", "iommufd", "--viommu", "virtio", "--exit-stats")
    args += ("--rng",)  # an emulated device: outside the IOMMU (pyvmm.devices.virtio.iommu)
    result = boot(tmp_path, INIT, *args)
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
