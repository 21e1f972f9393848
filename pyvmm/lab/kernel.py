"""Finding the lab kernel and checking, from its embedded config, that it can serve as one.

Lookup order: an explicit path (`--kernel`), then `$PYVMM_LAB_KERNEL`, then the cache where
`scripts/build-lab-kernel` puts its output. The check reads the kernel's own .config out of the
bzImage (CONFIG_IKCONFIG) so that a kernel without IOMMUFD is refused before QEMU even starts.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from pyvmm.lab.errors import LabError, LabUnavailable

log = logging.getLogger(__name__)

ENV_KERNEL = "PYVMM_LAB_KERNEL"

#: What the lab itself needs, built in (the lab loads no modules): 9p for the host's root, virtio
#: console for the agent's port, devtmpfs and tmpfs for the chroot; and what it exists to test.
REQUIRED_OPTIONS = (
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_DEVTMPFS",
    "CONFIG_TMPFS",
    "CONFIG_SERIAL_8250_CONSOLE",
    "CONFIG_VIRTIO_PCI",
    "CONFIG_VIRTIO_CONSOLE",
    "CONFIG_NET_9P_VIRTIO",
    "CONFIG_9P_FS",
    "CONFIG_KVM",
    "CONFIG_IOMMUFD",
    "CONFIG_VFIO_PCI",
    "CONFIG_VFIO_DEVICE_CDEV",
)

IOMMU_OPTIONS = {"intel": "CONFIG_INTEL_IOMMU", "virtio": "CONFIG_VIRTIO_IOMMU"}

_BUILD_HINT = "build one with scripts/build-lab-kernel"


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """pyvmm's cache directory, as scripts/fetch-uapi-headers and build-lab-kernel compute it."""
    if environ.get("PYVMM_CACHE"):
        return Path(environ["PYVMM_CACHE"])
    xdg = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "~")) / ".cache")
    return Path(xdg).expanduser() / "pyvmm"


def cached_kernel(environ: Mapping[str, str] = os.environ) -> Path:
    return cache_dir(environ) / "lab" / "bzImage"


def find_kernel(explicit: str | None = None, environ: Mapping[str, str] = os.environ) -> Path:
    """The lab kernel to boot, or `LabUnavailable` saying how to get one."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise LabUnavailable(f"lab kernel {explicit} (--kernel) does not exist")
        return path
    if environ.get(ENV_KERNEL):
        path = Path(environ[ENV_KERNEL])
        if not path.is_file():
            raise LabUnavailable(f"lab kernel {path} (${ENV_KERNEL}) does not exist")
        return path
    path = cached_kernel(environ)
    if path.is_file():
        return path
    raise LabUnavailable(
        f"no lab kernel: pass --kernel, set ${ENV_KERNEL}, or {_BUILD_HINT} (into {path})"
    )


def _payload(image: bytes) -> bytes:
    """The compressed vmlinux inside a bzImage (boot protocol >= 2.08 setup header)."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS setup header)")
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return image[start : start + length]


def _decompress(payload: bytes) -> bytes | None:
    if payload.startswith(b"\x1f\x8b"):
        # The payload carries the uncompressed size after the gzip stream; stop at the stream end.
        return zlib.decompressobj(wbits=31).decompress(payload)
    if payload.startswith(b"\xfd7zXZ"):
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"BZh"):
        return bz2.BZ2Decompressor().decompress(payload)
    if payload.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload)
    return None  # zstd, lz4, lzo: nothing in the standard library reads them


def read_ikconfig(kernel: Path) -> dict[str, str] | None:
    """The kernel's embedded .config as {option: value}, or None if it cannot be read."""
    try:
        vmlinux = _decompress(_payload(kernel.read_bytes()))
    except (OSError, ValueError, EOFError, lzma.LZMAError, zlib.error) as exc:
        log.debug("cannot unpack %s: %s", kernel, exc)
        return None
    if vmlinux is None:
        log.debug("%s: compression not readable from Python; config not checked", kernel)
        return None
    start = vmlinux.find(b"IKCFG_ST")
    end = vmlinux.find(b"IKCFG_ED", start)
    if start < 0 or end < 0:
        log.debug("%s has no embedded config (CONFIG_IKCONFIG)", kernel)
        return None
    text = gzip.decompress(vmlinux[start + 8 : end]).decode(errors="replace")
    return parse_config(text.splitlines())


def parse_config(lines: Iterable[str]) -> dict[str, str]:
    options = {}
    for line in lines:
        name, sep, value = line.strip().partition("=")
        if sep and name.startswith("CONFIG_"):
            options[name] = value
    return options


def missing_options(config: Mapping[str, str], iommu: str) -> list[str]:
    """The options the lab needs built in (=y) that `config` lacks."""
    wanted = [*REQUIRED_OPTIONS]
    if iommu in IOMMU_OPTIONS:
        wanted.append(IOMMU_OPTIONS[iommu])
    return [name for name in wanted if config.get(name) != "y"]


def check_kernel(kernel: Path, iommu: str) -> None:
    """Refuse a kernel whose embedded config shows it cannot run the lab.

    A kernel without CONFIG_IKCONFIG passes here; the guest agent then probes for /dev/iommu.
    """
    config = read_ikconfig(kernel)
    if config is None:
        log.info("lab kernel %s has no readable config (CONFIG_IKCONFIG); not checked", kernel)
        return
    missing = missing_options(config, iommu)
    if missing:
        raise LabError(f"lab kernel {kernel} lacks {', '.join(missing)} (=y); {_BUILD_HINT}")
