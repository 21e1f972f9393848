"""The documentation site builds, strictly: every page of docs/ in the navigation, no link to a
page or anchor that is not there (mkdocs --strict turns each into a failure)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_documentation_site_builds_with_every_page(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e .[dev])")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    pages = {path.stem for path in (ROOT / "docs").glob("*.md")}
    built_pages = {path.parent.name for path in tmp_path.glob("*/index.html")} | {"index"}
    assert pages <= built_pages, pages - built_pages
