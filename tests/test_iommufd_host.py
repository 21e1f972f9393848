"""The parts of pyvmm's iommufd layer that need no iommufd (this host's kernel has none): the
hardware info decoding and what it concludes about nesting and dirty tracking, the object tree
`pyvmm iommufd objects` prints, teardown order, and the control commands' and options' errors
on a machine that has no iommufd. The uAPI paths themselves are tested in the lab
(tests/lab/test_lab_iommufd_*.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvmm.board.machine import Machine
from pyvmm.commands.iommufd import tree_lines
from pyvmm.control.client import ControlClient, ControlError
from pyvmm.control.server import ControlServer
from pyvmm.errors import ConfigError
from pyvmm.uapi import iommufd as uapi
from pyvmm.vfio.iommufd import objects as iommufd
from pyvmm.vfio.iommufd.info import VTD_ECAP_BITS, HwInfo, decode_fields
from pyvmm.vfio.iommufd.objects import IommufdObject

needs_kvm = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")


def vtd(ecap_bits: list[str], cap: int = 0) -> HwInfo:
    ecap = sum(1 << VTD_ECAP_BITS[name] for name in ecap_bits)
    data = uapi.iommu_hw_info_vtd(cap_reg=cap, ecap_reg=ecap)
    return HwInfo("0000:00:04.0", uapi.IommuHwInfoType.INTEL_VTD, uapi.IommuHwCap(0), 0, data,
                  decode_fields(data))  # fmt: skip


def test_vtd_nesting_needs_scalable_mode_and_nest_as_the_kernel_checks() -> None:
    assert vtd(["QI", "SMTS", "SLTS", "NEST"]).nesting_missing() is None
    assert vtd(["QI", "SMTS", "SLTS"]).nesting_missing() == "its ECAP register lacks NEST"
    assert vtd(["QI", "SLTS"]).nesting_missing() == "its ECAP register lacks SMTS and NEST"
    assert vtd(["SMTS", "SLTS", "SLADS"]).dirty_tracking_missing() == (
        "no IOMMU_HW_CAP_DIRTY_TRACKING: its ECAP lacks SMPWC"
    )


def test_vtd_registers_are_shown_decoded() -> None:
    info = vtd(["QI", "IR", "PASID"], cap=(0x2F << 16) | (0x4 << 8) | (1 << 7))
    assert info.fields["ECAP"].endswith(": QI IR PASID")
    assert info.fields["CAP"].endswith(": CM")  # caching mode: an emulated IOMMU
    assert info.fields["  SAGAW/MGAW"] == "0x4 / 48 bits"
    lines = info.lines()
    assert lines[1] == "iommu           intel-vtd"
    assert lines[-2] == "nesting         no: its ECAP register lacks SMTS, SLTS and NEST"
    assert lines[-1] == (
        "dirty tracking  no: no IOMMU_HW_CAP_DIRTY_TRACKING: its ECAP lacks SMTS, SLTS, SLADS "
        "and SMPWC"
    )


def test_an_iommu_without_hardware_info_cannot_nest_and_smmuv3_needs_both_stages() -> None:
    none = HwInfo("d", uapi.IommuHwInfoType.NONE, uapi.IommuHwCap.DIRTY_TRACKING, 0)
    assert "no hardware information" in (none.nesting_missing() or "")
    assert none.dirty_tracking_missing() is None
    smmu = uapi.iommu_hw_info_arm_smmuv3()
    smmu.idr[0] = 0b10  # S1P only
    smmuv3 = uapi.IommuHwInfoType.ARM_SMMUV3
    info = HwInfo("d", smmuv3, uapi.IommuHwCap(0), 0, smmu, decode_fields(smmu))
    assert info.nesting_missing() == "its IDR0 lacks S2P"
    assert info.fields["IDR0"] == "0x00000002: S1P"


def test_objects_are_shown_as_a_tree_under_what_they_are_made_over() -> None:
    objects = [
        {"id": 1, "type": "ioas", "parents": []},
        {"id": 3, "type": "hwpt", "parents": [1], "flags": ["alloc_nest_parent"]},
        {"id": 4, "type": "viommu", "parents": [3], "viommu_type": "selftest"},
        {"id": 5, "type": "fault", "parents": []},
        {"id": 6, "type": "hwpt", "parents": [4, 5], "flags": [], "data_type": "selftest"},
        {"id": 2, "type": "device", "parents": [6], "name": "mock", "hwpt": 6},
        {"id": 7, "type": "vdevice", "parents": [4, 2], "virt_id": 0x18},
    ]
    assert tree_lines(objects) == [
        "ioas 1",
        "  hwpt 3 flags=alloc_nest_parent",
        "    viommu 4 viommu_type=selftest",
        "      hwpt 6 (also on 5) flags=- data_type=selftest",
        "        device 2 name=mock hwpt=6",
        "      vdevice 7 (also on 2) virt_id=0x18",
        "fault 5",
    ]


class _Fake(IommufdObject):
    """An object whose destruction is recorded instead of asked of a kernel."""

    kind = "fake"

    def __init__(self, iommufd: object, object_id: int, parents: tuple[IommufdObject, ...]) -> None:
        self._parents = parents
        super().__init__(iommufd, object_id)  # type: ignore[arg-type]

    @property
    def parents(self) -> tuple[IommufdObject, ...]:
        return self._parents

    def _destroy(self) -> None:
        self.iommufd.destroyed.append(self.id)  # type: ignore[attr-defined]


def test_teardown_destroys_each_object_after_everything_that_hangs_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(iommufd, "open_node", lambda *_: os.open(tmp_path, os.O_RDONLY))
    registry = iommufd.Iommufd()  # on any fd: close() closes it
    registry.destroyed = []  # type: ignore[attr-defined]
    ioas = _Fake(registry, 1, ())
    device = _Fake(registry, 2, ())
    parent = _Fake(registry, 3, (ioas,))
    queue = _Fake(registry, 4, ())
    nested = _Fake(registry, 5, (parent, queue))
    device._parents = (nested,)  # attached later to what was made after it
    registry.close()
    order = registry.destroyed  # type: ignore[attr-defined]
    assert sorted(order) == [1, 2, 3, 4, 5]
    assert order.index(2) < order.index(5) < order.index(3) < order.index(1)
    assert order.index(5) < order.index(4)
    assert registry.fd == -1 and registry.objects() == ()


@needs_kvm
def test_iommufd_commands_on_a_machine_without_iommufd_say_so(tmp_path: Path) -> None:
    path = str(tmp_path / "vm.sock")
    with Machine(mem_size=16 << 20) as machine:
        server = ControlServer(machine, path)
        try:
            with ControlClient(path) as client:
                with pytest.raises(ControlError, match="the machine has no assigned device"):
                    client.execute("iommufd-objects")
                with pytest.raises(ControlError, match="argument id must be a int"):
                    client.execute("hwpt-attach", device="0000:00:04.0", id="3")
                assert client.execute("status")["status"] == "created"  # still serving
        finally:
            server.close()


@needs_kvm
def test_viommu_and_hwpt_options_are_checked_before_any_device_is_opened() -> None:
    with Machine(mem_size=16 << 20) as machine:
        with pytest.raises(ConfigError, match=r"--viommu smmu: use none, nested, virtio"):
            machine.add_device("vfio-pci", host="0000:00:04.0", viommu="smmu")
        with pytest.raises(ConfigError, match="--hwpt and --viommu nested each choose"):
            machine.add_device("vfio-pci", host="0000:00:04.0", hwpt=True, viommu="nested")
        with pytest.raises(ConfigError, match="--hwpt and --viommu virtio each choose"):
            machine.add_device("vfio-pci", host="0000:00:04.0", hwpt=True, viommu="virtio")
        assert machine.vfio_backend is None  # nothing was opened
