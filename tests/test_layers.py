"""The package's layers point down only: every import of every module (at its top, inside a
function, or for type checking alone) names a module of its own layer or of one below it; and
no module outside uapi/ is longer than 500 lines."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import pyvmm

PACKAGE = Path(pyvmm.__file__).parent

#: From the bottom up; a module is in the layer of its folder (or, at the top, of its name).
LAYERS = [
    {"pyvmm", "pyvmm.errors", "pyvmm.libc", "pyvmm.initramfs", "pyvmm.guest_files"},
    {"pyvmm.uapi"},
    {"pyvmm.kvm"},
    {"pyvmm.machine"},  # the machine's building blocks
    {"pyvmm.devices"},
    {"pyvmm.vfio"},
    {"pyvmm.board"},  # the Machine, wiring the above together
    {"pyvmm.migration"},
    {"pyvmm.control"},
    {"pyvmm.lab"},
    {"pyvmm.commands"},
    {"pyvmm.testing"},  # the pytest plugin, for test writers
    {"pyvmm.cli", "pyvmm.__main__"},
]


def layer_of(module: str) -> int:
    """The layer of a module (or of a name in one: pyvmm.devices.rtc.CmosRtc is in devices)."""
    folder = ".".join(module.split(".")[:2])
    for index, members in enumerate(LAYERS):
        if folder in members:
            return index
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every pyvmm import in the file, wherever it is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "pyvmm":  # `from pyvmm import board` imports pyvmm.board
                found += [(node.lineno, _from_pyvmm(alias.name)) for alias in node.names]
            elif node.module.startswith("pyvmm."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("pyvmm")]
    return sorted(found)


def _from_pyvmm(name: str) -> str:
    """What `from pyvmm import name` imports: a module of the package, or a name in it."""
    is_module = (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()
    return f"pyvmm.{name}" if is_module else "pyvmm"


def test_every_import_points_down_or_sideways() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        own = layer_of(module)
        for line, imported in imports(path):
            if layer_of(imported) > own:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} -> {imported}")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_the_check_sees_an_import_that_points_up(tmp_path: Path) -> None:
    """The check itself: a device module importing the board is caught, even for typing."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from pyvmm.board.machine import Machine\n"
        "def f():\n"
        "    import pyvmm.migration.source\n"
    )
    sample.write_text(
        sample.read_text() + "from pyvmm import board, errors\n" + "import pyvmm.nowhere\n"
    )
    found = imports(sample)
    assert [(line, layer_of(name)) for line, name in found[:4]] == [
        (3, layer_of("pyvmm.board")),
        (5, layer_of("pyvmm.migration")),
        (6, layer_of("pyvmm.board")),
        (6, layer_of("pyvmm.errors")),
    ]
    assert layer_of("pyvmm.devices.rtc") < layer_of("pyvmm.board.machine")
    with pytest.raises(AssertionError, match=r"pyvmm\.nowhere is in no layer"):
        layer_of(found[4][1])


def test_every_pyvmm_name_a_script_imports_exists() -> None:
    """scripts/ are not imported by the tests: a module they name that moved would go unseen."""
    missing = []
    for script in sorted((PACKAGE.parent / "scripts").iterdir()):
        if not script.is_file() or not script.read_text(errors="replace").startswith("#!/usr"):
            continue
        try:
            tree = ast.parse(script.read_text(), str(script))
        except SyntaxError:
            continue  # (a shell script)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyvmm"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{script.name}: {node.module}.{alias.name}")
    assert not missing, missing


MAX_LINES = 500  # a module outside uapi/ (kernel ABI tables are as long as the kernel's)


def test_every_module_outside_uapi_is_at_most_500_lines() -> None:
    """One module, one job: past 500 lines a module is doing two."""
    long = {
        str(path.relative_to(PACKAGE)): lines
        for path in PACKAGE.rglob("*.py")
        if "uapi" not in path.relative_to(PACKAGE).parts
        and (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
