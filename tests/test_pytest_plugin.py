"""pyvmm's pytest plugin as a test writer meets it: installed with the package (its pytest11
entry point, no conftest), its machine and guest fixtures on this host's KVM, a failing test's
report showing what the guest said, the Linux-guest helper's script protocol, and the lab tier
under pytest-xdist (each lab session's tests on one worker, each worker booting its own lab;
the lab there is test_lab_host's fake QEMU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from guestbuild import guest, requires_kvm
from test_lab_host import FakeLab

from pyvmm.lab.errors import LabUnavailable
from pyvmm.lab.launcher import find_busybox
from pyvmm.testing.linux import BEGIN, STATUS, init_script, parse_console

USER_GUEST = r"""
#include <pyvmmfw.h>

int main(void)
{
    printf("a test writer's guest on %lu vCPUs\n", fw_nr_cpus);
    return 5;
}
"""

MACHINE_TESTS = """
import pytest

HELLO = {hello!r}

def test_a_machine_runs_the_guest_it_was_given(pyvmm_machine):
    machine = pyvmm_machine(guest=HELLO)
    machine.start()
    assert machine.wait(30).exit_code == 0
    assert "Hello" in machine.console.text

def test_a_users_guest_is_built_and_booted(pyvmm_machine, pyvmm_guest):
    machine = pyvmm_machine(vcpus=2, guest=pyvmm_guest("user.c"))
    machine.start()
    assert machine.wait(30).exit_code == 5
    assert "a test writer's guest on 2 vCPUs" in machine.console.text

def test_a_failing_test_shows_the_guests_console(pyvmm_machine):
    machine = pyvmm_machine(guest=HELLO)
    machine.start()
    machine.wait(30)
    assert machine.console.text == "something else"

@pytest.mark.kvm
def test_kvm_marked(): pass
"""


@requires_kvm
def test_the_installed_plugin_gives_machines_guests_and_failure_reports(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_guests=MACHINE_TESTS.format(hello=str(guest("hello"))))
    (pytester.path / "user.c").write_text(USER_GUEST)
    # a subprocess: the plugin is found through the installed entry point, not a conftest
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=3, failed=1)
    output = result.stdout.str()
    assert "plugins:" in output and "pyvmm-kvm" in output
    # the failure's report: the machine's end and its console's last lines
    report = output[output.index("test_a_failing_test_shows_the_guests_console") :]
    assert "pyvmm machine 0" in report
    assert "ended: debug-exit (exit code 0)" in report
    assert "| Hello" in report


def test_a_scripts_output_and_status_come_back_from_the_console() -> None:
    console = (
        "[    0.5] Linux booting\n"
        f"{BEGIN}\nhello\nfrom the guest\n\n{STATUS} 3\n"
        "[    1.0] reboot: Power down\n"
    )
    assert parse_console(console) == ("hello\nfrom the guest\n", 3)
    # output with no newline at its end: the status line still stands alone (init_script)
    assert parse_console(f"{BEGIN}\r\nhi\r\n{STATUS} 0\r\n") == ("hi", 0)
    assert parse_console(f"{BEGIN}\r\nhalf\r\n") == ("half\n", None)  # (it never finished)
    assert parse_console("Kernel panic\n") == ("", None)
    init = init_script("echo hi\nexit 3")
    assert "echo hi\nexit 3\n" in init and init.rstrip().endswith("poweroff -f")
    assert "sh /script </dev/null 2>&1" in init  # (no wait for input that never comes)
    assert f'printf "\\n{STATUS} %d\\n" $?' in init
    with pytest.raises(ValueError, match="may not contain"):
        init_script("cat <<PYVMM_SCRIPT_EOF")


XDIST_LAB_TESTS = """
import pytest

@pytest.mark.lab
def test_a1(): pass

@pytest.mark.lab
def test_a2(): pass

@pytest.mark.lab(session="other")
def test_b1(): pass

@pytest.mark.lab(session="other")
def test_b2(): pass

def test_host(): pass
"""


def test_under_xdist_each_lab_session_runs_once_on_one_worker(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed (pip install -e .[dev])")
    try:
        find_busybox()  # (the workers use the real one: the fake lab's is patched in-process)
    except LabUnavailable as err:
        pytest.skip(str(err))
    fake_lab = FakeLab(tmp_path, monkeypatch)
    monkeypatch.setenv("PYVMM_LAB_QEMU", str(tmp_path / "qemu-system-x86_64"))
    monkeypatch.setenv("PYVMM_LAB_KERNEL", str(fake_lab.kernel))
    monkeypatch.setenv("FAKE_QEMU_MODE", "record-boots")
    monkeypatch.delenv("PYVMM_IN_LAB", raising=False)
    pytester.makepyfile(XDIST_LAB_TESTS)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    boots = [json.loads(line) for line in (tmp_path / "boots.jsonl").read_text().splitlines()]
    ran = sorted(nodeid.split("::")[1] for boot in boots for nodeid in boot["nodeids"])
    assert ran == ["test_a1", "test_a2", "test_b1", "test_b2"]  # each once, in the lab
    assert sorted(sorted(n.split("::")[1] for n in boot["nodeids"]) for boot in boots) == [
        ["test_a1", "test_a2"],
        ["test_b1", "test_b2"],
    ]  # a boot per lab session, each with that session's tests only
    assert all(boot["worker"].startswith("gw") for boot in boots)  # booted by xdist workers
