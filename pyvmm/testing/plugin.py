"""pyvmm's pytest plugin: installing pyvmm-kvm is enough (entry point `pytest11: pyvmm`; turn it
off with `-p no:pyvmm`). docs/testing.md shows it at work.

Markers:
- `lab(devices=..., iommu=..., session=..., before=...)`: the test runs inside the lab (QEMU
  with an emulated IOMMU, emulated PCI devices bound to vfio-pci, nested KVM), from a plain
  `pytest` on the host (pyvmm.lab.pytest_plugin says how). Under pytest-xdist (`-n N`) each
  lab boot's tests go to one worker (xdist's `loadgroup`), so each worker boots labs of its own.
- `kvm`: the test needs /dev/kvm; it is skipped, saying so, where there is none.

Fixtures:
- `pyvmm_machine`: makes Machines (`pyvmm_machine(mem_size=..., vcpus=..., guest=ELF)`), each
  closed after the test; a failing test's report shows each one's console tail and how it ended.
- `pyvmm_guest`: builds a freestanding C test guest against the packaged firmware runtime
  (what `pyvmm guest build` does), once per source and session; returns the ELF's path.
- `linux_guest`: runs a shell script in a Linux guest (`linux_guest("cat /proc/cpuinfo")`),
  returning its output and exit status (pyvmm.testing.linux); skipped where no lab kernel is.
- `lab_devices`, `vfio_device`, `mdev`: inside the lab, its devices by name ({"edu": BDF}),
  the BDF of the first device the test's lab marker asked for (edu if none), and a maker of
  mdevs (`mdev("mtty-2")` gives a UUID), all removed after the test.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pyvmm.board.machine import Machine
    from pyvmm.testing.linux import LinuxRun

pytest_plugins = ("pyvmm.lab.pytest_plugin", "pyvmm.lab.pytest_xdist")

CONSOLE_TAIL_LINES = 30
_MACHINES: pytest.StashKey[list[Machine]] = pytest.StashKey()
_LINUX_RUNS: pytest.StashKey[list[LinuxRun]] = pytest.StashKey()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: needs /dev/kvm (skipped, saying so, without it)")
    config.addinivalue_line(
        "markers",
        "lab(devices=(), iommu='intel', session='', before=None): runs inside the lab "
        "(pyvmm's QEMU machine with an emulated IOMMU and devices on vfio-pci)",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm") and not os.path.exists("/dev/kvm"):
        pytest.skip("needs /dev/kvm, which this host does not have")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test's report gets what its guests said: each machine's console tail and
    how it ended, and each Linux guest's run."""
    report: pytest.TestReport = yield
    if report.failed and report.when == "call":
        for index, machine in enumerate(item.stash.get(_MACHINES, [])):
            report.sections.append((f"pyvmm machine {index}", describe(machine)))
        for index, run in enumerate(item.stash.get(_LINUX_RUNS, [])):
            report.sections.append((f"pyvmm linux guest {index}", run.summary()))
    return report


def describe(machine: Machine) -> str:
    """How a machine stands or ended, and its console's last lines."""
    from pyvmm.board.machine import RunState

    state = machine.state
    lines = [f"state: {state.value}"]
    if state is RunState.STOPPED:
        ended = machine.wait(0)
        lines.append(f"ended: {ended.reason.value} (exit code {ended.exit_code}) {ended.detail}")
        lines += [f"  {line}" for line in (*ended.crash, *ended.vcpus)]
    lines.append("console (last lines):")
    lines += [f"| {line}" for line in machine.console_tail.lines(CONSOLE_TAIL_LINES)]
    return "\n".join(lines)


@pytest.fixture
def pyvmm_machine(request: pytest.FixtureRequest) -> Iterator[Callable[..., Machine]]:
    """Makes Machines: `pyvmm_machine(mem_size=64 << 20, vcpus=1, guest=None, **options)`, a
    console captured (`machine.console.text`, `.wait_for(regex, timeout)`) unless one is given;
    with `guest`, that ELF is loaded. Every one is closed after the test."""
    from pyvmm.board.machine import Machine
    from pyvmm.machine.console import CaptureConsole

    made: list[Machine] = []
    request.node.stash[_MACHINES] = made

    def make(
        mem_size: int = 64 << 20,
        vcpus: int = 1,
        *,
        guest: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> Machine:
        options.setdefault("console", CaptureConsole())
        machine = Machine(mem_size=mem_size, vcpus=vcpus, **options)
        made.append(machine)
        if guest is not None:
            machine.load_elf(os.fspath(guest))
        return machine

    yield make
    with contextlib.ExitStack() as closing:  # (each one closed, whatever another's close raised)
        for machine in made:
            closing.callback(machine.close)


@pytest.fixture(scope="session")
def pyvmm_guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Builds a C test guest (`#include <pyvmmfw.h>`) and returns its ELF: once per source
    file in a session (pyvmm.commands.guest.build_guest; a compile error fails the test with
    gcc's messages)."""
    from pyvmm.commands.guest import build_guest
    from pyvmm.errors import PyvmmError

    built: dict[Path, Path] = {}
    where = tmp_path_factory.mktemp("pyvmm-guests")

    def build(source: str | os.PathLike[str]) -> Path:
        path = Path(source).resolve()
        if path not in built:
            output = where / f"{path.stem}-{len(built)}.elf"
            try:
                build_guest(str(path), str(output))
            except PyvmmError as err:
                pytest.fail(f"building the guest {path} failed: {err}", pytrace=False)
            built[path] = output
        return built[path]

    return build


@pytest.fixture
def linux_guest(request: pytest.FixtureRequest) -> Callable[..., LinuxRun]:
    """Runs a shell script as a Linux guest's whole userspace: `linux_guest(script, mem="256M",
    cpus=1, pyvmm_args=(), kernel=None, timeout=150)` returns `.output`, `.status` (None if
    it never finished), `.console`; skipped, saying why, where no lab kernel is found."""
    from pyvmm.lab.errors import LabUnavailable
    from pyvmm.testing.linux import run_script

    runs: list[LinuxRun] = []
    request.node.stash[_LINUX_RUNS] = runs

    def run(script: str, **options: Any) -> LinuxRun:
        try:
            result = run_script(script, **options)
        except LabUnavailable as err:  # no kernel or busybox
            pytest.skip(f"no Linux guest here: {err}")
        runs.append(result)
        return result

    return run


@pytest.fixture
def lab_devices() -> dict[str, str]:
    """Inside the lab: its devices as the lab reports them ({"edu": BDF, ...}), each on
    vfio-pci but an SR-IOV PF ("igb", on its own driver), whose VFs ("igbvf", "igbvf1") are."""
    pairs = os.environ.get("PYVMM_LAB_DEVICES", "")
    if not pairs:
        pytest.skip("not inside the lab: mark the test with @pytest.mark.lab")
    return dict(pair.split("=", 1) for pair in pairs.split(",") if pair)


@pytest.fixture
def vfio_device(request: pytest.FixtureRequest, lab_devices: dict[str, str]) -> str:
    """Inside the lab: the BDF of the first device the test's lab marker asks for (edu if it
    asks for none), bound to vfio-pci."""
    from pyvmm.lab.pytest_plugin import lab_keywords

    wanted = [*lab_keywords(request.node).get("devices", ()), "edu"]
    name = next(device for device in wanted if device != "igb")
    return lab_devices[name]


@pytest.fixture
def mdev() -> Iterator[Callable[..., str]]:
    """Inside the lab: makes mdevs (`mdev("mtty-2")` gives its UUID; /sys/bus/mdev/devices/UUID
    is what `--vfio-dev` takes), every one removed after the test."""
    from pyvmm.vfio.sysfs import Sysfs

    sysfs = Sysfs("/")
    made: list[str] = []

    def make(type_id: str, parent: str | None = None) -> str:
        uuid = sysfs.create_mdev(type_id, parent)
        made.append(uuid)
        return uuid

    try:
        yield make
    finally:
        for uuid in made:
            sysfs.remove_mdev(uuid)
