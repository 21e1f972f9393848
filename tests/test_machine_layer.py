"""The machine layer on this host's KVM: pausing and resuming, the state of every component,
a machine rebuilt from its configuration, device memory in the guest's address space, and the
dirty log of pyvmm's own writes."""

from __future__ import annotations

import errno
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from counting import assert_consecutive, console_of, count_in_ram, counts
from elftools.elf.elffile import ELFFile
from fakes import RecordingDma
from guestbuild import guest, requires_kvm

from pyvmm.board.machine import Machine, RunState, StopReason
from pyvmm.devices.pci.testdev import MAPPED_BAR, MAPPED_OFFSET, PciTestDevice
from pyvmm.devices.testports import Checkpoint
from pyvmm.errors import ConfigError
from pyvmm.kvm.eventfd import EventFd
from pyvmm.machine import layout
from pyvmm.machine.address_space import AddressSpaceError
from pyvmm.machine.console import CaptureConsole
from pyvmm.machine.memory import RegionKind
from pyvmm.machine.state import StateError
from pyvmm.machine.vcpus import VCPU_SWITCH_INTERVAL
from pyvmm.uapi import kvm as uapi
from pyvmm.uapi.ioctl import IoctlError
from pyvmm.uapi.kvm import KvmExit
from pyvmm.vfio.dma_space import GuestRamMapper

pytestmark = [pytest.mark.kvm, requires_kvm]

MiB = layout.MiB


def boot(name: str, *, mem: int = 64 * MiB, cpus: int = 1, **kwargs: object) -> Machine:
    machine = Machine(mem_size=mem, vcpus=cpus, console=CaptureConsole(), **kwargs)
    machine.load_elf(str(guest(name)))
    return machine


@pytest.fixture
def on_thread() -> Iterator[Callable[[Callable[[], None]], None]]:
    """Run a function on a thread of its own; its exception fails the test at the end."""
    errors: list[BaseException] = []
    threads: list[threading.Thread] = []

    def start(work: Callable[[], None]) -> None:
        def run() -> None:
            try:
                work()
            except BaseException as err:
                errors.append(err)

        thread = threading.Thread(target=run)
        threads.append(thread)
        thread.start()

    yield start
    for thread in threads:
        thread.join(60)
    assert not errors, errors


# pause and resume


def test_a_paused_counting_guest_makes_no_progress_then_goes_on(on_thread) -> None:
    """The counter guest in its tight loop, paused from another thread than the one running
    the machine: its count in RAM and in r12 stand still and it prints nothing; resumed, it
    carries on from there."""
    with boot("counter") as machine:
        console = console_of(machine)
        seen: dict[str, int] = {}

        def driver() -> None:
            console.wait_for(r"count 2048\n", 30)
            assert machine.pause() and machine.state is RunState.PAUSED
            seen["ram"], seen["r12"] = count_in_ram(machine), machine.vcpus[0].get_regs().r12
            text = console.text
            time.sleep(0.5)
            assert count_in_ram(machine) == seen["ram"]
            assert machine.vcpus[0].get_regs().r12 == seen["r12"]
            assert console.text == text
            machine.resume()
            assert machine.state is RunState.RUNNING
            console.wait_for(rf"count {(seen['r12'] // 1024 + 2) * 1024}\n", 30)
            machine.stop(StopReason.STOPPED, 0, "done")

        on_thread(driver)
        result = machine.run(timeout=90)
    assert result.detail == "done", result
    assert seen["r12"] - seen["ram"] in (0, 1)  # r12 is stored right after each increment
    assert seen["r12"] >= 2048
    assert counts(console.text)[-1] >= (seen["r12"] // 1024 + 2) * 1024  # it went on
    assert_consecutive(counts(console.text))


def test_pause_and_resume_a_hundred_times_loses_and_doubles_nothing(on_thread) -> None:
    with boot("counter") as machine:
        console = console_of(machine)
        values: list[int] = []

        def driver() -> None:
            console.wait_for(r"count 1024\n", 30)
            for _ in range(100):
                assert machine.pause()
                values.append(machine.vcpus[0].get_regs().r12)
                machine.resume()
                time.sleep(0.003)
            console.wait_for(rf"count {(values[-1] // 1024 + 2) * 1024}\n", 30)
            machine.stop()

        on_thread(driver)
        machine.run(timeout=120)
    assert values == sorted(values) and len(set(values)) > 50  # it ran between the pauses
    assert_consecutive(counts(console.text))


def test_pauses_and_resumes_racing_from_two_threads_never_hang(on_thread) -> None:
    """One thread pauses while another resumes, over and over: every call returns, each pause
    either holds (machine PAUSED) or was overtaken by a resume; afterwards the guest runs on
    with nothing lost."""
    with boot("counter") as machine:
        console = console_of(machine)
        outcomes: list[bool] = []
        done = threading.Event()

        def pauser() -> None:
            console.wait_for(r"count 1024\n", 30)
            for _ in range(200):
                started = time.monotonic()
                outcomes.append(machine.pause())
                assert time.monotonic() - started < 10, "pause() hung"
            done.set()

        def resumer() -> None:
            console.wait_for(r"count 1024\n", 30)
            while not done.is_set():
                machine.resume()
                time.sleep(0.0005)
            machine.resume()
            end = counts(console.text)[-1]
            console.wait_for(rf"count {end + 2048}\n", 30)
            machine.stop()

        on_thread(pauser)
        on_thread(resumer)
        machine.run(timeout=120)
    assert len(outcomes) == 200 and any(outcomes)
    assert_consecutive(counts(console.text))


def test_pause_while_every_vcpu_is_halted_or_waiting_for_its_sipi(on_thread) -> None:
    """The interrupts guest halts waiting for an MSI; its second vCPU waits for a SIPI that
    never comes. Both leave KVM_RUN for the pause; after resume the MSI still gets through."""
    with boot("interrupts", cpus=2) as machine:
        console = console_of(machine)
        msi = EventFd()
        gsi = machine.gsi.allocate_gsi()
        machine.gsi.set_msi(gsi, layout.LAPIC_BASE, 0x40)
        machine.vm.irqfd(msi.fd, gsi)
        pin = EventFd()
        machine.vm.irqfd(pin.fd, 10)

        def driver() -> None:
            console.wait_for("interrupts: ready\n", 30)
            time.sleep(0.3)  # into its hlt
            for _ in range(3):
                assert machine.pause()
                assert machine.vcpus[0].get_mp_state() == uapi.KvmMpState.HALTED
                assert machine.vcpus[1].get_mp_state() == uapi.KvmMpState.UNINITIALIZED
                machine.resume()
            msi.signal()
            console.wait_for("msi: vector 0x40 count 1\n", 30)
            pin.signal()

        on_thread(driver)
        result = machine.run(timeout=90)
        msi.close()
        pin.close()
    assert result.reason is StopReason.DEBUG_EXIT and result.exit_code == 0, console.text


def test_a_throttled_guest_runs_slower_pauses_at_once_and_runs_on_unthrottled(
    on_thread,
) -> None:
    """The counter guest's progress over the same time, unthrottled, then throttled to 90%
    (a tenth of it, give or take; asserted below half), then unthrottled again. A pause cuts a
    throttle sleep short; the throttle's thread ends with the throttle and with the machine."""
    with boot("counter") as machine:
        console = console_of(machine)
        progress: dict[str, int] = {}

        def counted_over(seconds: float) -> int:
            before = count_in_ram(machine)
            time.sleep(seconds)
            return count_in_ram(machine) - before

        def throttle_threads() -> list[str]:
            return [t.name for t in threading.enumerate() if t.name.startswith("throttle")]

        def driver() -> None:
            console.wait_for(r"count 1024\n", 30)
            progress["free"] = counted_over(1.0)
            machine.throttle(0.9)
            progress["throttled"] = counted_over(1.0)
            assert machine.throttled_seconds > 0.5  # ~0.9 s
            machine.throttle(0.99)  # a sleep of 990 ms per kick
            time.sleep(0.1)
            asked = time.monotonic()
            assert machine.pause()
            progress["pause_ms"] = int((time.monotonic() - asked) * 1000)
            machine.resume()
            machine.throttle(0)
            time.sleep(0.2)
            assert throttle_threads() == []
            progress["again"] = counted_over(1.0)
            machine.throttle(0.5)
            assert throttle_threads() != []
            with pytest.raises(ValueError, match=r"0 to 0\.99"):
                machine.throttle(1.0)
            machine.stop(StopReason.STOPPED, 0, "done")

        on_thread(driver)
        assert machine.run(timeout=60).detail == "done"
    time.sleep(0.2)
    assert [t for t in threading.enumerate() if t.name.startswith("throttle")] == []
    assert progress["throttled"] < progress["free"] / 2, progress
    assert progress["again"] > progress["free"] / 2, progress
    assert progress["pause_ms"] < 500, progress  # not the 990 ms sleep
    assert_consecutive(counts(console.text))


def test_a_machine_paused_before_it_starts_starts_paused(on_thread) -> None:
    with boot("hello") as machine:
        assert machine.pause() and machine.state is RunState.PAUSED
        machine.start()
        time.sleep(0.3)
        assert console_of(machine).text == "" and machine.state is RunState.PAUSED
        machine.resume()
        result = machine.wait(30)
    assert result.reason is StopReason.DEBUG_EXIT and result.exit_code == 0
    assert console_of(machine).text.startswith("Hello from pyvmm guest")


def test_pause_after_the_end_and_from_a_vcpu_thread() -> None:
    refused: list[BaseException] = []
    with boot("dirty") as machine:

        def checkpoint(phase: int) -> None:
            try:
                machine.pause()
            except RuntimeError as err:
                refused.append(err)

        machine.pio.register(layout.CHECKPOINT_PORT, 4, Checkpoint(checkpoint), "checkpoint")
        result = machine.run(timeout=60)
        assert result.exit_code == 0
        assert machine.pause() is False and machine.state is RunState.STOPPED
    assert [str(e) for e in refused] == ["pause() on a vCPU thread would wait for itself"] * 2


# state


def test_a_paused_machine_moves_into_one_built_from_its_configuration(on_thread) -> None:
    """Every component's state, plus a copy of RAM, carried from a paused machine into a new
    one built from the first one's configuration: the new one continues the count exactly
    (its console picks up mid-line where the first one stopped)."""
    with boot("counter") as first:
        first.add_device("virtio-rng")
        console = console_of(first)
        saved_at: dict[str, int] = {}

        def driver() -> None:
            console.wait_for(r"count 3072\n", 30)
            assert first.pause()
            saved_at["r12"] = first.vcpus[0].get_regs().r12
            first.stop()

        on_thread(driver)
        first.run(timeout=60)
        saved = first.save()
        ram = first.memory.read(0, 64 * MiB)
    with Machine.from_config(saved.config, CaptureConsole()) as second:
        assert second.config == saved.config
        second.memory.write(0, ram)
        second.restore(saved)
        assert second.vcpus[0].get_regs().r12 == saved_at["r12"]
        assert second.save().config == saved.config
        second.start()
        target = (saved_at["r12"] // 1024 + 2) * 1024
        console_of(second).wait_for(rf"count {target}\n", 30)
        second.stop()
        second.wait()
    joined = console.text + console_of(second).text
    assert_consecutive(counts(joined))
    assert counts(console_of(second).text)[-1] >= target


def test_save_restore_save_gives_equal_states_for_every_component(
    tmp_path: Path, on_thread
) -> None:
    """A machine paused while it runs, with virtio devices and the PCI test device: saving,
    restoring that into it, and saving again gives the same state for every component. The
    exceptions are what runs on by itself: kvmclock, and the vCPU's TSC (test_kvm_state.py
    checks both run on by no more than the time taken)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"pyvmm sector zero\0".ljust(8 * 512, b"\0"))
    with boot("counter") as machine:
        machine.add_device("virtio-blk", path=str(disk))
        machine.add_device("virtio-rng")
        machine.add_device("pci-testdev")
        states: list[object] = []

        def driver() -> None:
            console_of(machine).wait_for(r"count 1024\n", 30)
            assert machine.pause()
            saved = machine.save()
            machine.restore(saved)
            states.extend((saved, machine.save()))
            machine.resume()
            console_of(machine).wait_for(r"count 3072\n", 30)
            machine.stop()

        on_thread(driver)
        machine.run(timeout=60)
    saved, again = states
    ids = [state.component for state in saved.components]
    assert ids[:4] == ["irqchip", "pit", "clock", "vcpu0"]
    assert {"com1", "rtc", "pci-bus", "pci/00:00.0", "pci/00:01.0", "pci/00:03.0"} <= set(ids)
    by_id = {state.component: state for state in again.components}
    for state in saved.components:
        if state.component == "clock":
            continue
        if state.component == "vcpu0":
            for s in (state, by_id["vcpu0"]):
                s.data["msrs"].pop(0x10)  # IA32_TSC
        assert by_id[state.component] == state, state.component
    assert_consecutive(counts(console_of(machine).text))


def test_a_state_of_unknown_version_or_another_machine_is_refused_and_changes_nothing() -> None:
    with boot("hello") as machine:
        machine.add_device("pci-testdev")
        saved = machine.save()
        rtc_before = machine.rtc.save()
        newer = [
            replace(s, version=s.version + 1) if s.component == "rtc" else s
            for s in saved.components
        ]
        with pytest.raises(StateError) as err:
            machine.restore(replace(saved, components=newer))
        assert str(err.value) == "rtc: saved RtcState is version 2; this pyvmm reads version 1 only"
        unknown = [*saved.components, replace(saved.components[0], component="gpu0")]
        with pytest.raises(StateError, match="has 'gpu0', which this machine does not have"):
            machine.restore(replace(saved, components=unknown))
        broken = [
            replace(s, data={"cmos": 5}) if s.component == "rtc" else s for s in saved.components
        ]
        with pytest.raises(StateError, match=r"rtc: fields missing"):
            machine.restore(replace(saved, components=broken))
        assert machine.rtc.save() == rtc_before
    with (
        boot("hello", mem=32 * MiB) as other,
        pytest.raises(
            StateError,
            match=r"differs from this one: RAM 64 MiB, not 32 MiB; "
            r"slot 1: pci-testdev\(\), not nothing",
        ),
    ):
        other.restore(saved)


def test_a_state_the_kernel_refuses_leaves_a_machine_that_neither_starts_nor_resumes() -> None:
    """vCPU registers that pass pyvmm's checks but not KVM's (a reserved CR4 bit): the
    restore fails, and the half-restored machine refuses to run on, paused or not started."""
    with boot("counter") as machine:
        console = console_of(machine)
        machine.start()
        console.wait_for(r"count 1024\n", 30)
        assert machine.pause()
        saved = machine.save()
        (vcpu0,) = [s for s in saved.components if s.component == "vcpu0"]
        sregs = uapi.kvm_sregs.from_buffer_copy(vcpu0.data["sregs"])
        sregs.cr4 |= 1 << 40
        bad = [
            replace(s, data={**s.data, "sregs": bytes(sregs)}) if s.component == "vcpu0" else s
            for s in saved.components
        ]
        with pytest.raises(StateError, match=r"vcpu0.*KVM_SET_SREGS"):
            machine.restore(replace(saved, components=bad))
        with pytest.raises(StateError, match=r"cannot run: restoring a state into it failed"):
            machine.resume()
        assert machine.state is RunState.PAUSED
        machine.stop()
        machine.wait()


def test_devices_are_added_by_kind_and_errors_are_one_line(tmp_path: Path) -> None:
    with boot("hello") as machine:
        with pytest.raises(Exception, match="unknown device kind 'gpu'"):
            machine.add_device("gpu")
        with pytest.raises(Exception, match=r"virtio-rng: got an unexpected keyword argument 'x'"):
            machine.add_device("virtio-rng", x=1)
        with pytest.raises(Exception, match="PCI slot 0 is taken by host-bridge"):
            machine.add_device("virtio-rng", slot=0)
        # options of the wrong type (a configuration from a stream may hold any JSON value)
        disk = tmp_path / "disk"
        disk.write_bytes(bytes(4096))
        with pytest.raises(ConfigError, match=r"virtio-blk: option path must be str, not int 5"):
            machine.add_device("virtio-blk", path=5)
        with pytest.raises(ConfigError, match=r"option read_only must be bool, not int 1$"):
            machine.add_device("virtio-blk", path=str(disk), read_only=1)
        with pytest.raises(ConfigError, match=r"option serial must be str \| None, not list"):
            machine.add_device("virtio-blk", path=str(disk), serial=["x"])
        machine.add_device("virtio-rng", slot=5)
        assert [d.slot for d in machine.config.devices] == [5]
        assert machine.run(timeout=30).exit_code == 0
        with pytest.raises(Exception, match="devices are added before the machine starts"):
            machine.add_device("virtio-rng")


def test_a_bug_inside_a_device_is_not_called_a_bad_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TypeError raised inside a device's constructor is a bug to see, with its traceback,
    not "options do not fit"."""

    def broken(machine: object) -> None:
        raise TypeError("a bug inside the device")

    monkeypatch.setattr("pyvmm.devices.pci.testdev.create", broken)
    with boot("hello") as machine, pytest.raises(TypeError, match="a bug inside the device"):
        machine.add_device("pci-testdev")


# device memory in the guest's address space


def test_device_memory_is_a_slot_the_guest_uses_without_exits_and_moves_with_its_bar() -> None:
    """The bar-mmap guest writes BAR4's device memory (an anonymous mapping standing in for a
    passed-through BAR) and its trapped page, then moves the BAR. The host sees every write in
    its mapping; the trapped page exits to Python, the device memory never does; it is not in
    the dirty log nor DMA-mapped; the BAR move moved its KVM slot."""
    with boot("bar-mmap", trace_exits=True) as machine:
        dev = machine.add_device("pci-testdev")
        assert isinstance(dev, PciTestDevice)
        base = dev.bar_address(MAPPED_BAR)
        (region,) = machine.address_space.regions(RegionKind.DEVICE)
        slot = region.slot
        dma = RecordingDma()
        machine.address_space.listen(GuestRamMapper(dma))
        machine.dirty.start()
        seen: dict[int, object] = {}

        def checkpoint(phase: int) -> None:
            words = struct.unpack_from("<16Q", dev.device_memory.view, 0)  # BAR page 1
            seen[phase] = {
                "words": words,
                "gpa": region.gpa,
                "slot": region.slot,
                "dirty": machine.dirty.collect(),
                "exits": list(machine.exits.trace or ()),
            }

        machine.pio.register(layout.CHECKPOINT_PORT, 4, Checkpoint(checkpoint), "checkpoint")
        result = machine.run(timeout=60)
        out = machine.console.text
        assert result.exit_code == 0, out
        assert out.splitlines() == [
            f"bar-mmap: testdev 00:{dev.devfn >> 3:02x}.0 bar4 {base:#x}",
            f"bar-mmap: wrote 240 words at {base + MAPPED_OFFSET:#x}",
            "bar-mmap: moved to 0xd0000000 ok",
            "bar-mmap: ext cap 0x000b v1 at 0x100",
            "bar-mmap: ext cap 0x000b v1 at 0x110",
            "bar-mmap: 2 extended capabilities",
        ]
        pattern = tuple(0x0101010101010101 * 2 + j for j in range(16))
        assert seen[1]["words"] == pattern
        assert (seen[1]["gpa"], seen[1]["slot"]) == (base + MAPPED_OFFSET, slot)
        assert (seen[2]["gpa"], seen[2]["slot"]) == (0xD000_0000 + MAPPED_OFFSET, slot)
        extra = 0x2108 - MAPPED_OFFSET
        assert dev.device_memory.view[extra : extra + 8] == b"\x5a" * 8
        assert dev.scratch[MAPPED_BAR][:4] == struct.pack("<I", 0xCAFEF00D)
        # No exit reached Python for the device memory, before the move or after it; the
        # trapped page did exit. After the move the old place is unmapped: the guest's one
        # read there exits (and reads all-ones).
        before = seen[1]["exits"]
        after = seen[2]["exits"][len(before) :]
        for start, trace in ((base, before), (0xD000_0000, after)):
            mmio = [addr for reason, addr in trace if reason == KvmExit.MMIO]
            assert not [a for a in mmio if start + MAPPED_OFFSET <= a < start + 0x10000]
            assert [a for a in mmio if start <= a < start + MAPPED_OFFSET]
        old_place = [a for r, a in after if r == KvmExit.MMIO and base <= a < base + 0x10000]
        assert old_place == [base + MAPPED_OFFSET]
        # only RAM is DMA-mapped, and only RAM is dirty-logged
        ram = {r.gpa: (r.host_addr, r.size) for r in machine.address_space.regions(RegionKind.RAM)}
        assert dma.mapped == ram
        for phase in (1, 2):
            assert [b.gpa for b in seen[phase]["dirty"]] == sorted(ram)
        with pytest.raises(AddressSpaceError, match="only RAM is dirty-logged"):
            machine.address_space.set_dirty_logging(region, True)
        # KVM's own view: the RAM slots log dirty pages, the device memory's slot does not
        for ram_region in machine.address_space.regions(RegionKind.RAM):
            machine.vm.get_dirty_log(ram_region.slot, ram_region.size)
        with pytest.raises(IoctlError, match=r"KVM_GET_DIRTY_LOG failed: No such file"):
            machine.vm.get_dirty_log(region.slot, region.size)


# the dirty log of pyvmm's own writes


def elf_symbol(path: Path, name: str) -> int:
    with path.open("rb") as f:
        symbols = ELFFile(f).get_section_by_name(".symtab")
        return symbols.get_symbol_by_name(name)[0]["st_value"]


def test_a_virtio_blk_read_into_guest_memory_is_dirty_though_kvm_never_saw_it(
    tmp_path: Path,
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"pyvmm sector zero\0".ljust(8 * 512, b"\xee"))
    buffer = elf_symbol(guest("virtio-blk"), "sector0")
    found: dict[str, set[int]] = {}
    with boot("virtio-blk") as machine:
        machine.add_device("virtio-blk", path=str(disk))

        def checkpoint(phase: int) -> None:
            bitmaps = machine.dirty.collect()
            if phase == 2:
                found["kvm"] = {a for b in bitmaps for a in b.addresses("kvm")}
                found["vmm"] = {a for b in bitmaps for a in b.addresses("vmm")}
                found["both"] = {a for b in bitmaps for a in b.addresses()}

        machine.pio.register(layout.CHECKPOINT_PORT, 4, Checkpoint(checkpoint), "checkpoint")
        machine.dirty.start()
        result = machine.run(timeout=60)
    assert result.exit_code == 0
    assert buffer % 4096 == 0
    assert buffer in found["vmm"] and buffer in found["both"]
    assert buffer not in found["kvm"]  # the guest never wrote that page: the device did


def test_pre_fault_is_for_a_machine_out_of_the_guest_and_gives_up_where_kvm_cannot(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where KVM pre-faults (the lab's, tests/lab/test_lab_pre_fault.py) pages get mapped; here
    the outcome of each way KVM can decline: no capability (this host's PVM KVM), shadow
    paging (EOPNOTSUPP, as expected: no warning), and any other error (one warning). Each
    leaves the pages to fault in as the guest touches them, and the machine never asks again."""
    with boot("counter") as machine:
        capable = machine.can_pre_fault  # (what this KVM says; a wrong request would turn it off)
        assert machine.pre_fault(MiB, MiB) is capable and machine.can_pre_fault is capable
        for errno_value, warned in ((errno.EOPNOTSUPP, False), (errno.EFAULT, True)):
            calls: list[tuple[int, int]] = []

            def refuse(
                gpa: int, size: int, errno_value: int = errno_value, calls: list = calls
            ) -> None:
                calls.append((gpa, size))
                raise IoctlError("KVM_PRE_FAULT_MEMORY", errno_value)

            monkeypatch.setattr(machine.vcpus[0], "pre_fault_memory", refuse)
            monkeypatch.setattr(machine, "_can_pre_fault", True)
            caplog.clear()
            assert not machine.pre_fault(MiB, 2 * MiB)
            assert not machine.pre_fault(MiB, 2 * MiB)
            assert calls == [(MiB, 2 * MiB)] and not machine.can_pre_fault
            assert any("not pre-faulting" in r.message for r in caplog.records) is warned
        machine.start()
        assert machine.state is RunState.RUNNING
        with pytest.raises(StateError, match="pause"):
            machine.pre_fault(MiB, MiB)
        machine.stop()
        machine.wait()


def test_running_machines_shorten_the_interpreters_switch_interval_then_give_it_back() -> None:
    """A vCPU exit needs the GIL: behind a thread running Python it would wait a switch
    interval (5 ms by default) for it, so while machines run the interval is short; a process
    that set a shorter one keeps it, and each gets its own back when the last machine stops."""
    before = sys.getswitchinterval()
    try:
        for chosen, running in ((0.005, VCPU_SWITCH_INTERVAL), (0.00005, 0.00005)):
            sys.setswitchinterval(chosen)
            with Machine(mem_size=32 << 20, console=CaptureConsole()) as first:
                first.load_elf(str(guest("counter")))  # (counts for ever)
                first.start()
                assert sys.getswitchinterval() == pytest.approx(running, abs=2e-6)  # (in µs)
                with Machine(mem_size=8 << 20) as second:
                    second.load_elf(str(guest("hello")))
                    assert second.run(timeout=30).exit_code == 0
                assert first.state is RunState.RUNNING
                assert sys.getswitchinterval() == pytest.approx(running, abs=2e-6)
            assert sys.getswitchinterval() == pytest.approx(chosen, abs=2e-6)
    finally:
        sys.setswitchinterval(before)
