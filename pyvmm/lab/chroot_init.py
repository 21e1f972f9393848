"""The lab's initramfs: a static busybox and an init that chroots into the host's root.

The init mounts the host's root read-only over 9p, gives the chroot fresh /proc, /sys, /dev,
/dev/pts, /dev/shm, /tmp and /run, mounts over those the host directories under /tmp or /run the
run needs (a checkout, a virtualenv, the working directory: read-only, each at its own path),
mounts the writable results share at the same path it has on the host, and starts the guest
agent (`pyvmm.lab.agent`) with the host's own interpreter. When the agent returns, or anything
before it fails, the init powers the machine off, so QEMU exits.

The image is pyvmm.initramfs.busybox_initramfs with this init.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from pyvmm.initramfs import busybox_initramfs

#: virtio-9p mount tags, shared with the QEMU command line.
ROOT_TAG = "hostroot"
SHARE_TAG = "results"

#: Directories the lab mounts its own filesystems on: what the host has there is hidden.
LAB_OWN_DIRS = ("/proc", "/sys", "/dev", "/tmp", "/run")
#: Of those, where a host directory can be mounted again (the lab's are empty tmpfs).
REMOUNTABLE_DIRS = ("/tmp", "/run")


def host_dir_tag(index: int) -> str:
    """The virtio-9p mount tag of the `index`th host directory mounted inside."""
    return f"hostdir{index}"


#: Printed by the init before every failure line; the host picks it out of the console.
FAIL_PREFIX = "pyvmm-lab-init: "

_9P_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000"

_INIT = """\
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() {{ echo "{fail_prefix}$*"; poweroff -f; sleep 60; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t 9p -o ro,cache=loose,{options} {root_tag} /root \\
    || fail "cannot mount the host's root over 9p (kernel needs CONFIG_9P_FS, CONFIG_NET_9P_VIRTIO)"
mount -t proc proc /root/proc || fail "no /proc in the host's root"
mount -t sysfs sysfs /root/sys || fail "no /sys in the host's root"
mount -t devtmpfs devtmpfs /root/dev || fail "no /dev in the host's root"
mkdir -p /root/dev/pts /root/dev/shm
mount -t devpts devpts /root/dev/pts
mount -t tmpfs tmpfs /root/dev/shm
mount -t tmpfs tmpfs /root/tmp || fail "no /tmp in the host's root"
mount -t tmpfs tmpfs /root/run
{host_dirs}mkdir -p /root{share}
mount -t 9p -o {options} {share_tag} /root{share} || fail "cannot mount the results share"
PYTHONPATH={pythonpath} PYTHONDONTWRITEBYTECODE=1 chroot /root {python} -m pyvmm.lab.agent \\
    {share}/spec.json || echo "{fail_prefix}the guest agent failed (status $?)"
poweroff -f
sleep 60
"""


@dataclass(frozen=True)
class InitConfig:
    """What the init needs to know about the host: paths as they are on the host."""

    python: str  # the interpreter that runs the agent
    pythonpath: str  # the directory holding the pyvmm package
    share: str  # the results share; mounted at this same path inside
    host_dirs: tuple[str, ...] = ()  # under /tmp or /run: mounted read-only at the same path


def init_script(config: InitConfig) -> str:
    host_dirs = ""
    for index, path in enumerate(config.host_dirs):
        where = shlex.quote(path)
        why = shlex.quote(f"cannot mount the host's {path} (needed inside)")
        host_dirs += (
            f"mkdir -p /root{where}\n"
            f"mount -t 9p -o ro,cache=loose,{_9P_OPTIONS} {host_dir_tag(index)} /root{where}"
            f" || fail {why}\n"
        )
    return _INIT.format(
        host_dirs=host_dirs,
        fail_prefix=FAIL_PREFIX,
        options=_9P_OPTIONS,
        root_tag=ROOT_TAG,
        share_tag=SHARE_TAG,
        share=shlex.quote(config.share),
        python=shlex.quote(config.python),
        pythonpath=shlex.quote(config.pythonpath),
    )


def build(busybox: Path, config: InitConfig) -> bytes:
    """The initramfs image for one lab boot."""
    return busybox_initramfs(busybox, init_script(config))  # /root: the chroot's mount point
