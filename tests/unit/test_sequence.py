"""The whole boot (lczfs_unlockd/sequence.py) against the stateful fakes of tests/fakes.py:
the order of the steps, STATUS=, a dry run, secrets kept out of logs and wiped."""

from __future__ import annotations

import pytest

from lczfs_unlockd import sequence
from lczfs_unlockd.errors import UnlockError
from tests.fakes import HEX_KEY, PASSPHRASE_KEY, fake_ports
from tests.unit.conftest import CRYPT_UNIT, assert_clean, mount_unit_of


def test_passphrase_unlocks_and_tears_down_in_order(world, make_config, run):
    world.answers = ["luks pass"]
    report = run(make_config())
    assert report.ok, report.error
    assert world.loaded_keys() == {"rpool/crypt": True}
    assert_clean(world)
    assert world.events == [
        "import rpool",
        "activate lczfs-keystore ro",
        f"mount {world.mountpoint}",
        "load-key rpool/crypt",
        f"unmount {world.mountpoint}",
        "deactivate lczfs-keystore",
        f"mask {CRYPT_UNIT} {mount_unit_of(world.mountpoint)}",
    ]
    assert report.summary.startswith("unlocked rpool/crypt (hex) in ")
    assert report.summary.endswith("; keystore closed")
    assert world.prompts == [
        ("Please enter the passphrase for keystore rpool/volumes/bootsecrets:", True)
    ]
    assert report.keystore_method == "passphrase"


def test_status_is_reported_at_every_step(world, make_config, run):
    world.answers = ["luks pass"]
    run(make_config())
    statuses = [n for n in world.notifications if n.startswith("STATUS=")]
    assert any("importing pool rpool" in s for s in statuses)
    assert any("opening keystore /dev/zvol/rpool/volumes/bootsecrets-part1" in s for s in statuses)
    assert any("mounting /dev/mapper/lczfs-keystore read-only" in s for s in statuses)
    assert any("loading keys" in s for s in statuses)
    assert any("asking for the passphrase" in s for s in statuses)


def snapshot(world):
    return (
        {n: d.loaded for n, d in world.datasets.items()},
        world.imported,
        dict(world.mappings),
        dict(world.mounts),
        dict(world.masked),
    )


def test_dry_run_changes_nothing(world, make_config, run):
    world.answers = ["luks pass"]
    before = snapshot(world)
    report = run(make_config(dry_run=True))
    assert report.ok, report.error
    assert snapshot(world) == before
    assert "import rpool readonly" in world.events
    assert "export rpool" in world.events
    assert "activate lczfs-keystore ro" in world.events
    assert report.summary.startswith(
        "dry run: would unlock rpool/crypt (hex) using the keystore (passphrase)"
    )
    assert report.summary.endswith("nothing changed")


def test_dry_run_reports_what_would_fail(world, make_config, run):
    world.keystore_files["rpoolcrypt.key"] = ("ab" * 32).encode()
    world.answers = ["luks pass"]
    before = snapshot(world)
    report = run(make_config(dry_run=True))
    assert not report.ok
    assert report.summary.startswith(
        "dry run: a real run would fail: zfs rejected the key for rpool/crypt"
    )
    assert snapshot(world) == before


@pytest.mark.parametrize("step", ["import", "activate", "mount", "load_key"])
def test_dry_run_failure_at_any_step_changes_nothing(world, make_config, run, step):
    world.answers = ["luks pass"]
    before = snapshot(world)

    def fail(_w):
        raise UnlockError("injected")

    world.hooks[step] = fail
    report = run(make_config(dry_run=True))
    assert not report.ok
    assert snapshot(world) == before


def test_no_secret_reaches_logs_or_notifications(world, make_config, run, caplog):
    world.add_encryption_root("rpool/pass", "passphrase", (PASSPHRASE_KEY + "\n").encode())
    world.answers = ["wrong secret", "luks pass"]
    report = run(make_config())
    assert report.ok
    text = caplog.text + "\n".join(world.notifications) + report.summary
    for secret in ("luks pass", "wrong secret", HEX_KEY, PASSPHRASE_KEY, HEX_KEY.upper()):
        assert secret not in text


def test_key_buffers_are_wiped(world, make_config):
    world.answers = ["luks pass"]
    ports = fake_ports(world)
    handed_out: list[bytearray] = []
    real_ask, real_read = ports.askpass.ask, ports.keys.read_key_file

    def ask(*a, **kw):
        buf = real_ask(*a, **kw)
        handed_out.append(buf)
        return buf

    def read(*a, **kw):
        buf = real_read(*a, **kw)
        handed_out.append(buf)
        return buf

    ports.askpass.ask = ask
    ports.keys.read_key_file = read
    assert sequence.run(make_config(), ports).ok
    assert len(handed_out) == 2
    assert all(not any(buf) for buf in handed_out)
    assert ports.keys.seen  # the fake saw the real key while it was live
