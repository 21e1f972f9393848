"""Linux boots under pyvmm on the lab's KVM: bzImage and PVH vmlinux, 2 vCPUs, virtio-blk,
virtio-rng, the CMOS clock, the UART's interrupt, and an ACPI power-off (bzImage) or a reboot
(PVH: Linux's default way, through the reset vector) that ends pyvmm with exit code 0. Each
boot takes about 15 s in the lab (nested SVM under TCG).

A boot is booted once: a guest that triple-faults, hits a KVM internal error or hangs fails the
test, with pyvmm's crash report (scripts/lab-soak measures how often that happens, beside QEMU).
"""

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
from pyvmm.machine.bzimage import extract_vmlinux

MARK = "pyvmm-guest:"
SECTOR0 = b"pyvmm test disk, sector 0"
WRITTEN = "written by the guest"

INIT = rf"""{BUSYBOX_INIT_PRELUDE}echo "{MARK} init started"
echo "{MARK} cpus online $(cat /sys/devices/system/cpu/online)"
echo "{MARK} rtc $(cat /sys/class/rtc/rtc0/since_epoch)"
echo "{MARK} serial irqs $(grep ttyS0 /proc/interrupts | tr -s ' ' | cut -d' ' -f3,4 | tr ' ' +)"
echo "{MARK} sector0 $(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c {len(SECTOR0)})"
printf '{WRITTEN}' | dd of=/dev/vda bs=512 seek=1 conv=notrunc 2>/dev/null && sync
echo "{MARK} wrote sector1 status $?"
echo "{MARK} hwrng $(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
echo "{MARK} rng $(cat /sys/class/misc/hw_random/rng_current)"
echo "{MARK} ending: {{ END }}"
sleep 1  # let the tty drain to the UART: poweroff -f and reboot -f do not wait for it
{{ END }} -f
"""


def boot(kernel: Path, tmp_path: Path, end: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Boot once; `end`: poweroff or reboot."""
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(find_busybox(), INIT.replace("{ END }", end)))
    disk = tmp_path / "disk.img"
    disk.write_bytes(SECTOR0.ljust(512, b"\0") + bytes(2047 * 512))
    command = [
        sys.executable, "-m", "pyvmm", "run", "--timeout", "120",
        "-k", str(kernel), "-i", str(initrd), "-m", "256M", "-c", "2",
        "--disk", str(disk), "--rng",
        "-p", "console=ttyS0 quiet panic=-1",
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, errors="replace", timeout=180, check=False
    )
    elapsed = time.monotonic() - started
    print(f"{kernel.name}: exit {result.returncode} after {elapsed:.1f} s")
    return result, disk


def check(result: subprocess.CompletedProcess[str], disk: Path, booted_at: float, end: str) -> None:
    out = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\n{out[-3000:]}\n{result.stderr}"
    assert result.stderr == ""
    assert f"{MARK} init started" in out
    assert f"{MARK} cpus online 0-1" in out
    # The guest's wall clock is the host's, read through the CMOS RTC.
    rtc = re.search(rf"{MARK} rtc (\d+)", out)
    assert rtc and booted_at - 2 <= int(rtc[1]) <= time.time() + 2, out[-3000:]
    # The UART interrupts (its ACPI device gives Linux the IRQ; without it, it is polled).
    irqs = re.search(rf"{MARK} serial irqs (\d+)\+(\d+)", out)
    assert irqs and int(irqs[1]) + int(irqs[2]) > 0, out[-3000:]
    assert f"{MARK} sector0 {SECTOR0.decode()}" in out
    assert f"{MARK} wrote sector1 status 0" in out
    assert re.search(rf"{MARK} hwrng [0-9a-f]{{32}}", out)
    assert f"{MARK} rng virtio_rng" in out
    assert f"{MARK} ending: {end}" in out
    assert disk.read_bytes()[512 : 512 + len(WRITTEN)] == WRITTEN.encode()


# A lab boot of their own, with the other tests that boot Linux: should the lab's nested KVM
# wedge (it has, rarely), only these tests lose their results.
LINUX_SESSION = pytest.mark.lab(iommu="virtio", session="linux")


@LINUX_SESSION
def test_bzimage_boots_with_smp_virtio_and_powers_off(tmp_path: Path) -> None:
    booted_at = time.time()
    result, disk = boot(lab_kernel(), tmp_path, "poweroff")
    check(result, disk, booted_at, "poweroff")


@LINUX_SESSION
def test_pvh_vmlinux_boots_with_smp_virtio_and_reboots(tmp_path: Path) -> None:
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(extract_vmlinux(str(lab_kernel())))
    booted_at = time.time()
    result, disk = boot(vmlinux, tmp_path, "reboot")
    check(result, disk, booted_at, "reboot")
