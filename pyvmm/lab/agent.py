"""The guest agent: runs inside the lab, chrooted into the host's root, started by the init.

It reads the run's spec from the results share, binds the requested emulated devices to vfio-pci,
then either runs the command, forwarding its output to the host as frames on the agent's
virtio-serial port (see `pyvmm.lab.protocol`) and ending with its exit status, or starts an
interactive shell on the serial console. Its own log goes to the console, which the host shows
only with --verbose.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import selectors
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

from pyvmm.lab import chroot_init, protocol
from pyvmm.lab.protocol import Kind
from pyvmm.vfio.sysfs import Sysfs, SysfsError

log = logging.getLogger(__name__)

_CONSOLE = "/dev/ttyS0"


class AgentError(Exception):
    """The lab cannot run the command; reported to the host as one line."""


class Port:
    """The write side of the agent's virtio-serial port."""

    def __init__(self, name: str) -> None:
        self._fd = os.open(_find_port(name), os.O_WRONLY)

    def send(self, kind: Kind, payload: bytes) -> None:
        for start in range(0, max(len(payload), 1), protocol.MAX_PAYLOAD):
            _write_all(
                self._fd, protocol.encode(kind, payload[start : start + protocol.MAX_PAYLOAD])
            )

    def send_json(self, kind: Kind, value: Any) -> None:
        _write_all(self._fd, protocol.encode_json(kind, value))

    def close(self) -> None:
        os.close(self._fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _find_port(name: str) -> str:
    """The /dev node of the virtio-serial port called `name` (devtmpfs has no by-name links)."""
    for entry in Path("/sys/class/virtio-ports").glob("*"):
        if (entry / "name").read_text().strip() == name:
            return f"/dev/{entry.name}"
    raise AgentError(f"no virtio-serial port {name}")


def bind_devices(devices: list[dict[str, Any]], sysfs: Sysfs) -> dict[str, str]:
    """Bind each requested device to vfio-pci; returns {"edu": bdf, "edu1": bdf, ...}.

    An SR-IOV device (a request with "vfs") is the exception: its PF stays with its kernel
    driver, which makes the VFs, and the VFs go to vfio-pci (no VF driver probing them first);
    the PF is returned under its name and the VFs under "vf_name": {"igb": PF, "igbvf": VF 0,
    "igbvf1": VF 1}.
    """
    bound: dict[str, str] = {}
    taken: set[str] = set()

    def add(key: str, bdf: str) -> None:
        count = sum(1 for k in bound if k.rstrip("0123456789") == key)
        bound[f"{key}{count or ''}"] = bdf

    for request in devices:
        free = [d for d in sysfs.find(request["vendor"], request["device"]) if d.bdf not in taken]
        if not free:
            raise AgentError(f"the lab has no {request['name']} device")
        device = free[0]
        taken.add(device.bdf)
        if request.get("vfs"):
            add(request["name"], device.bdf)
            log.info(
                "%s %s left on %s; it makes the VFs", request["name"], device.bdf, device.driver
            )
            vfs = sysfs.enable_vfs(device.bdf, request["vfs"], probe=False)
            to_bind = [(request["vf_name"], vf) for vf in vfs]
        else:
            to_bind = [(request["name"], device.bdf)]
        for key, bdf in to_bind:
            group = sysfs.bind_vfio(bdf).iommu_group
            add(key, bdf)
            log.info("%s %s bound to vfio-pci (IOMMU group %s)", key, bdf, group)
    return bound


def command_env(spec: dict[str, Any], bound: dict[str, str]) -> dict[str, str]:
    env = dict(spec["env"])
    env["PYVMM_LAB_DEVICES"] = ",".join(f"{k}={v}" for k, v in bound.items())
    return env


def run_command(spec: dict[str, Any], env: dict[str, str], port: Port) -> int:
    """Run the command, forwarding its output as it comes; returns its exit status."""
    try:
        process = subprocess.Popen(
            spec["command"],
            cwd=spec["cwd"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        port.send(Kind.STDERR, f"pyvmm lab: {spec['command'][0]}: command not found\n".encode())
        return 127
    except PermissionError as exc:
        port.send(Kind.STDERR, f"pyvmm lab: {spec['command'][0]}: {exc.strerror}\n".encode())
        return 126
    assert process.stdout is not None and process.stderr is not None
    with process, selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ, Kind.STDOUT)
        selector.register(process.stderr, selectors.EVENT_READ, Kind.STDERR)
        while selector.get_map():
            for key, _ in selector.select():
                data = os.read(key.fd, protocol.MAX_PAYLOAD)
                if data:
                    port.send(key.data, data)
                else:
                    selector.unregister(key.fileobj)
    code = process.returncode
    return 128 - code if code < 0 else code


def run_shell(spec: dict[str, Any], env: dict[str, str]) -> int:
    """An interactive login shell on the serial console, with job control."""
    console = os.open(_CONSOLE, os.O_RDWR)
    rows, columns = spec.get("winsize") or (24, 80)
    fcntl.ioctl(console, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {**env, "PS1": r"(lab) \w\$ "}

    def take_console() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(
        spec["command"] if os.path.exists(spec["command"][0]) else ["/bin/sh"],
        cwd=spec["cwd"] if os.path.isdir(spec["cwd"]) else "/",
        env=env,
        stdin=console,
        stdout=console,
        stderr=console,
        start_new_session=True,
        preexec_fn=take_console,  # in the child, after setsid: the console becomes its tty
    )
    os.close(console)
    return process.wait()


def prepare(spec: dict[str, Any]) -> dict[str, str]:
    """Check the lab and bind the devices; returns the command's environment."""
    sysfs = Sysfs("/")
    if not sysfs.iommufd:
        raise AgentError("the lab kernel has no /dev/iommu (it lacks CONFIG_IOMMUFD)")
    return command_env(spec, bind_devices(spec["devices"], sysfs))


def serve_command(spec: dict[str, Any]) -> None:
    """Run the command and report everything on the agent's port."""
    port = Port(spec["port"])
    try:
        port.send_json(Kind.HELLO, {"uptime": float(Path("/proc/uptime").read_text().split()[0])})
        env = prepare(spec)
        if not os.path.isdir(spec["cwd"]):
            raise AgentError(
                f"the working directory {spec['cwd']} is not visible inside the lab "
                f"({', '.join(chroot_init.LAB_OWN_DIRS)} are the lab's own)"
            )
        port.send_json(Kind.EXIT, {"code": run_command(spec, env, port)})
    except (AgentError, SysfsError) as exc:
        log.error("%s", exc)
        port.send(Kind.ERROR, str(exc).encode())
    except Exception as exc:
        log.exception("agent failed")
        port.send(Kind.ERROR, f"the guest agent failed: {type(exc).__name__}: {exc}".encode())
    finally:
        port.close()


def serve_shell(spec: dict[str, Any]) -> None:
    """The interactive shell; problems go to the console, where the user is.

    The agent's port is left alone: its host side is not connected in shell mode, and a write
    to an unconnected virtio-serial port blocks.
    """
    try:
        env = prepare(spec)
    except (AgentError, SysfsError) as exc:
        log.error("%s; starting the shell anyway", exc)
        env = dict(spec["env"])
    run_shell(spec, env)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="pyvmm-lab-agent: %(message)s")
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec["mode"] == "shell":
        serve_shell(spec)
    else:
        serve_command(spec)


if __name__ == "__main__":
    main()
