"""The real nixpkgs tree the Nix tests evaluate against, and how to run Nix
(the fixtures are re-exported by tests/nix/conftest.py).

The tree comes from ``LCZFS_NIXPKGS`` (an unpacked nixpkgs directory, a
``.tar.gz`` of one, or a directory holding exactly one such tarball),
defaulting to ``../shared/nixpkgs/`` beside the repository.  A tarball is
unpacked once into the cache (``LCZFS_NIX_CACHE``, default
``/var/cache/lczfs-nix``), keyed by its sha256, and added to the Nix store
once (flake input overrides need a store path; hashing the tree again costs
about a minute a call).  Without a tree (or without Nix) the tests skip with
a message, except under CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .variants import REFUSED, WORKING

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TREE = ROOT.parent / "shared" / "nixpkgs"
CACHE = Path(os.environ.get("LCZFS_NIX_CACHE", "/var/cache/lczfs-nix"))
SYSTEM_NIX = Path(__file__).with_name("system.nix")
ARCH = "x86_64-linux"


def missing(reason: str) -> None:
    """Skip, or fail under CI: CI must never pass because the tree was not there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def nix_env() -> dict[str, str]:
    env = dict(os.environ)
    # Debian's nix-bin names a build-users-group that does not exist here;
    # nothing is built, so no build users are needed.
    env["NIX_CONFIG"] = (
        "build-users-group =\nexperimental-features = nix-command flakes\n"
        + env.get("NIX_CONFIG", "")
    )
    return env


def run_nix(args: list[str], *, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        check=False,
        env=nix_env(),
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def nix_ok(args: list[str], *, timeout: float = 600) -> str:
    proc = run_nix(args, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args[:3])} ... failed:\n{proc.stderr[-6000:]}"
    return proc.stdout


@dataclass(frozen=True)
class Nixpkgs:
    tree: Path  # an unpacked tree, for import
    store_path: str  # the same tree in the Nix store
    nar_hash: str  # its SRI narHash, so flake overrides do not hash it again

    def flake_ref(self) -> str:
        from urllib.parse import quote

        return f"path:{self.store_path}?narHash={quote(self.nar_hash, safe='')}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _locate() -> Path | None:
    given = os.environ.get("LCZFS_NIXPKGS")
    path = Path(given) if given else DEFAULT_TREE
    if path.is_file():
        return path
    if (path / "nixos" / "lib" / "eval-config.nix").is_file():
        return path
    if path.is_dir():
        tarballs = sorted(path.glob("*.tar.gz"))
        if len(tarballs) == 1:
            return tarballs[0]
    return None


def _unpack(tarball: Path) -> Path:
    key = _sha256(tarball)[:16]
    tree = CACHE / f"nixpkgs-{key}"
    if (tree / "nixos" / "lib" / "eval-config.nix").is_file():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run(["tar", "-xzf", str(tarball), "-C", tmp], check=True)
        tops = list(Path(tmp).iterdir())
        top = tops[0] if len(tops) == 1 and tops[0].is_dir() else Path(tmp)
        shutil.rmtree(tree, ignore_errors=True)
        top.rename(tree)
    return tree


def _add_to_store(tree: Path) -> tuple[str, str]:
    record = tree.with_name(tree.name + ".store.json")
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("tree") == str(tree) and Path(saved["store_path"]).is_dir():
            return saved["store_path"], saved["nar_hash"]
    store_path = nix_ok(["nix-store", "--add", str(tree)]).strip()
    base32 = nix_ok(["nix-store", "--query", "--hash", store_path]).strip()
    nar_hash = nix_ok(["nix", "hash", "to-sri", base32]).strip()
    if tree.is_relative_to(CACHE):
        record.write_text(
            json.dumps({"tree": str(tree), "store_path": store_path, "nar_hash": nar_hash})
        )
    return store_path, nar_hash


@pytest.fixture(scope="session")
def nixpkgs() -> Nixpkgs:
    for tool in ("nix-instantiate", "nix-store", "nix"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (Debian: nix-bin; scripts/setup-host installs it)")
    found = _locate()
    if found is None:
        given = os.environ.get("LCZFS_NIXPKGS")
        where = f"LCZFS_NIXPKGS={given}" if given else f"the default {DEFAULT_TREE}"
        missing(
            f"no nixpkgs tree: {where} is neither a nixpkgs directory nor a tarball of one "
            "(nor a directory holding exactly one); set LCZFS_NIXPKGS"
        )
        raise AssertionError  # unreachable: missing() raises
    tree = _unpack(found) if found.is_file() else found
    store_path, nar_hash = _add_to_store(tree)
    return Nixpkgs(tree=tree, store_path=store_path, nar_hash=nar_hash)


def eval_systems(
    nixpkgs: Nixpkgs, batches: list[dict[str, Any]], flake_module: str = ""
) -> dict[str, Any]:
    """Evaluate batches of system variants, one nix-instantiate each, in parallel.

    --read-write-mode: drvPath writes the .drv files (the systems are really
    instantiated) and the package's source is copied to the store.
    """
    procs = []
    for batch in batches:
        args = [
            "nix-instantiate",
            "--eval",
            "--strict",
            "--json",
            "--read-write-mode",
            str(SYSTEM_NIX),
            "-A",
            "results",
            "--arg",
            "nixpkgs",
            str(nixpkgs.tree),
            "--argstr",
            "variants",
            json.dumps(batch),
            "--argstr",
            "flakeModule",
            flake_module,
        ]
        procs.append(
            (
                args,
                subprocess.Popen(
                    args,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    env=nix_env(),
                ),
            )
        )
    results: dict[str, Any] = {}
    for args, proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{' '.join(args[:6])} failed:\n{err[-8000:]}"
        results.update(json.loads(out))
    return results


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lczfs-nix-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="session")
def flake_eval(nixpkgs: Nixpkgs) -> dict[str, Any]:
    """The flake's outputs, evaluated the way a flake user gets them."""
    base = [
        "nix",
        "eval",
        "--impure",  # lib.fileset needs it on Nix < 2.14 (see shared/nixpkgs/README.md)
        "--no-write-lock-file",
        "--override-input",
        "nixpkgs",
        nixpkgs.flake_ref(),
        "--json",
    ]
    ref = f"git+file://{ROOT}"
    module = json.loads(
        nix_ok([*base, f"{ref}#nixosModules", "--apply", "ms: builtins.mapAttrs (_: toString) ms"])
    )
    packages = json.loads(
        nix_ok(
            [
                *base,
                f"{ref}#packages.{ARCH}",
                "--apply",
                "ps: { drv = ps.default.drvPath; systemd = ps.default.passthru.systemd.name;"
                " systemdPath = toString ps.default.passthru.systemd;"
                " zfs = ps.default.passthru.zfs.name; postPatch = ps.default.postPatch;"
                " pyzfs = ps.pyzfs.drvPath; initrdEnv = ps.initrd-env.drvPath; }",
            ]
        )
    )
    return {"modules": module, "packages": packages}


@pytest.fixture(scope="session")
def systems(nixpkgs: Nixpkgs, flake_eval: dict[str, Any]) -> dict[str, Any]:
    refused = {name: {"config": cfg} for name, (cfg, _) in REFUSED.items()}
    return eval_systems(nixpkgs, [WORKING, refused], flake_module=flake_eval["modules"]["default"])
