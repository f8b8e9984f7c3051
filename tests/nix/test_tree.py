"""Where the Nix tests take nixpkgs from, and what happens without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import nixtools


def test_tree_from_a_directory_a_tarball_or_a_directory_holding_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    (tree / "nixos" / "lib").mkdir(parents=True)
    (tree / "nixos" / "lib" / "eval-config.nix").write_text("{ }")
    monkeypatch.setenv("LCZFS_NIXPKGS", str(tree))
    assert nixtools._locate() == tree

    holder = tmp_path / "holder"
    holder.mkdir()
    tarball = holder / "nixos-24.05.tar.gz"
    tarball.write_bytes(b"")
    monkeypatch.setenv("LCZFS_NIXPKGS", str(holder))
    assert nixtools._locate() == tarball
    monkeypatch.setenv("LCZFS_NIXPKGS", str(tarball))
    assert nixtools._locate() == tarball

    (holder / "other.tar.gz").write_bytes(b"")
    monkeypatch.setenv("LCZFS_NIXPKGS", str(holder))
    assert nixtools._locate() is None  # two tarballs: which one is meant?
    monkeypatch.setenv("LCZFS_NIXPKGS", str(tmp_path / "nothing"))
    assert nixtools._locate() is None


def test_default_is_shared_nixpkgs_beside_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LCZFS_NIXPKGS", raising=False)
    assert nixtools.ROOT.parent / "shared" / "nixpkgs" == nixtools.DEFAULT_TREE
    if nixtools.DEFAULT_TREE.is_dir():
        assert nixtools._locate() is not None


def test_missing_tree_skips_outside_ci_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no tree here"):
        nixtools.missing("no tree here")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: no tree here"):
        nixtools.missing("no tree here")
