"""The build cache: where built things live, how they are named, locking.

Everything expensive (the guest tree, initrds, provisioned disk images) is
stored under ``$LCZFS_VM_CACHE`` (default ``/var/cache/lczfs-vm``), outside
the repository, in a directory named by a hash of its recipe: a changed
recipe gets a new directory, an unchanged one is reused.  A directory only
appears under its final name once it is complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .proc import log


def cache_root() -> Path:
    root = Path(os.environ.get("LCZFS_VM_CACHE", "/var/cache/lczfs-vm"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def recipe_hash(parts: Iterable[Path | str | bytes], length: int = 16) -> str:
    """sha256 over files (name + content), directories (recursively) and strings."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            paths = sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part]
            for p in paths:
                if "__pycache__" in p.parts:
                    continue
                h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
        elif isinstance(part, str):
            h.update(part.encode() + b"\0")
        else:
            h.update(part + b"\0")
    return h.hexdigest()[:length]


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Serialise builds of one cache entry across processes."""
    lock = cache_root() / f".{name}.lock"
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_dir(name: str, build: Callable[[Path], None]) -> Path:
    """Return cache_root()/name, building it with build(tmpdir) if missing."""
    final = cache_root() / name
    if final.is_dir():
        return final
    with locked(name):
        if final.is_dir():
            return final
        tmp = cache_root() / f"{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        start = time.monotonic()
        try:
            build(tmp)
        except BaseException:
            log(f"building {name} failed; partial result left in {tmp}")
            raise
        tmp.rename(final)
        log(f"built {name} in {time.monotonic() - start:.0f} s")
    return final
