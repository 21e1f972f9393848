"""Linux's own drivers on devices passed through by pyvmm, in the lab: the lab kernel boots
under pyvmm (busybox init) with a lab device passed through, on each VFIO backend and under each
of the lab's IOMMUs (see `cases`); its e1000e driver probes the device, brings the link up and
takes the device's MSI-X interrupts, whose counts grow; its nvme driver writes and reads the
NVMe's namespace through DMA and MSI-X, and a second boot finds the data there; the igbvf driver
drives an igb VF. The tests boot in lab sessions of their own ("linux-pass")."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from lab_passthrough import boot_linux

from pyvmm.initramfs import BUSYBOX_INIT_PRELUDE

MARK = "pyvmm-guest:"


def cases(device: str, *pairs: tuple[str, str]) -> pytest.MarkDecorator:
    """The test once for each (VFIO backend, lab IOMMU) pair, with `device`. Each Linux boot
    takes the lab most of a minute, so the devices share out the four pairs between them
    (each device meets both backends and both IOMMUs, and every pair is run by some device)
    rather than each running all four; the lab tests that do not boot Linux cover every
    backend with every device. Under each IOMMU these tests share one lab boot ("linux-pass")."""
    return pytest.mark.parametrize(
        ("backend", "iommu"),
        [
            pytest.param(
                backend,
                iommu,
                marks=pytest.mark.lab(devices=(device,), iommu=iommu, session="linux-pass"),
            )
            for backend, iommu in pairs
        ],
    )


E1000E_INIT = rf"""{BUSYBOX_INIT_PRELUDE}echo "{MARK} init started"
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


def e1000e_with_linux(lab_devices: dict[str, str], backend: str) -> None:
    nic = lab_devices["e1000e"]
    result = boot_linux(E1000E_INIT, "--vfio-pci", nic, "--vfio-backend", backend)
    out = result.stdout
    assert result.returncode == 0, f"{out[-3000:]}\n{result.stderr}"
    assert re.search(rf"{MARK} e1000e bound 0000:00:[0-9a-f]{{2}}\.0", out), out[-3000:]
    assert f"{MARK} msix 2" in out, out[-3000:]  # its rx and tx queues' MSI-X vectors
    assert f"{MARK} link up" in out, out[-3000:]
    before = int(re.search(rf"{MARK} irqs before (\d+)", out)[1])
    after = int(re.search(rf"{MARK} irqs after (\d+)", out)[1])
    assert after > before, out[-3000:]


@cases("e1000e", ("container", "intel"), ("iommufd", "virtio"))
def test_linux_drives_a_passed_through_e1000e(backend: str, iommu: str, lab_devices) -> None:
    e1000e_with_linux(lab_devices, backend)


PATTERN = "pyvmm nvme pattern"

NVME_WRITE = rf"""{BUSYBOX_INIT_PRELUDE}echo "{MARK} init started"
for dev in /sys/bus/pci/drivers/nvme/0000:*; do echo "{MARK} nvme bound $(basename $dev)"; done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/nvme0n1 ] && break; sleep 1; done
echo "{MARK} namespace $(cat /sys/block/nvme0n1/size) sectors"
echo "{MARK} msix $(grep PCI-MSIX /proc/interrupts | grep -c nvme)"
{{ BOOT_STEP }}
echo "{MARK} powering off"
sleep 1
poweroff -f
"""
# The pattern, and a check of block 100 of the namespace against it (read past the page cache).
PATTERN_FILE = rf"""i=0; while [ $i -lt 64 ]; do echo "{PATTERN} $i"; i=$((i+1)); done > /tmp/p
same() {{ dd if=/dev/nvme0n1 bs=4096 skip=100 count=1 iflag=direct 2>/dev/null \
    | head -c $(wc -c < /tmp/p) | cmp - /tmp/p && echo same; }}
"""
WRITE_STEP = rf"""{PATTERN_FILE}
dd if=/tmp/p of=/dev/nvme0n1 bs=4096 seek=100 conv=fsync 2>/dev/null
echo "{MARK} wrote $(wc -c < /tmp/p) bytes status $?"
echo "{MARK} read back $(same)"
"""
CHECK_STEP = rf"""{PATTERN_FILE}
echo "{MARK} after reboot $(same)"
"""


def nvme_with_linux(lab_devices: dict[str, str], backend: str) -> None:
    """Linux's nvme driver (MSI-X, DMA into guest RAM) writes a pattern to the namespace and
    reads it back; a second boot finds it there."""
    nvme = lab_devices["nvme"]
    args = ("--vfio-pci", nvme, "--vfio-backend", backend)
    for step, wanted in ((WRITE_STEP, "read back same"), (CHECK_STEP, "after reboot same")):
        result = boot_linux(NVME_WRITE.replace("{ BOOT_STEP }", step), *args)
        out = result.stdout
        assert result.returncode == 0, f"{out[-3000:]}\n{result.stderr}"
        assert re.search(rf"{MARK} nvme bound 0000:00:[0-9a-f]{{2}}\.0", out), out[-3000:]
        assert f"{MARK} namespace 131072 sectors" in out, out[-3000:]  # the lab's 64 MiB
        msix = re.search(rf"{MARK} msix (\d+)", out)
        assert msix and int(msix[1]) >= 2, out[-3000:]  # admin and I/O queues' vectors
        assert f"{MARK} {wanted}" in out, out[-3000:]


@cases("nvme", ("iommufd", "intel"), ("container", "virtio"))
def test_linux_drives_a_passed_through_nvme(backend: str, iommu: str, lab_devices) -> None:
    nvme_with_linux(lab_devices, backend)


IGBVF_INIT = rf"""{BUSYBOX_INIT_PRELUDE}echo "{MARK} init started"
for dev in /sys/bus/pci/drivers/igbvf/0000:*; do echo "{MARK} igbvf bound $(basename $dev)"; done
irqs() {{ grep eth0 /proc/interrupts | tr -s ' ' | cut -d' ' -f3,4 | tr ' \n' '++'; echo 0; }}
ip link set eth0 up
echo "{MARK} irqs before $(( $(irqs) ))"
echo "{MARK} msix $(grep PCI-MSIX /proc/interrupts | grep -c eth0)"
sleep 3
echo "{MARK} irqs after $(( $(irqs) ))"
echo "{MARK} powering off"
sleep 1
poweroff -f
"""


def pf_up(pf: str) -> None:
    """The VF's driver talks to the PF's through its mailbox: the PF's interface must be up."""
    (netdev,) = Path(f"/sys/bus/pci/devices/{pf}/net").iterdir()
    subprocess.run(["ip", "link", "set", netdev.name, "up"], check=True)


@cases("igb", ("iommufd", "intel"), ("container", "virtio"))
def test_linux_drives_a_passed_through_igb_virtual_function(
    backend: str, iommu: str, lab_devices
) -> None:
    """SR-IOV as users pass NICs through: a VF of the lab's igb (its PF on the lab's igb
    driver), passed through; the guest's igbvf driver probes it, talks to the PF, and takes
    its MSI-X interrupts."""
    pf_up(lab_devices["igb"])
    vf = lab_devices["igbvf"]
    result = boot_linux(IGBVF_INIT, "--vfio-pci", vf, "--vfio-backend", backend)
    out = result.stdout
    assert result.returncode == 0, f"{out[-3000:]}\n{result.stderr}"
    assert re.search(rf"{MARK} igbvf bound 0000:00:[0-9a-f]{{2}}\.0", out), out[-3000:]
    msix = re.search(rf"{MARK} msix (\d+)", out)
    assert msix and int(msix[1]) >= 2, out[-3000:]
    before = int(re.search(rf"{MARK} irqs before (\d+)", out)[1])
    after = int(re.search(rf"{MARK} irqs after (\d+)", out)[1])
    assert after > 0 and after >= before, out[-3000:]
