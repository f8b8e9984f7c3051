"""Initrd size: dracut with the lczfs-unlockd module minus the same dracut without it.

Both images come from the same guest tree, the same dracut arguments and the
same dracut module list (read from the first image's lsinitrd), so the only
difference is this project's module.  The compressor is pinned: zstd at
dracut's own setting (``zstd -15 -q -T0``; dracut's first choice when no
compressor is configured, and the VM harness's pin).  gzip -9 (dracut's
``gzip -n -9``) is reported alongside, recompressing the same cpio.

The delta is broken down by part.  Each added file is put in one part by its
path; shared libraries that appear only with the module are put in the part
of the first ELF (in the order of PARTS) whose NEEDED closure reaches them.
Per-part compressed sizes compress that part's files alone (zstd -15), so
they add up to roughly, not exactly, the compressed delta.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .common import build, cache, log, recipe_hash

ZSTD = ["zstd", "-15", "-q", "-T0"]  # what dracut runs for --compress zstd
GZIP = ["gzip", "-n", "-9"]  # dracut's gzip line without --rsyncable
PARTS = ("interpreter", "stdlib", "pyzfs+cffi", "pystemd", "sdnotify", "daemon", "other")


def _modules_of(lsinitrd: str) -> list[str]:
    m = re.search(r"dracut modules:\n(.*?)\n=+", lsinitrd, re.S)
    if not m:
        raise RuntimeError("no module list in lsinitrd output")
    return [line.strip() for line in m.group(1).splitlines() if line.strip()]


def without_initrd(root: Path, with_initrd: Path) -> Path:
    """The same dracut run without lczfs-unlockd (exact same module list)."""
    lsinitrd = (with_initrd.parent / "lsinitrd.txt").read_text()
    modules = [m for m in _modules_of(lsinitrd) if m != "lczfs-unlockd"]
    # The base initrd carries the harness's test-only programs
    # (build.TEST_INSTALL): the same here, so the delta is the module's alone.
    args = [*build.COMMON_DRACUT_ARGS, "--install", build.TEST_INSTALL]
    name = f"bench-initrd-without-{root.name.removeprefix('rootfs-')}-" + recipe_hash(
        [" ".join(args), " ".join(modules)]
    )

    def make(tmp: Path) -> None:
        kver = build.kernel_version(root)
        out = tmp / "out"
        out.mkdir()
        argv = [*args, "--kver", kver, "--modules", " ".join(modules), "/mnt/out/initrd.img"]
        log("dracut: the same initrd without lczfs-unlockd")
        build.chroot_script(
            root,
            "dracut " + shlex.join(argv) + "\nlsinitrd /mnt/out/initrd.img > /mnt/out/lsinitrd.txt",
            {"/mnt/out": out},
            log_to=tmp / "dracut.log",
        )
        shutil.move(out / "initrd.img", tmp / "initrd.img")
        shutil.move(out / "lsinitrd.txt", tmp / "lsinitrd.txt")

    return cache.cached_dir(name, make) / "initrd.img"


def _decompress(img: Path) -> bytes:
    return subprocess.run(["zstd", "-dc", str(img)], capture_output=True, check=True).stdout


def _compress(cmd: list[str], data: bytes) -> int:
    return len(subprocess.run(cmd, input=data, capture_output=True, check=True).stdout)


def _unpack(cpio_data: bytes, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        input=cpio_data,
        cwd=dest,
        check=True,
        capture_output=True,
    )


def _files(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            rel = str(p.relative_to(root))
            out[rel] = 0 if p.is_symlink() else p.stat().st_size
    return out


def _part_of_path(rel: str) -> str | None:
    name = rel.rsplit("/", 1)[-1]
    if "lczfs_unlockd/" in rel or name in ("lczfs-unlockd", "lczfs-unlockd.service"):
        return "daemon"
    if "lczfs-unlockd" in rel:  # config, wants symlink, key file
        return "daemon"
    if "/libzfs_core/" in rel or name.startswith("_cffi_backend"):
        return "pyzfs+cffi"
    if "/pystemd/" in rel:
        return "pystemd"
    if "/sdnotify/" in rel:
        return "sdnotify"
    if re.search(r"usr/lib/python3\.\d+/", rel):
        return "stdlib"
    if re.match(r"usr/bin/python3", rel):
        return "interpreter"
    return None


def _needed(path: Path) -> list[str]:
    r = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=False)
    return re.findall(r"\(NEEDED\).*\[(.+?)\]", r.stdout)


def _is_elf(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def _attribute(root: Path, added: dict[str, int]) -> dict[str, str]:
    """Assign every added file to a part; libraries to the first part needing them."""
    parts = {rel: part for rel in added if (part := _part_of_path(rel))}
    by_name: dict[str, list[str]] = {}
    for rel in added:
        by_name.setdefault(rel.rsplit("/", 1)[-1], []).append(rel)
    for part in PARTS:
        queue = [rel for rel, p in parts.items() if p == part and _is_elf(root / rel)]
        seen: set[str] = set()
        while queue:
            rel = queue.pop()
            if rel in seen:
                continue
            seen.add(rel)
            for lib in _needed(root / rel):
                for dep in by_name.get(lib, []):
                    real = (root / dep).resolve()
                    targets = [dep]
                    if real.is_file() and real.is_relative_to(root.resolve()):
                        targets.append(str(real.relative_to(root.resolve())))
                    for t in targets:
                        if t in added and t not in parts:
                            parts[t] = part
                            queue.append(t)
    for rel in added:
        parts.setdefault(rel, "other")
    return parts


def measure(root: Path, with_img: Path, without_img: Path) -> dict[str, Any]:
    with_cpio, without_cpio = _decompress(with_img), _decompress(without_img)
    result: dict[str, Any] = {
        "compressor": " ".join(ZSTD),
        "with_compressed_bytes": with_img.stat().st_size,
        "without_compressed_bytes": without_img.stat().st_size,
        "with_uncompressed_bytes": len(with_cpio),
        "without_uncompressed_bytes": len(without_cpio),
    }
    result["initrd_delta_compressed_bytes"] = (
        result["with_compressed_bytes"] - result["without_compressed_bytes"]
    )
    result["initrd_delta_uncompressed_bytes"] = len(with_cpio) - len(without_cpio)
    result["initrd_delta_gzip9_bytes"] = _compress(GZIP, with_cpio) - _compress(GZIP, without_cpio)
    with tempfile.TemporaryDirectory(prefix="lczfs-bench-size-") as t:
        tmp = Path(t)
        _unpack(with_cpio, tmp / "with")
        _unpack(without_cpio, tmp / "without")
        fw, fo = _files(tmp / "with"), _files(tmp / "without")
        added = {rel: size for rel, size in fw.items() if rel not in fo}
        changed = {rel: fw[rel] - fo[rel] for rel in fw if rel in fo and fw[rel] != fo[rel]}
        removed = {rel: size for rel, size in fo.items() if rel not in fw}
        parts = _attribute(tmp / "with", added)
        breakdown: dict[str, dict[str, int]] = {}
        for part in PARTS:
            files = sorted(rel for rel, p in parts.items() if p == part and rel in added)
            if not files:
                continue
            blob = b"".join(
                (tmp / "with" / rel).read_bytes()
                for rel in files
                if not (tmp / "with" / rel).is_symlink()
            )
            breakdown[part] = {
                "files": len(files),
                "uncompressed_bytes": sum(added[rel] for rel in files),
                "compressed_bytes": _compress(ZSTD, blob) if blob else 0,
            }
        result["breakdown"] = breakdown
        result["files_added"] = len(added)
        result["files_changed"] = {k: v for k, v in sorted(changed.items())}
        result["files_removed"] = sorted(removed)
        result["largest_added"] = sorted(
            ({"path": rel, "bytes": size, "part": parts[rel]} for rel, size in added.items()),
            key=lambda e: -int(e["bytes"]),  # type: ignore[call-overload]
        )[:15]
    return result


def run() -> dict[str, Any]:
    root = build.rootfs()
    with_img = build.base_initrd(root)
    without_img = without_initrd(root, with_img)
    log(f"size: with {with_img}, without {without_img}")
    out = measure(root, with_img, without_img)
    out["with_initrd"] = str(with_img)
    out["without_initrd"] = str(without_img)
    return out
