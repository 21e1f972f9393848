"""SR-IOV in the lab: QEMU's igb (an Intel 82576) behind a PCIe root port of its own, its PF left
on the kernel's igb driver, which made two VFs for the agent; the VFs on vfio-pci, each in an
IOMMU group of its own, and VFIO opens them. No DMA is mapped.

Why a group each: the root port has ACS (source validation, request and completion redirect,
upstream forwarding), which isolates its bus from the rest, and on that bus neither the PF nor
a VF is multi-function (a VF never is), so nothing joins them. With `disable-acs=on` on the
root port the PF, both VFs and the port share one group and VFIO refuses a VF (not viable).

The VF tests run under both IOMMUs; the virtio-iommu ones join that IOMMU's boot (the Linux
boot tests'), which then has an igb too.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import pytest

from pyvmm.cli import main
from pyvmm.uapi import vfio as uapi
from pyvmm.vfio.backends import BACKENDS, open_context
from pyvmm.vfio.sysfs import VFIO_PCI, Sysfs

pytestmark = pytest.mark.lab(devices=("igb",))

VF_IDS = (0x8086, 0x10CA)
#: Each IOMMU's boot, with the igb (a test's own marker is the one the lab tier reads).
ON_EACH_IOMMU = pytest.mark.parametrize(
    "iommu",
    [
        pytest.param(i, marks=pytest.mark.lab(devices=("igb",), iommu=i))
        for i in ("intel", "virtio")
    ],
)


def group_members(group: str) -> list[str]:
    return sorted(
        entry.name for entry in Path("/sys/kernel/iommu_groups", group, "devices").iterdir()
    )


def test_the_pf_stays_on_igb_and_has_the_vfs(lab_devices: dict[str, str], sysfs: Sysfs) -> None:
    pf = sysfs.pci_device(lab_devices["igb"])
    assert (pf.vendor, pf.device, pf.driver) == (0x8086, 0x10C9, "igb")
    assert sysfs.vfs(pf.bdf) == [lab_devices["igbvf"], lab_devices["igbvf1"]]
    assert pf.iommu_group is not None and group_members(pf.iommu_group) == [pf.bdf]
    assert not pf.group_node  # not VFIO's


def translated_by(bdf: str) -> str:
    """Which IOMMU translates the device's DMA: its `iommu` link is to dmar0 for intel-iommu,
    to the virtio-iommu's PCI device otherwise."""
    target = Path("/sys/bus/pci/devices", bdf, "iommu").resolve()
    if target.name.startswith("dmar"):
        return "intel"
    return "virtio" if any(part.startswith("virtio") for part in target.parts) else str(target)


@ON_EACH_IOMMU
def test_each_vf_is_on_vfio_pci_in_a_group_of_its_own(
    iommu: str, lab_devices: dict[str, str], sysfs: Sysfs
) -> None:
    for name in ("igbvf", "igbvf1"):
        vf = sysfs.pci_device(lab_devices[name])
        assert (vf.vendor, vf.device) == VF_IDS
        assert vf.physfn == lab_devices["igb"]
        assert vf.driver == VFIO_PCI
        assert translated_by(vf.bdf) == iommu
        assert vf.iommu_group is not None and group_members(vf.iommu_group) == [vf.bdf]
        assert vf.group_node and Path("/dev/vfio", vf.iommu_group).exists()
        assert vf.cdev is not None and vf.cdev_node


@ON_EACH_IOMMU
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_vfio_opens_a_vf(
    iommu: str, backend: str, lab_devices: dict[str, str], sysfs: Sysfs
) -> None:
    """Its group is viable (container) and its cdev binds (iommufd); VFIO shows an 82576 VF:
    the IDs (which a VF's own config space reads as ffff; vfio-pci fills them in), BAR0 and
    the MSI-X BAR3 of 16 KiB, 3 MSI-X vectors, no INTx (a VF has none), and a reset (FLR)."""
    assert translated_by(lab_devices["igbvf"]) == iommu
    with open_context(backend) as context:
        device = context.open_pci(sysfs.pci_device(lab_devices["igbvf"]))
        config = device.region(uapi.VfioPciRegion.CONFIG)
        assert struct.unpack("<HH", device.read(config, 0, 4)) == VF_IDS
        assert device.region(uapi.VfioPciRegion.BAR0).size == 0x4000
        assert device.region(uapi.VfioPciRegion.BAR3).size == 0x4000
        assert device.irq(uapi.VfioPciIrq.MSIX).count == 3
        assert device.irq(uapi.VfioPciIrq.INTX).count == 0
        assert device.info().flags & uapi.VfioDeviceFlag.RESET


def as_nobody(argv: list[str]) -> tuple[int, str]:
    """`pyvmm ARGV` in a child process that has become nobody: (exit status, stderr). In this
    process's image, since nobody may not read the interpreter under /root; should setuid
    fail, the child does nothing (status 99)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(read)
            os.dup2(write, 2)
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 (the child _exits)
            os.setuid(65534)
            code = main(argv)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with open(read) as stderr:
        err = stderr.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


def test_pyvmm_vfio_sriov_on_the_real_kernel(
    lab_devices: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`pyvmm vfio sriov` against the lab's igb, changing nothing: asking for the VFs it has
    lists them; the kernel's own sriov_totalvfs bounds the number; a PF with VFs keeps them;
    a device without SR-IOV and a caller who is not root are told so in one line."""
    pf, vfs = lab_devices["igb"], [lab_devices["igbvf"], lab_devices["igbvf1"]]
    assert main(["vfio", "sriov", pf, "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[0] for line in out] == vfs
    assert all(f"of {pf}, 8086:10ca, vfio-pci, IOMMU group " in line for line in out)
    refusals = {
        (pf, "8"): f"{pf} can have 0 to 7 VFs (sriov_totalvfs), not 8",
        (pf, "3"): f"{pf} has 2 VFs already; remove them first (0 VFs) to have 3",
        (lab_devices["edu"], "1"): f"{lab_devices['edu']} has no SR-IOV capability",
    }
    for (bdf, count), message in refusals.items():
        assert main(["vfio", "sriov", bdf, count]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"pyvmm vfio: {message}") and err.count("\n") == 1, err
    # As nobody, removing the VFs is refused by the kernel.
    assert as_nobody(["vfio", "sriov", pf, "0"]) == (
        1,
        f"pyvmm vfio: writing '0' to /sys/bus/pci/devices/{pf}/sriov_numvfs: "
        "Permission denied (needs root)\n",
    )
    assert Sysfs("/").vfs(pf) == vfs
