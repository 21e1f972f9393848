"""The lab machine's TSC rate, given to its kernel so that it never has to measure it.

QEMU's TCG gives the lab machine this host's TSC, at this host's rate, but no invariant-TSC
bit (TCG refuses `invtsc`), so the lab kernel has no constant_tsc. Its KVM then records the TSC
rate when it loads (about 1.3 s into the boot) and gives every new vCPU that rate. The lab
kernel measures its TSC twice: against the PIT or HPET at boot, then refined against the HPET
about 3 s in. Under TCG the first measurement is now and then off by more than 250 ppm; KVM
then creates each vCPU with a rate below the refined one, prints "user requested TSC rate
below hardware speed", and leaves the vCPU's TSC scaling ratio at 0, so KVM's view of the
guest's TSC stands still and the guest's TSC-deadline timers never fire (a Linux guest hangs;
docs/lab-crashes.md). Telling the lab kernel its TSC rate (`tsc_early_khz=`) makes both
measurements agree.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pyvmm.kvm.errors import KvmError
from pyvmm.kvm.system import System
from pyvmm.uapi.ioctl import IoctlError


@functools.cache
def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """This host's TSC rate in kHz: the rate this host's KVM gives a new vCPU (its kernel's own
    TSC rate); else /proc/cpuinfo's "cpu MHz" when it is the TSC's (see cpuinfo_tsc_khz); else
    None."""
    try:
        with System() as kvm:
            vm = kvm.create_vm()
            try:
                vcpu = vm.create_vcpu(0)
                try:
                    khz = vcpu.get_tsc_khz()
                finally:
                    vcpu.close()
            finally:
                vm.close()
        if khz > 0:
            return khz
    except (KvmError, IoctlError, OSError):
        pass
    return cpuinfo_tsc_khz(cpuinfo)


def cpuinfo_tsc_khz(cpuinfo: Path) -> int | None:
    """/proc/cpuinfo's "cpu MHz" where it is the TSC's rate: the kernel knows that rate
    (tsc_known_freq) and the CPU has no APERF/MPERF, with which "cpu MHz" is the clock the CPU
    runs at now."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    fields = dict(
        (name.strip(), value.strip())
        for name, _, value in (line.partition(":") for line in text.split("\n\n")[0].splitlines())
    )
    flags = fields.get("flags", "").split()
    if "tsc_known_freq" not in flags or "aperfmperf" in flags or "cpu MHz" not in fields:
        return None
    return round(float(fields["cpu MHz"]) * 1000)


def skewed(khz: int, ppm: int) -> int:
    """`khz` off by `ppm` parts per million (a lab test's stale TSC calibration)."""
    return khz + khz * ppm // 1_000_000
