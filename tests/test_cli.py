"""The `pyvmm` command line: which command modules a command line loads, and help (no KVM)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyvmm import cli


def subcommands(argv: list[str]) -> set[str]:
    """The commands the parser for `argv` offers, as its help lists them."""
    listed = cli.build_parser(argv).format_help()
    return {name for name in cli.COMMAND_MODULES if f"\n    {name} " in listed}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "x.elf"], {"run"}),
        (["-v", "run", "--help"], {"run"}),
        (["lab", "run", "--", "true"], {"lab"}),
        ([], set(cli.COMMAND_MODULES)),
        (["--help"], set(cli.COMMAND_MODULES)),
        (["-h", "run"], set(cli.COMMAND_MODULES)),  # help before a command lists them all
        (["bogus"], set(cli.COMMAND_MODULES)),  # so the error names every command
    ],
)
def test_only_the_named_command_group_is_loaded(argv: list[str], expected: set[str]) -> None:
    assert subcommands(argv) == expected


def test_help_lists_every_command_and_unknown_ones_are_refused() -> None:
    def pyvmm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pyvmm", *args], capture_output=True, text=True, timeout=60
        )

    for args in (["--help"], ["-h", "run"]):
        result = pyvmm(*args)
        assert result.returncode == 0
        for command in cli.COMMAND_MODULES:
            assert f"    {command} " in result.stdout, result.stdout
    result = pyvmm("run", "--help")
    assert result.returncode == 0 and "--exit-stats" in result.stdout
    result = pyvmm("bogus")
    assert result.returncode == 2
    choices = ", ".join(f"'{name}'" for name in cli.COMMAND_MODULES)
    assert f"invalid choice: 'bogus' (choose from {choices})" in result.stderr
