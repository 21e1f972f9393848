"""The lab test tier: tests marked `@pytest.mark.lab` run inside the lab, from a plain `pytest`.

On the host, each selected lab test is replaced by a stand-in item with the same node id. The
first stand-in to run boots the lab once and runs every lab test there with one inner
`python -m pytest -m lab <node ids>`; that inner session (this plugin again, seeing
PYVMM_IN_LAB=1) appends one JSON line per test report to a file on the results share, and each
stand-in then passes, fails with the inner failure text, or skips with the inner reason. A
test counts once its teardown is reported; should QEMU itself crash (die of a signal) or the lab
hang past its budget or its machine reset itself, the tests left without a result run in one
more boot. When QEMU, busybox
or a lab kernel is missing, the stand-ins skip and say which.

A test asks for lab hardware with the marker's keywords: `@pytest.mark.lab(devices=("nvme",))`
adds devices to the one boot (edu is always there; `("igb",)` brings an SR-IOV PF and its VFs,
`igbvf` and `igbvf1` in PYVMM_LAB_DEVICES); `iommu="virtio"` puts the test in a second
boot with that IOMMU; `session="name"` puts it in a boot of its own for tests of that name (long
tests, such as Linux boots, each boot having the --lab-timeout budget); `tsc_skew_ppm=N` boots
the lab with its kernel told a TSC rate N ppm off the real one (pyvmm.lab.tsc); `before=callable` is
called on the host before the boot, for what must be prepared where the files are writable
(the host's root is read-only in the lab), such as building the test guests. A test's lab
markers (its module's, its own, a parameter's) add up, the nearest one (a parameter's first)
winning where two give a keyword.

Under pytest-xdist, pyvmm.lab.pytest_xdist puts each lab test in the xdist group of its lab
session, so that one worker runs a session's tests, in a boot of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pyvmm.lab import launcher, qemu
from pyvmm.lab.errors import LabCrashed, LabError, LabReset, LabTimeout, LabUnavailable
from pyvmm.lab.kmsg import KernelLog
from pyvmm.lab.protocol import Kind

ENV_IN_LAB = "PYVMM_IN_LAB"
ENV_RESULTS = "PYVMM_LAB_RESULTS"

DEFAULT_TIMEOUT = 540.0  # for each lab boot (session): keep each well under it
_OUTPUT_TAIL = 4000
#: Boots a session may take in all: when QEMU itself crashes (as QEMU 10.0's TCG rarely does,
#: asserting in iotlb_to_section) or the lab hangs past its budget (as its kernel now and then
#: does under the emulated virtio-iommu, or panics), the tests left without a result run again
#: in a new boot, once.
_MAX_BOOTS = 2
#: Markers the inner session evaluates; on the host they would judge the wrong machine.
_INNER_ONLY_MARKERS = frozenset(
    {"skip", "skipif", "xfail", "usefixtures", "parametrize", "kvm"}  # (the lab has its KVM)
)


def in_lab() -> bool:
    return os.environ.get(ENV_IN_LAB) == "1"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyvmm lab")
    group.addoption(
        "--lab-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="stop a lab boot after S seconds (default %(default)g)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if in_lab():
        if os.environ.get(ENV_RESULTS):
            config.pluginmanager.register(ResultWriter(Path(os.environ[ENV_RESULTS])))
        return
    config.pluginmanager.register(LabTier(config), "pyvmm-lab-tier")


# -- inside the lab ------------------------------------------------------------------------------


class ResultWriter:
    """Appends each test report to a JSON-lines file, flushed at once (partial runs count). A
    failure carries what the lab's kernel logged during its test: when a test hangs or fails in
    the lab, the reason is as often in the lab's kernel (an IOMMU fault, a stalled vCPU, an
    oops) as in the test's own output."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kernel_log = KernelLog()

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.kernel_log.skip_to_end()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        sections = list(report.sections) if report.failed else []
        if report.failed:
            sections.append(("lab kernel log during the test", self.kernel_log.read_new()))
        record = {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "longrepr": _skip_reason(report) if report.skipped else report.longreprtext,
            "crash": _crash_message(report),
            "wasxfail": getattr(report, "wasxfail", None),
            "sections": sections,
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _crash_message(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    return crash.message.splitlines()[0] if crash is not None and crash.message else ""


def _skip_reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return report.longreprtext


# -- on the host ---------------------------------------------------------------------------------


@dataclass
class InnerResult:
    """One test's outcome in the lab, folded from its setup, call and teardown reports."""

    outcome: str = "passed"  # passed, failed, skipped, xfailed
    text: str = ""
    #: its teardown was reported: a test the lab stopped in has reports that look like a pass
    finished: bool = False

    def add(self, record: dict[str, Any]) -> None:
        self.finished = self.finished or record["when"] == "teardown"
        if record["outcome"] == "failed" and self.outcome != "failed":
            self.outcome = "failed"
            where = "" if record["when"] == "call" else f" (in {record['when']})"
            sections = "".join(
                f"\n{'-' * 10} {title} {'-' * 10}\n{content}"
                for title, content in record["sections"]
            )
            headline = record.get("crash") or "failed"
            self.text = f"{headline} [in the lab{where}]\n\n{record['longrepr']}{sections}"
        elif record["outcome"] == "skipped" and self.outcome == "passed":
            self.outcome = "xfailed" if record["wasxfail"] is not None else "skipped"
            self.text = record["wasxfail"] or record["longrepr"]


def read_results(path: Path) -> dict[str, InnerResult]:
    results: dict[str, InnerResult] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                results.setdefault(record["nodeid"], InnerResult()).add(record)
    return results


class LabFailure(Exception):
    """A lab test failed inside the lab; the message is the inner report."""


@dataclass
class LabSession:
    """One lab boot running a group of lab tests (those sharing an IOMMU and a session name)."""

    iommu: str
    name: str = ""
    tsc_skew_ppm: int = 0  # the lab kernel is told its TSC runs this far off (pyvmm.lab.tsc)
    items: list[LabItem] = field(default_factory=list)
    results: dict[str, InnerResult] | None = None
    problem: str = ""  # why tests have no result, when the session went wrong

    def prepare(self) -> None:
        """Run the tests' `before` callables, each once."""
        done: list[Callable[[], object]] = []
        for item in self.items:
            if item.before is not None and item.before not in done:
                item.before()
                done.append(item.before)

    @property
    def devices(self) -> tuple[str, ...]:
        wanted = ["edu"]
        for item in self.items:
            wanted += [d for d in item.lab_devices if d not in wanted]
        return tuple(wanted)


class LabTier:
    """Host side of the tier: swaps lab tests for stand-ins and runs them in the lab."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.sessions: dict[tuple[str, str, int], LabSession] = {}
        #: each lab boot that had to be run again (the lab crashed, hung or reset), why
        self.retries: list[str] = []

    @pytest.hookimpl(trylast=True)  # after -m and -k have deselected
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        if not any(item.get_closest_marker("lab") for item in items):
            return
        unavailable = self._unavailable()
        for index, item in enumerate(items):
            if not item.get_closest_marker("lab"):
                continue
            stand_in = LabItem.from_parent(item.parent, name=item.name, original=item, tier=self)
            if unavailable:
                stand_in.skip_reason = f"lab unavailable: {unavailable}"
            else:
                session = self.sessions.setdefault(
                    stand_in.session_key,
                    LabSession(stand_in.iommu, stand_in.session_name, stand_in.tsc_skew_ppm),
                )
                session.items.append(stand_in)
            items[index] = stand_in

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        """Say, at the end of every run that booted the lab, how many lab boots had to be run
        again: a retry is a crash of the lab to explain, never noise."""
        booted = sum(1 for session in self.sessions.values() if session.results is not None)
        if not booted:
            return
        version = qemu.qemu_version(qemu.find_qemu())
        terminalreporter.write_sep(
            "-", f"lab: {booted} lab sessions on QEMU {version}, {len(self.retries)} retried"
        )
        for retry in self.retries:
            terminalreporter.write_line(f"lab retry: {retry}")

    def _unavailable(self) -> str:
        """Why the lab cannot run on this host (so its tests skip), or "" if it can."""
        try:
            prereq = launcher.prerequisites(launcher.LabOptions())
            launcher.hidden_dirs(launcher.needed_paths(str(self.config.rootpath), prereq.kernel))
        except LabUnavailable as exc:
            return str(exc)
        except LabError:
            return ""  # a real problem: the tests fail with it when they run
        return ""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        """Point a stand-in's skip at the test, not at the stand-in's code."""
        report = yield
        if isinstance(item, LabItem) and report.skipped and isinstance(report.longrepr, tuple):
            path, line, _ = item.reportinfo()
            report.longrepr = (str(path), (line or 0) + 1, report.longrepr[2])
        return report

    def result(self, item: LabItem) -> InnerResult:
        session = self.sessions[item.session_key]
        if session.results is None:
            self._run(session)
        assert session.results is not None
        found = session.results.get(item.inner_nodeid)
        if found is None:
            return InnerResult("failed", f"no result from the lab: {session.problem or 'unknown'}")
        if not found.finished:
            so_far = f"\n\nwhat it reported before:\n{found.text}" if found.text else ""
            return InnerResult(
                "failed", f"the lab stopped during this test: {session.problem}{so_far}"
            )
        return found

    def _run(self, session: LabSession) -> None:
        share = Path(tempfile.mkdtemp(prefix="pyvmm-lab-tier-"))
        self.config.add_cleanup(lambda: shutil.rmtree(share, ignore_errors=True))
        output = _Output(self.config)
        try:
            session.prepare()
        except (Exception, pytest.fail.Exception) as exc:
            session.problem = f"preparing on the host failed: {exc}"
            session.results = {}
            return
        session.results = {}
        stopped: LabCrashed | LabReset | LabTimeout | None = None
        for boot in range(1, _MAX_BOOTS + 1):
            left = [item.inner_nodeid for item in session.items if _rerun(session.results, item)]
            if not left:  # (QEMU died after the last test was done)
                return
            if stopped is not None:
                what = {LabCrashed: "QEMU crashed", LabReset: "the lab machine reset"}.get(
                    type(stopped), "the lab hung"
                )
                # tests run in order: the first left that had begun (or the first left) was on
                during = next((n for n in left if n in session.results), left[0])
                retry = (
                    f"{what} ({stopped}) during {during}; a new boot runs what it left "
                    f"without a result ({len(left)} of {len(session.items)} tests)"
                )
                self.retries.append(retry)
                output.line(f"lab: {retry}")
            try:
                self._boot(session, left, share / f"boot{boot}", output)
                return
            except (LabCrashed, LabReset, LabTimeout) as exc:
                session.problem = f"{exc}\n{output.tail()}"
                stopped = exc

    def _boot(self, session: LabSession, nodeids: list[str], share: Path, output: _Output) -> None:
        """Run `nodeids` in one lab boot; their results go into `session.results`."""
        share.mkdir()
        results = share / "results.jsonl"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "lab",
            "-p",
            "no:cacheprovider",  # the host's root is read-only inside
            "-q",
            *nodeids,
        ]
        options = launcher.LabOptions(
            iommu=session.iommu,
            devices=session.devices,
            timeout=self.config.getoption("--lab-timeout"),
            tsc_skew_ppm=session.tsc_skew_ppm,
            env={
                ENV_RESULTS: str(results),
                "HYPOTHESIS_STORAGE_DIRECTORY": str(share / "hypothesis"),
            },
        )
        output.line(
            f"lab: running {len(nodeids)} tests in QEMU "
            f"(iommu {session.iommu}, devices {', '.join(session.devices)}"
            f"{', session ' + session.name if session.name else ''}"
            f"{f', TSC told {session.tsc_skew_ppm} ppm off' if session.tsc_skew_ppm else ''})"
        )
        started = time.monotonic()
        assert session.results is not None
        try:
            result = launcher.run(
                command, options, cwd=str(self.config.rootpath), output=output.write, share=share
            )
        except (LabCrashed, LabReset, LabTimeout):
            raise
        except LabError as exc:
            session.problem = f"{exc}\n{output.tail()}"
        else:
            session.problem = f"inner pytest exited with status {result.exit_code}\n{output.tail()}"
            output.line(
                f"lab: booted in {result.boot_seconds:.1f} s, "
                f"{time.monotonic() - started:.1f} s in all"
            )
        finally:
            session.results.update(read_results(results))


def _rerun(results: dict[str, InnerResult], item: LabItem) -> bool:
    """Whether a new boot should run `item`: it has no result, or one the lab cut short
    before anything failed (a failure stands: running it again could only hide it)."""
    found = results.get(item.inner_nodeid)
    return found is None or (not found.finished and found.outcome != "failed")


class _Output:
    """The inner pytest's output: kept for failure reports; live on the terminal with -v."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.live = config.get_verbosity() > 0
        self.buffer = bytearray()

    def write(self, kind: Kind, data: bytes) -> None:
        self.buffer += data
        if self.live:
            self._terminal(data.decode(errors="replace"))

    def line(self, text: str) -> None:
        self._terminal(f"\n{text}\n")

    def _terminal(self, text: str) -> None:
        capture = self.config.pluginmanager.getplugin("capturemanager")
        reporter = self.config.pluginmanager.getplugin("terminalreporter")
        if reporter is None:
            return
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write(text)
            reporter.flush()

    def tail(self) -> str:
        return self.buffer[-_OUTPUT_TAIL:].decode(errors="replace")


def lab_keywords(item: pytest.Item) -> dict[str, Any]:
    """The keywords of all a test's lab markers: a parameter's first, then its own, its
    class's, its module's (pytest lists a parameter's marks after the function's)."""
    callspec = getattr(item, "callspec", None)
    parameter_marks = [m for m in (callspec.marks if callspec else ()) if m.name == "lab"]
    lab: dict[str, Any] = {}
    for marker in (*parameter_marks, *item.iter_markers("lab")):
        for key, value in marker.kwargs.items():
            lab.setdefault(key, value)
    return lab


def session_key(lab: dict[str, Any]) -> tuple[str, str, int]:
    """Which lab boot a test with these lab keywords runs in: (iommu, session, TSC skew)."""
    return (lab.get("iommu", "intel"), lab.get("session", ""), lab.get("tsc_skew_ppm", 0))


class LabItem(pytest.Item):
    """Stands in on the host for a lab test; its outcome is the one the test had in the lab."""

    def __init__(self, *, original: pytest.Item, tier: LabTier, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.original = original
        self.tier = tier
        for mark in original.own_markers:
            self.own_markers.append(mark)
            self.keywords[mark.name] = mark
        lab = lab_keywords(original)
        self.lab_devices: tuple[str, ...] = tuple(lab.get("devices", ()))
        self.iommu: str = lab.get("iommu", "intel")
        self.session_name: str = lab.get("session", "")
        self.tsc_skew_ppm: int = lab.get("tsc_skew_ppm", 0)
        self.session_key = session_key(lab)
        # the lab's pytest selects it by this; the host's may have added an xdist group to it
        self.inner_nodeid = self.nodeid
        self._nodeid = original.nodeid
        self.before: Callable[[], object] | None = lab.get("before")
        self.skip_reason: str | None = None

    def iter_markers_with_node(self, name: str | None = None) -> Iterator[tuple[Any, pytest.Mark]]:
        """The test's markers, less those only the inner session may judge (skipif, xfail, ...)."""
        for node, mark in super().iter_markers_with_node(name):
            if mark.name not in _INNER_ONLY_MARKERS:
                yield node, mark

    def setup(self) -> None:
        if self.skip_reason:
            pytest.skip(self.skip_reason)

    def runtest(self) -> None:
        result = self.tier.result(self)
        if result.outcome == "skipped":
            pytest.skip(result.text)
        if result.outcome == "xfailed":
            pytest.xfail(result.text)
        if result.outcome == "failed":
            raise LabFailure(result.text)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException]) -> Any:
        if isinstance(excinfo.value, LabFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.original.reportinfo()
