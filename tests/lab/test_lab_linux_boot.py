"""Linux boots under pyvmm on the lab's KVM: bzImage and PVH vmlinux, 2 vCPUs, virtio-blk,
virtio-rng, and an ACPI power-off that ends pyvmm with exit code 0.

A known fault of the lab, not of pyvmm: with 2 vCPUs, an L3 guest on the lab's nested SVM (which
QEMU emulates with TCG) often triple-faults soon after the second CPU comes up. QEMU's own microvm
with -smp 2 on the same KVM failed 4 of 4 boots that way, at the same point; pyvmm failed about
half. So a boot may be retried, but only after exactly that failure: any other error, a hang
(pyvmm's --timeout) or a wrong result fails the test at once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from linuxkernel import lab_kernel

from pyvmm.initramfs import busybox_initramfs
from pyvmm.lab.launcher import find_busybox
from pyvmm.machine.bzimage import extract_vmlinux

MARK = "pyvmm-guest:"
SECTOR0 = b"pyvmm test disk, sector 0"
WRITTEN = "written by the guest"

INIT = rf"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "{MARK} init started"
echo "{MARK} cpus online $(cat /sys/devices/system/cpu/online)"
echo "{MARK} sector0 $(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c {len(SECTOR0)})"
printf '{WRITTEN}' | dd of=/dev/vda bs=512 seek=1 conv=notrunc 2>/dev/null && sync
echo "{MARK} wrote sector1 status $?"
echo "{MARK} hwrng $(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
echo "{MARK} rng $(cat /sys/class/misc/hw_random/rng_current)"
echo "{MARK} powering off"
sleep 1  # let the tty drain to the UART: poweroff -f does not wait for it
poweroff -f
"""


ATTEMPTS = 3
# A lab session of their own (the lab tier boots one per distinct IOMMU): these boots are long,
# and within the default session they would eat the time of every lab test after them.
LINUX_SESSION = [
    pytest.mark.lab(iommu="virtio"),
    # Each boot takes 1-4 minutes under the lab's nested TCG: more than the lab tier's budget in
    # CI allows, until pyvmm boots faster (issue 4). Run them with PYVMM_LAB_LINUX=1.
    pytest.mark.skipif(
        os.environ.get("PYVMM_LAB_LINUX") != "1",
        reason="Linux boots in the lab take minutes; set PYVMM_LAB_LINUX=1 to run them",
    ),
]
LAB_SMP_FAULT = "pyvmm: triple-fault: vcpu"


def boot(kernel: Path, tmp_path: Path, cpus: int) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Boot until one run powers off; earlier runs may only have hit the lab's SMP fault."""
    for attempt in range(1, ATTEMPTS + 1):
        result, disk = boot_once(kernel, tmp_path, cpus)
        if result.returncode == 0 or LAB_SMP_FAULT not in result.stderr:
            return result, disk
        print(f"attempt {attempt}: the lab's nested-SVM SMP fault: {result.stderr.strip()}")
    return result, disk


def boot_once(
    kernel: Path, tmp_path: Path, cpus: int
) -> tuple[subprocess.CompletedProcess[str], Path]:
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(find_busybox(), INIT))
    disk = tmp_path / "disk.img"
    disk.write_bytes(SECTOR0.ljust(512, b"\0") + bytes(2047 * 512))
    command = [
        sys.executable, "-m", "pyvmm", "run", "--timeout", "240",
        "-k", str(kernel), "-i", str(initrd), "-m", "256M", "-c", str(cpus),
        "--disk", str(disk), "--rng",
        "-p", "console=ttyS0 quiet panic=-1",
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, errors="replace", timeout=300, check=False
    )
    elapsed = time.monotonic() - started
    print(f"{kernel.name}: exit {result.returncode} after {elapsed:.1f} s")
    return result, disk


def check(result: subprocess.CompletedProcess[str], disk: Path, cpus: int) -> None:
    out = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\n{out[-3000:]}\n{result.stderr}"
    assert result.stderr == ""
    assert f"{MARK} init started" in out
    assert f"{MARK} cpus online {'0-1' if cpus == 2 else '0'}" in out
    assert f"{MARK} sector0 {SECTOR0.decode()}" in out
    assert f"{MARK} wrote sector1 status 0" in out
    assert re.search(rf"{MARK} hwrng [0-9a-f]{{32}}", out)
    assert f"{MARK} rng virtio_rng" in out
    assert f"{MARK} powering off" in out
    assert disk.read_bytes()[512 : 512 + len(WRITTEN)] == WRITTEN.encode()


@LINUX_SESSION[0]
@LINUX_SESSION[1]
def test_bzimage_boots_with_smp_virtio_and_powers_off(tmp_path: Path) -> None:
    result, disk = boot(lab_kernel(), tmp_path, cpus=2)
    check(result, disk, cpus=2)


@LINUX_SESSION[0]
@LINUX_SESSION[1]
def test_pvh_vmlinux_boots_with_virtio_and_powers_off(tmp_path: Path) -> None:
    """One vCPU: SMP is proven above, and the lab's SMP fault would cost retries the lab tier's
    time budget does not have. SMP through PVH is checked on the host (tests/test_linux_boot.py:
    the kernel reports 2 present CPUs from our MADT)."""
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(extract_vmlinux(str(lab_kernel())))
    result, disk = boot(vmlinux, tmp_path, cpus=1)
    check(result, disk, cpus=1)
