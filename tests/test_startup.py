"""What `pyvmm run GUEST.elf` loads: start-up is most of a test guest's run, so the run path
imports nothing it does not use (scripts/bench-startup measures the time)."""

from __future__ import annotations

import json
import sys

import pytest
from guestbuild import guest, requires_kvm
from processes import python_probe

# Imported by `run` only when an option asks for them.
OPTIONAL = ("pyvmm.lab", "pyvmm.migration", "pyvmm.vfio", "pyvmm.control", "pyvmm.devices.virtio")

PROBE = """
import json, sys
before = set(sys.modules)
from pyvmm.cli import main
code = main(["run", sys.argv[1]])
print(json.dumps({"code": code, "new": sorted(set(sys.modules) - before)}))
"""


@requires_kvm
@pytest.mark.kvm
def test_run_imports_no_optional_feature_and_no_third_party_module() -> None:
    result = python_probe(PROBE, str(guest("hello")))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["code"] == 0
    imported = report["new"]
    assert "pyvmm.board.machine" in imported  # (the probe did run a machine)
    assert [m for m in imported if m.startswith(OPTIONAL)] == []
    outside = {m.split(".")[0] for m in imported} - set(sys.stdlib_module_names) - {"pyvmm"}
    # (cffi's runtime: the C exit loop's calls go through it)
    assert outside == {"_cffi_backend"}, "the run path needs only the standard library"
