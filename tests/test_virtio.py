"""virtio devices end to end: freestanding guests driving virtio-rng and virtio-blk over PCI on
this host's KVM (doorbells through ioeventfd, interrupts through MSI-X irqfds), MSI-X pending
delivery by real KVM, and the blk and net backends driven from the host side (no KVM)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guestbuild import guest, requires_kvm
from pcibench import HostDriver, virtio_device

from pyvmm.board.machine import Machine, StopReason
from pyvmm.devices.pci.msix import Msix
from pyvmm.devices.virtio import blk as vblk
from pyvmm.devices.virtio import net as vnet
from pyvmm.devices.virtio.pci import VirtioPciDevice
from pyvmm.devices.virtio.pci_layout import NOTIFY_OFFSET
from pyvmm.errors import ConfigError
from pyvmm.kvm.irq import MsiRoute
from pyvmm.machine import layout
from pyvmm.machine.console import CaptureConsole
from pyvmm.uapi.kvm import KvmExit

MiB = layout.MiB


def boot(name: str, **kwargs: object) -> Machine:
    machine = Machine(mem_size=64 * MiB, console=CaptureConsole(), **kwargs)
    machine.load_elf(str(guest(name)))
    return machine


def mmio_exits(machine: Machine, start: int, end: int) -> list[int]:
    return [a for r, a in machine.exits.trace or () if r == KvmExit.MMIO and start <= a < end]


def watch_threads(device: VirtioPciDevice) -> list[str]:
    """Record which thread each queue-processing call runs on."""
    names: list[str] = []
    process = device.backend.process

    def recording(index: int) -> None:
        names.append(threading.current_thread().name)
        process(index)

    device.backend.process = recording  # type: ignore[method-assign]
    return names


@pytest.mark.kvm
@requires_kvm
def test_virtio_rng_guest_gets_entropy_through_ioeventfd_and_msix_irqfd() -> None:
    with boot("virtio-rng", trace_exits=True) as machine:
        device = machine.add_device("virtio-rng")
        assert isinstance(device, VirtioPciDevice)
        threads = watch_threads(device)

        def no_signal_msi(address: int, data: int) -> int:
            raise AssertionError("KVM_SIGNAL_MSI used: interrupts must go through irqfd")

        machine.vm.signal_msi = no_signal_msi  # type: ignore[method-assign]
        result = machine.run(timeout=60)
        out = machine.console.text
        bar = device.bar_address(0)
        assert result.reason is StopReason.DEBUG_EXIT and result.exit_code == 0, out
        match = re.fullmatch(r"virtio-rng: 16 bytes ([0-9a-f]{32})\n", out)
        assert match, out
        assert int(match[1], 16) != 0
        # The doorbell write completed in the kernel (ioeventfd): no exit reached Python...
        doorbell = bar + NOTIFY_OFFSET
        assert mmio_exits(machine, doorbell, doorbell + 4) == []
        # ...while the guest's other BAR accesses did (the trace does see this BAR).
        assert mmio_exits(machine, bar, bar + 0x40)
        # The queue was processed on the device's worker, never on a vCPU thread.
        assert threads and all(name == "virtio-rng-worker" for name in threads)
        # Vector 0 is a KVM MSI route to the guest's vector 0x50, fed by the irqfd; the guest
        # only printed after its handler for 0x50 ran.
        msi = [r for r in machine.gsi.routes() if isinstance(r, MsiRoute)]
        assert [(r.address & 0xFFF00000, r.data) for r in msi] == [(layout.LAPIC_BASE, 0x50)]
    assert not any(t.name.endswith("-worker") for t in threading.enumerate())


@pytest.mark.kvm
@requires_kvm
def test_virtio_blk_guest_reads_writes_and_flushes_a_host_file(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"pyvmm sector zero\0".ljust(16 * 512, b"\xee"))
    with boot("virtio-blk", trace_exits=True) as machine:
        device = machine.add_device("virtio-blk", path=str(disk), serial="pyvmm-disk-0")
        result = machine.run(timeout=60)
        out = machine.console.text
        doorbell = device.bar_address(0) + NOTIFY_OFFSET
        assert mmio_exits(machine, doorbell, doorbell + 4) == []
    assert result.exit_code == 0, out
    assert out.splitlines() == [
        "virtio-blk: capacity 16 sectors",
        "virtio-blk: id pyvmm-disk-0",
        "virtio-blk: sector 0 pyvmm sector zero",
        "virtio-blk: wrote sector 1",
        "virtio-blk: read past end status 1",
    ]
    data = disk.read_bytes()
    assert data[512:1024] == bytes((i * 7 + 3) & 0xFF for i in range(512))
    assert data[1024:] == b"\xee" * (14 * 512)


@pytest.mark.kvm
@requires_kvm
def test_virtio_blk_read_only_disk_refuses_the_write(tmp_path: Path) -> None:
    disk = tmp_path / "ro.img"
    disk.write_bytes(bytes(4 * 512))
    with boot("virtio-blk") as machine:
        machine.add_device("virtio-blk", path=str(disk), read_only=True)
        result = machine.run(timeout=60)
        out = machine.console.text
    assert result.exit_code == 1, out
    assert out.endswith("virtio-blk: writing sector 1 failed\n")
    assert disk.read_bytes() == bytes(4 * 512)


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


@pytest.mark.kvm
@requires_kvm
def test_msix_masked_vector_pends_in_its_eventfd_and_kvm_delivers_it_on_unmask() -> None:
    """The pending-bit scheme relies on KVM_IRQFD firing an event already in the eventfd when
    the irqfd is assigned; check that on this kernel."""
    with Machine(mem_size=16 * MiB) as machine:
        msix = Msix(machine.vm, machine.gsi, 2, table=(0, 0), pba=(0, 0x800))
        config = bytearray(256)
        msix.capability.attach(config, 0x40)
        try:
            msix.table_write(0, 4, layout.LAPIC_BASE)
            msix.table_write(8, 4, 0x44)
            config[0x42:0x44] = struct.pack("<H", 0x8000)
            msix.capability.after_write(2, 2)
            msix.signal(0)
            fd = msix.eventfds[0].fd
            assert readable(fd) and msix.pba_read(0, 8) == 1
            msix.table_write(12, 4, 0)  # unmask: the irqfd is assigned and KVM takes the event
            assert not readable(fd) and msix.pba_read(0, 8) == 0
            msix.signal(0)  # live: consumed by KVM at once
            assert not readable(fd)
            msix.table_write(12, 4, 1)  # masked again: pending once more
            msix.signal(0)
            assert msix.pba_read(0, 8) == 1
        finally:
            msix.close()


# virtio-blk requests from the host side (no KVM)

DISK_SECTORS = 8


@contextlib.contextmanager
def blk_device(tmp_path: Path, **options: object) -> Iterator[tuple[HostDriver, Path]]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 2 * DISK_SECTORS)
    with virtio_device(vblk.VirtioBlk(str(disk), **options)) as (_, _, driver):  # type: ignore[arg-type]
        driver.start(0)
        yield driver, disk


def blk_request(
    driver: HostDriver, kind: int, sector: int, data: list[tuple[int, bool]], status: bool = True
) -> tuple[int, int]:
    """Posts header at 0x200000, data buffers at 0x210000..., status at 0x2F0000; returns
    (used length, status byte)."""
    mem = driver.mem
    mem.write(0x200000, struct.pack("<IIQ", kind, 0, sector))
    mem.write(0x2F0000, b"\x77")
    buffers = [(0x200000, 16, False)]
    for n, (length, writable) in enumerate(data):
        buffers.append((0x210000 + n * 0x10000, length, writable))
    if status:
        buffers.append((0x2F0000, 1, True))
    count = len(driver.used(0))
    driver.post(0, buffers)
    driver.notify(0)
    used = driver.wait_used(0, count + 1)[-1][1]
    return used, mem.read(0x2F0000, 1)[0]


def test_blk_requests_and_their_statuses(tmp_path: Path) -> None:
    with blk_device(tmp_path, serial="serial-number-longer-than-20") as (driver, disk):
        config = driver.device.bar_read(0, 0x2000, 8)
        assert config == DISK_SECTORS
        assert blk_request(driver, vblk.VIRTIO_BLK_T_IN, 1, [(1024, True)]) == (1025, 0)
        assert driver.mem.read(0x210000, 1024) == disk.read_bytes()[512:1536]
        # a read scattered over three buffers
        assert blk_request(driver, 0, 0, [(100, True), (312, True), (512, True)]) == (1, 1)
        assert blk_request(driver, 0, 0, [(200, True), (312, True), (512, True)]) == (1025, 0)
        scattered = b"".join(
            driver.mem.read(0x210000 + n * 0x10000, length)
            for n, length in enumerate((200, 312, 512))
        )
        assert scattered == disk.read_bytes()[:1024]
        driver.mem.write(0x210000, b"\x5a" * 512)
        assert blk_request(driver, vblk.VIRTIO_BLK_T_OUT, 7, [(512, False)]) == (1, 0)
        assert disk.read_bytes()[7 * 512 :] == b"\x5a" * 512
        assert blk_request(driver, vblk.VIRTIO_BLK_T_FLUSH, 0, []) == (1, 0)
        assert blk_request(driver, vblk.VIRTIO_BLK_T_GET_ID, 0, [(20, True)]) == (21, 0)
        assert driver.mem.read(0x210000, 20) == b"serial-number-longer"
        # outside the disk, partial sectors, unknown requests, missing pieces
        assert blk_request(driver, 0, DISK_SECTORS, [(512, True)])[1] == 1
        assert blk_request(driver, 0, DISK_SECTORS - 1, [(1024, True)])[1] == 1
        assert blk_request(driver, 0, 2**64 - 1, [(512, True)])[1] == 1
        assert blk_request(driver, 1, 2**63, [(512, False)])[1] == 1
        assert blk_request(driver, 0, 0, [(100, True)])[1] == 1
        assert blk_request(driver, 99, 0, [])[1] == vblk.VIRTIO_BLK_S_UNSUPP
        assert blk_request(driver, 0, 0, [], status=False) == (0, 0x77)  # no status byte
        count = len(driver.used(0))
        driver.post(0, [(0x200000, 8, False), (0x2F0000, 1, True)])  # a short header
        driver.notify(0)
        assert driver.wait_used(0, count + 1)[-1][1] == 0
        assert driver.read("device_status") & 0x40 == 0  # all answered, nothing broken


def test_blk_read_only_refuses_writes_and_offers_the_ro_feature(tmp_path: Path) -> None:
    with blk_device(tmp_path, read_only=True) as (driver, disk):
        before = disk.read_bytes()
        assert blk_request(driver, vblk.VIRTIO_BLK_T_OUT, 0, [(512, False)])[1] == 1
        assert disk.read_bytes() == before
        driver.write("device_feature_select", 0)
        assert driver.read("device_feature") & vblk.VIRTIO_BLK_F_RO


def test_blk_missing_image_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^virtio-blk: cannot open disk image .*nope") as err:
        vblk.VirtioBlk(str(tmp_path / "nope"))
    assert "\n" not in str(err.value)


# virtio-net on a real tap (no KVM; skipped where taps cannot be made)

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
ETH_P_ALL = 0x0003
TEST_ETHERTYPE = 0x88B5  # IEEE local experimental


CAP_NET_ADMIN = 12


def tap_unavailable() -> str | None:
    """Why this host cannot make the tests' tap, or None: what a test may skip for (any other
    ConfigError from a NIC is a failure)."""
    try:
        os.close(os.open(vnet.TUN_DEVICE, os.O_RDWR))
    except OSError as err:
        return f"no tap for the tests: cannot open {vnet.TUN_DEVICE}: {err.strerror}"
    status = Path("/proc/self/status").read_text()
    effective = int(
        next(line for line in status.splitlines() if line.startswith("CapEff:"))[7:], 16
    )
    if not effective >> CAP_NET_ADMIN & 1:
        return "no tap for the tests: creating one needs CAP_NET_ADMIN"
    return None


requires_tap = pytest.mark.skipif(tap_unavailable() is not None, reason=str(tap_unavailable()))


def open_test_tap() -> vnet.VirtioNet:
    return vnet.VirtioNet(f"pyvmm{os.getpid() % 100000}", mac=bytes.fromhex("525400123456"))


def link_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH22x", name.encode(), 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags | IFF_UP))


def tap_sniffer(name: str) -> socket.socket:
    """The tap `name`, up, and a raw socket on it that sees and sends its frames (the test
    skips, saying why, where this host does not allow that)."""
    try:
        link_up(name)
        sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    except PermissionError as err:
        pytest.skip(f"cannot bring the tap up or open a raw socket on it: {err}")
    sniffer.bind((name, 0))
    return sniffer


def test_net_tap_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="tap name"):
        vnet.VirtioNet("x" * 16)
    monkeypatch.setattr(vnet, "TUN_DEVICE", "/nonexistent/tun")
    with pytest.raises(ConfigError, match=r"^virtio-net: cannot open /nonexistent/tun") as err:
        vnet.VirtioNet("tap0")
    assert "\n" not in str(err.value)


@requires_tap
def test_net_frames_cross_the_tap_both_ways() -> None:
    backend = open_test_tap()
    with virtio_device(backend) as (_, device, driver):
        assert device.bar_read(0, 0x2000, 6) == int.from_bytes(backend.mac, "little")
        driver.start(0, 1)
        with tap_sniffer(backend.tap_name) as sniffer:
            sniffer.settimeout(5)
            # guest -> host: a frame on the transmit queue comes out of the tap
            frame = b"\xff" * 6 + backend.mac + struct.pack(">H", TEST_ETHERTYPE) + b"tx" * 30
            driver.mem.write(0x200000, bytes(12) + frame)
            driver.post(1, [(0x200000, 12 + len(frame), False)])
            driver.notify(1)
            driver.wait_used(1, 1)
            deadline = time.monotonic() + 5
            while sniffer.recv(2048) != frame:
                assert time.monotonic() < deadline, "transmitted frame never seen on the tap"
            # host -> guest: a frame sent into the tap lands in a receive buffer
            for n in range(8):
                driver.post(0, [(0x300000 + n * 0x1000, 2048, True)])
            driver.notify(0)
            reply = bytes(backend.mac) + b"\x02" * 6 + struct.pack(">H", TEST_ETHERTYPE) + b"rx"
            sniffer.send(reply.ljust(60, b"\0"))
            deadline = time.monotonic() + 5
            while True:
                for n, (_, length) in enumerate(driver.used(0)):
                    got = driver.mem.read(0x300000 + n * 0x1000, length)
                    if got[12:] == reply.ljust(60, b"\0"):
                        assert struct.unpack("<BBHHHHH", got[:12])[-1] == 1  # num_buffers
                        return
                assert time.monotonic() < deadline, "frame sent to the tap never received"
                time.sleep(0.01)


@requires_tap
def test_a_paused_nic_takes_no_frames_from_a_tap_it_shares() -> None:
    """Two NICs on one multi-queue tap, as a migration's source and destination are: frames
    go only to the queue of the one that runs with its driver up; a paused one's queue, or
    one whose driver has not brought it up, gets none."""
    first = open_test_tap()
    second = vnet.VirtioNet(first.tap_name)
    try:
        for backend in (first, second):
            backend.activate(0, [])  # the driver brought it up
        with tap_sniffer(first.tap_name) as sniffer:

            def frames_reaching(running: vnet.VirtioNet, paused: vnet.VirtioNet) -> list[bytes]:
                paused.pause()
                paused.pause()  # twice: as good as once
                running.resume()
                sent = []
                for n in range(16):  # sixteen flows, which a hash would spread over queues
                    frame = first.mac + bytes([2, 0, 0, 0, 0, n]) + b"\x88\xb5" + bytes(46)
                    sniffer.send(frame)
                    sent.append(frame)
                with pytest.raises(BlockingIOError):
                    os.read(paused._tap, 2048)
                got: list[bytes] = []  # ours only: the host sends its own (IPv6 solicitations)
                deadline = time.monotonic() + 5
                while len(got) < len(sent) and time.monotonic() < deadline:
                    with contextlib.suppress(BlockingIOError):
                        frame = os.read(running._tap, 2048)
                        if frame in sent:
                            got.append(frame)
                with pytest.raises(BlockingIOError):
                    os.read(paused._tap, 2048)
                return got

            assert len(frames_reaching(second, first)) == 16
            assert len(frames_reaching(first, second)) == 16
            second.resume()
            second.reset()  # the driver took it down: it gets nothing, running or not
            assert len(frames_reaching(first, second)) == 16
    finally:
        first.close()
        second.close()


@requires_kvm
@pytest.mark.kvm
def test_cli_plugs_virtio_devices(tmp_path: Path) -> None:
    import subprocess
    import sys

    def pyvmm_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pyvmm", "run", *args], capture_output=True, text=True
        )

    result = pyvmm_run(str(guest("virtio-rng")), "--rng")
    assert result.returncode == 0, result.stderr
    assert re.search(r"virtio-rng: 16 bytes [0-9a-f]{32}", result.stdout)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"pyvmm disk sector zero".ljust(512, b"\0") + bytes(511 * 512))
    result = pyvmm_run(str(guest("virtio-blk")), "--disk", str(disk))
    assert result.returncode == 0, result.stderr
    assert "virtio-blk: sector 0 pyvmm disk sector zero" in result.stdout
    for bad, message in (
        (("--disk", str(tmp_path / "missing.img")), "cannot open disk image"),
        (("--disk", f"{disk},rw"), "bad --disk"),
        (("--net", "bridge:br0"), "bad --net"),
    ):
        result = pyvmm_run(str(guest("hello")), *bad)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.kvm
@requires_kvm
@requires_tap
def test_a_machines_nic_is_rebuilt_the_same_from_its_configuration() -> None:
    """A migration's destination on the same host attaches to the source's tap while the
    source still has it (a multi-queue tap), with the MAC the source chose at random (recorded
    in the configuration)."""
    name = f"pyvmm{os.getpid() % 100000}"
    with Machine(mem_size=64 * MiB, console=CaptureConsole()) as first:
        device = first.add_device("virtio-net", tap=name)
        (config,) = first.config.devices
        assert config.options == {"tap": name, "mac": device.backend.mac.hex(":")}
        with Machine.from_config(first.config, CaptureConsole()) as second:
            assert second.config == first.config
            (copy,) = [f for f in second.pci.functions.values() if isinstance(f, VirtioPciDevice)]
            assert copy.backend.mac == device.backend.mac
