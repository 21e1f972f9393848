"""Every test guest on this host's KVM: output, exit codes, interrupts, doorbells, dirty log."""

from __future__ import annotations

import datetime
import re
import signal
import subprocess
import sys
import threading

import pytest
from guestbuild import guest, requires_kvm

from pyvmm.board.machine import Machine, StopReason
from pyvmm.devices.pci.testdev import BARS, PciTestDevice
from pyvmm.devices.testports import BenchSink, Checkpoint
from pyvmm.kvm.eventfd import EventFd
from pyvmm.machine import layout
from pyvmm.machine.console import CaptureConsole
from pyvmm.uapi.kvm import KvmExit

pytestmark = [pytest.mark.kvm, requires_kvm]

MiB = layout.MiB
COM1_PORTS = range(layout.COM1_PORT, layout.COM1_PORT + 8)


def boot(name: str, *, mem: int = 64 * MiB, cpus: int = 1, **kwargs: object) -> Machine:
    machine = Machine(mem_size=mem, vcpus=cpus, console=CaptureConsole(), **kwargs)
    machine.load_elf(str(guest(name)))
    return machine


def test_hello_via_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", str(guest("hello")), "-m", "32M", "-c", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Hello from pyvmm guest", "ram=32M cpus=2"]
    assert result.stderr == ""


def test_hello_via_api_reports_ram_and_cpus() -> None:
    with boot("hello", mem=48 * MiB, cpus=3) as machine:
        result = machine.run(timeout=30)
        assert result.reason is StopReason.DEBUG_EXIT
        assert result.exit_code == 0
        assert machine.console.text.splitlines() == ["Hello from pyvmm guest", "ram=48M cpus=3"]


def test_console_to_file(tmp_path) -> None:
    log = tmp_path / "console.log"
    result = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", str(guest("hello")), "--console", f"file:{log}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert log.read_text().startswith("Hello from pyvmm guest\n")


def test_pci_probe_lists_host_bridge_and_assigned_bars() -> None:
    with boot("pci-probe") as machine:
        testdev = PciTestDevice()
        slot = machine.pci.plug(testdev)
        result = machine.run(timeout=60)
        out = machine.console.text
    assert result.exit_code == 0, out
    assert "pci 00:00.0 8086:0d57 class 060000" in out
    assert f"pci 00:{slot:02x}.0 5056:0001 class ff0000" in out
    assert "pci: 2 functions" in out
    printed = {
        int(m[1]): (m[2], int(m[3], 16), int(m[4], 16))
        for m in re.finditer(r"bar(\d) (\w+) 0x([0-9a-f]+) size 0x([0-9a-f]+)", out)
    }
    kinds = {"mem32": "mem", "io": "io", "mem64": "mem64"}
    assert set(printed) == {bar.index for bar in BARS}
    for bar in BARS:
        kind, base, size = printed[bar.index]
        assert (kind, size) == (kinds[bar.kind.value], bar.size)
        assert base == testdev.bar_address(bar.index)
        assert base % size == 0
        if kind == "io":
            assert layout.PCI_IO_BASE <= base < layout.PCI_IO_BASE + layout.PCI_IO_SIZE
        else:
            assert layout.PCI_MMIO_BASE <= base < layout.PCI_MMIO_BASE + layout.PCI_MMIO_SIZE


def test_interrupts_msi_via_irqfd_and_ioapic_pin_without_python_exits() -> None:
    """The host raises an MSI (GSI route + irqfd) and an IOAPIC pin (irqfd on GSI 10); the
    guest's handlers run and no vCPU exit reaches Python between the eventfd write and the
    guest printing that its handler ran."""
    with boot("interrupts", trace_exits=True) as machine:
        console = machine.console
        assert isinstance(console, CaptureConsole)
        msi, pin = EventFd(), EventFd()
        gsi = machine.gsi.allocate_gsi()
        machine.gsi.set_msi(gsi, layout.LAPIC_BASE, 0x40)
        machine.vm.irqfd(msi.fd, gsi)
        machine.vm.irqfd(pin.fd, 10)
        marks: dict[str, int] = {}
        errors: list[BaseException] = []

        def host() -> None:
            try:
                console.wait_for("interrupts: ready\n", 30)
                marks["msi"] = machine.exits.count
                msi.signal()
                console.wait_for("msi: vector 0x40 count 1\n", 30)
                marks["pin"] = machine.exits.count
                pin.signal()
            except BaseException as err:  # reported by the test thread
                errors.append(err)
                machine.stop()

        driver = threading.Thread(target=host)
        driver.start()
        result = machine.run(timeout=60)
        driver.join()
        msi.close()
        pin.close()
        assert not errors, errors
        assert result.exit_code == 0, console.text
        assert "ioapic: vector 0x41 count 1" in console.text
        trace = list(machine.exits.trace or ())
        for mark in ("msi", "pin"):
            after = trace[marks[mark] :]
            # The guest was halted when the eventfd was written; the next exit is its own
            # console output from the handler's aftermath, never an interrupt-related exit.
            assert after, "no exits after the interrupt"
            reason, port = after[0]
            assert reason == KvmExit.IO and port in COM1_PORTS, after[:5]


def test_ioeventfd_doorbell_writes_cause_no_python_exit() -> None:
    """The exits guest writes N times to port 0x510; with an ioeventfd on that port every write
    is counted by the eventfd in the kernel and none exits to Python."""
    iterations = 500
    with boot("exits", trace_exits=True) as machine:
        sink = BenchSink(iterations)
        machine.pio.register(layout.BENCH_SINK_PORT, 4, sink, "bench")
        doorbell = EventFd()
        machine.vm.ioeventfd(doorbell.fd, layout.BENCH_SINK_PORT, 4, pio=True)
        result = machine.run(timeout=60)
        assert result.exit_code == 0
        assert doorbell.read() == iterations
        assert sink.writes == 0
        port_exits = [p for r, p in machine.exits.trace or () if p == layout.BENCH_SINK_PORT]
        assert port_exits == [layout.BENCH_SINK_PORT]  # only the inl that fetched N
        doorbell.close()


def test_python_handled_port_writes_are_all_seen() -> None:
    iterations = 300
    with boot("exits") as machine:
        sink = BenchSink(iterations)
        machine.pio.register(layout.BENCH_SINK_PORT, 4, sink, "bench")
        result = machine.run(timeout=60)
        assert result.exit_code == 0
        assert sink.writes == iterations


def _dirty_set(rule) -> set[int]:
    region = 0x2000000
    return {region + i * 4096 for i in range(256) if rule(i)}


def test_exit_stats_count_every_exit_by_device_and_offset() -> None:
    """`pyvmm run --exit-stats`: the exits guest's 300 bench-port writes (no ioeventfd) show up
    as one row, named by the device, beside the debug-exit row."""
    iterations = 300
    with boot("exits", trace_exits=True) as machine:
        machine.pio.register(layout.BENCH_SINK_PORT, 4, BenchSink(iterations), "bench")
        assert machine.run(timeout=60).exit_code == 0
        rows = {(kind, where): count for kind, where, count in machine.exits.summary()}
    assert rows["pio", "bench+0x0"] == iterations + 1  # and the inl that fetched N
    assert rows["pio", "debug-exit+0x0"] == 1
    assert sum(rows.values()) == machine.exits.count


def test_exit_stats_from_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", str(guest("hello")), "--exit-stats"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert re.fullmatch(r"pyvmm: \d+ exits to pyvmm, by kind and place:", lines[0])
    assert re.search(r"^\s+1\s+[\d.]+%\s+pio\s+debug-exit\+0x0$", result.stderr, re.M)


def test_rtc_guest_reads_the_host_clock_through_the_cmos_ports() -> None:
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    with boot("rtc") as machine:
        result = machine.run(timeout=30)
        text = machine.console.text
    after = datetime.datetime.now(datetime.UTC)
    assert result.exit_code == 0, text
    stamp = re.search(r"rtc: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\n", text)
    assert stamp, text
    read = datetime.datetime.fromisoformat(stamp[1]).replace(tzinfo=datetime.UTC)
    assert before <= read <= after
    assert "rtc: regB=0x2 regD=0x80\n" in text  # 24-hour BCD; valid RAM and time


def test_dirty_log_reports_exactly_the_pages_the_guest_wrote() -> None:
    region = range(0x2000000, 0x2000000 + 256 * 4096)
    seen: dict[int, set[int]] = {}
    by_vmm: dict[int, set[int]] = {}
    with boot("dirty") as machine:

        def checkpoint(phase: int) -> None:
            bitmaps = machine.dirty.collect()
            seen[phase] = {p for b in bitmaps for p in b.addresses() if p in region}
            by_vmm[phase] = {p for b in bitmaps for p in b.addresses("vmm") if p in region}

        machine.pio.register(layout.CHECKPOINT_PORT, 4, Checkpoint(checkpoint), "checkpoint")
        machine.dirty.start()
        result = machine.run(timeout=60)
        out = machine.console.text
    assert result.exit_code == 0, out
    phase1 = _dirty_set(lambda i: i % 3 == 0)
    phase2 = _dirty_set(lambda i: i % 7 == 1 or i == 255)
    assert f"dirty: phase 1 count {len(phase1)}" in out
    assert f"dirty: phase 2 count {len(phase2)}" in out
    assert seen[1] == phase1
    assert seen[2] == phase2  # reading the log at phase 1 re-armed it
    assert by_vmm == {1: set(), 2: set()}  # the guest wrote them, not pyvmm


def test_triple_fault_is_reported_not_hidden() -> None:
    """A vCPU whose page tables lie outside RAM cannot fetch an instruction; with no IDT the
    fault escalates to a triple fault, which must end the run with an error, not exit code 0."""
    with boot("hello") as machine:
        sregs = machine.vcpus[0].get_sregs()
        sregs.cr3 = 0x40000000
        machine.vcpus[0].set_sregs(sregs)
        result = machine.run(timeout=30)
    assert result.reason in (StopReason.TRIPLE_FAULT, StopReason.ERROR)
    assert result.exit_code != 0
    assert "vcpu0" in result.detail


def test_an_interrupted_run_says_where_each_vcpu_was() -> None:
    """Ctrl-C on a guest that seems hung is a question: where is it? Answered as a timeout is."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvmm", "run", str(guest("ticker")), "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("ticker: ")  # running, its timer programmed
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(30) == 130
    first, where = err.strip().splitlines()
    assert first == "pyvmm: stopped: interrupted"
    assert re.fullmatch(r"pyvmm:   vcpu0 (halted|runnable) at rip 0x[0-9a-f]+, .*", where), where


def test_a_crash_leaves_a_report_a_developer_can_act_on() -> None:
    """`pyvmm run` of a guest that triple-faults: exit 1, and on stderr the vCPU's registers
    (here the #UD's rip, with no IDT: the idt's limit 0), the event in flight, the exit pyvmm
    handled before (the port write of the line's last byte) and the console's last lines."""
    done = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", str(guest("crash")), "--timeout", "30"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stdout == "crash: about to fault\n"
    lines = done.stderr.splitlines()
    assert lines[0] == "pyvmm: triple-fault: vcpu0: guest triple-faulted (reset)", done.stderr
    assert re.fullmatch(
        r"pyvmm:   vcpu0 rip=0x[0-9a-f]+ rsp=0x[0-9a-f]+ rflags=0x[0-9a-f]+ .*", lines[1]
    )
    assert re.fullmatch(
        r"pyvmm:   vcpu0 cr0=0x[0-9a-f]+ cr2=0x[0-9a-f]+ cr3=0x[0-9a-f]+ .*", lines[2]
    )
    assert re.fullmatch(r"pyvmm:   vcpu0 idt=0x[0-9a-f]+\+0x[0-9a-f]+ gdt=.*", lines[3])
    assert re.fullmatch(
        r"pyvmm:   vcpu0 in flight: .*; last exit to pyvmm: port out 0x3f8 \(1 bytes\)", lines[4]
    ), lines[4]
    assert lines[5:] == ["pyvmm:   the console's last lines:", "pyvmm:   | crash: about to fault"]


def test_a_console_reader_that_goes_away_costs_the_guest_nothing() -> None:
    """`pyvmm run GUEST | head -1`: once the reader is gone, the guest's output is dropped
    without a traceback and the guest's exit code still comes through."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvmm", "run", str(guest("counter")), "--timeout", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"counter: at 0x1f00000 in r12\n"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 124
    first, where = err.strip().splitlines()
    assert first == "pyvmm: stopped: timed out after 3.0 s"
    assert re.fullmatch(r"pyvmm:   vcpu0 runnable at rip 0x[0-9a-f]+, interrupts off, .*", where)


def test_a_run_that_times_out_says_where_each_vcpu_was() -> None:
    """A guest that hung is asked first where it is: a halted ticker with interrupts on and its
    periodic timer armed on the vector it programmed."""
    done = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", str(guest("ticker")), "--timeout", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 124
    first, where = done.stderr.strip().splitlines()
    assert first == "pyvmm: stopped: timed out after 1.0 s"
    assert re.fullmatch(
        r"pyvmm:   vcpu0 halted at rip 0x[0-9a-f]+, interrupts on, "
        r"(vector 0x30 (pending|in service), )*timer periodic, \d+ bus ticks left \(vector 0x30\)",
        where,
    ), where
