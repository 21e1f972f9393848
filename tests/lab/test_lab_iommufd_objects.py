"""iommufd's object model through pyvmm's classes, on the lab kernel's iommufd selftest mock
(CONFIG_IOMMUFD_TEST), over an IOAS that maps a running machine's guest RAM.

No emulated IOMMU in the lab can nest or track dirty pages (QEMU's intel-iommu and virtio-iommu
refuse NEST_PARENT), so the nesting objects are built on mock devices: a NEST_PARENT HWPT, a
SELFTEST vIOMMU with its mmap, a vDEVICE, a nested HWPT with a fault queue, invalidations of
the nested IOTLB and of the device cache (the failing request's index reported), vEVENTs, an
I/O page fault answered, HW queues; the kernel's side is checked with the mock's check ops
(which pages the page tables map, how often they are pinned). Everything is destroyed in
dependency order and the process's fds are back where they started.

On a real device (edu, behind intel-iommu and virtio-iommu), DMA follows explicit HWPTs and a
replace while attached; the emulated IOMMUs say what they lack for nesting and dirty tracking.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterator

import pytest
from counting import counts
from guestbuild import guest
from lab_edu import EDU_BUFFER, bar0, dma, enable_dma, lab_pci_device

from pyvmm.board.machine import Machine
from pyvmm.kvm.mmap import Mapping
from pyvmm.machine.console import CaptureConsole
from pyvmm.machine.vcpus import RunState
from pyvmm.uapi import iommufd as uapi
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.iommufd import mock
from pyvmm.vfio.iommufd.dirty import DmaDirtyLog
from pyvmm.vfio.iommufd.events import FaultQueue
from pyvmm.vfio.iommufd.hwpt import Hwpt, InvalidationError
from pyvmm.vfio.iommufd.info import hw_info
from pyvmm.vfio.iommufd.mock import MockDevice
from pyvmm.vfio.iommufd.objects import Iommufd, VfioBinding, open_cdev
from pyvmm.vfio.iommufd.viommu import Viommu
from pyvmm.vfio.sysfs import Sysfs

MiB = 1 << 20
PAGE = 4096
#: The part of guest RAM the IOAS maps, at IOVA = GPA: inside the mock IOMMU's aperture
#: (16 MiB - 2 GiB), as guest RAM below 16 MiB is not.
RAM_GPA, RAM_SIZE = 16 * MiB, 32 * MiB
QUEUE_GPA = RAM_GPA + RAM_SIZE - 2 * PAGE  # two pages for the HW queues
VIRT_ID = 0x42
NESTED_IOTLB = uapi.IOMMU_TEST_IOTLB_DEFAULT


def build_guests() -> None:
    guest("counter")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def running() -> Iterator[tuple[Machine, int]]:
    """A machine counting in its RAM, and the host address of its RAM at RAM_GPA."""
    with Machine(mem_size=64 * MiB, console=CaptureConsole()) as machine:
        machine.load_elf(str(guest("counter")))
        machine.start()
        machine.console.wait_for(r"count 1024\n", 60)  # type: ignore[attr-defined]
        region = machine.memory.region_for(RAM_GPA, RAM_SIZE)
        yield machine, region.host_addr + RAM_GPA - region.gpa
        assert machine.state is RunState.RUNNING, "the guest stopped while its RAM was mapped"
        last = counts(machine.console.text)[-1]  # type: ignore[attr-defined]
        machine.console.wait_for(rf"count {last + 1024}\n", 60)  # type: ignore[attr-defined]


@pytest.fixture
def fresh_iommufd() -> Iterator[tuple[Iommufd, int]]:
    """An iommufd, and how many fds this process had before it; closed whatever happens (it
    may pin a running guest's RAM)."""
    fds = open_fds()
    iommufd = Iommufd()
    try:
        yield iommufd, fds
    finally:
        iommufd.close()


@pytest.mark.lab(before=build_guests)
def test_every_nesting_object_on_the_mock_over_a_running_machines_guest_ram(
    running: tuple[Machine, int], fresh_iommufd: tuple[Iommufd, int]
) -> None:
    _, ram = running
    iommufd, fds = fresh_iommufd
    assert mock.available(iommufd), "the lab kernel has CONFIG_IOMMUFD_TEST"
    ioas = iommufd.alloc_ioas()
    ioas.map(RAM_GPA, ram, RAM_SIZE)
    device = MockDevice(ioas)
    # the kernel made a page table for it that maps the guest's pages, pinned once
    assert mock.maps(iommufd, device.hwpt_id, RAM_GPA, RAM_SIZE, ram)
    assert mock.pinned(iommufd, ram, RAM_SIZE, 1)
    assert not mock.maps(iommufd, device.hwpt_id, RAM_GPA, PAGE, ram + PAGE)  # and only so
    info = hw_info(device)
    assert info.type_name == "selftest" and info.fields["test_reg"] == "0xdeadbeef"
    assert info.nesting_missing() is None

    parent = Hwpt.paging(ioas, device, nest_parent=True)
    device.attach(parent)
    assert device.hwpt_id == parent.id
    assert mock.maps(iommufd, parent.id, RAM_GPA, RAM_SIZE, ram)
    assert mock.pinned(iommufd, ram, RAM_SIZE, 1)  # one IOAS: its pages are pinned once

    # a stage 1 straight over the nesting parent (no vIOMMU), its IOTLB invalidated
    stage1 = Hwpt.nested(parent, device, uapi.iommu_hwpt_selftest(iotlb=NESTED_IOTLB))
    device.attach(stage1)
    assert device.hwpt_id == stage1.id and iommufd.describe()[-1]["parents"] == [parent.id]
    stage1.invalidate(
        [uapi.iommu_hwpt_invalidate_selftest(flags=uapi.IOMMU_TEST_INVALIDATE_FLAG_ALL)]
    )
    assert all(mock.iotlb_holds(stage1, i, 0) for i in range(4))
    device.attach(parent)
    stage1.close()

    data = uapi.iommu_viommu_selftest(in_data=0xC0FFEE)
    viommu = Viommu(parent, device, uapi.IommuViommuType.SELFTEST, data)
    assert data.out_data == 0xC0FFEE and data.out_mmap_length >= PAGE
    with mmap.mmap(
        iommufd.fd, data.out_mmap_length, mmap.MAP_SHARED, offset=data.out_mmap_offset
    ) as page:
        assert int.from_bytes(page[:4], "little") == 0xC0FFEE  # the vIOMMU's own page
    vdevice = viommu.vdevice(device, VIRT_ID)
    with pytest.raises(VfioError, match="has a vDEVICE already"):
        viommu.vdevice(device, VIRT_ID + 1)

    fault = FaultQueue(iommufd)
    nested = viommu.nested_hwpt(device, uapi.iommu_hwpt_selftest(iotlb=NESTED_IOTLB), fault=fault)
    device.attach(nested)
    assert all(mock.iotlb_holds(nested, i, NESTED_IOTLB) for i in range(4))

    # invalidation of the nested IOTLB, and of the device's cache through the vIOMMU
    nested.invalidate([uapi.iommu_hwpt_invalidate_selftest(iotlb_id=1)])
    assert [mock.iotlb_holds(nested, i, 0) for i in range(4)] == [False, True, False, False]
    with pytest.raises(InvalidationError, match="request 1 of 2 failed") as failed:
        nested.invalidate(
            [
                uapi.iommu_hwpt_invalidate_selftest(iotlb_id=2),
                uapi.iommu_hwpt_invalidate_selftest(iotlb_id=7),  # there are 4
            ]
        )
    assert failed.value.index == 1
    assert mock.iotlb_holds(nested, 2, 0) and mock.iotlb_holds(nested, 3, NESTED_IOTLB)
    default_cache = uapi.IOMMU_TEST_DEV_CACHE_DEFAULT
    assert all(device.cache(i, default_cache) for i in range(4))
    viommu.invalidate([uapi.iommu_viommu_invalidate_selftest(vdev_id=VIRT_ID, cache_id=3)])
    assert [device.cache(i, 0) for i in range(4)] == [False, False, False, True]

    # vEVENTs name the device by its virtual id; an overflow is marked
    events = viommu.veventq(uapi.IommuVeventqType.SELFTEST, depth=2)
    assert events.read() == []
    device.trigger_vevent()
    (event,) = events.read()
    assert event.record.virt_id == VIRT_ID and not event.lost_before
    for _ in range(3):
        device.trigger_vevent()
    queued = events.read()
    assert [e.lost_before for e in queued] == [False, False, True], queued
    assert [e.sequence for e in queued] == list(range(event.sequence + 1, event.sequence + 4))

    # an I/O page fault on the nested HWPT, read and answered once
    device.trigger_fault(
        RAM_GPA + PAGE, uapi.IommuPgfaultPerm.READ | uapi.IommuPgfaultPerm.WRITE, group=5
    )
    (page_fault,) = fault.read()
    assert page_fault.dev_id == device.id and page_fault.addr == RAM_GPA + PAGE
    assert page_fault.group == 5 and page_fault.last and page_fault.pasid is None
    assert page_fault.perm == uapi.IommuPgfaultPerm.READ | uapi.IommuPgfaultPerm.WRITE
    fault.respond(page_fault)
    with pytest.raises(VfioError, match="no such fault is pending"):
        fault.respond(page_fault)

    # HW queues in guest RAM of the nesting parent: queue 1 only after queue 0
    with pytest.raises(VfioError, match="the queues before it must exist first"):
        viommu.hw_queue(uapi.IommuHwQueueType.SELFTEST, 1, QUEUE_GPA + PAGE, PAGE)
    queue0 = viommu.hw_queue(uapi.IommuHwQueueType.SELFTEST, 0, QUEUE_GPA, PAGE)
    queue1 = viommu.hw_queue(uapi.IommuHwQueueType.SELFTEST, 1, QUEUE_GPA + PAGE, PAGE)
    with pytest.raises(VfioError, match="nothing is mapped there"):
        viommu.hw_queue(uapi.IommuHwQueueType.SELFTEST, 1, 0x1000_0000 - PAGE, PAGE)

    # how the pieces hang together, as `describe` tells it
    described = {item["id"]: item for item in iommufd.describe()}
    assert described[parent.id]["parents"] == [ioas.id]
    assert described[parent.id]["flags"] == ["alloc_nest_parent"]
    assert described[viommu.id]["parents"] == [parent.id]
    assert described[vdevice.id]["parents"] == [viommu.id, device.id]
    assert described[vdevice.id]["virt_id"] == VIRT_ID
    assert described[nested.id]["parents"] == [viommu.id, fault.id]
    assert described[nested.id]["data_type"] == "selftest"
    assert described[device.id]["parents"] == [nested.id]
    assert described[queue1.id]["parents"] == [viommu.id, queue0.id]
    assert described[events.id]["type"] == "veventq"
    with pytest.raises(VfioError, match=rf"hwpt {parent.id} is in use by viommu {viommu.id}"):
        parent.close()

    iommufd.close()  # everything, children first
    assert iommufd.objects() == ()
    assert open_fds() == fds, "an object's fd was left open"
    with Iommufd() as checker:
        assert mock.pinned(checker, ram, RAM_SIZE, 0)  # nothing holds guest RAM any more


@pytest.mark.lab(before=build_guests)
def test_dirty_tracking_on_the_mock_reads_and_clears_what_dma_wrote(
    running: tuple[Machine, int],
) -> None:
    machine, ram = running
    with Iommufd() as iommufd:
        ioas = iommufd.alloc_ioas()
        assert ioas.huge_pages
        ioas.huge_pages = False  # dirty bits are per IOMMU page: make each one 4 KiB
        assert not ioas.huge_pages
        ioas.map(RAM_GPA, ram, RAM_SIZE)
        device = MockDevice(ioas)
        plain = Hwpt.paging(ioas, device)
        with pytest.raises(VfioError, match="allocated without dirty tracking"):
            plain.read_dirty(RAM_GPA, RAM_SIZE, PAGE)
        tracked = Hwpt.paging(ioas, device, dirty_tracking=True)
        device.attach(tracked)
        tracked.set_dirty_tracking(True)
        assert not any(tracked.read_dirty(RAM_GPA, RAM_SIZE, PAGE))
        written = bytearray(RAM_SIZE // PAGE // 8)
        for page in (0, 1, 63, 64, 4095, RAM_SIZE // PAGE - 1):
            written[page // 8] |= 1 << page % 8
        assert mock.mark_dirty(tracked, RAM_GPA, PAGE, bytes(written)) >= 6
        assert tracked.read_dirty(RAM_GPA, RAM_SIZE, PAGE, clear=False) == written
        assert tracked.read_dirty(RAM_GPA, RAM_SIZE, PAGE) == written
        assert not any(tracked.read_dirty(RAM_GPA, RAM_SIZE, PAGE))  # read and cleared
        tracked.set_dirty_tracking(False)

        # the interface a migration uses: the devices move to a dirty-tracking HWPT and back
        device.attach(plain)
        log = DmaDirtyLog(ioas, [device], lambda: {RAM_GPA: RAM_SIZE})
        log.start()
        assert log.hwpt is not None and device.attached is log.hwpt
        assert mock.mark_dirty(log.hwpt, RAM_GPA + 5 * PAGE, PAGE, b"\x05") >= 2  # 5 and 7
        (pages,) = log.collect()
        assert (pages.gpa, pages.pages) == (RAM_GPA, RAM_SIZE // PAGE)
        first = RAM_GPA // PAGE
        assert list(pages.page_numbers()) == [first + 5, first + 7]
        assert list(log.collect()[0].page_numbers()) == []  # collected means cleared
        log.stop()
        assert device.attached is plain and log.hwpt is None

        # ... as a source of the machine's one dirty log: started, read and stopped with it
        machine.dirty.add_source(log)
        machine.dirty.start()
        assert log.hwpt is not None and device.attached is log.hwpt
        assert mock.mark_dirty(log.hwpt, RAM_GPA + 9 * PAGE, PAGE, b"\x01") >= 1
        bitmaps = machine.dirty.collect()
        assert [a for b in bitmaps for a in b.addresses("dma")] == [RAM_GPA + 9 * PAGE]
        assert any(RAM_GPA + 9 * PAGE in b for b in bitmaps)  # in what a migration sends
        assert any(any(b.kvm) for b in bitmaps)  # beside what the counting vCPU wrote
        assert not [a for b in machine.dirty.collect() for a in b.addresses("dma")]
        machine.dirty.stop()
        machine.dirty.remove_source(log)
        assert device.attached is plain and log.hwpt is None

        untrackable = MockDevice(ioas, uapi.MockDeviceFlag.NO_DIRTY, name="no-dirty mock")
        assert hw_info(untrackable).dirty_tracking_missing() == "no IOMMU_HW_CAP_DIRTY_TRACKING"
        with pytest.raises(VfioError, match=r"no-dirty mock: cannot allocate a HWPT \(alloc_dirty"):
            Hwpt.paging(ioas, untrackable, dirty_tracking=True)
        refused = DmaDirtyLog(ioas, [device, untrackable], lambda: {RAM_GPA: RAM_SIZE})
        with pytest.raises(VfioError, match="no-dirty mock: DMA dirty tracking: its IOMMU "
                           r"\(selftest\) cannot track dirty pages"):  # fmt: skip
            refused.start()
        assert device.attached is plain  # nothing moved


EDU_IOVA = 0x100000  # edu's DMA addresses fit in 28 bits
EDU_SIZE = 0x4000
PATTERN = bytes(range(256)) * 4
IOMMUS = [pytest.param(iommu, marks=pytest.mark.lab(iommu=iommu)) for iommu in ("intel", "virtio")]


@pytest.mark.parametrize("iommu", IOMMUS)
def test_edus_dma_follows_the_page_table_it_is_attached_to_through_replace_and_detach(
    iommu: str, lab_devices: dict[str, str], sysfs: Sysfs
) -> None:
    """edu DMAs the same IOVA while attached to an IOAS, to an explicit HWPT over it, then,
    replaced while attached, to a HWPT over a second IOAS that maps that IOVA elsewhere: each
    write lands where the current page table says and only there; detached, it lands nowhere."""
    edu = lab_pci_device(lab_devices, sysfs, "edu")
    with (
        Iommufd() as iommufd,
        open_cdev(edu.cdev, edu.bdf) as cdev,
        Mapping(EDU_SIZE) as first_memory,
        Mapping(EDU_SIZE) as second_memory,
    ):
        first, second = iommufd.alloc_ioas(), iommufd.alloc_ioas()
        first.map(EDU_IOVA, first_memory.addr, EDU_SIZE)
        second.map(EDU_IOVA, second_memory.addr, EDU_SIZE)
        device = VfioBinding(cdev, iommufd)
        auto_hwpt = device.attach(first)
        enable_dma(cdev)
        registers = bar0(cdev)

        for memory in (first_memory, second_memory):  # the source, the same in both
            memory.view[: len(PATTERN)] = PATTERN

        def write(offset: int, data: bytes) -> None:
            """edu copies `data` from EDU_IOVA to EDU_IOVA + offset through its buffer, by
            whatever page table it is attached to."""
            dma(registers, EDU_IOVA, EDU_BUFFER, len(data), to_ram=False)
            dma(registers, EDU_BUFFER, EDU_IOVA + offset, len(data), to_ram=True)

        def landed(offset: int, data: bytes) -> tuple[bool, bool]:
            return tuple(  # type: ignore[return-value]
                bytes(m.view[offset : offset + len(data)]) == data
                for m in (first_memory, second_memory)
            )

        write(0x1000, PATTERN)
        assert landed(0x1000, PATTERN) == (True, False)
        explicit = Hwpt.paging(first, device)
        assert device.attach(explicit) == explicit.id != auto_hwpt
        write(0x2000, PATTERN)
        assert landed(0x2000, PATTERN) == (True, False)
        other = Hwpt.paging(second, device)
        assert device.attach(other) == other.id  # a replace: no detach in between
        write(0x3000 - len(PATTERN), PATTERN)
        assert landed(0x3000 - len(PATTERN), PATTERN) == (False, True)
        with pytest.raises(VfioError, match=rf"hwpt {other.id} is in use by device {device.id}"):
            other.close()
        explicit.close()  # no longer used: it can go
        device.detach()
        write(0x3000, PATTERN)  # an IOMMU fault: blocked
        assert landed(0x3000, PATTERN) == (False, False)
        described = {item["id"]: item for item in iommufd.describe()}
        assert described[other.id]["parents"] == [second.id]
        assert described[device.id]["parents"] == []  # detached


@pytest.mark.parametrize("iommu", IOMMUS)
def test_the_labs_iommus_say_what_they_lack_for_nesting_and_dirty_tracking(
    iommu: str, lab_devices: dict[str, str], sysfs: Sysfs
) -> None:
    edu = lab_pci_device(lab_devices, sysfs, "edu")
    with Iommufd() as iommufd, open_cdev(edu.cdev, edu.bdf) as cdev:
        device = VfioBinding(cdev, iommufd)
        info = hw_info(device)
        ioas = iommufd.alloc_ioas()
        device.attach(ioas)
        if iommu == "intel":
            assert info.type_name == "intel-vtd"
            assert info.fields["ECAP"].startswith("0x") and "QI" in info.fields["ECAP"]
            assert re.search(r"ECAP register lacks .*NEST", info.nesting_missing() or "")
        else:
            assert info.type_name == "none" and info.fields == {}
            assert "no hardware information" in (info.nesting_missing() or "")
        assert info.dirty_tracking_missing() is not None  # QEMU emulates no dirty bits
        with pytest.raises(VfioError, match=r"cannot allocate a HWPT \(alloc_nest_parent\)"):
            Hwpt.paging(ioas, device, nest_parent=True)
        with pytest.raises(VfioError, match=r"cannot allocate a HWPT \(alloc_dirty_tracking\)"):
            Hwpt.paging(ioas, device, dirty_tracking=True)


@pytest.mark.lab(before=build_guests)
def test_an_ioas_keeps_the_ranges_it_is_told_and_copies_mappings_without_pinning_again(
    running: tuple[Machine, int],
) -> None:
    _, ram = running
    with Iommufd() as iommufd:
        ioas, other, low = iommufd.alloc_ioas(), iommufd.alloc_ioas(), iommufd.alloc_ioas()
        ioas.map(RAM_GPA, ram, RAM_SIZE)
        device = MockDevice(ioas)
        aperture = (uapi.MOCK_APERTURE_START, uapi.MOCK_APERTURE_LAST)
        assert ioas.iova_ranges() == (aperture,)  # what the mock IOMMU translates
        with pytest.raises(VfioError, match="an attached device's IOMMU reserves IOVAs in them"):
            ioas.allow_iovas([(PAGE, RAM_GPA - 1)])  # below the aperture
        ioas.allow_iovas([(RAM_GPA, RAM_GPA + RAM_SIZE - 1)])  # inside: kept
        low.allow_iovas([(PAGE, RAM_GPA - 1)])
        with pytest.raises(VfioError, match="mock IOMMU reserves IOVAs the IOAS keeps"):
            MockDevice(low)  # it cannot translate what the IOAS must keep
        copied_at = 0x1000_0000
        ioas.copy_to(other, RAM_GPA + 4 * PAGE, copied_at, 16 * PAGE)
        second = MockDevice(other, name="second")
        assert mock.maps(iommufd, second.hwpt_id, copied_at, 16 * PAGE, ram + 4 * PAGE)
        assert mock.pinned(iommufd, ram, RAM_SIZE, 1)  # the copy shares the pinned pages
        assert other.unmap(copied_at, 16 * PAGE) == 16 * PAGE
        assert not mock.maps(iommufd, second.hwpt_id, copied_at, PAGE, ram + 4 * PAGE)
        assert mock.maps(iommufd, device.hwpt_id, RAM_GPA, RAM_SIZE, ram)  # the source stays
