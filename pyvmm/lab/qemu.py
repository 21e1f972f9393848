"""The QEMU command line of the lab machine.

q35 under TCG (`-accel kvm` does not work on the hosts pyvmm is developed on), `-cpu max` for
nested SVM so that /dev/kvm works inside, an emulated IOMMU, the emulated PCI devices that get
bound to vfio-pci, the host's root and a results share over virtio-9p, the serial console and
one virtio-serial port for the guest agent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyvmm.lab import chroot_init
from pyvmm.lab.errors import LabError, LabUnavailable
from pyvmm.lab.kernel import cache_dir

QEMU = "qemu-system-x86_64"
ENV_QEMU = "PYVMM_LAB_QEMU"

#: The virtio-serial port name the agent looks for.
AGENT_PORT = "pyvmm.agent"

#: The lab machine's CPUs. One: with two, QEMU 10.0's multi-threaded TCG now and then corrupts
#: what a nested guest's vCPU sees of its own page tables while it runs nested SVM. The guest
#: (Linux under pyvmm or under QEMU's own -accel kvm alike) then takes a #PF it cannot deliver:
#: a triple fault, or a KVM internal error; and the lab's own kernel triple-faults now and then.
#: scripts/lab-soak measured it: with two CPUs, 8 of 15 pyvmm and 4 of 6 QEMU boots of the lab
#: kernel did not end clean, the same with kvm_amd.vgif=0, kvm.tdp_mmu=0, no LA57 or no SVM in
#: the guest; with one, no guest crashed in 27 boots (docs/lab-crashes.md has the evidence).
#: It costs speed: a nested Linux boot takes 60-120 s instead of 25-60 s.
DEFAULT_CPUS = 1

IOMMUS = ("intel", "virtio")
_REFUSED_IOMMUS = {
    "amd": "QEMU 10.0's amd-iommu is broken (device DMA data never arrives); use intel or virtio",
}


@dataclass(frozen=True)
class LabDevice:
    """An emulated PCI device the lab can hand to vfio-pci."""

    name: str
    qemu_device: str  # the -device argument; {index} numbers instances, {drive} is the drive's id
    vendor: int
    device: int
    summary: str
    #: The size of a sparse raw image made for each instance (a -drive with id {drive}); 0: none.
    disk_mib: int = 0
    #: Behind a PCIe root port of its own instead of on the root bus: a bus of its own, so that
    #: its VFs take no slots on the root bus (where two igbs' VFs would collide).
    root_port: bool = False
    #: SR-IOV: the PF is left with its kernel driver, which makes this many VFs for vfio-pci.
    vfs: int = 0
    vf_name: str = ""  # what PYVMM_LAB_DEVICES calls the VFs
    #: A user-mode network of its own (slirp, restricted: nothing leaves the lab): its gateway
    #: 10.0.2.2 answers pings, so traffic through the NIC has a peer.
    netdev: bool = False
    #: Shared memory of this many MiB (a memfd, allocated as it is touched) as the device's
    #: memdev; 0: none.
    memdev_mib: int = 0


DEVICES = {
    device.name: device
    for device in (
        LabDevice("edu", "edu", 0x1234, 0x11E8, "QEMU edu: a DMA engine with MSI"),
        LabDevice(
            "nvme",
            "nvme,serial=pyvmm-lab-{index},drive={drive}",
            0x1B36,
            0x0010,
            "QEMU NVMe controller, namespace 1 on a 64 MiB sparse image: MSI-X, DMA",
            disk_mib=64,
        ),
        # romfile= empty: no iPXE option ROM needed (and ipxe-qemu need not be installed).
        LabDevice(
            "e1000e",
            "e1000e,romfile=",
            0x8086,
            0x10D3,
            "Intel 82574L NIC: MSI-X; on a user-mode network whose gateway 10.0.2.2 answers pings",
            netdev=True,
        ),
        # igb has no option ROM by default. QEMU makes its 8 VFs at start, 7 of which Linux's
        # igb driver allows (sriov_totalvfs).
        LabDevice(
            "igb",
            "igb",
            0x8086,
            0x10C9,
            "Intel 82576 NIC with SR-IOV, behind a PCIe root port: the PF on the igb driver, "
            "2 VFs (igbvf, 8086:10ca, an IOMMU group each) on vfio-pci",
            root_port=True,
            vfs=2,
            vf_name="igbvf",
        ),
        # 1 GiB of shared memory as its 64-bit BAR2: twice a VMM's 32-bit PCI window.
        LabDevice(
            "ivshmem",
            "ivshmem-plain",
            0x1AF4,
            0x1110,
            "QEMU ivshmem-plain: 1 GiB of memory as its 64-bit prefetchable BAR2, no interrupts",
            memdev_mib=1024,
        ),
    )
}


def cached_qemu(environ: Mapping[str, str] = os.environ) -> Path:
    """Where scripts/fetch-lab-qemu (run by scripts/setup-lab, as the user who runs the lab)
    puts QEMU 11; it is used once the fetch has verified it (its `.complete` mark)."""
    return cache_dir(environ) / "lab-qemu" / "bin" / QEMU


def find_qemu(environ: Mapping[str, str] = os.environ) -> str:
    """The QEMU that runs the lab machine: $PYVMM_LAB_QEMU, else the QEMU 11 that
    scripts/setup-lab unpacks (QEMU 10.0's TCG hangs whole labs: docs/lab-crashes.md), else
    qemu-system-x86_64 on the PATH."""
    if environ.get(ENV_QEMU):
        chosen = environ[ENV_QEMU]
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            raise LabUnavailable(f"${ENV_QEMU} is {chosen}, which is not an executable file")
        return chosen
    cached = cached_qemu(environ)
    if cached.is_file() and (cached.parent.parent / ".complete").is_file():
        return str(cached)
    path = shutil.which(QEMU, path=environ.get("PATH"))
    if path is None:
        raise LabUnavailable(f"{QEMU} not installed (run scripts/setup-lab)")
    return path


def qemu_version(qemu: str) -> str:
    """`qemu --version`'s version ("11.1.3"), or what it said instead."""
    try:
        said = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError as err:
        return f"unknown ({err.strerror})"
    first = said.splitlines()[0] if said else ""
    return first.removeprefix("QEMU emulator version ").split(" ")[0] or "unknown"


def check_iommu(iommu: str) -> None:
    if iommu in _REFUSED_IOMMUS:
        raise LabError(f"--iommu {iommu} is not supported: {_REFUSED_IOMMUS[iommu]}")
    if iommu not in IOMMUS:
        raise LabError(f"unknown IOMMU {iommu!r}; choose one of {', '.join(IOMMUS)}")


def check_devices(devices: Sequence[str]) -> None:
    unknown = [name for name in devices if name not in DEVICES]
    if unknown:
        raise LabError(f"unknown lab device {unknown[0]!r}; choose from {', '.join(DEVICES)}")


def kernel_cmdline(iommu: str, verbose: bool, tsc_khz: int | None = None) -> str:
    # no_timer_check: Linux's boot-time test that the IO-APIC timer ticks counts ticks during
    # a delay loop; under TCG on a loaded host the ticks fall behind the loop and it panics
    # ("timer doesn't work through Interrupt-remapped IO-APIC", seen once in a lab's own boot
    # with another lab beside it). Linux skips it itself on KVM and VMware (arch/x86/kernel/kvm.c,
    # paravirt_ops_setup): a TCG machine it cannot tell from hardware is told here.
    args = ["console=ttyS0", "panic=-1", "intel_iommu=on", "no_timer_check"]
    if iommu == "virtio":
        # virtio-iommu has no interrupt remapping; VFIO refuses MSI without this.
        args += ["vfio_iommu_type1.allow_unsafe_interrupts=1", "iommufd.allow_unsafe_interrupts=1"]
    if not verbose:
        args.append("quiet")
    if tsc_khz:
        # the rate QEMU runs its TSC at, so that KVM's vCPUs get it (pyvmm.lab.tsc says why)
        args.append(f"tsc_early_khz={tsc_khz}")
    return " ".join(args)


@dataclass(frozen=True)
class LabMachine:
    """One lab machine. The chardevs are QEMU backend specs without the id, e.g. "socket,fd=5"."""

    kernel: Path
    initrd: Path
    share: Path
    console: str
    agent: str
    scratch: Path  # the boot's own directory, for the devices' disk images
    iommu: str = "intel"
    devices: tuple[str, ...] = ("edu",)
    memory: str = "2G"
    cpus: int = DEFAULT_CPUS
    verbose: bool = False
    monitor: str | None = None  # a chardev for QEMU's QMP monitor (pyvmm.lab.monitor)
    tsc_khz: int | None = None  # the lab kernel's TSC rate (pyvmm.lab.tsc); None: it measures
    host_dirs: tuple[Path, ...] = ()  # host directories the lab hides, shared again (read-only)


def reset_log(config: LabMachine) -> Path:
    """Where QEMU logs each CPU reset (`-d cpu_reset`): the boot's two, and a triple fault's."""
    return config.scratch / "qemu-reset.log"


def command(qemu: str, config: LabMachine) -> list[str]:
    """The full QEMU argv for `config`."""
    check_iommu(config.iommu)
    check_devices(config.devices)
    args = [
        qemu,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        # what made the machine reset, should it: QEMU logs "Triple fault" where a CPU had one
        "-d",
        "cpu_reset",
        "-D",
        str(reset_log(config)),
        "-machine",
        "q35,kernel-irqchip=split",
        "-accel",
        "tcg,thread=multi,tb-size=512",
        "-cpu",
        "max",
        "-m",
        config.memory,
        "-smp",
        str(config.cpus),
        "-kernel",
        str(config.kernel),
        "-initrd",
        str(config.initrd),
        "-append",
        kernel_cmdline(config.iommu, config.verbose, config.tsc_khz),
    ]
    # The IOMMU comes first: it must exist before the PCI devices it translates.
    if config.iommu == "intel":
        args += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
    else:
        args += ["-device", "virtio-iommu-pci"]
    args += ["-chardev", f"{config.console},id=console", "-serial", "chardev:console"]
    # (-monitor and -qmp with "chardev:ID": QEMU 11 deprecates -mon)
    if config.console.startswith("stdio"):
        args += ["-monitor", "chardev:console"]
    else:
        args += ["-monitor", "none"]
    if config.monitor:
        args += ["-chardev", f"{config.monitor},id=qmp", "-qmp", "chardev:qmp"]
    args += [
        "-device",
        "virtio-serial-pci,id=vser",
        "-chardev",
        f"{config.agent},id=agent",
        "-device",
        f"virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT}",
    ]
    # multidevs=remap: the host's root spans several filesystems; keep inode numbers unique.
    args += [
        "-virtfs",
        f"local,path=/,mount_tag={chroot_init.ROOT_TAG},security_model=none,readonly=on,"
        "multidevs=remap",
        "-virtfs",
        f"local,path={config.share},mount_tag={chroot_init.SHARE_TAG},security_model=none",
    ]
    for index, path in enumerate(config.host_dirs):
        where = str(path).replace(",", ",,")  # QEMU's escape for ","
        tag = chroot_init.host_dir_tag(index)
        args += [
            "-virtfs",
            f"local,path={where},mount_tag={tag},security_model=none,readonly=on,multidevs=remap",
        ]
    ports = 0
    for device, index, ident in _instances(config.devices):
        if device.disk_mib:
            image = str(_disk_image(config, ident)).replace(",", ",,")  # QEMU's escape for ","
            args += ["-drive", f"file={image},if=none,format=raw,id={ident}"]
        spec = device.qemu_device.format(index=index, drive=ident)
        if device.root_port:
            # (chassis, slot) must be unique among root ports; QEMU's root ports have ACS.
            ports += 1
            args += ["-device", f"pcie-root-port,id={ident}-port,chassis=1,slot={ports}"]
            spec += f",bus={ident}-port"
        if device.netdev:
            args += ["-netdev", f"user,id={ident}-net,restrict=on"]
            spec += f",netdev={ident}-net"
        if device.memdev_mib:
            memory = f"memory-backend-memfd,id={ident}-mem,size={device.memdev_mib}M,share=on"
            args += ["-object", memory]
            spec += f",memdev={ident}-mem"
        args += ["-device", spec]
    return args


def _instances(devices: Sequence[str]) -> list[tuple[LabDevice, int, str]]:
    """(device, index, id) of each device: the instances of a name numbered from 0, and the id
    ("nvme0") that names what belongs to the instance (its drive, its root port)."""
    counts: dict[str, int] = {}
    numbered = []
    for name in devices:
        index = counts[name] = counts.get(name, -1) + 1
        numbered.append((DEVICES[name], index, f"{name}{index}"))
    return numbered


def _disk_image(config: LabMachine, ident: str) -> Path:
    return config.scratch / f"{ident}.img"


def create_disk_images(config: LabMachine) -> list[Path]:
    """Write the sparse raw images the devices of `config` are backed by; returns their paths.

    Sparse: a 64 MiB image takes no space until the guest writes to it. The images live in the
    boot's scratch directory and go with it.
    """
    images = []
    for device, _, ident in _instances(config.devices):
        if device.disk_mib:
            image = _disk_image(config, ident)
            with image.open("wb") as f:
                f.truncate(device.disk_mib << 20)
            images.append(image)
    return images
