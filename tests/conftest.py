"""Shared pytest set-up: `pytester` for the tests of pyvmm's pytest plugin, and Ctrl-C as a
terminal gives it. The plugin itself (the lab tier, the markers, the fixtures) comes with the
installed package (its pytest11 entry point: pyvmm.testing.plugin).

Tests marked `@pytest.mark.lab` run inside the lab; on the host they are stand-ins for the
results of one lab boot per session.

A shell without job control starts an asynchronous command (`scripts/test > log &` in a script)
with SIGINT ignored, and an ignored signal stays ignored across fork and exec: every `pyvmm run`
a test starts would then ignore the SIGINT the Ctrl-C tests send it (as it should: that is the
shell's intent), and those tests would fail for a reason that is not pyvmm's. So the test
process takes SIGINT back as Python's default before any test starts a process.
"""

import signal

import pytest

pytest_plugins = ["pytester"]


def pytest_configure(config: pytest.Config) -> None:
    # (an editable install made before the plugin's entry point existed has none: the lab
    # tests would then run on the host, and fail one by one)
    if not config.pluginmanager.hasplugin("pyvmm"):
        raise pytest.UsageError(
            "pyvmm's pytest plugin is not installed (its pytest11 entry point): run "
            "scripts/setup, or pip install -e .[dev]"
        )


if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
