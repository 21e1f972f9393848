"""Linux's own drivers on devices passed through by pyvmm, in the lab: the lab kernel boots
under pyvmm (busybox init) with the lab's e1000e passed through, on each VFIO backend and under
each of the lab's IOMMUs; its e1000e driver probes the device, brings the link up and takes the
device's MSI-X interrupts, whose counts grow."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from linuxkernel import lab_kernel

from pyvmm.initramfs import busybox_initramfs
from pyvmm.lab.launcher import find_busybox
from pyvmm.vfio.context import backends

MARK = "pyvmm-guest:"
BACKENDS = sorted(backends())
ATTEMPTS = 3
LAB_FAULT = "pyvmm: triple-fault: vcpu"  # the lab's nested-SVM fault: see test_lab_linux_boot

E1000E_INIT = rf"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "{MARK} init started"
for dev in /sys/bus/pci/drivers/e1000e/0000:*; do echo "{MARK} e1000e bound $(basename $dev)"; done
irqs() {{ grep eth0 /proc/interrupts | tr -s ' ' | cut -d' ' -f3,4 | tr ' \n' '++'; echo 0; }}
ip link set eth0 up
echo "{MARK} irqs before $(( $(irqs) ))"
echo "{MARK} msix $(grep PCI-MSIX /proc/interrupts | grep -c -E 'eth0-(rx|tx)-0')"
sleep 3
echo "{MARK} irqs after $(( $(irqs) ))"
echo "{MARK} link $(cat /sys/class/net/eth0/operstate)"
echo "{MARK} powering off"
sleep 1
poweroff -f
"""


def boot(tmp_path: Path, init: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Boot the lab kernel until a run ends other than by the lab's triple fault."""
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(find_busybox(), init))
    command = [
        sys.executable, "-m", "pyvmm", "run", "--timeout", "150",
        "-k", str(lab_kernel()), "-i", str(initrd), "-m", "256M", "-c", "2",
        "-p", "console=ttyS0 quiet panic=-1", *args,
    ]  # fmt: skip
    for attempt in range(1, ATTEMPTS + 1):
        started = time.monotonic()
        result = subprocess.run(
            command, capture_output=True, text=True, errors="replace", timeout=200, check=False
        )
        print(f"boot {attempt}: exit {result.returncode} after {time.monotonic() - started:.1f} s")
        if LAB_FAULT not in result.stderr:
            break
    return result


def e1000e_with_linux(tmp_path: Path, lab_devices: dict[str, str], backend: str) -> None:
    nic = lab_devices["e1000e"]
    result = boot(tmp_path, E1000E_INIT, "--vfio-pci", nic, "--vfio-backend", backend)
    out = result.stdout
    assert result.returncode == 0, f"{out[-3000:]}\n{result.stderr}"
    assert re.search(rf"{MARK} e1000e bound 0000:00:[0-9a-f]{{2}}\.0", out), out[-3000:]
    assert f"{MARK} msix 2" in out, out[-3000:]  # its rx and tx queues' MSI-X vectors
    assert f"{MARK} link up" in out, out[-3000:]
    before = int(re.search(rf"{MARK} irqs before (\d+)", out)[1])
    after = int(re.search(rf"{MARK} irqs after (\d+)", out)[1])
    assert after > before, out[-3000:]


@pytest.mark.lab(devices=("e1000e",))
@pytest.mark.parametrize("backend", BACKENDS)
def test_linux_drives_a_passed_through_e1000e_under_intel_iommu(
    backend: str, lab_devices, tmp_path: Path
) -> None:
    e1000e_with_linux(tmp_path, lab_devices, backend)


@pytest.mark.lab(iommu="virtio", devices=("e1000e",))
@pytest.mark.parametrize("backend", BACKENDS)
def test_linux_drives_a_passed_through_e1000e_under_virtio_iommu(
    backend: str, lab_devices, tmp_path: Path
) -> None:
    e1000e_with_linux(tmp_path, lab_devices, backend)
