"""units/lczfs-unlockd.service: what issue 2 asks of it, systemd's own
verdict on it, and the NixOS module's copy of its dependencies (nix/lib.nix
unitOrdering) agreeing with it.  The VM's handoff scenario checks the same
ordering as systemd actually ran it (tests/vm: assert_ordered)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "units" / "lczfs-unlockd.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (space-separated lists split, repeated keys joined)."""
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out[section][key.strip()] += value.split()
    return out


UNIT_CONF = parse_unit(UNIT.read_text())


def test_it_is_a_notify_service_outside_the_default_dependencies() -> None:
    u, s = UNIT_CONF["Unit"], UNIT_CONF["Service"]
    assert s["Type"] == ["notify"]
    assert s["RemainAfterExit"] == ["yes"]
    assert u["DefaultDependencies"] == ["no"]
    assert u["ConditionPathExists"] == ["/etc/initrd-release"]  # initrd only
    assert UNIT_CONF["Install"]["WantedBy"] == ["initrd.target"]


def test_it_starts_after_udev_and_module_loading() -> None:
    after = set(UNIT_CONF["Unit"]["After"])
    assert {"systemd-udevd.service", "systemd-udev-trigger.service"} <= after
    assert "systemd-modules-load.service" in after


def test_it_finishes_before_the_distributions_import_and_the_switch_root() -> None:
    before = set(UNIT_CONF["Unit"]["Before"])
    assert {
        "zfs-import-scan.service",
        "zfs-import-cache.service",
        "zfs-import.target",
        "zfs-load-key.service",
        "sysroot.mount",
        "initrd.target",
        "initrd-switch-root.target",
    } <= before
    # Never ordered before the keystore's own units: the daemon masks them.
    assert not {"cryptsetup.target", "cryptsetup-pre.target"} & before


def test_no_timeout_can_kill_a_person_typing() -> None:
    # A finite start timeout is only a backstop: the daemon sends
    # EXTEND_TIMEOUT_USEC while it waits, and must be allowed to.
    s = UNIT_CONF["Service"]
    assert s["NotifyAccess"] == ["main"]
    assert "TimeoutSec" not in s
    (timeout,) = s["TimeoutStartSec"]
    assert timeout.endswith("s") and int(timeout[:-1]) >= 30


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    def verify(text: str) -> str:
        unit = tmp_path / "lczfs-unlockd.service"
        unit.write_text(text)
        proc = subprocess.run(
            ["systemd-analyze", "verify", str(unit)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return (proc.stdout + proc.stderr).strip() + ("" if proc.returncode == 0 else " (failed)")

    # The daemon is not installed on the host: point ExecStart at a binary
    # that exists so that only the unit itself is judged.
    text = UNIT.read_text().replace("ExecStart=/usr/bin/lczfs-unlockd", "ExecStart=/bin/true")
    assert "ExecStart=/bin/true" in text
    assert verify(text) == ""
    # ...and this systemd does report a mistake in such a unit.
    assert "Unknown key" in verify(text.replace("Type=notify", "Typ=notify"))


@pytest.mark.skipif(shutil.which("nix-instantiate") is None, reason="nix-instantiate not installed")
def test_the_nixos_module_orders_the_same_plus_its_pool_import() -> None:
    expr = f'(import {REPO / "nix" / "lib.nix"}).unitOrdering "tank"'
    nix = json.loads(
        subprocess.run(
            ["nix-instantiate", "--eval", "--strict", "--json", "--expr", expr],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )
    u = UNIT_CONF["Unit"]
    assert nix["after"] == u["After"]
    assert nix["wants"] == u["Wants"]
    assert nix["conflicts"] == u["Conflicts"]
    assert sorted(nix["before"]) == sorted([*u["Before"], "zfs-import-tank.service"])
    assert sorted(nix["wantedBy"]) == sorted(
        [*UNIT_CONF["Install"]["WantedBy"], "zfs-import-tank.service"]
    )
