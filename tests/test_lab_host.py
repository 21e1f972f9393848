"""The lab's host side without QEMU: kernel lookup and checks, QEMU's command line, the
initramfs, the agent protocol, the launcher against a fake QEMU, the CLI's errors, and how the
test tier folds inner results."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import logging
import lzma
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from fakesysfs import EDU, IGB, IGB_VFS, NVME, FakeKernel, FakeTree

from pyvmm.lab import agent, chroot_init, cli, kernel, launcher, protocol, qemu, tsc
from pyvmm.lab.errors import LabCrashed, LabError, LabTimeout, LabUnavailable
from pyvmm.lab.protocol import Kind
from pyvmm.lab.pytest_plugin import InnerResult, read_results

# -- kernel lookup ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_unpacked_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests choose their QEMU (a fake, or none): not the QEMU 11 that scripts/setup-lab
    unpacked into this host's cache."""
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("PYVMM_LAB_QEMU", raising=False)


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home")}


def test_kernel_lookup_order(tmp_path: Path, home: dict[str, str]) -> None:
    cached = kernel.cached_kernel(home)
    cached.parent.mkdir(parents=True)
    cached.touch()
    from_env = tmp_path / "env-bzImage"
    from_env.touch()
    explicit = tmp_path / "explicit-bzImage"
    explicit.touch()
    env = {**home, "PYVMM_LAB_KERNEL": str(from_env)}
    assert kernel.find_kernel(str(explicit), env) == explicit
    assert kernel.find_kernel(None, env) == from_env
    assert kernel.find_kernel(None, home) == cached
    assert cached == tmp_path / "home/.cache/pyvmm/lab/bzImage"


def test_the_lab_runs_on_the_qemu_asked_for_then_the_unpacked_one_then_the_paths(
    tmp_path: Path,
) -> None:
    def executable(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
        return path

    on_path = executable(tmp_path / "usr/bin/qemu-system-x86_64")
    env = {"PYVMM_CACHE": str(tmp_path / "cache"), "PATH": str(on_path.parent)}
    assert qemu.find_qemu(env) == str(on_path)
    unpacked = executable(qemu.cached_qemu(env))
    assert unpacked == tmp_path / "cache/lab-qemu/bin/qemu-system-x86_64"
    assert qemu.find_qemu(env) == str(on_path)  # not verified by its fetch yet
    (tmp_path / "cache/lab-qemu/.complete").write_text("QEMU emulator version 11.1.3\n")
    assert qemu.find_qemu(env) == str(unpacked)
    chosen = executable(tmp_path / "mine/qemu")
    assert qemu.find_qemu({**env, "PYVMM_LAB_QEMU": str(chosen)}) == str(chosen)
    with pytest.raises(LabUnavailable, match=r"\$PYVMM_LAB_QEMU is /nope, which is not an exec"):
        qemu.find_qemu({**env, "PYVMM_LAB_QEMU": "/nope"})
    with pytest.raises(LabUnavailable, match="qemu-system-x86_64 not installed"):
        qemu.find_qemu({"PYVMM_CACHE": str(tmp_path / "empty"), "PATH": str(tmp_path)})


def test_cache_dir_follows_pyvmm_cache_then_xdg() -> None:
    assert kernel.cache_dir({"PYVMM_CACHE": "/c", "XDG_CACHE_HOME": "/x"}) == Path("/c")
    assert kernel.cache_dir({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/x/pyvmm")
    assert kernel.cache_dir({"HOME": "/h"}) == Path("/h/.cache/pyvmm")


def test_missing_kernels_say_where_to_get_one(tmp_path: Path, home: dict[str, str]) -> None:
    with pytest.raises(LabUnavailable, match=r"lab kernel /nope \(--kernel\) does not exist"):
        kernel.find_kernel("/nope", home)
    with pytest.raises(LabUnavailable, match=r"/nope \(\$PYVMM_LAB_KERNEL\) does not exist"):
        kernel.find_kernel(None, {**home, "PYVMM_LAB_KERNEL": "/nope"})
    with pytest.raises(LabUnavailable) as excinfo:
        kernel.find_kernel(None, home)
    assert str(excinfo.value) == (
        "no lab kernel: pass --kernel, set $PYVMM_LAB_KERNEL, or build one with "
        f"scripts/build-lab-kernel (into {tmp_path}/home/.cache/pyvmm/lab/bzImage)"
    )


def fake_bzimage(path: Path, config: str | None, compress: str = "gzip") -> Path:
    """A bzImage as far as the setup header and the compressed payload go."""
    vmlinux = b"\x90" * 64
    if config is not None:
        vmlinux += b"IKCFG_ST" + gzip.compress(config.encode()) + b"IKCFG_ED"
    vmlinux += b"\x90" * 64
    if compress == "gzip":
        payload = gzip.compress(vmlinux) + struct.pack("<I", len(vmlinux))
    else:
        payload = lzma.compress(vmlinux, format=lzma.FORMAT_XZ)
    setup_sects = 2
    header = bytearray((setup_sects + 1) * 512)
    header[0x1F1] = setup_sects
    header[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", header, 0x248, 8, len(payload))
    path.write_bytes(bytes(header) + b"\0" * 8 + payload)
    return path


FULL_CONFIG = "\n".join(
    [
        "# comment",
        *(f"{name}=y" for name in kernel.REQUIRED_OPTIONS),
        *(f"{name}=y" for name in kernel.IOMMU_OPTIONS.values()),
        'CONFIG_LOCALVERSION="-lab"',
        "# CONFIG_MODULES is not set",
    ]
)


@pytest.mark.parametrize("compress", ["gzip", "xz"])
def test_read_ikconfig(tmp_path: Path, compress: str) -> None:
    config = kernel.read_ikconfig(fake_bzimage(tmp_path / "bzImage", FULL_CONFIG, compress))
    assert config is not None
    assert config["CONFIG_IOMMUFD"] == "y"
    assert config["CONFIG_LOCALVERSION"] == '"-lab"'
    assert "CONFIG_MODULES" not in config


def test_kernels_whose_config_cannot_be_read_pass_unchecked_and_say_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    no_ikconfig = fake_bzimage(tmp_path / "plain", None)
    not_a_kernel = tmp_path / "junk"
    not_a_kernel.write_bytes(b"junk" * 300)
    caplog.set_level(logging.INFO, logger=kernel.__name__)
    for path in (no_ikconfig, not_a_kernel):
        assert kernel.read_ikconfig(path) is None
        caplog.clear()
        kernel.check_kernel(path, "intel")  # (the agent probes for /dev/iommu instead)
        assert caplog.messages == [
            f"lab kernel {path} has no readable config (CONFIG_IKCONFIG); not checked"
        ]


def test_kernel_without_iommufd_is_refused(tmp_path: Path) -> None:
    config = FULL_CONFIG.replace("CONFIG_IOMMUFD=y", "# CONFIG_IOMMUFD is not set")
    config = config.replace("CONFIG_VIRTIO_IOMMU=y", "CONFIG_VIRTIO_IOMMU=m")
    image = fake_bzimage(tmp_path / "bzImage", config)
    with pytest.raises(LabError, match=r"lacks CONFIG_IOMMUFD \(=y\); build one with scripts/"):
        kernel.check_kernel(image, "intel")
    with pytest.raises(LabError, match="lacks CONFIG_IOMMUFD, CONFIG_VIRTIO_IOMMU"):
        kernel.check_kernel(image, "virtio")


# -- QEMU's command line ---------------------------------------------------------------------------


SHARED_LAB = Path(__file__).resolve().parents[2] / "shared" / "lab"  # beside the checkout


def machine(**overrides: object) -> qemu.LabMachine:
    fields: dict[str, object] = {
        "kernel": Path("/k/bzImage"),
        "initrd": Path("/t/initrd.cpio"),
        "share": Path("/t/share"),
        "console": "socket,fd=5",
        "agent": "socket,fd=6",
        "scratch": Path("/t"),
    }
    fields.update(overrides)
    return qemu.LabMachine(**fields)  # type: ignore[arg-type]


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def options(spec: str) -> dict[str, str]:
    """A QEMU option value as key=value pairs; a leading bare word is the "type"."""
    found = {}
    for n, item in enumerate(spec.split(",")):
        key, sep, value = item.partition("=")
        found[key if sep or n else "type"] = value if sep else key
    return found


def test_command_line_has_what_the_lab_needs() -> None:
    """Each property the lab relies on, and why, rather than the strings that give it."""
    argv = qemu.command("/usr/bin/qemu-system-x86_64", machine())
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    # intel-iommu's interrupt remapping needs the split irqchip, which needs q35
    assert options(option_values(argv, "-machine")[0]) == {"type": "q35", "kernel-irqchip": "split"}
    # TCG, with -cpu max for nested SVM (the lab's /dev/kvm), on one CPU: with two, QEMU 10.0's
    # TCG crashes nested guests now and then (qemu.DEFAULT_CPUS); two if asked
    accel = options(option_values(argv, "-accel")[0])
    assert accel["type"] == "tcg" and accel["thread"] == "multi"
    assert option_values(argv, "-cpu") == ["max"]
    assert (option_values(argv, "-m"), option_values(argv, "-smp")) == (["2G"], ["1"])
    two = qemu.command("qemu-system-x86_64", dataclasses.replace(machine(), cpus=2))
    assert option_values(two, "-smp") == ["2"]
    assert (option_values(argv, "-kernel"), option_values(argv, "-initrd")) == (
        ["/k/bzImage"],
        ["/t/initrd.cpio"],
    )
    assert "-no-reboot" in argv  # a guest panic ends QEMU (panic=-1 reboots)
    # a reset says whether a CPU triple-faulted
    assert option_values(argv, "-d") == ["cpu_reset"]
    assert option_values(argv, "-D") == [str(machine().scratch / "qemu-reset.log")]
    assert {"console=ttyS0", "panic=-1", "intel_iommu=on", "no_timer_check"} <= set(
        option_values(argv, "-append")[0].split()
    )
    chardevs = {options(c)["id"]: options(c) for c in option_values(argv, "-chardev")}
    assert chardevs["console"]["fd"] == "5" and chardevs["agent"]["fd"] == "6"
    shares = {options(v)["mount_tag"]: options(v) for v in option_values(argv, "-virtfs")}
    assert shares["hostroot"]["path"] == "/" and shares["hostroot"]["readonly"] == "on"
    assert shares["results"]["path"] == "/t/share" and "readonly" not in shares["results"]


def test_the_lab_kernel_is_told_its_tsc_rate_when_it_is_known() -> None:
    """With the host's TSC rate the lab kernel never measures its own (a stale measurement makes
    its KVM freeze vCPUs' TSCs: pyvmm.lab.tsc); without it, it measures as before."""
    told = qemu.command("qemu", machine(tsc_khz=2445432))
    assert "tsc_early_khz=2445432" in option_values(told, "-append")[0].split()
    untold = qemu.command("qemu", machine())
    assert not [a for a in option_values(untold, "-append")[0].split() if a.startswith("tsc_")]


def test_the_hosts_tsc_rate() -> None:
    """The host KVM's rate for a new vCPU where there is /dev/kvm; /proc/cpuinfo's "cpu MHz"
    only where the kernel knows it is its TSC's (tsc_known_freq); a skew in ppm."""
    if os.path.exists("/dev/kvm"):
        khz = tsc.host_tsc_khz()
        assert khz is not None and 100_000 < khz < 10_000_000
    assert tsc.skewed(2_445_432, -500) == 2_445_432 - 1223
    assert tsc.skewed(2_445_432, 0) == 2_445_432


@pytest.mark.parametrize(
    ("flags", "mhz", "khz"),
    [
        ("fpu tsc constant_tsc tsc_known_freq", "2445.432", 2445432),
        ("fpu tsc constant_tsc", "2445.432", None),
        ("fpu tsc constant_tsc tsc_known_freq aperfmperf", "3100.000", None),
    ],
)
def test_cpuinfo_gives_the_tsc_rate_only_when_known(
    tmp_path: Path, flags: str, mhz: str, khz: int | None
) -> None:
    cpu = f"processor\t: {{n}}\nvendor_id\t: AuthenticAMD\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(cpu.format(n=0) + "\n" + cpu.format(n=1).replace(mhz, "1.000"))
    assert tsc.cpuinfo_tsc_khz(cpuinfo) == khz
    assert tsc.cpuinfo_tsc_khz(tmp_path / "absent") is None


@pytest.mark.parametrize("iommu", ["intel", "virtio"])
def test_qemu_accepts_the_command_line(tmp_path: Path, iommu: str) -> None:
    """The real QEMU takes the whole command line, every lab device on it twice: it checks every
    option and device at start-up, before the guest runs (-S keeps it from running), the VFs'
    slots and the root ports' chassis and slot numbers included."""
    binary = shutil.which(qemu.QEMU)
    if binary is None:
        pytest.skip(f"{qemu.QEMU} is not installed (scripts/setup-lab installs it)")
    try:
        bzimage = kernel.find_kernel(None)
    except LabError as err:
        if not (SHARED_LAB / "bzImage").is_file():
            pytest.skip(f"no lab kernel: {err}")
        bzimage = SHARED_LAB / "bzImage"
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(bytes(512))
    config = machine(
        kernel=bzimage,
        initrd=initrd,
        share=tmp_path,
        console="null",
        agent="null",
        scratch=tmp_path,
        iommu=iommu,
        devices=tuple(qemu.DEVICES) * 2,
    )
    qemu.create_disk_images(config)  # QEMU opens each -drive's file at start-up
    proc = subprocess.Popen(
        [*qemu.command(binary, config), "-S"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass  # still up: every option was taken
    else:
        raise AssertionError(f"QEMU refused the command line: {proc.stderr.read().decode()}")
    finally:
        proc.kill()
        proc.communicate()


def test_iommu_comes_before_the_devices() -> None:
    devices = option_values(qemu.command("qemu", machine(devices=("edu", "nvme"))), "-device")
    assert devices[0] == "intel-iommu,intremap=on,caching-mode=on"
    assert devices[-2:] == ["edu", "nvme,serial=pyvmm-lab-0,drive=nvme0"]


def test_virtio_iommu_allows_unsafe_interrupts_and_verbose_is_not_quiet() -> None:
    argv = qemu.command("qemu", machine(iommu="virtio", verbose=True))
    assert option_values(argv, "-device")[0] == "virtio-iommu-pci"
    append = option_values(argv, "-append")[0].split()
    assert "vfio_iommu_type1.allow_unsafe_interrupts=1" in append
    assert "iommufd.allow_unsafe_interrupts=1" in append
    assert "quiet" not in append


def test_repeated_devices_are_numbered() -> None:
    argv = qemu.command("q", machine(devices=("nvme", "e1000e", "nvme")))
    assert option_values(argv, "-device")[-3:] == [
        "nvme,serial=pyvmm-lab-0,drive=nvme0",
        "e1000e,romfile=,netdev=e1000e0-net",
        "nvme,serial=pyvmm-lab-1,drive=nvme1",
    ]
    # the NIC's network is QEMU's user-mode one, restricted to the lab
    assert option_values(argv, "-netdev") == ["user,id=e1000e0-net,restrict=on"]


def test_ivshmem_has_shared_memory_of_its_own() -> None:
    argv = qemu.command("q", machine(devices=("ivshmem",)))
    assert option_values(argv, "-device")[-1] == "ivshmem-plain,memdev=ivshmem0-mem"
    assert option_values(argv, "-object") == [
        "memory-backend-memfd,id=ivshmem0-mem,size=1024M,share=on"
    ]


def test_each_nvme_has_a_drive_of_its_own_in_the_scratch_directory() -> None:
    """So that the NVMe has namespace 1: the drive is its, by id, and the image is the boot's."""
    argv = qemu.command("q", machine(devices=("edu", "nvme", "nvme"), scratch=Path("/t/boot")))
    assert [options(d) for d in option_values(argv, "-drive")] == [
        {"file": "/t/boot/nvme0.img", "if": "none", "format": "raw", "id": "nvme0"},
        {"file": "/t/boot/nvme1.img", "if": "none", "format": "raw", "id": "nvme1"},
    ]
    nvmes = [options(d) for d in option_values(argv, "-device") if d.startswith("nvme,")]
    assert [d["drive"] for d in nvmes] == ["nvme0", "nvme1"]
    assert option_values(qemu.command("q", machine(devices=("edu", "e1000e"))), "-drive") == []


def test_a_comma_in_the_image_path_is_escaped() -> None:
    """QEMU splits option values at commas and reads ",," as one."""
    argv = qemu.command("q", machine(devices=("nvme",), scratch=Path("/t/a,b")))
    assert option_values(argv, "-drive") == ["file=/t/a,,b/nvme0.img,if=none,format=raw,id=nvme0"]


def test_disk_images_are_sparse_and_of_the_stated_size(tmp_path: Path) -> None:
    config = machine(devices=("edu", "nvme", "e1000e", "nvme"), scratch=tmp_path)
    images = qemu.create_disk_images(config)
    assert images == [tmp_path / "nvme0.img", tmp_path / "nvme1.img"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nvme0.img", "nvme1.img"]
    for image in images:
        info = image.stat()
        assert info.st_size == qemu.DEVICES["nvme"].disk_mib << 20 == 64 << 20
        assert info.st_blocks * 512 < 1 << 20  # sparse: nothing allocated yet
    assert f"{qemu.DEVICES['nvme'].disk_mib} MiB" in qemu.DEVICES["nvme"].summary


def test_igb_sits_behind_a_root_port_of_its_own() -> None:
    """Each igb on a bus of its own: on the root bus two igbs' VFs would want the same slots."""
    devices = option_values(qemu.command("q", machine(devices=("edu", "igb", "igb"))), "-device")
    ports = [options(d) for d in devices if d.startswith("pcie-root-port,")]
    assert [(p["id"], p["chassis"], p["slot"]) for p in ports] == [
        ("igb0-port", "1", "1"),
        ("igb1-port", "1", "2"),
    ]
    igbs = [options(d) for d in devices if d.startswith("igb")]
    assert [d["bus"] for d in igbs] == ["igb0-port", "igb1-port"]
    assert devices.index("pcie-root-port,id=igb0-port,chassis=1,slot=1") < devices.index(
        "igb,bus=igb0-port"
    )
    others = option_values(qemu.command("q", machine(devices=("edu", "nvme"))), "-device")
    assert not any(d.startswith("pcie-root-port") or "bus=" in d for d in others[-2:])


def test_the_spec_asks_the_agent_for_igbs_vfs() -> None:
    assert launcher.device_request(qemu.DEVICES["igb"]) == {
        "name": "igb",
        "vendor": 0x8086,
        "device": 0x10C9,
        "vfs": 2,
        "vf_name": "igbvf",
    }
    assert "vfs" not in launcher.device_request(qemu.DEVICES["nvme"])


def test_shell_console_is_muxed_with_the_monitor() -> None:
    argv = qemu.command("q", machine(console="stdio,mux=on,signal=off", agent="null"))
    assert option_values(argv, "-monitor") == ["chardev:console"]
    assert "-mon" not in argv  # (deprecated in QEMU 11)


def test_a_run_has_a_qmp_monitor_and_no_human_one() -> None:
    argv = qemu.command("q", machine(monitor="socket,fd=9"))
    assert option_values(argv, "-monitor") == ["none"]
    assert option_values(argv, "-qmp") == ["chardev:qmp"]
    assert "socket,fd=9,id=qmp" in option_values(argv, "-chardev")


def test_amd_iommu_and_unknown_devices_are_refused() -> None:
    with pytest.raises(LabError, match=r"--iommu amd is not supported: QEMU 10\.0's amd-iommu"):
        qemu.command("q", machine(iommu="amd"))
    with pytest.raises(LabError, match="unknown IOMMU 'smmu'"):
        qemu.check_iommu("smmu")
    with pytest.raises(
        LabError, match="unknown lab device 'gpu'; choose from edu, nvme, e1000e, igb"
    ):
        qemu.command("q", machine(devices=("edu", "gpu")))
    with pytest.raises(LabError, match=r"^the lab machine needs at least 1 CPU, not 0$"):
        launcher.prerequisites(launcher.LabOptions(cpus=0))


# -- initramfs -------------------------------------------------------------------------------------


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """{name: (mode, body, (rdev major, minor))} from a newc archive."""
    entries = {}
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmajor, rminor, namesize = (
            fields[1],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        offset += 110
        name = data[offset : offset + namesize - 1].decode()
        offset += namesize + (-(110 + namesize) % 4)
        body = data[offset : offset + size]
        offset += size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body, (rmajor, rminor))


def test_initramfs_layout(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    config = chroot_init.InitConfig(
        python="/opt/py/bin/python3", pythonpath="/src/pyvmm co", share="/tmp/x y/share"
    )
    entries = read_cpio(chroot_init.build(busybox, config))
    assert {"bin", "dev", "proc", "sys", "root", "tmp", "init", "bin/sh"} <= entries.keys()
    mode, body, _ = entries["bin/busybox"]
    assert body == b"\x7fELF busybox" and mode & 0o111
    mode, _, rdev = entries["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    mode, body, _ = entries["bin/sh"]
    assert stat.S_ISLNK(mode) and body == b"busybox"
    mode, init, _ = entries["init"]
    assert mode & 0o111 and init.startswith(b"#!/bin/busybox sh\n")
    script = init.decode()
    assert "results /root'/tmp/x y/share'" in script
    assert "PYTHONPATH='/src/pyvmm co'" in script
    assert "chroot /root /opt/py/bin/python3 -m pyvmm.lab.agent" in script
    assert "poweroff -f" in script


# -- protocol --------------------------------------------------------------------------------------


def test_frames_survive_any_chunking() -> None:
    stream = (
        protocol.encode_json(Kind.HELLO, {"uptime": 1.5})
        + protocol.encode(Kind.STDOUT, b"x" * 1000)
        + protocol.encode(Kind.STDERR, b"")
        + protocol.encode_json(Kind.EXIT, {"code": 3})
    )
    reader = protocol.FrameReader()
    frames = [frame for byte in stream for frame in reader.feed(bytes([byte]))]
    assert frames == [
        (Kind.HELLO, b'{"uptime": 1.5}'),
        (Kind.STDOUT, b"x" * 1000),
        (Kind.STDERR, b""),
        (Kind.EXIT, b'{"code": 3}'),
    ]
    assert reader.pending == 0


def test_oversized_frames_are_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        protocol.encode(Kind.STDOUT, b"x" * (protocol.MAX_PAYLOAD + 1))


# -- prerequisites and the command's environment ---------------------------------------------------


def elf(path: Path, interp: bool) -> Path:
    """A minimal 64-bit ELF header with one program header: PT_INTERP (3) or PT_LOAD (1)."""
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<QHH", header, 32, 64, 0, 0)
    struct.pack_into("<HH", header, 54, 56, 1)
    program = struct.pack("<I", 3 if interp else 1) + bytes(52)
    path.write_bytes(bytes(header) + program)
    return path


def test_static_elf_detection(tmp_path: Path) -> None:
    assert launcher.is_static_elf(elf(tmp_path / "static", interp=False))
    assert not launcher.is_static_elf(elf(tmp_path / "dynamic", interp=True))
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert not launcher.is_static_elf(tmp_path / "script")


def test_missing_qemu_says_run_setup_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LabUnavailable) as excinfo:
        launcher.prerequisites(launcher.LabOptions())
    assert str(excinfo.value) == "qemu-system-x86_64 not installed (run scripts/setup-lab)"


def test_missing_busybox_says_run_setup_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(launcher, "_BUSYBOX_CANDIDATES", ())
    with pytest.raises(LabUnavailable, match=r"no static busybox .* scripts/setup-lab"):
        launcher.find_busybox()


def test_guest_env_passes_only_what_the_command_needs(tmp_path: Path) -> None:
    host = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "LC_ALL": "C.UTF-8",
        "PYVMM_LAB_KERNEL": "/k",
        "PYTHONPATH": "/extra",
        "API_TOKEN": "secret",
        "SSH_AUTH_SOCK": "/run/agent",
    }
    env = launcher.guest_env(host, tmp_path, {"FOO": "bar"})
    assert env["PATH"] == f"{Path(sys.executable).parent}:/usr/bin:/bin"
    assert env["PYTHONPATH"] == f"{launcher.package_root()}:/extra"
    assert (env["PYVMM_IN_LAB"], env["PYVMM_LAB_SHARE"]) == ("1", str(tmp_path))
    assert (env["HOME"], env["LC_ALL"], env["PYVMM_LAB_KERNEL"], env["FOO"]) == (
        "/root",
        "C.UTF-8",
        "/k",
        "bar",
    )
    assert "API_TOKEN" not in env and "SSH_AUTH_SOCK" not in env


def test_paths_the_lab_hides_are_shared_into_it_again(tmp_path: Path) -> None:
    """A checkout or virtualenv under /tmp (the lab has its own /tmp) is shared into the lab,
    read-only at its own path: each directory once, the outermost of nested ones."""
    checkout = tmp_path / "co"
    (checkout / "tests").mkdir(parents=True)
    found = launcher.hidden_dirs(
        {
            "pyvmm": checkout,
            "the working directory": checkout / "tests",
            "the interpreter": Path("/tmp/venv/bin/python"),  # (a file: its directory)
            "the kernel": Path("/work/shared/lab/bzImage"),  # (visible: nothing to share)
            "x": Path("/tmpfoo/y"),
        }
    )
    assert found == tuple(sorted([checkout, Path("/tmp/venv/bin")]))
    for own in ("/dev/shm/co", "/proc/1", "/tmp", "/run", "/tmp/bzImage"):  # (or all of /tmp)
        with pytest.raises(LabUnavailable, match=f"pyvmm {own} is under /[a-z]+, which the lab"):
            launcher.hidden_dirs({"pyvmm": Path(own)})


def test_the_hidden_directories_are_mounted_inside_at_their_own_paths(tmp_path: Path) -> None:
    config = qemu.LabMachine(
        kernel=Path("/k"),
        initrd=Path("/i"),
        share=Path("/tmp/s"),
        console="null",
        agent="null",
        scratch=tmp_path,
        host_dirs=(Path("/tmp/co,1"), Path("/run/venv")),
    )
    argv = qemu.command("qemu-system-x86_64", config)
    shares = option_values(argv, "-virtfs")
    assert "local,path=/tmp/co,,1,mount_tag=hostdir0,security_model=none,readonly=on," in (
        "".join(shares)
    )
    assert any(s.startswith("local,path=/run/venv,mount_tag=hostdir1,") for s in shares)
    odd = '/tmp/a "b" $c'
    init = chroot_init.init_script(
        chroot_init.InitConfig("/py", "/tmp/co,1", "/tmp/s", ("/tmp/co,1", "/run/venv", odd))
    )
    assert "hostdir0 /root/tmp/co,1 ||" in init and "hostdir1 /root/run/venv ||" in init
    mount = next(line for line in init.splitlines() if "hostdir2" in line)
    assert shlex.split(mount)[-5:] == [
        "hostdir2",
        f"/root{odd}",
        "||",
        "fail",
        (f"cannot mount the host's {odd} (needed inside)"),
    ]  # (a shell word each, whatever the path holds)
    # after the lab's own /tmp and /run, before anything runs from them
    assert init.index("tmpfs /root/run") < init.index("hostdir0") < init.index("chroot /root")


def test_package_root_holds_pyvmm() -> None:
    assert (launcher.package_root() / "pyvmm" / "lab" / "agent.py").is_file()


# -- the agent's binding of the devices ------------------------------------------------------------


@pytest.fixture
def lab_sysfs(tmp_path: Path) -> FakeKernel:
    """The lab's PCI devices as a fake kernel has them: edu without a driver, an NVMe on nvme and
    an igb PF on igb (7 VFs allowed), with igbvf there to take VFs that are probed."""
    tree = FakeTree(tmp_path)
    tree.driver("vfio-pci")
    tree.driver("igbvf")
    tree.device(EDU, (0x1234, 0x11E8), group="4")
    tree.device(NVME, (0x1B36, 0x0010), driver="nvme", group="5")
    tree.physical_function(IGB, (0x8086, 0x10C9), total=7, driver="igb", group="7")
    return FakeKernel(tree, {NVME: "nvme", IGB: "igb", **dict.fromkeys(IGB_VFS, "igbvf")})


def requests(*names: str) -> list[dict[str, object]]:
    return [launcher.device_request(qemu.DEVICES[name]) for name in names]


def test_the_agent_binds_the_devices_to_vfio_pci(lab_sysfs: FakeKernel) -> None:
    assert agent.bind_devices(requests("edu", "nvme"), lab_sysfs) == {"edu": EDU, "nvme": NVME}
    assert [lab_sysfs.pci_device(bdf).driver for bdf in (EDU, NVME)] == ["vfio-pci"] * 2


def test_the_agent_leaves_igb_on_its_driver_and_binds_its_vfs(lab_sysfs: FakeKernel) -> None:
    bound = agent.bind_devices(requests("edu", "igb"), lab_sysfs)
    assert bound == {"edu": EDU, "igb": IGB, "igbvf": IGB_VFS[0], "igbvf1": IGB_VFS[1]}
    assert lab_sysfs.pci_device(IGB).driver == "igb"
    vfs = [lab_sysfs.pci_device(bdf) for bdf in IGB_VFS]
    assert [(vf.driver, vf.physfn, vf.cdev_node) for vf in vfs] == [("vfio-pci", IGB, True)] * 2
    # no VF driver had them first: nothing was released from one
    assert [path for path, _ in lab_sysfs.writes if path.endswith("driver/unbind")] == []
    env = agent.command_env({"env": {}}, bound)
    assert env["PYVMM_LAB_DEVICES"] == (
        f"edu={EDU},igb={IGB},igbvf={IGB_VFS[0]},igbvf1={IGB_VFS[1]}"
    )


def test_the_agent_says_which_device_the_lab_lacks(lab_sysfs: FakeKernel) -> None:
    with pytest.raises(agent.AgentError, match=r"^the lab has no igb device$"):
        agent.bind_devices(requests("igb", "igb"), lab_sysfs)


# -- the launcher against a fake QEMU --------------------------------------------------------------

FAKE_QEMU = """\
#!{python}
import json, os, re, socket, sys, time
from pathlib import Path
from pyvmm.lab import protocol
from pyvmm.lab.protocol import Kind

fds = {{}}
for arg in sys.argv:
    match = re.fullmatch(r"socket,fd=(\\d+),id=(\\w+)", arg)
    if match:
        fds[match.group(2)] = int(match.group(1))
share = Path(next(a for a in sys.argv if "mount_tag=results" in a).split("path=")[1].split(",")[0])
spec = json.loads((share / "spec.json").read_text())
drives = [a.split("file=")[1].split(",if=")[0] for a in sys.argv if a.startswith("file=")]
sizes = {{path: os.stat(path).st_size for path in drives}}
record = {{"argv": sys.argv, "pid": os.getpid(), "spec": spec, "drive_sizes": sizes}}
Path(os.environ["FAKE_QEMU_RECORD"]).write_text(json.dumps(record))
mode = os.environ["FAKE_QEMU_MODE"]

def agent(kind, payload):
    os.write(fds["agent"], protocol.encode(kind, payload))

REGISTERS = ("\\r\\nCPU#0\\r\\nRAX=0000000000000000 RBX=0000000000000000\\r\\n"
             "RIP=ffffffff81000000 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\\r\\n"
             "CR0=80050033 CR2=0000000000000000 CR3=0000000001234000 CR4=00751ef0\\r\\n"
             "FPR0=0000000000000000 0000 FPR1=0000000000000000 0000\\r\\n")

def hang():
    # a hung lab: its CPUs stopped, QEMU's monitor still answering (an event first, as QMP may)
    sock = socket.socket(fileno=fds["qmp"])
    sock.sendall(b'{{"QMP": {{"version": {{}}, "capabilities": []}}}}\\r\\n')
    for line in sock.makefile("rb"):
        request = json.loads(line)
        answer = {{}}
        if request["execute"] == "query-cpus-fast":
            answer = [{{"cpu-index": 0, "thread-id": os.getpid()}}]
        elif request["execute"] == "human-monitor-command":
            command = request["arguments"]["command-line"]
            answer = REGISTERS if command == "info registers -a" else "LVTT 0x000000ec\\r\\n"
            sock.sendall(b'{{"event": "RTC_CHANGE", "data": {{"offset": 0}}}}\\r\\n')
        sock.sendall(json.dumps({{"return": answer}}).encode() + b"\\r\\n")

os.write(fds["console"], b"[    0.000000] Linux version 7.3.4-lab\\n")
if mode == "qemu-error":
    sys.stderr.write("qemu-system-x86_64: -device edu: something broke\\n")
    sys.stderr.write("qemu-system-x86_64: -qmp chardev:qmp: warning: not why it stopped\\n")
    sys.exit(1)
if mode.startswith(("aborts", "crash")):
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # (no core dump of the fake's abort)
if mode == "aborts":
    os.abort()
if mode == "init-fails":
    os.write(fds["console"], b"{fail}cannot mount the host's root over 9p\\n")
    sys.exit(0)
if mode == "panics":
    os.write(fds["console"], b"RIP: 0010:old_oops+0x1/0x2\\nBUG: x\\n"
             b"RIP: 0010:vmx_vcpu_run+0x4c/0x90\\n"
             b"Kernel panic - not syncing: Fatal exception in interrupt\\n")
    sys.exit(0)
agent(Kind.HELLO, b'{{"uptime": 2.5}}')

def report(nodeid, *whens, outcome="passed"):  # a test's reports, as the lab's pytest writes them
    with open(spec["env"]["PYVMM_LAB_RESULTS"], "a") as results:
        for when in whens:
            record = {{"nodeid": nodeid, "when": when, "outcome": outcome, "longrepr": "",
                      "crash": "", "wasxfail": None, "sections": []}}
            results.write(json.dumps(record) + "\\n")

if mode == "ok":
    agent(Kind.STDOUT, b"out\\n")
    agent(Kind.STDERR, b"err\\n")
    agent(Kind.STDOUT, b"more out\\n")
    agent(Kind.EXIT, b'{{"code": 3}}')
elif mode == "agent-error":
    agent(Kind.ERROR, b"the lab has no nvme device")
elif mode == "hang":
    hang()
elif mode == "silent":  # the command said something, then nothing more
    agent(Kind.STDOUT, b"started\\n")
    hang()
elif mode == "record-boots":  # a tier's run (under xdist): every test passes, each boot noted
    nodeids = spec["command"][spec["command"].index("-q") + 1:]
    boot = {{"nodeids": nodeids, "worker": os.environ.get("PYTEST_XDIST_WORKER", "")}}
    with open(Path(os.environ["FAKE_QEMU_RECORD"]).with_name("boots.jsonl"), "a") as boots:
        boots.write(json.dumps(boot) + "\\n")
    for nodeid in nodeids:
        report(nodeid, "setup", "call", "teardown")
    agent(Kind.EXIT, b'{{"code": 0}}')
elif mode.startswith(("crash", "hang-", "reset-")):  # a tier's run: reports, then it breaks
    nodeids = spec["command"][spec["command"].index("-q") + 1:]
    boots = Path(os.environ["FAKE_QEMU_RECORD"]).with_name("boots")
    boots.write_text(str(boot := int(boots.read_text() if boots.exists() else 0) + 1))
    crashes = mode in ("crash", "hang-always") or boot == 1

    def crash():
        if mode.startswith("reset-"):  # the lab's kernel triple-faults: QEMU just exits
            reset_log = Path(sys.argv[sys.argv.index("-D") + 1])
            reset_log.write_text("CPU Reset (CPU 0)\\nTriple fault\\n")
            sys.exit(0)
        if mode.startswith("hang-"):  # the lab's kernel stalls, saying so on its console
            stall = b"[  412.000001] rcu: INFO: rcu_preempt self-detected stall\\n"
            os.write(fds["console"], stall)
            hang()
        sys.stderr.write("qemu-system-x86_64: physmem.c:2678: iotlb_to_section: Assertion\\n")
        sys.stderr.flush()
        os.abort()

    for index, nodeid in enumerate(nodeids):
        if crashes and index == len(nodeids) - 2 and mode != "crash-at-the-end":
            report(nodeid, "setup")  # in the middle of the second last test
            if mode == "crash-after-a-failure":
                report(nodeid, "call", outcome="failed")
            else:
                report(nodeid, "call")
            crash()
        report(nodeid, "setup", "call", "teardown")
    if mode == "crash-at-the-end":
        crash()
    agent(Kind.EXIT, b'{{"code": 0}}')
"""


class FakeLab:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path = tmp_path
        self.record_path = tmp_path / "record.json"
        script = tmp_path / "qemu-system-x86_64"
        script.write_text(FAKE_QEMU.format(python=sys.executable, fail=chroot_init.FAIL_PREFIX))
        script.chmod(0o755)
        busybox = tmp_path / "busybox"
        busybox.write_bytes(b"busybox")
        self.kernel = tmp_path / "bzImage"
        self.kernel.write_bytes(b"not a real kernel")
        monkeypatch.setattr(qemu, "find_qemu", lambda: str(script))
        monkeypatch.setattr(launcher, "find_busybox", lambda: busybox)
        monkeypatch.setenv("PYTHONPATH", str(launcher.package_root()))
        monkeypatch.setenv("FAKE_QEMU_RECORD", str(self.record_path))
        self.monkeypatch = monkeypatch
        self.output: list[tuple[Kind, bytes]] = []

    def run(self, mode: str, **options: object) -> launcher.LabResult:
        self.monkeypatch.setenv("FAKE_QEMU_MODE", mode)
        lab_options = launcher.LabOptions(kernel=str(self.kernel), **options)  # type: ignore[arg-type]
        return launcher.run(
            ["pytest", "-q"],
            lab_options,
            cwd="/work",
            output=lambda kind, data: self.output.append((kind, data)),
        )

    @property
    def record(self) -> dict[str, object]:
        return json.loads(self.record_path.read_text())


@pytest.fixture
def fake_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeLab:
    return FakeLab(tmp_path, monkeypatch)


def test_run_streams_output_and_returns_the_exit_status(fake_lab: FakeLab) -> None:
    result = fake_lab.run("ok", devices=("edu", "nvme"))
    assert result.exit_code == 3
    assert result.boot_seconds <= result.seconds
    assert fake_lab.output == [
        (Kind.STDOUT, b"out\n"),
        (Kind.STDERR, b"err\n"),
        (Kind.STDOUT, b"more out\n"),
    ]
    spec = fake_lab.record["spec"]
    assert isinstance(spec, dict)
    assert (spec["mode"], spec["command"], spec["cwd"]) == ("run", ["pytest", "-q"], "/work")
    assert spec["port"] == qemu.AGENT_PORT
    assert spec["env"]["PYVMM_IN_LAB"] == "1"
    assert spec["devices"] == [
        {"name": "edu", "vendor": 0x1234, "device": 0x11E8},
        {"name": "nvme", "vendor": 0x1B36, "device": 0x0010},
    ]


def test_the_temporary_files_are_removed(fake_lab: FakeLab) -> None:
    fake_lab.run("ok", devices=("edu", "nvme"))
    argv = fake_lab.record["argv"]
    assert isinstance(argv, list)
    initrd = Path(option_values(argv, "-initrd")[0])
    assert not initrd.parent.exists()
    # the NVMe's image was there, beside the initramfs, for as long as QEMU ran
    image = str(initrd.parent / "nvme0.img")
    assert fake_lab.record["drive_sizes"] == {image: 64 << 20}


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("init-fails", "cannot mount the host's root over 9p"),
        (  # a kernel panic, with where it crashed
            "panics",
            "Kernel panic - not syncing: Fatal exception in interrupt "
            "(RIP: 0010:vmx_vcpu_run+0x4c/0x90)",
        ),
    ],
)
def test_a_lab_that_stops_early_is_reported_in_one_line(
    fake_lab: FakeLab, mode: str, why: str
) -> None:
    with pytest.raises(LabError) as excinfo:
        fake_lab.run(mode)
    assert str(excinfo.value) == (
        f"the lab stopped before the command finished: {why} "
        "(rerun with --verbose to see its console)"
    )


def test_qemu_killed_by_a_signal_is_a_crash_of_the_lab(fake_lab: FakeLab) -> None:
    with pytest.raises(LabCrashed) as excinfo:
        fake_lab.run("aborts")
    assert str(excinfo.value) == (
        "the lab stopped before the command finished: QEMU was killed by SIGABRT "
        "(rerun with --verbose to see its console)"
    )


def test_a_qemu_error_is_reported_in_one_line(fake_lab: FakeLab) -> None:
    with pytest.raises(LabError, match="qemu-system-x86_64: -device edu: something broke"):
        fake_lab.run("qemu-error")


def test_an_agent_error_is_reported_as_is(fake_lab: FakeLab) -> None:
    with pytest.raises(LabError) as excinfo:
        fake_lab.run("agent-error")
    assert str(excinfo.value) == "the lab has no nvme device"


def test_a_timeout_stops_qemu_and_says_where_the_labs_cpus_were(fake_lab: FakeLab) -> None:
    with pytest.raises(LabTimeout) as excinfo:
        fake_lab.run("hang", timeout=1.5)
    assert re.fullmatch(
        r"timed out after 1.5 s; QEMU stopped; the lab's CPUs: CPU 0 at ffffffff81000000 each "
        r"time, halted, CPL 0, cr3 0x1234000, thread busy \d+% \(3 samples over 1.\d s\); "
        r"its console last said: \[    0.000000\] Linux version 7.3.4-lab",
        str(excinfo.value),
    )
    # the whole of what the monitor said, without the FPU's registers
    evidence = excinfo.value.evidence
    assert evidence.count("RIP=ffffffff81000000") == 3
    assert "-- info lapic (CPU 0)\nLVTT 0x000000ec" in evidence
    assert "FPR0" not in evidence and "\r" not in evidence
    pid = fake_lab.record["pid"]
    assert isinstance(pid, int)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_lab_silent_for_longer_than_allowed_is_stopped(fake_lab: FakeLab) -> None:
    silent = r"^the command inside wrote nothing for 1 s \(the lab hung\); QEMU stopped; "
    with pytest.raises(LabTimeout, match=silent + "the lab's CPUs: CPU 0 at ffffffff81000000 "):
        fake_lab.run("silent", silence=1.0)
    assert fake_lab.output == [(Kind.STDOUT, b"started\n")]


def test_an_exception_in_the_output_sink_stops_qemu(
    fake_lab: FakeLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(kind: Kind, data: bytes) -> None:
        raise KeyboardInterrupt

    monkeypatch.setenv("FAKE_QEMU_MODE", "ok")
    with pytest.raises(KeyboardInterrupt):
        launcher.run(["x"], launcher.LabOptions(kernel=str(fake_lab.kernel)), output=explode)
    pid = fake_lab.record["pid"]
    assert isinstance(pid, int)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


LAB_TESTS = """
import pytest

@pytest.mark.lab
def test_one(): pass

@pytest.mark.lab
def test_two(): pass

@pytest.mark.lab
def test_three(): pass
"""


def run_tier(
    pytester: pytest.Pytester, fake_lab: FakeLab, mode: str, *options: str
) -> pytest.RunResult:
    """A host pytest of three lab tests, the lab being the fake QEMU in `mode`."""
    fake_lab.monkeypatch.setenv("FAKE_QEMU_MODE", mode)
    fake_lab.monkeypatch.setenv("PYVMM_LAB_KERNEL", str(fake_lab.kernel))
    fake_lab.monkeypatch.delenv("PYVMM_IN_LAB", raising=False)
    pytester.makeini("[pytest]\nmarkers = lab: runs in the lab\n")
    pytester.makepyfile(LAB_TESTS)
    return pytester.runpytest_inprocess("-p", "pyvmm.lab.pytest_plugin", "-rA", *options)


def test_after_qemu_crashes_the_tests_left_without_a_result_run_in_a_new_boot(
    pytester: pytest.Pytester, fake_lab: FakeLab
) -> None:
    result = run_tier(pytester, fake_lab, "crash-once")
    result.assert_outcomes(passed=3)
    output = result.stdout.str()
    assert "lab: running 3 tests in QEMU" in output
    assert "lab: QEMU crashed (the lab stopped before the command finished: " in output
    assert "iotlb_to_section: Assertion" in output
    assert "a new boot runs what it left without a result (2 of 3 tests)" in output
    # test_one had finished; test_two was under way when QEMU aborted, so it runs again
    assert "lab: running 2 tests in QEMU" in output
    # and the end of the run counts the retry, and says what it was
    assert re.search(r"-+ lab: 1 lab sessions on QEMU \S+, 1 retried -+", output)
    assert "\nlab retry: QEMU crashed (the lab stopped before the command finished" in output


def test_after_the_lab_hangs_past_its_budget_the_tests_left_run_in_a_new_boot(
    pytester: pytest.Pytester, fake_lab: FakeLab
) -> None:
    """A lab whose kernel stalls (or panics under the emulated IOMMU) is the emulator's failure
    as a crash is: one more boot for what it left; the timeout says what its console said."""
    result = run_tier(pytester, fake_lab, "hang-once", "--lab-timeout", "3")
    result.assert_outcomes(passed=3)
    output = result.stdout.str()
    assert (
        "lab: the lab hung (timed out after 3 s; QEMU stopped; the lab's CPUs: CPU 0 at " in output
    )
    assert (
        "; its console last said: [    0.000000] Linux version 7.3.4-lab | [  412.000001] rcu: "
        "INFO: rcu_preempt self-detected stall) during "
    ) in output
    assert "::test_two; a new boot runs what it left without a result (2 of 3 tests)" in output
    assert "lab: running 2 tests in QEMU" in output


def test_after_the_lab_machine_resets_itself_the_tests_left_run_in_a_new_boot(
    pytester: pytest.Pytester, fake_lab: FakeLab
) -> None:
    result = run_tier(pytester, fake_lab, "reset-once")
    result.assert_outcomes(passed=3)
    output = result.stdout.str()
    assert (
        "lab: the lab machine reset (the lab stopped before the command finished: the lab "
        "machine reset (QEMU exited 0 under -no-reboot; no panic was printed; a CPU "
        "triple-faulted, QEMU's reset log says)"
    ) in output
    assert "a new boot runs what it left without a result (2 of 3 tests)" in output


def test_a_lab_that_hangs_again_fails_what_it_left(
    pytester: pytest.Pytester, fake_lab: FakeLab
) -> None:
    result = run_tier(pytester, fake_lab, "hang-always", "--lab-timeout", "3")
    result.assert_outcomes(passed=1, failed=2)
    output = result.stdout.str()
    assert output.count("lab: running 2 tests in QEMU") == 1  # one new boot, not more
    assert re.search(r" test_three _+\nno result from the lab: timed out after 3 s; ", output)


def test_a_test_the_lab_stopped_in_fails_though_its_reports_so_far_passed(
    pytester: pytest.Pytester, fake_lab: FakeLab
) -> None:
    result = run_tier(pytester, fake_lab, "crash")
    result.assert_outcomes(passed=1, failed=2)
    output = result.stdout.str()
    assert output.count("lab: running 2 tests in QEMU") == 1  # one new boot, not more
    crash = re.escape(
        "the lab stopped before the command finished: qemu-system-x86_64: physmem.c:2678: "
    )
    assert re.search(f" test_two _+\nthe lab stopped during this test: {crash}", output)
    assert re.search(f" test_three _+\nno result from the lab: {crash}", output)


def test_a_crash_after_the_last_test_boots_nothing_more(
    pytester: pytest.Pytester, fake_lab: FakeLab
) -> None:
    result = run_tier(pytester, fake_lab, "crash-at-the-end")
    result.assert_outcomes(passed=3)
    assert result.stdout.str().count("lab: running") == 1
    assert "lab: QEMU crashed" not in result.stdout.str()
    assert re.search(r"-+ lab: 1 lab sessions on QEMU \S+, 0 retried -+", result.stdout.str())
    assert "lab retry:" not in result.stdout.str()


def test_a_failure_before_a_crash_stands_and_is_not_run_again(
    pytester: pytest.Pytester, fake_lab: FakeLab
) -> None:
    result = run_tier(pytester, fake_lab, "crash-after-a-failure")
    result.assert_outcomes(passed=2, failed=1)
    output = result.stdout.str()
    assert "a new boot runs what it left without a result (1 of 3 tests)" in output
    assert "lab: running 1 tests in QEMU" in output  # test_three alone
    assert re.search(
        r" test_two _+\nthe lab stopped during this test: .*\n+what it reported before", output
    )


# -- the CLI ---------------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="pyvmm")
    cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *argv])
    return args.func(args)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("run", "--iommu", "amd", "--", "true"),
            "--iommu amd is not supported: QEMU 10.0's amd-iommu is broken (device DMA data "
            "never arrives); use intel or virtio",
        ),
        (("run", "--"), "no command given (use: pyvmm lab run -- CMD ...)"),
        (("run", "--env", "NOVALUE", "--", "true"), "--env 'NOVALUE': expected NAME=VALUE"),
    ],
)
def test_cli_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    assert run_cli(*argv) == 1
    assert capsys.readouterr().err == f"pyvmm lab: {message}\n"


def test_cli_without_qemu(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert run_cli("run", "--", "true") == 1
    assert capsys.readouterr().err == (
        "pyvmm lab: qemu-system-x86_64 not installed (run scripts/setup-lab)\n"
    )


def test_cli_passes_the_exit_status_through(
    fake_lab: FakeLab, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    fake_lab.monkeypatch.setenv("FAKE_QEMU_MODE", "ok")
    assert run_cli("run", "--kernel", str(fake_lab.kernel), "--", "true") == 3
    captured = capsysbinary.readouterr()
    assert (captured.out, captured.err) == (b"out\nmore out\n", b"err\n")


def test_cli_timeout_exits_124(fake_lab: FakeLab, capsys: pytest.CaptureFixture[str]) -> None:
    fake_lab.monkeypatch.setenv("FAKE_QEMU_MODE", "hang")
    assert run_cli("run", "--kernel", str(fake_lab.kernel), "--timeout", "1", "--", "x") == 124
    err = capsys.readouterr().err
    assert err.startswith("pyvmm lab: timed out after 1 s; QEMU stopped; the lab's CPUs: CPU 0 ")
    assert err.endswith("; its console last said: [    0.000000] Linux version 7.3.4-lab\n")
    assert err.count("\n") == 1


# -- the test tier's folding of inner reports ------------------------------------------------------


def record(when: str, outcome: str, **extra: object) -> dict[str, object]:
    base = {"nodeid": "t.py::x", "when": when, "outcome": outcome, "longrepr": "", "crash": ""}
    base.update({"wasxfail": None, "sections": []})
    base.update(extra)
    return base


def fold(*records: dict[str, object]) -> InnerResult:
    result = InnerResult()
    for item in records:
        result.add(item)
    return result


def test_inner_results_fold_like_pytest() -> None:
    passed = fold(record("setup", "passed"), record("call", "passed"), record("teardown", "passed"))
    assert passed == InnerResult("passed", "", finished=True)
    skipped = fold(record("setup", "skipped", longrepr="no nvme"), record("teardown", "passed"))
    assert skipped == InnerResult("skipped", "no nvme", finished=True)
    xfailed = fold(record("setup", "passed"), record("call", "skipped", wasxfail="known bug"))
    assert xfailed == InnerResult("xfailed", "known bug")  # no teardown yet: not finished
    failed = fold(
        record("setup", "passed"),
        record(
            "call",
            "failed",
            longrepr="E assert 1 == 2",
            crash="assert 1 == 2",
            sections=[["Captured stdout call", "hi\n"]],
        ),
        record("teardown", "failed", longrepr="teardown broke"),
    )
    assert failed.outcome == "failed"
    assert failed.text.startswith("assert 1 == 2 [in the lab]\n\nE assert 1 == 2\n")
    assert "Captured stdout call" in failed.text and "teardown broke" not in failed.text
    setup_error = fold(record("setup", "failed", longrepr="boom", crash="RuntimeError: boom"))
    assert setup_error.text.startswith("RuntimeError: boom [in the lab (in setup)]")


def test_read_results(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    assert read_results(path) == {}
    lines = [
        record("call", "passed"),
        record("call", "failed", longrepr="x"),
        {**record("call", "passed"), "nodeid": "t.py::y"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    results = read_results(path)
    assert results["t.py::x"].outcome == "failed"
    assert results["t.py::y"].outcome == "passed"


# -- the lab kernel's configuration ----------------------------------------------------------------


def config_options(text: str) -> dict[str, str]:
    """CONFIG_X -> value, with "n" for `# CONFIG_X is not set`."""
    options = {}
    for line in text.splitlines():
        if match := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            options[match[1]] = "n"
        elif line.startswith("CONFIG_"):
            name, _, value = line.partition("=")
            options[name] = value
    return options


def test_the_kernel_fragment_builds_the_shared_lab_kernel() -> None:
    """scripts/lab-kernel.config carries the options of the lab kernel CI boots
    (../shared/lab/lab.config), and the full .config that kernel was built with has each."""
    if not (SHARED_LAB / "lab.config").is_file():
        pytest.skip(f"no shared lab kernel at {SHARED_LAB}")
    ours = config_options((Path(__file__).parents[1] / "scripts" / "lab-kernel.config").read_text())
    assert ours == config_options((SHARED_LAB / "lab.config").read_text())
    built = config_options((SHARED_LAB / "config").read_text())
    for name, value in ours.items():
        assert built.get(name, "n") == value, name
    assert ours["CONFIG_LOCALVERSION"] == '"-lab2"'


def test_a_tests_lab_markers_add_up_the_closest_winning(pytester: pytest.Pytester) -> None:
    """A parameter's iommu and the function's `before` both count, the parameter's winning over
    the function's (the function's marker alone once hid the parameter's, and the virtio case
    ran under intel-iommu)."""
    pytester.makeini("[pytest]\nmarkers = lab: runs in the lab\n")
    pytester.makepyfile(
        """
import pytest

pytestmark = pytest.mark.lab(devices=("nvme",), session="module")

def prepare(): pass

@pytest.mark.lab(before=prepare, session="own", iommu="intel")
@pytest.mark.parametrize("iommu", [pytest.param("virtio", marks=pytest.mark.lab(iommu="virtio"))])
def test_one(iommu): pass
"""
    )
    recorder = pytester.inline_run("-p", "pyvmm.lab.pytest_plugin", "--collect-only")
    (item,) = recorder.getcalls("pytest_collection_finish")[0].session.items  # the stand-in
    assert (item.iommu, item.session_name, item.lab_devices) == ("virtio", "own", ("nvme",))
    assert item.before.__name__ == "prepare"
