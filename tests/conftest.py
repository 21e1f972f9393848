"""Shared pytest set-up: the lab test tier (`pyvmm.lab.pytest_plugin`), and `pytester` for
the tests of that tier.

Tests marked `@pytest.mark.lab` run inside the lab; on the host they are stand-ins for the
results of one lab boot per session.
"""

pytest_plugins = ["pyvmm.lab.pytest_plugin", "pytester"]
