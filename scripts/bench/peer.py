"""The benchmarks' shared build step: the test guests (make -C guests) and the C peer VMM
(scripts/bench/exits-peer.c, built with gcc into the cache once per version of its source)."""

from __future__ import annotations

import hashlib
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
    """The peer built from this checkout's source (named by its digest: another checkout's
    benchmark, an older one compared, builds its own)."""
    source = ROOT / "scripts" / "bench" / "exits-peer.c"
    peer = CACHE / f"exits-peer-{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}"
    if not peer.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(peer), str(source)], check=True)
    return peer
