"""The lab tier under pytest-xdist: xdist's own scheduler, told to keep the tests of one lab
session on one worker, which boots that lab itself, so that workers run labs side by side (and
on other hosts, with xdist's remote workers).

Each lab test gets the xdist group of its lab session; `-n N` alone (xdist's `--dist load`)
becomes `--dist loadgroup`, which schedules as `load` for tests without a group. A worker takes
--dist from its own argv, not from the controller's change, so the controller tells each worker
through its workerinput. Other --dist modes would give a lab session's tests to several
workers, each booting all of it: they are warned of.
"""

from __future__ import annotations

from typing import Any

import pytest

from pyvmm.lab.pytest_plugin import in_lab, lab_keywords, session_key

#: What a worker is told: whether the controller schedules by xdist_group.
_XDIST_GROUPS = "pyvmm_lab_xdist_groups"


def pytest_configure(config: pytest.Config) -> None:
    if in_lab():
        return
    dist = getattr(config.option, "dist", "no")
    if dist == "load":
        config.option.dist = "loadgroup"
    elif dist not in ("no", "loadgroup", "each"):
        config.issue_config_time_warning(
            pytest.PytestConfigWarning(
                f"pyvmm: under --dist {dist}, every worker given a lab test boots that test's "
                "whole lab session and runs all of it: give -n alone, or --dist loadgroup"
            ),
            stacklevel=2,
        )
    if getattr(config, "workerinput", {}).get(_XDIST_GROUPS):
        config.option.loadgroup = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """(The controller, for each worker it starts) Whether lab tests go by group."""
    node.workerinput[_XDIST_GROUPS] = node.config.getoption("dist") == "loadgroup"


@pytest.hookimpl(tryfirst=True)  # before xdist's worker names the groups in node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each lab test in the xdist group of its lab session (the pyvmm.lab.pytest_plugin stand-ins
    made after this keep the node ids xdist gives them)."""
    if in_lab() or not config.getoption("loadgroup", False):
        return
    for item in items:
        if item.get_closest_marker("lab"):
            group = "-".join(map(str, session_key(lab_keywords(item))))
            item.add_marker(pytest.mark.xdist_group(f"pyvmm-lab-{group}"))
