"""pyvmm.vfio.sysfs and the `pyvmm vfio` commands against a fake sysfs tree in a temp dir."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

import pytest
from fakesysfs import EDU, IGB, IGB_VFS, NVME, FakeKernel, FakeTree

from pyvmm.vfio import cli
from pyvmm.vfio.sysfs import (
    DeviceBusy,
    NoSuchDevice,
    NotPermitted,
    Sysfs,
    SysfsError,
    _error,
    _parse_pci_ids,
    normalize_bdf,
)


@pytest.fixture
def tree(tmp_path: Path) -> FakeTree:
    tree = FakeTree(tmp_path)
    tree.driver("vfio-pci")
    tree.device(EDU, (0x1234, 0x11E8), group="4")
    tree.device(NVME, (0x1B36, 0x0010), class_code=0x010802, driver="nvme", group="5")
    tree.device("0000:00:1f.0", (0x8086, 0x2918), class_code=0x060100)
    return tree


@pytest.fixture
def kernel(tree: FakeTree) -> FakeKernel:
    return FakeKernel(tree, {NVME: "nvme"})


def run_cli(root: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="pyvmm")
    cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["vfio", "--root", str(root), *argv])
    return args.func(args)


@pytest.mark.parametrize(
    ("given", "expected"),
    [("00:04.0", EDU), ("0000:00:04.0", EDU), ("0001:3A:1f.7", "0001:3a:1f.7")],
)
def test_normalize_bdf(given: str, expected: str) -> None:
    assert normalize_bdf(given) == expected


@pytest.mark.parametrize("bad", ["", "4.0", "00:04", "0000:00:04.8", "xx:00.0"])
def test_normalize_bdf_refuses_non_addresses(bad: str) -> None:
    with pytest.raises(NoSuchDevice, match="not a PCI address"):
        normalize_bdf(bad)


def test_pci_devices_reads_ids_driver_and_group(tree: FakeTree) -> None:
    devices = {d.bdf: d for d in Sysfs(tree.root).pci_devices()}
    assert list(devices) == [EDU, NVME, "0000:00:1f.0"]
    nvme = devices[NVME]
    assert (nvme.vendor, nvme.device, nvme.class_code) == (0x1B36, 0x0010, 0x010802)
    assert (nvme.driver, nvme.iommu_group, nvme.group_node, nvme.cdev) == ("nvme", "5", False, None)
    assert devices[EDU].driver is None
    assert devices["0000:00:1f.0"].iommu_group is None


def test_no_pci_bus_means_no_devices(tmp_path: Path) -> None:
    assert Sysfs(tmp_path).pci_devices() == []


def test_vfio_cdev_directory_without_a_dev_node(tree: FakeTree) -> None:
    """vfio-dev/ exists in sysfs even without CONFIG_VFIO_DEVICE_CDEV: the node decides."""
    (tree.pci / "devices" / EDU / "vfio-dev" / "vfio0").mkdir(parents=True)
    edu = Sysfs(tree.root).pci_device(EDU)
    assert (edu.cdev, edu.cdev_node) == ("vfio0", False)
    (tree.root / "dev/vfio/devices/vfio0").touch()
    assert Sysfs(tree.root).pci_device(EDU).cdev_node


def test_global_nodes(tree: FakeTree) -> None:
    sysfs = Sysfs(tree.root)
    assert (sysfs.iommufd, sysfs.vfio_container, sysfs.vfio_cdevs) == (False, False, True)
    (tree.root / "dev/iommu").touch()
    (tree.root / "dev/vfio/vfio").touch()
    assert (sysfs.iommufd, sysfs.vfio_container) == (True, True)


def test_find_by_ids(tree: FakeTree) -> None:
    assert [d.bdf for d in Sysfs(tree.root).find(0x1234, 0x11E8)] == [EDU]
    assert Sysfs(tree.root).find(0x1234, 0x0001) == []


def test_names_come_from_pci_ids(tree: FakeTree) -> None:
    ids = tree.root / "usr/share/misc/pci.ids"
    ids.parent.mkdir(parents=True)
    ids.write_text(
        "# comment\n1234  Technical Corp.\n\t11e8  Edu device\n\t\t1234 0001  a subsystem\n"
        "1b36  Red Hat, Inc.\n\t0010  QEMU NVM Express Controller\nC 00  Unclassified\n"
    )
    names = {d.bdf: d.name for d in Sysfs(tree.root).pci_devices()}
    assert names[EDU] == "Technical Corp. Edu device"
    assert names[NVME] == "Red Hat, Inc. QEMU NVM Express Controller"
    assert names["0000:00:1f.0"] == ""


def test_parse_pci_ids_stops_at_the_class_list() -> None:
    lines = ["1234  V", "C 12  Accelerator", "\t00  Processing accelerators"]
    assert _parse_pci_ids(lines, {(0x1234, 0x0000)}) == {}


def test_bind_device_without_driver(kernel: FakeKernel) -> None:
    edu = kernel.bind_vfio("00:04.0")
    assert (edu.driver, edu.group_node, edu.cdev, edu.cdev_node) == (
        "vfio-pci",
        True,
        "vfio0",
        True,
    )
    assert kernel.writes == [
        (f"sys/bus/pci/devices/{EDU}/driver_override", "vfio-pci"),
        ("sys/bus/pci/drivers_probe", EDU),
    ]


def test_bind_releases_the_current_driver_first(kernel: FakeKernel) -> None:
    assert kernel.bind_vfio(NVME).driver == "vfio-pci"
    assert kernel.writes == [
        (f"sys/bus/pci/devices/{NVME}/driver_override", "vfio-pci"),
        (f"sys/bus/pci/devices/{NVME}/driver/unbind", NVME),
        ("sys/bus/pci/drivers_probe", NVME),
    ]


def test_bind_of_a_bound_device_writes_nothing(kernel: FakeKernel) -> None:
    kernel.bind_vfio(EDU)
    kernel.writes.clear()
    assert kernel.bind_vfio(EDU).driver == "vfio-pci"
    assert kernel.writes == []


def test_unbind_gives_the_device_back_to_its_driver(kernel: FakeKernel) -> None:
    kernel.bind_vfio(NVME)
    kernel.writes.clear()
    assert kernel.unbind(NVME).driver == "nvme"
    assert kernel.writes == [
        (f"sys/bus/pci/devices/{NVME}/driver_override", "\n"),
        (f"sys/bus/pci/devices/{NVME}/driver/unbind", NVME),
        ("sys/bus/pci/drivers_probe", NVME),
    ]


def test_bind_without_iommu_group_says_so(tree: FakeTree) -> None:
    tree.device("0000:00:06.0", (0x8086, 0x10D3))
    with pytest.raises(SysfsError, match=r"did not take the device \(it has no IOMMU group"):
        FakeKernel(tree, {}).bind_vfio("0000:00:06.0")


def test_bind_without_vfio_pci_driver(tmp_path: Path) -> None:
    tree = FakeTree(tmp_path)
    tree.device(EDU, (0x1234, 0x11E8), group="4")
    with pytest.raises(SysfsError, match="vfio-pci driver is not available"):
        Sysfs(tmp_path).bind_vfio(EDU)


def test_missing_device(kernel: FakeKernel) -> None:
    with pytest.raises(NoSuchDevice, match=r"no PCI device 0000:00:09\.0"):
        kernel.bind_vfio("00:09.0")


@pytest.mark.parametrize(
    ("code", "kind", "hint"),
    [
        (errno.EACCES, NotPermitted, "needs root"),
        (errno.EPERM, NotPermitted, "needs root"),
        (errno.EBUSY, DeviceBusy, "in use"),
        (errno.ENOENT, NoSuchDevice, ""),
        (errno.EINVAL, SysfsError, ""),
    ],
)
def test_write_errors_are_one_line(code: int, kind: type[SysfsError], hint: str) -> None:
    error = _error(Path("/sys/x/remove"), "1", OSError(code, os.strerror(code)))
    assert type(error) is kind
    assert str(error).startswith("writing '1' to /sys/x/remove: ")
    assert hint in str(error) and "\n" not in str(error)


def test_write_to_a_missing_attribute(tmp_path: Path) -> None:
    with pytest.raises(NoSuchDevice, match="No such file"):
        Sysfs(tmp_path)._write(tmp_path / "nope", "1")


# -- SR-IOV -----------------------------------------------------------------------------------


@pytest.fixture
def sriov(tree: FakeTree) -> FakeKernel:
    """The tree with an igb PF bound to igb (7 VFs allowed) and an igbvf driver for its VFs."""
    tree.driver("igbvf")
    tree.physical_function(IGB, (0x8086, 0x10C9), total=7, driver="igb", group="7")
    return FakeKernel(tree, {IGB: "igb", **dict.fromkeys(IGB_VFS, "igbvf")})


def test_enable_vfs_returns_the_vfs_the_kernel_made(sriov: FakeKernel) -> None:
    assert sriov.enable_vfs("01:00.0", 2) == IGB_VFS
    assert sriov.writes == [(f"sys/bus/pci/devices/{IGB}/sriov_numvfs", "2")]
    vfs = [sriov.pci_device(bdf) for bdf in IGB_VFS]
    assert [(vf.ids, vf.physfn, vf.driver) for vf in vfs] == [("8086:10ca", IGB, "igbvf")] * 2
    assert len({vf.iommu_group for vf in vfs} | {sriov.pci_device(IGB).iommu_group}) == 3
    assert sriov.pci_device(IGB).physfn is None


def test_enable_vfs_without_probing_leaves_them_for_vfio_pci(sriov: FakeKernel) -> None:
    vfs = sriov.enable_vfs(IGB, 2, probe=False)
    assert sriov.writes == [
        (f"sys/bus/pci/devices/{IGB}/sriov_drivers_autoprobe", "0"),
        (f"sys/bus/pci/devices/{IGB}/sriov_numvfs", "2"),
    ]
    assert [sriov.pci_device(bdf).driver for bdf in vfs] == [None, None]
    assert [sriov.bind_vfio(bdf).cdev_node for bdf in vfs] == [True, True]


def test_enable_vfs_again_changes_nothing_and_zero_removes_them(sriov: FakeKernel) -> None:
    sriov.enable_vfs(IGB, 2)
    sriov.writes.clear()
    assert sriov.enable_vfs(IGB, 2) == IGB_VFS
    assert sriov.writes == []
    assert sriov.enable_vfs(IGB, 0) == []
    assert sriov.writes == [(f"sys/bus/pci/devices/{IGB}/sriov_numvfs", "0")]
    assert not any((sriov.tree.pci / "devices" / bdf).exists() for bdf in IGB_VFS)


def test_vfs_come_in_index_order(tree: FakeTree) -> None:
    pf = tree.physical_function(IGB, (0x8086, 0x10C9), total=12)
    for index in (10, 2, 0):
        (pf / f"virtfn{index}").symlink_to(f"../0000:01:{index:02x}.0")
    assert Sysfs(tree.root).vfs(IGB) == ["0000:01:00.0", "0000:01:02.0", "0000:01:0a.0"]
    assert Sysfs(tree.root).vfs(EDU) == []


@pytest.mark.parametrize(
    ("bdf", "count", "error", "message"),
    [
        (EDU, 1, SysfsError, f"{EDU} has no SR-IOV capability (no sriov_totalvfs)"),
        (IGB, 8, SysfsError, f"{IGB} can have 0 to 7 VFs (sriov_totalvfs), not 8"),
        (IGB, -1, SysfsError, f"{IGB} can have 0 to 7 VFs (sriov_totalvfs), not -1"),
        ("00:09.0", 1, NoSuchDevice, "no PCI device 0000:00:09.0"),
    ],
)
def test_enable_vfs_refuses_what_the_device_cannot_do(
    sriov: FakeKernel, bdf: str, count: int, error: type[SysfsError], message: str
) -> None:
    with pytest.raises(error) as excinfo:
        sriov.enable_vfs(bdf, count)
    assert str(excinfo.value) == message
    assert sriov.writes == []


def test_enable_vfs_refuses_to_change_a_number_already_set(sriov: FakeKernel) -> None:
    sriov.enable_vfs(IGB, 2)
    with pytest.raises(DeviceBusy, match=r"has 2 VFs already; remove them first \(0 VFs\) to"):
        sriov.enable_vfs(IGB, 3)
    assert sriov.vfs(IGB) == IGB_VFS


def test_enable_vfs_needs_the_pf_driver(tree: FakeTree) -> None:
    tree.physical_function(IGB, (0x8086, 0x10C9), total=7, group="7")
    kernel = FakeKernel(tree, {})
    with pytest.raises(SysfsError, match="has no driver; its VFs are made by the PF's own driver"):
        kernel.enable_vfs(IGB, 2)
    kernel.tree.bind(IGB, "vfio-pci")  # vfio-pci makes no VFs (without enable_sriov=1)
    kernel.refuse["sriov_numvfs"] = errno.ENOENT
    with pytest.raises(SysfsError) as excinfo:
        kernel.enable_vfs(IGB, 2)
    assert str(excinfo.value) == (
        f"{IGB}: its driver vfio-pci does not make VFs (No such file or directory)"
    )


def test_enable_vfs_as_non_root_says_so(sriov: FakeKernel) -> None:
    sriov.refuse["sriov_numvfs"] = errno.EACCES
    with pytest.raises(NotPermitted, match=r"sriov_numvfs: Permission denied \(needs root\)$"):
        sriov.enable_vfs(IGB, 2)


def test_enable_vfs_checks_the_kernel_made_them(tree: FakeTree) -> None:
    """A write the kernel took without making VFs (here: a plain file) is not success."""
    tree.physical_function(IGB, (0x8086, 0x10C9), total=7, driver="igb")
    with pytest.raises(SysfsError, match=f"^{IGB}: asked for 2 VFs, the kernel made 0$"):
        Sysfs(tree.root).enable_vfs(IGB, 2)


@pytest.fixture
def mtty(tree: FakeTree) -> FakeTree:
    tree.mdev_type("mtty", "mtty-1", "Single port serial", 24)
    tree.mdev_type("mtty", "mtty-2", "Dual port serial", 12)
    return tree


def test_mdev_types(mtty: FakeTree) -> None:
    types = Sysfs(mtty.root).mdev_types()
    assert [(t.parent, t.type_id, t.name, t.available, t.device_api) for t in types] == [
        ("mtty", "mtty-1", "Single port serial", 24, "vfio-pci"),
        ("mtty", "mtty-2", "Dual port serial", 12, "vfio-pci"),
    ]


def test_mdev_create_list_remove(mtty: FakeTree) -> None:
    kernel = FakeKernel(mtty, {})
    uuid = kernel.create_mdev("mtty-2", uuid="83b8f4f2-509f-382f-3c1e-e6bfe0fa1001")
    assert uuid == "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
    [mdev] = kernel.mdevs()
    assert (mdev.uuid, mdev.parent, mdev.type_id) == (uuid, "mtty", "mtty-2")
    kernel.remove_mdev(uuid)
    assert kernel.mdevs() == []


def test_mdev_create_picks_a_random_uuid(mtty: FakeTree) -> None:
    kernel = FakeKernel(mtty, {})
    uuid = kernel.create_mdev("mtty-1", parent="mtty")
    assert len(uuid) == 36 and [m.uuid for m in kernel.mdevs()] == [uuid]


def test_mdev_errors(mtty: FakeTree) -> None:
    sysfs = Sysfs(mtty.root)
    with pytest.raises(NoSuchDevice, match="no mdev type mtty-3"):
        sysfs.create_mdev("mtty-3")
    with pytest.raises(NoSuchDevice, match="under parent other"):
        sysfs.create_mdev("mtty-2", parent="other")
    with pytest.raises(NoSuchDevice, match="no mdev 1234"):
        sysfs.remove_mdev("1234")
    mtty.mdev_type("mtty9", "mtty-2", "Dual port serial", 0)
    with pytest.raises(SysfsError, match="exists under mtty, mtty9: choose with --parent"):
        sysfs.create_mdev("mtty-2")
    with pytest.raises(DeviceBusy, match="no instances left"):
        sysfs.create_mdev("mtty-2", parent="mtty9")


def test_cli_list(tree: FakeTree, capsys: pytest.CaptureFixture[str]) -> None:
    (tree.root / "dev/iommu").touch()
    assert run_cli(tree.root, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    header = ["BDF", "ID", "CLASS", "DRIVER", "GROUP", "GROUP", "NODE", "CDEV", "NODE", "NAME"]
    assert lines[0].split() == header
    assert lines[2].split() == [NVME, "1b36:0010", "0108", "storage", "nvme", "5", "-", "-"]
    assert lines[-1].startswith("/dev/iommu (iommufd): present; /dev/vfio/vfio (container): absent")


def test_cli_list_without_pci(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(tmp_path, "list") == 0
    assert capsys.readouterr().out.startswith("no PCI devices\n")


def test_cli_mdev_list(mtty: FakeTree, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(mtty.root, "mdev", "list") == 0
    out = capsys.readouterr().out
    assert "mtty    mtty-2  Dual port serial    12" in out
    assert out.rstrip().endswith("no mdevs")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("bind", "00:09.0"), "no PCI device 0000:00:09.0"),
        (
            ("bind", "nonsense"),
            "'nonsense' is not a PCI address (expected DDDD:BB:SS.F or BB:SS.F)",
        ),
        (("unbind", "00:1f.1"), "no PCI device 0000:00:1f.1"),
        (("mdev", "create", "mtty-2"), "no mdev type mtty-2"),
        (("mdev", "remove", "42"), "no mdev 42"),
    ],
)
def test_cli_user_errors_are_one_line(
    tree: FakeTree, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    assert run_cli(tree.root, *argv) == 1
    assert capsys.readouterr().err == f"pyvmm vfio: {message}\n"


@pytest.fixture
def sriov_cli(sriov: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    """The CLI on the SR-IOV fake kernel (so its writes make VFs)."""
    monkeypatch.setattr(cli, "Sysfs", lambda root: sriov)
    return sriov


def test_cli_sriov_makes_vfs_and_removes_them(
    sriov_cli: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(sriov_cli.root, "sriov", "01:00.0", "2") == 0
    assert capsys.readouterr().out == (
        f"{IGB_VFS[0]}: VF 0 of {IGB}, 8086:10ca, igbvf, IOMMU group 100\n"
        f"{IGB_VFS[1]}: VF 1 of {IGB}, 8086:10ca, igbvf, IOMMU group 101\n"
    )
    assert run_cli(sriov_cli.root, "sriov", IGB, "0") == 0
    assert capsys.readouterr().out == f"{IGB}: no VFs\n"
    assert sriov_cli.vfs(IGB) == []


def test_cli_sriov_vfio_binds_the_vfs_to_vfio_pci(
    sriov_cli: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(sriov_cli.root, "sriov", IGB, "1", "--vfio") == 0
    assert capsys.readouterr().out == (
        f"{IGB_VFS[0]}: VF 0 of {IGB}, 8086:10ca, vfio-pci, IOMMU group 100\n"
    )
    assert (f"sys/bus/pci/devices/{IGB}/sriov_drivers_autoprobe", "0") in sriov_cli.writes


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((EDU, "2"), f"{EDU} has no SR-IOV capability (no sriov_totalvfs)"),
        ((IGB, "9"), f"{IGB} can have 0 to 7 VFs (sriov_totalvfs), not 9"),
        (
            (IGB, "2", "--vfio"),
            f"writing '0' to {{root}}/sys/bus/pci/devices/{IGB}/sriov_drivers_autoprobe: "
            "Permission denied (needs root)",
        ),
    ],
)
def test_cli_sriov_errors_are_one_line(
    sriov_cli: FakeKernel, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    sriov_cli.refuse = {"sriov_drivers_autoprobe": errno.EACCES, "sriov_numvfs": errno.EACCES}
    assert run_cli(sriov_cli.root, "sriov", *argv) == 1
    assert capsys.readouterr().err == f"pyvmm vfio: {message.format(root=sriov_cli.root)}\n"
