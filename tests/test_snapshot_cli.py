"""The snapshot command line against the host's /dev/kvm: `pyvmm run --control`, `pyvmm ctl`,
`pyvmm snapshot` and `pyvmm restore`, as scripts use them, with the counter guest."""

from __future__ import annotations

import json
import re
import socket
import stat
import time
from pathlib import Path

import pytest
from counting import assert_consecutive, counts
from guestbuild import guest, requires_kvm
from processes import pyvmm, start_counter

pytestmark = [pytest.mark.kvm, requires_kvm]


def test_ctl_pauses_resumes_and_quits_a_running_machine(tmp_path: Path) -> None:
    control = tmp_path / "vm.sock"
    proc = start_counter(control)
    try:
        status = pyvmm("ctl", str(control), "status")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout) == {
            "status": "running", "vcpus": 1, "mem_size": 64 << 20, "devices": []
        }  # fmt: skip
        assert stat.S_IMODE(control.stat().st_mode) == 0o600  # the user's alone
        assert pyvmm("ctl", str(control), "pause").returncode == 0
        assert json.loads(pyvmm("ctl", str(control), "status").stdout)["status"] == "paused"
        assert pyvmm("ctl", str(control), "resume").returncode == 0
        bad = pyvmm("ctl", str(control), "snapshot", "stop=true")
        assert bad.returncode == 1
        assert bad.stderr == "pyvmm: error: snapshot: argument path is required\n"
        bad = pyvmm("ctl", str(control), "reboot")
        assert bad.returncode == 1
        assert "unknown command 'reboot'; known: hwpt-alloc, hwpt-attach, " in bad.stderr
        assert pyvmm("ctl", str(control), "quit").returncode == 0
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert err == "pyvmm: stopped: quit from the control socket\n"
    assert_consecutive(counts(out))
    assert not control.exists()  # removed when the machine ended


def test_the_control_socket_survives_garbage_and_answers_each_request(tmp_path: Path) -> None:
    control = tmp_path / "vm.sock"
    proc = start_counter(control)
    try:
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(control))
            reader = raw.makefile("rb")
            greeting = json.loads(reader.readline())
            assert "snapshot" in greeting["pyvmm"]["commands"]
            raw.sendall(b'not json\n[1, 2]\n{"execute": "status", "id": 7}\n')
            replies = [json.loads(reader.readline()) for _ in range(3)]
        assert replies[0]["error"]["desc"] == "the request is not valid JSON"
        assert "a request is an object" in replies[1]["error"]["desc"]
        assert replies[2]["id"] == 7 and replies[2]["return"]["status"] == "running"
        assert pyvmm("ctl", str(control), "quit").returncode == 0
        proc.communicate(timeout=30)
    finally:
        proc.kill()


@pytest.mark.parametrize("mode", [[], ["--copy"]], ids=["mmap", "copy"])
def test_snapshot_stop_then_restore_continues_the_count_in_the_same_console_file(
    tmp_path: Path, mode: list[str]
) -> None:
    """The restored machine prints where the original did (its --console file, appended to),
    and the file's count runs on with no line lost or repeated."""
    control, console, snap = tmp_path / "vm.sock", tmp_path / "console.txt", tmp_path / "snap"
    proc = start_counter(control, "--console", f"file:{console}")
    try:
        while len(counts(console.read_text())) < 3:
            time.sleep(0.02)
        taken = pyvmm("snapshot", str(control), str(snap), "--stop")
        assert taken.returncode == 0, taken.stderr
        assert re.fullmatch(
            rf"pyvmm: snapshot {snap}: 64 MiB of RAM, \d+ KiB of it written, in [\d.]+ ms\n",
            taken.stdout,
        )
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert err == f"pyvmm: stopped: snapshotted to {snap}\n"
    at_snapshot = counts(console.read_text())[-1]
    restored = pyvmm("restore", str(snap), *mode, "--timeout", "1")
    assert restored.returncode == 124, restored.stderr
    assert restored.stderr.startswith("pyvmm: stopped: timed out after 1.0 s\npyvmm:   vcpu0 ")
    assert restored.stdout == ""  # its console is the file, as the original's was
    after = counts(console.read_text())
    assert after[-1] > at_snapshot
    assert_consecutive(after)


def test_a_snapshot_while_running_leaves_the_machine_running(tmp_path: Path) -> None:
    control, snap = tmp_path / "vm.sock", tmp_path / "snap"
    proc = start_counter(control)
    try:
        assert pyvmm("snapshot", str(control), str(snap)).returncode == 0
        assert json.loads(pyvmm("ctl", str(control), "status").stdout)["status"] == "running"
        again = pyvmm("snapshot", str(control), str(snap))
        assert again.returncode == 1
        assert (
            again.stderr == f"pyvmm: error: {snap} exists: give a new directory for the snapshot\n"
        )
        assert json.loads(pyvmm("ctl", str(control), "status").stdout)["status"] == "running"
        assert pyvmm("ctl", str(control), "quit").returncode == 0
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert (snap / "state").is_file() and (snap / "memory").is_file()


def test_command_line_errors_are_one_line(tmp_path: Path) -> None:
    nothing = tmp_path / "none.sock"
    result = pyvmm("ctl", str(nothing), "status")
    assert result.returncode == 1
    assert result.stderr.startswith(f"pyvmm: error: cannot connect to the control socket {nothing}")
    assert result.stderr.count("\n") == 1
    result = pyvmm("restore", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr == (
        f"pyvmm: error: {tmp_path} is not a pyvmm snapshot (it has no state file)\n"
    )
    (tmp_path / "file").write_text("x")
    result = pyvmm("run", str(guest("hello")), "--control", str(tmp_path / "file"))
    assert result.returncode == 1
    assert "a file that is not a socket is there" in result.stderr


def test_an_incremental_snapshot_needs_a_full_one_and_then_restores(tmp_path: Path) -> None:
    control, console = tmp_path / "vm.sock", tmp_path / "console.txt"
    base, increment = tmp_path / "base", tmp_path / "increment"
    proc = start_counter(control, "--console", f"file:{console}")
    try:
        refused = pyvmm("snapshot", str(control), str(increment), "--incremental")
        assert refused.returncode == 1
        assert refused.stderr == (
            "pyvmm: error: no earlier snapshot of this machine to build on: take a full one\n"
        )
        assert pyvmm("snapshot", str(control), str(base)).returncode == 0
        while len(counts(console.read_text())) < 5:
            time.sleep(0.02)
        taken = pyvmm("snapshot", str(control), str(increment), "--incremental", "--stop")
        assert taken.returncode == 0, taken.stderr
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    at_snapshot = counts(console.read_text())[-1]
    restored = pyvmm("restore", str(increment), "--timeout", "1")
    assert restored.returncode == 124, restored.stderr
    after = counts(console.read_text())
    assert after[-1] > at_snapshot
    assert_consecutive(after)
