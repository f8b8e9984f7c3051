"""cli.main end to end with the fake machine behind it."""

from __future__ import annotations

import argparse

import pytest

from lczfs_unlockd import cli
from tests.fakes import FakeNotifier, fake_ports


@pytest.fixture
def wired(world, monkeypatch, tmp_path, mountpoint):
    """cli.main with fake adapters; returns (config path, cmdline path)."""
    notifier = FakeNotifier(world)

    def ports(_notifier):
        p = fake_ports(world)
        p.notifier = notifier
        return p

    monkeypatch.setattr(cli, "real_ports", ports)
    monkeypatch.setattr(cli, "SystemdNotifier", lambda: notifier)
    cfg = tmp_path / "lczfs-unlockd.toml"
    cfg.write_text(
        'pool = "rpool"\ntimeout = "10s"\n'
        f'[keystore]\nvolume = "rpool/volumes/bootsecrets"\nmountpoint = "{mountpoint}"\n'
    )
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=zfs:rpool/crypt/local/root quiet\n")
    return cfg, cmdline


def test_main_unlocks_and_reports_ready(world, wired):
    cfg, cmdline = wired
    world.answers = ["luks pass"]
    assert cli.main(["--config", str(cfg), "--kernel-cmdline", str(cmdline)]) == 0
    assert world.loaded_keys() == {"rpool/crypt": True}
    # READY=1 alone: a long status can never take it down with it.
    assert world.notifications[-1] == "READY=1"
    assert world.notifications[-2].startswith(
        "STATUS=unlocked rpool/crypt (hex); root checked (rpool/crypt/local/root) in "
    )


def test_main_failure_sets_errno_and_exit_1(world, wired):
    cfg, cmdline = wired
    world.answers = ["bad", "bad", "bad"]
    assert cli.main(["run", "--config", str(cfg), "--kernel-cmdline", str(cmdline)]) == 1
    last = world.notifications[-1]
    assert last.startswith("STATUS=failed: cannot open keystore")
    assert last.endswith("\nERRNO=1")  # EPERM
    assert world.clean()


def test_main_dry_run_from_kernel_command_line(world, wired, capsys):
    cfg, cmdline = wired
    cmdline.write_text("rd.lczfs.dry_run=1 rd.lczfs.debug rd.lczfs.bogus=1\n")
    world.answers = ["luks pass"]
    assert cli.main(["--config", str(cfg), "--kernel-cmdline", str(cmdline)]) == 0
    err = capsys.readouterr().err
    assert world.loaded_keys() == {"rpool/crypt": False}
    assert world.masked == {}
    assert "kernel command line: rd.lczfs.bogus: unknown or not allowed" in err
    assert "keys for: auto" in err  # the debug summary of the configuration
    assert world.notifications[-1] == "READY=1"
    assert "STATUS=dry run: would unlock rpool/crypt (hex)" in world.notifications[-2]


def test_main_dry_run_flag(world, wired):
    cfg, cmdline = wired
    world.answers = ["luks pass"]
    assert cli.main(["--dry-run", "--config", str(cfg), "--kernel-cmdline", str(cmdline)]) == 0
    assert not world.imported


def test_main_missing_config_is_not_configured(world, wired, tmp_path):
    _, cmdline = wired
    code = cli.main(["--config", str(tmp_path / "none.toml"), "--kernel-cmdline", str(cmdline)])
    assert code == cli.EXIT_NOTCONFIGURED
    assert world.notifications == [
        f"STATUS=failed: {tmp_path / 'none.toml'} does not exist: write the configuration there or pass --config\nERRNO=22"
    ]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("lczfs-unlockd 0.1.0")


# --- --timings: the bench's hook ------------------------------------------------


def test_timings_record_every_step_in_boot_order(world, wired, tmp_path):
    import json

    cfg, cmdline = wired
    world.answers = ["luks pass"]
    out = tmp_path / "timing.json"
    args = ["--config", str(cfg), "--kernel-cmdline", str(cmdline), "--timings", str(out)]
    assert cli.main(args) == 0
    data = json.loads(out.read_text())
    events = data["events"]
    order = [
        "main", "pool", "pool_done", "keystore_device", "keystore_device_done",
        "keystore_open", "keystore_open_done", "mount", "mount_done", "keys", "keys_done", "exit",
    ]  # fmt: skip
    assert [e for e in sorted(events, key=lambda e: events[e]["t"]) if e in order] == order
    assert all(events[e]["rss"] > 0 for e in order)
    assert data["VmHWM"] > 0 and data["VmPeak"] > 0
    assert "luks pass" not in out.read_text()
    assert out.stat().st_mode & 0o777 == 0o644


def test_timings_are_written_when_the_run_fails(world, wired, tmp_path):
    import json

    cfg, cmdline = wired
    world.answers = []  # the prompt is cancelled: the run fails
    out = tmp_path / "timing.json"
    args = ["--config", str(cfg), "--kernel-cmdline", str(cmdline), "--timings", str(out)]
    assert cli.main(args) == cli.EXIT_FAILURE
    events = json.loads(out.read_text())["events"]
    assert {"main", "pool_done", "keystore_open", "exit"} <= set(events)
    assert "keys" not in events


def test_timings_replace_a_symlink_or_fifo_never_write_through_it(world, wired, tmp_path):
    """A symlink at the path is replaced, not followed; a FIFO (whose open
    would block with no reader) is replaced too; nothing waits."""
    import json
    import os

    cfg, cmdline = wired
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    link = tmp_path / "timing.json"
    link.symlink_to(victim)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for path in (link, fifo):
        world.answers = ["luks pass"]
        args = ["--config", str(cfg), "--kernel-cmdline", str(cmdline), "--timings", str(path)]
        assert cli.main(args) == 0
        assert path.is_file() and not path.is_symlink()
        assert "main" in json.loads(path.read_text())["events"]
    assert victim.read_text() == "keep me\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".timings.")] == []


def test_timings_that_cannot_be_written_do_not_change_the_exit_code(world, wired, tmp_path, capfd):
    cfg, cmdline = wired
    world.answers = ["luks pass"]
    where = tmp_path / "no" / "such" / "dir" / "timing.json"
    args = ["--config", str(cfg), "--kernel-cmdline", str(cmdline), "--timings", str(where)]
    assert cli.main(args) == 0
    assert f"--timings {where}: cannot write: No such file or directory" in capfd.readouterr().err


def test_without_timings_nothing_is_recorded(world, wired):
    from lczfs_unlockd import log as logsetup

    cfg, cmdline = wired
    world.answers = ["luks pass"]
    logsetup._timings = None
    assert cli.main(["--config", str(cfg), "--kernel-cmdline", str(cmdline)]) == 0
    assert logsetup.timings() is None


def test_timings_never_remove_a_file_they_did_not_make(world, wired, tmp_path, monkeypatch):
    import tempfile

    cfg, cmdline = wired
    world.answers = ["luks pass"]
    other = tmp_path / "someone-elses"
    other.write_text("theirs\n")

    def refuse(**_kw):
        raise FileExistsError(17, "File exists", str(other))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = tmp_path / "timing.json"
    args = ["--config", str(cfg), "--kernel-cmdline", str(cmdline), "--timings", str(out)]
    assert cli.main(args) == 0
    assert other.read_text() == "theirs\n" and not out.exists()


def test_the_operations_commands_forbid_core_dumps_first():
    """setup, enroll, arm-reboot hold passphrases and raw keys: no core dump of them."""
    import subprocess
    import sys

    code = (
        "import contextlib, io\n"
        "from lczfs_unlockd import cli, libc\n"
        "assert libc.dumpable() == 1\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    cli.main(['status', '--help'])\n"
        "print(libc.dumpable())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


@pytest.mark.parametrize("command", ["disarm", "arm-reboot", "unenroll", "enroll"])
def test_an_operations_command_without_its_config_exits_6_naming_it(command, tmp_path, capsys):
    missing = tmp_path / "nowhere.toml"
    extra = {"unenroll": ["tpm2"], "enroll": ["recovery"]}.get(command, [])
    assert cli.main([command, *extra, "--config", str(missing)]) == 6
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "check-config" in err


def test_an_operations_command_refusing_exits_1(capsys):
    from lczfs_unlockd import ops_common
    from lczfs_unlockd.errors import OpsError

    def refuse(_args: object) -> int:
        raise OpsError("not armed: mentioning check-config does not make it a config problem")

    assert ops_common.run_command(refuse, argparse.Namespace()) == 1
    assert "not armed" in capsys.readouterr().err
