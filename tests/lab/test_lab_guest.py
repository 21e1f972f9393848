"""A test guest runs under pyvmm on the lab's own /dev/kvm (nested SVM under TCG)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from guestbuild import guest


def build_hello() -> None:
    """Build the guests on the host: inside the lab the checkout is read-only."""
    guest("hello")


@pytest.mark.lab(before=build_hello)
def test_hello_runs_on_the_labs_kvm() -> None:
    hello = guest("hello")  # make finds it current and writes nothing
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", str(hello)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    print(f"pyvmm run hello.elf in the lab: {time.monotonic() - started:.2f} s wall")
    assert result.returncode == 0, result.stderr
    assert "Hello from pyvmm guest" in result.stdout


@pytest.mark.lab(before=build_hello, session="stale-tsc", tsc_skew_ppm=-500)
def test_a_vcpu_whose_tsc_kvm_froze_is_refused_in_one_line() -> None:
    """The lab kernel told that its TSC runs 500 ppm slower than it does: the stale rate its
    KVM gives new vCPUs makes KVM leave their TSC standing still (a Linux guest then hangs at
    its first idle; docs/lab-crashes.md). pyvmm refuses such a machine at once, in one line
    saying why and what to do, before the guest runs."""
    result = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", str(guest("hello"))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "Hello from pyvmm guest" not in result.stdout
    assert result.stderr.startswith("pyvmm: error: this KVM froze vCPU 0's TSC ("), result.stderr
    assert result.stderr.count("\n") == 1 and "tsc_early_khz=" in result.stderr
    log = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
    assert "kvm: user requested TSC rate below hardware speed" in log
