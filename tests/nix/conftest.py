"""Fixtures of the Nix tests; see nixtools.py."""

from .nixtools import flake_eval, nixpkgs, systems, workdir

__all__ = ["flake_eval", "nixpkgs", "systems", "workdir"]
