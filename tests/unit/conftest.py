from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import pytest

from lczfs_unlockd import config as configmod
from lczfs_unlockd import sequence
from lczfs_unlockd.config import Config
from lczfs_unlockd.report import Report
from tests.fakes import World, fake_ports, seed_world

# Shared by the tests of the sequence's steps (test_sequence, test_pool,
# test_keystore, test_keys, test_teardown): imported from here, where
# pytest rewrites the asserts, rather than from tests/fakes.py.

CRYPT_UNIT = r"systemd-cryptsetup@lczfs\x2dkeystore.service"


def mount_unit_of(path: str) -> str:
    from lczfs_unlockd.unitnames import mount_unit

    return mount_unit(path)


def assert_clean(world, *, masked: bool = True) -> None:
    assert world.clean(), (world.mappings, world.mounts)
    if masked:
        assert world.masked.get(CRYPT_UNIT) == "masked-runtime"
        assert world.masked.get(mount_unit_of(world.mountpoint)) == "masked-runtime"
    else:
        assert world.masked == {}


@pytest.fixture(autouse=True)
def flags_in_tmp(tmp_path, monkeypatch):
    """The root check's flag files, which the command line writes itself."""
    from lczfs_unlockd import paths

    monkeypatch.setattr(paths, "ROOT_CHECKED_FLAG", str(tmp_path / "flags" / "root-checked"))
    monkeypatch.setattr(paths, "ROOT_REFUSED_FLAG", str(tmp_path / "flags" / "root-refused"))


@pytest.fixture
def mountpoint(tmp_path) -> str:
    return str(tmp_path / "bootsecrets")


@pytest.fixture
def world(mountpoint) -> World:
    return seed_world(mountpoint)


@pytest.fixture
def make_config(mountpoint) -> Callable[..., Config]:
    def make(keystore: dict[str, Any] | None = None, **top: Any) -> Config:
        data: dict[str, Any] = {
            "pool": "rpool",
            "devices": ["/dev/disk/by-id/nvme-disk-part2"],
            "online_grace": "3s",
            "timeout": "20s",
            "keystore": {
                "volume": "rpool/volumes/bootsecrets",
                "partition": 1,
                "mountpoint": mountpoint,
                "token_timeout": "2s",
                **(keystore or {}),
            },
        }
        data.update(top)
        dry_run = data.pop("dry_run", False)
        cfg = configmod.parse(data, source="test.toml")
        return dataclasses.replace(cfg, dry_run=dry_run) if dry_run else cfg

    return make


@pytest.fixture
def run(world, caplog) -> Callable[[Config], Report]:
    caplog.set_level(logging.DEBUG, logger="lczfs_unlockd")

    def go(cfg: Config) -> Report:
        return sequence.run(cfg, fake_ports(world))

    return go


@pytest.fixture(autouse=True)
def _reset_logging():
    """cli.main() configures the package logger for the journal; undo it for caplog."""
    logger = logging.getLogger("lczfs_unlockd")
    yield
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
