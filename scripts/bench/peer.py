"""The benchmarks' shared build step: the test guests (make -C guests) and the C peer VMM
(scripts/bench/exits-peer.c, built with gcc into the cache when its source is newer)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PYVMM_CACHE", Path.home() / ".cache" / "pyvmm")) / "bench"


def build_guests() -> Path:
    """guests/build, with every test guest built."""
    subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    return ROOT / "guests" / "build"


def build_peer() -> Path:
    source = ROOT / "scripts" / "bench" / "exits-peer.c"
    peer = CACHE / "exits-peer"
    if not peer.exists() or peer.stat().st_mtime < source.stat().st_mtime:
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(peer), str(source)], check=True)
    return peer
