"""Shared pieces: the VM harness (tests/vm/lczfsvm), the cache, statistics.

The bench reuses the harness through its Python API only: the guest tree,
kernel, golden disks and the base initrd (dracut + this project's module)
come from ``lczfsvm``; what the bench adds (the initrd without the module,
the seed's unit chain, its own report unit) lives under ``bench/``.
``lczfsvm`` is found on the module path: bench/run puts tests/vm there
(``PYTHONPATH=tests/vm python3 -m bench`` from the repository does the same).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from lczfsvm import build, cache, cpio, qemu, vm

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
GUEST = BENCH / "guest"

__all__ = ["BENCH", "GUEST", "REPO", "build", "cache", "cpio", "qemu", "vm"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def recipe_hash(parts: Iterable[Path | str | bytes]) -> str:
    return cache.recipe_hash(parts)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """Median, min, max, stdev of the finite values."""
    xs = sorted(v for v in values if v is not None and math.isfinite(v))
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None, "stdev": None}
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
    }
