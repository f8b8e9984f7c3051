"""Fixtures of the Nix tests; see nixtools.py."""

from .nixtools import nixpkgs, workdir

__all__ = ["nixpkgs", "workdir"]
