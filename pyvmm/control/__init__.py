"""The control plane: a running machine served on a unix socket in JSON lines (server.py), and
the client that `pyvmm ctl`, `snapshot`, `migrate` and scripts use (client.py)."""
