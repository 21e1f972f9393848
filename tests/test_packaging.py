"""pyvmm for test writers, outside this checkout: `pyvmm guest build` turns a user's C file into
a test guest against the runtime pyvmm carries, and a wheel installed into a fresh virtualenv
boots its packaged demo guest, builds a guest with nothing from the checkout, and runs a user's
tests with its pytest plugin: on this host, and in the lab, from under /tmp."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from guestbuild import ROOT, requires_kvm
from processes import pyvmm

from pyvmm.lab import launcher
from pyvmm.lab.errors import LabUnavailable

pytestmark = [pytest.mark.kvm, requires_kvm]

GUEST = """\
#include <pyvmmfw.h>

int main(void)
{
    printf("a user's guest: %lu MiB, %lu vCPUs\\n", fw_ram_bytes >> 20, fw_nr_cpus);
    return 7;
}
"""


USERS_TEST = """
from pathlib import Path

from pyvmm.guest_files import demo_guest

def test_the_demo_guest(pyvmm_machine):
    machine = pyvmm_machine(guest=demo_guest())
    machine.start()
    assert machine.wait(30).exit_code == 0
    assert "Hello from pyvmm guest" in machine.console.text

def test_a_guest_of_mine(pyvmm_machine, pyvmm_guest):
    machine = pyvmm_machine(vcpus=2, guest=pyvmm_guest(Path(__file__).parents[1] / "mine.c"))
    machine.start()
    assert machine.wait(30).exit_code == 7
"""


def run(
    command: list[str],
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: Path | str = "/",
) -> subprocess.CompletedProcess[str]:
    """`command` run from `cwd`, by default / (nothing of the checkout in reach)."""
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, env=env, check=False, timeout=timeout
    )


def test_a_users_c_file_builds_into_a_guest_that_runs(tmp_path: Path) -> None:
    source = tmp_path / "mine.c"
    source.write_text(GUEST)
    built = pyvmm("guest", "build", str(source))
    assert built.returncode == 0, built.stderr
    image = tmp_path / "mine.elf"
    assert built.stdout.strip() == str(image) and image.read_bytes()[:4] == b"\x7fELF"
    booted = pyvmm("run", str(image), "-c", "2")
    assert (booted.returncode, booted.stdout) == (7, "a user's guest: 64 MiB, 2 vCPUs\n")


def test_a_compile_error_is_shown_and_the_build_fails(tmp_path: Path) -> None:
    source = tmp_path / "broken.c"
    source.write_text("#include <pyvmmfw.h>\nint main(void) { return no_such_thing; }\n")
    built = pyvmm("guest", "build", str(source), "-o", str(tmp_path / "out.elf"))
    assert built.returncode == 1
    assert "no_such_thing" in built.stderr and "undeclared" in built.stderr  # (gcc's message)
    assert built.stderr.splitlines()[-1] == (
        "pyvmm: error: broken.c did not build (the compiler's messages are above)"
    )
    assert not (tmp_path / "out.elf").exists()
    missing = pyvmm("guest", "build", str(tmp_path / "nope.c"))
    assert (missing.returncode, missing.stderr) == (
        1,
        f"pyvmm: error: {tmp_path}/nope.c: no such file\n",
    )


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As a new user installs it: the wheel built from this tree, installed with its
    dependencies from the package index into a fresh virtualenv (under /tmp), pytest beside
    it; the virtualenv's directory."""
    top = tmp_path_factory.mktemp("wheel")
    wheels = top / "wheels"
    built = run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("pyvmm_kvm-*.whl")
    home = top / "venv"
    venv.create(home, with_pip=True)
    python = str(home / "bin" / "python")
    installed = run([python, "-m", "pip", "install", "-q", str(wheel), "pytest"], timeout=600)
    assert installed.returncode == 0, installed.stderr
    where = run([python, "-c", "import pyvmm; print(pyvmm.__file__)"])
    assert where.stdout.startswith(str(home)), where.stdout  # (not this checkout)
    return home


def test_the_wheel_works_in_a_fresh_virtualenv_outside_the_checkout(
    wheel_venv: Path, tmp_path: Path
) -> None:
    """From /: the demo, a guest of the user's own, and pytest finding pyvmm's plugin with no
    conftest."""
    home, python = wheel_venv, str(wheel_venv / "bin" / "python")
    demo = run([str(home / "bin" / "pyvmm"), "run", "--demo"])
    assert (demo.returncode, demo.stdout) == (0, "Hello from pyvmm guest\nram=64M cpus=1\n")
    source = tmp_path / "mine.c"
    source.write_text(GUEST)
    env_home = {**os.environ, "PYVMM_CACHE": str(tmp_path / "cache")}  # (a user's own cache)
    built_guest = run(
        [str(home / "bin" / "pyvmm"), "guest", "build", str(source)], timeout=300, env=env_home
    )
    assert built_guest.returncode == 0, built_guest.stderr
    booted = run([str(home / "bin" / "pyvmm"), "run", str(tmp_path / "mine.elf")])
    assert (booted.returncode, booted.stdout) == (7, "a user's guest: 64 MiB, 1 vCPUs\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_mine.py").write_text(USERS_TEST)
    tested = run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "tests")],
        timeout=300,
        env=env_home,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "2 passed" in tested.stdout


LAB_TEST = """
import os

import pytest

from pyvmm.guest_files import demo_guest

@pytest.mark.lab
def test_in_the_lab(vfio_device, pyvmm_machine):
    driver = os.path.realpath(f"/sys/bus/pci/devices/{vfio_device}/driver")
    assert os.path.basename(driver) == "vfio-pci"
    machine = pyvmm_machine(guest=demo_guest())  # (on the lab's KVM)
    machine.start()
    assert machine.wait(60).exit_code == 0
"""


def test_a_lab_test_runs_from_the_wheel_in_a_directory_the_lab_has_its_own_of(
    wheel_venv: Path, tmp_path: Path
) -> None:
    """The lab boots its own /tmp: the virtualenv and the tests, both under the host's /tmp,
    are shared into it at their own paths, and a lab test runs there from the wheel."""
    try:
        launcher.prerequisites(launcher.LabOptions())
    except LabUnavailable as err:
        pytest.skip(f"lab unavailable: {err}")
    assert str(tmp_path).startswith("/tmp/") and str(wheel_venv).startswith("/tmp/")
    (tmp_path / "test_lab.py").write_text(LAB_TEST)
    tested = run(
        [str(wheel_venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        timeout=900,
        cwd=tmp_path,
    )
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    assert "1 passed" in tested.stdout
    assert "lab: 1 lab sessions on QEMU" in tested.stdout  # (it ran there, not skipped)
