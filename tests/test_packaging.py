"""pyvmm for test writers, outside this checkout: `pyvmm guest build` turns a user's C file into
a test guest against the runtime pyvmm carries, and a wheel installed into a fresh virtualenv
boots its packaged demo guest and builds a guest with nothing from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from guestbuild import ROOT, requires_kvm
from processes import pyvmm

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
    command: list[str], timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`command` run from / (nothing of the checkout in reach)."""
    return subprocess.run(
        command, capture_output=True, text=True, cwd="/", env=env, check=False, timeout=timeout
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


def test_the_wheel_works_in_a_fresh_virtualenv_outside_the_checkout(tmp_path: Path) -> None:
    """As a new user installs it: the wheel built from this tree, installed with its
    dependencies from the package index; then, from /, the demo and a guest of their own."""
    wheels = tmp_path / "wheels"
    built = run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("pyvmm_kvm-*.whl")
    home = tmp_path / "venv"
    venv.create(home, with_pip=True)
    python = str(home / "bin" / "python")
    installed = run([python, "-m", "pip", "install", "-q", str(wheel)], timeout=600)
    assert installed.returncode == 0, installed.stderr
    where = run([python, "-c", "import pyvmm; print(pyvmm.__file__)"])
    assert where.stdout.startswith(str(home)), where.stdout  # (not this checkout)
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
    # and pytest, installed beside it, finds its plugin with no conftest: a test of their own
    got_pytest = run([python, "-m", "pip", "install", "-q", "pytest"], timeout=600)
    assert got_pytest.returncode == 0, got_pytest.stderr
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_mine.py").write_text(USERS_TEST)
    tested = run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "tests")],
        timeout=300,
        env=env_home,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "2 passed" in tested.stdout
