"""The package's layers point down only: every import of every module (at its top, inside a
function, or for type checking alone) names a module of its own layer or of one below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pyvmm

PACKAGE = Path(pyvmm.__file__).parent

#: From the bottom up; a module is in the layer of its folder (or, at the top, of its name).
LAYERS = [
    {"pyvmm", "pyvmm.errors", "pyvmm.libc", "pyvmm.initramfs"},
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
    {"pyvmm.cli", "pyvmm.__main__"},
]


def layer_of(module: str) -> int:
    parts = module.split(".")
    for length in (2, 1):
        name = ".".join(parts[:length])
        for index, members in enumerate(LAYERS):
            if name in members:
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
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            # `from pyvmm.migration import source` imports pyvmm.migration.source
            found += [(node.lineno, name) for name in names[:1] if name.startswith("pyvmm")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("pyvmm")]
    return found


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
    assert [(line, layer_of(name)) for line, name in imports(sample)] == [
        (3, layer_of("pyvmm.board")),
        (5, layer_of("pyvmm.migration")),
    ]
    assert layer_of("pyvmm.devices.rtc") < layer_of("pyvmm.board.machine")
