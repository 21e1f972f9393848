"""The lab gives what it promises: KVM, iommufd, VFIO cdevs and the edu device on vfio-pci."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from pyvmm.kvm.system import System
from pyvmm.uapi import kvm as uapi
from pyvmm.vfio.sysfs import VFIO_PCI, Sysfs

pytestmark = pytest.mark.lab

MSR_IA32_TSC = 0x10


def test_device_nodes_exist() -> None:
    for node in ("/dev/kvm", "/dev/iommu", "/dev/vfio/vfio", "/dev/vfio/devices"):
        assert os.path.exists(node), node


def test_edu_is_bound_to_vfio_pci(lab_devices: dict[str, str], sysfs: Sysfs) -> None:
    edu = sysfs.pci_device(lab_devices["edu"])
    assert (edu.vendor, edu.device) == (0x1234, 0x11E8)
    assert edu.driver == VFIO_PCI
    assert edu.iommu_group is not None and edu.group_node
    assert edu.cdev is not None and edu.cdev_node


def test_the_host_checkout_is_visible_read_only() -> None:
    here = Path(__file__)
    assert here.is_file()
    assert os.statvfs(here).f_flag & os.ST_RDONLY


def test_the_labs_kvm_has_what_pyvmm_needs() -> None:
    """The nested KVM runs pyvmm's machines: its API version (System checks it), the
    capabilities pyvmm relies on, and enough memory slots."""
    with System() as kvm:
        kvm.check_required()
        assert kvm.check_extension(uapi.KvmCap.NR_MEMSLOTS) >= 32


def test_the_labs_kvm_gives_a_vcpu_the_tsc_rate_its_kernel_refined() -> None:
    """The lab kernel is told its TSC rate (tsc_early_khz=, pyvmm.lab.tsc), so its KVM gives new
    vCPUs the rate the kernel refined a few seconds into its boot, and their TSC runs. A stale
    rate freezes them (test_lab_guest has that case)."""
    assert re.search(r"(^| )tsc_early_khz=\d+( |$)", Path("/proc/cmdline").read_text().strip())
    log = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
    assert "user requested TSC rate below hardware speed" not in log
    refined = re.search(r"Refined TSC clocksource calibration: (\d+)\.(\d+) MHz", log)
    assert refined, "the lab kernel did not refine its TSC rate"
    refined_khz = int(refined[1]) * 1000 + int(refined[2])
    with (
        System() as kvm,
        contextlib.closing(kvm.create_vm()) as vm,
        contextlib.closing(vm.create_vcpu(0)) as vcpu,
    ):
        given = vcpu.get_tsc_khz()
        first = vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
        assert vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC] > first
    assert abs(given - refined_khz) * 1_000_000 <= 250 * refined_khz, (given, refined_khz)


def test_a_failing_lab_test_reports_what_the_labs_kernel_logged_during_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Why a lab test hung is often in the lab's kernel log: a failure's report carries the
    records logged from its setup on, and not the earlier ones."""
    results = tmp_path / "results.jsonl"
    monkeypatch.setenv("PYVMM_LAB_RESULTS", str(results))
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write("pyvmm-test: logged before the test\n")
    pytester.makepyfile(
        """
        def test_logs_and_fails():
            with open("/dev/kmsg", "w") as kmsg:
                kmsg.write("pyvmm-test: logged during the test\\n")
            assert False
        """
    )
    pytester.runpytest("-p", "pyvmm.lab.pytest_plugin").assert_outcomes(failed=1)
    call = [r for r in map(json.loads, results.read_text().splitlines()) if r["when"] == "call"]
    sections = dict(call[0]["sections"])
    log = sections["lab kernel log during the test"]
    assert "pyvmm-test: logged during the test" in log
    assert "logged before the test" not in log
