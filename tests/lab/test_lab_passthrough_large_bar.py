"""A BAR too large for the 32-bit PCI window, in the lab: the lab's ivshmem has 1 GiB of shared
memory as its 64-bit BAR2, twice the window below 4 GiB. Passed through by pyvmm, it is placed in
the window above 64 GiB, which the DSDT declares, so the guest's Linux keeps it there; Linux
writes to both ends of it through /dev/mem (an mmap in a KVM slot: no exit reaches Python), and
a second boot, in a new pyvmm process, reads the same words back from the device's memory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from linuxkernel import lab_kernel

from pyvmm.initramfs import BUSYBOX_INIT_PRELUDE, busybox_initramfs
from pyvmm.lab.launcher import find_busybox
from pyvmm.machine import layout
from pyvmm.vfio.backends import BACKENDS

MARK = "pyvmm-guest:"
GiB = 1 << 30
FIRST, LAST = 0x5079766D, 0x6D6D7632  # written at BAR2's first and last words

INIT = rf"""{BUSYBOX_INIT_PRELUDE}for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = 0x1af4:0x1110 ] && dev=$d
done
[ -n "$dev" ] || echo "{MARK} no ivshmem"
set -- $(sed -n 3p $dev/resource)
first=$(($1)); last=$(($2 - 3))
echo "{MARK} bar2 $1 $2"
{{ STEP }}
echo "{MARK} words $(devmem $first 32) $(devmem $last 32)"
poweroff -f
"""
WRITE = f"devmem $first 32 {FIRST:#x}; devmem $last 32 {LAST:#x}"


def boot(tmp_path: Path, step: str, bdf: str, backend: str) -> subprocess.CompletedProcess[str]:
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(busybox_initramfs(find_busybox(), INIT.replace("{ STEP }", step)))
    command = [
        sys.executable, "-m", "pyvmm", "run", "--timeout", "150",
        "-k", str(lab_kernel()), "-i", str(initrd), "-m", "256M", "-c", "2",
        "-p", "console=ttyS0 quiet panic=-1", "--exit-stats",
        "--vfio-pci", bdf, "--vfio-backend", backend,
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, errors="replace", timeout=200, check=False
    )


@pytest.mark.lab(devices=("ivshmem",), session="linux")
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_bar_larger_than_the_32_bit_window_goes_above_4_gib(
    backend: str, lab_devices, tmp_path: Path
) -> None:
    bdf = lab_devices["ivshmem"]
    for step in (WRITE, ""):  # the second boot, a new process, reads what the device holds
        result = boot(tmp_path, step, bdf, backend)
        out = result.stdout
        assert result.returncode == 0, f"{out[-3000:]}\n{result.stderr[-3000:]}"
        bar = re.search(rf"{MARK} bar2 (0x[0-9a-f]+) (0x[0-9a-f]+)", out)
        assert bar, out[-3000:]
        start, end = int(bar[1], 16), int(bar[2], 16)
        assert end - start + 1 == GiB
        assert start == layout.PCI_MMIO64_BASE, f"Linux moved BAR2 to {start:#x}"
        seen = re.search(rf"{MARK} words (0x[0-9A-F]+) (0x[0-9A-F]+)", out)
        assert seen, out[-3000:]
        assert (int(seen[1], 16), int(seen[2], 16)) == (FIRST, LAST), out[-3000:]
        # exit statistics: nothing at BAR2 (neither a trapped window nor a bare address)
        places = re.findall(r"^\s+\d+\s+[\d.]+%\s+\S+\s+(.*)$", result.stderr, re.MULTILINE)
        at_bar2 = [
            p
            for p in places
            if "BAR2" in p or (p.startswith("0x") and start <= int(p.split("+")[0], 16) <= end)
        ]
        assert places and not at_bar2, result.stderr[-3000:]
