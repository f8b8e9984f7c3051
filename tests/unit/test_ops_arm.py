"""arm-reboot and disarm (lczfs_unlockd/ops_arm.py) on a real LUKS2 image file.

cryptsetup is real; systemd-cryptenroll is a stand-in script (this host's
systemd 252 cannot pin a PCR to a value, and no TPM is here) that does what
it does to the header: a key slot for a fresh secret and a systemd-tpm2
token naming it.  It records its argv, so the tests see the policy asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lczfs_unlockd import keystore, luksadmin, ops_arm

pytestmark = pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="no cryptsetup CLI")

PASSPHRASE = b"keystore passphrase"
ZEROS = "0" * 64

FAKE_CRYPTENROLL = """\
#!{python}
import json, os, secrets, subprocess, sys
here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
with open(os.path.join(here, "argv.log"), "a") as log:
    log.write(json.dumps(args) + "\\n")
if args == ["--tpm2-device=list"]:
    print("PATH        DEVICE      DRIVER")
    print("/dev/tpmrm0 MSFT0101:00 tpm_crb")
    sys.exit(0)
device = args[-1]
given = [a.split("=", 1)[1] for a in args if a.startswith("--unlock-key-file=")][0]
unlock = os.path.join(here, "unlock.key")  # the pipe is ours only: a file for cryptsetup
with open(given, "rb") as src, open(unlock, "wb") as dst:
    dst.write(src.read())
new = os.path.join(here, "new.key")
with open(new, "w") as f:
    f.write(secrets.token_hex(32))
dump = lambda: json.loads(subprocess.run(
    ["cryptsetup", "luksDump", "--dump-json-metadata", device],
    check=True, capture_output=True, text=True).stdout)
before = set(dump()["keyslots"])
subprocess.run(["cryptsetup", "luksAddKey", "--batch-mode", "--key-file", unlock,
                "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", device, new],
               check=True)
slot = (set(dump()["keyslots"]) - before).pop()
if os.path.exists(os.path.join(here, "fail")):
    print("Failed to seal to TPM2: simulated", file=sys.stderr)
    sys.exit(1)
if os.path.exists(os.path.join(here, "sigterm")):  # the user's Ctrl-C, a shutdown
    import signal, time
    os.kill(os.getppid(), getattr(signal, open(os.path.join(here, "sigterm")).read()))
    time.sleep(30)
kind = "systemd-fido2" if any(a.startswith("--fido2") for a in args) else "systemd-tpm2"
# The plugin validates a systemd-tpm2 token's fields on import: all of them.
token = {{"type": kind, "keyslots": [slot], "tpm2-blob": "AJ4AIDYf0mm27DbEBU9Y",
         "tpm2-pcrs": [7, 15], "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc",
         "tpm2-policy-hash": "f62d13a8dfa1a3dca5b7f16214692abd321889814e17d52ab9e830623eb8f15d",
         "tpm2-pin": False}}
subprocess.run(["cryptsetup", "token", "import", device], input=json.dumps(token),
               text=True, check=True)
print("New TPM2 token enrolled as key slot " + slot + ".", file=sys.stderr)
"""


class Box:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.image = tmp / "keystore.img"
        self.passfile = tmp / "pass"
        self.passfile.write_bytes(PASSPHRASE)
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.script = self.bin / "systemd-cryptenroll"
        self.script.write_text(textwrap.dedent(FAKE_CRYPTENROLL.format(python=sys.executable)))
        self.script.chmod(0o755)
        self.tpm = tmp / "tpmrm0"
        self.tpm.write_text("")
        self.secure_boot = tmp / "SecureBoot-8be4df61-93ca-11d2-aa0d-e98c0ec4fd9c"

    def argv(self) -> list[list[str]]:
        log = self.bin / "argv.log"
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    def meta(self) -> luksadmin.Metadata:
        return luksadmin.metadata(str(self.image))


def make_box(tmp_path, monkeypatch, measure_pcr=None) -> Box:
    box = Box(tmp_path)
    with open(box.image, "wb") as f:
        f.truncate(32 * 1024 * 1024)
    luksadmin.format_luks2(str(box.image), PASSPHRASE, pbkdf=luksadmin.MINIMAL_PBKDF)
    monkeypatch.setattr(luksadmin, "CRYPTENROLL", str(box.script))
    cfg = SimpleNamespace(keystore=SimpleNamespace(device=str(box.image), measure_pcr=measure_pcr))
    for module in ("ops_arm", "ops_enroll"):
        monkeypatch.setattr(f"lczfs_unlockd.{module}.load_config", lambda path: cfg)
    monkeypatch.setattr(ops_arm, "TPM_DEVICE", str(box.tpm))
    box.secure_boot.write_bytes(b"\x06\x00\x00\x00\x01")  # attributes, then 1: enabled
    monkeypatch.setattr(ops_arm, "SECURE_BOOT_VAR", str(box.secure_boot))
    return box


@pytest.fixture
def box(tmp_path, monkeypatch) -> Box:
    return make_box(tmp_path, monkeypatch)


def arm(box: Box, *extra: str) -> int:
    return ops_arm.arm_main(["--passphrase-file", str(box.passfile), *extra])


def test_arm_adds_slot_token_and_marker(box, capsys):
    assert arm(box, "--expires", "2h") == 0
    out = capsys.readouterr().out
    meta = box.meta()
    assert sorted(meta.keyslots) == [0, 1]
    types = {n: t.type for n, t in meta.tokens.items()}
    assert types == {0: "systemd-tpm2", 1: "lczfs-armed"}
    marker = meta.tokens[1].fields
    unlock = keystore.parse_marker(1, marker, lambda n: meta.tokens[n].fields)
    assert (unlock.slot, unlock.token) == (1, 0)
    assert unlock.expires - unlock.armed_at == 7200
    assert abs(unlock.armed_at - time.time()) < 60
    assert f"armed: key slot 1 (token 0), expires {keystore.utc(unlock.expires)}" in out
    enroll = box.argv()[-1]
    assert "--tpm2-device=auto" in enroll
    assert f"--tpm2-pcrs=7+15:sha256={ZEROS}" in enroll
    assert not any("keystore passphrase" in a for a in enroll)  # only through a pipe
    assert ["--tpm2-device=list"] in box.argv()
    assert meta.human_slots() == [0]
    # "any token" must never use it: priority ignore; pbkdf2 as systemd-cryptenroll's
    assert (meta.keyslots[1].priority, meta.keyslots[1].kdf) == (0, "pbkdf2")


def test_arm_binds_the_pcrs_asked_for(box):
    assert arm(box, "--tpm2-pcrs", "7+0+4+2") == 0
    assert f"--tpm2-pcrs=0+2+4+7+15:sha256={ZEROS}" in box.argv()[-1]


@pytest.mark.parametrize(
    ("pcrs", "why"),
    [
        ("7+15", "names the measurement PCR 15"),
        ("7+24", "PCR numbers 0-23"),
        ("system-identity", "PCR numbers 0-23"),
        ("7:sha256=00", "PCR numbers 0-23"),
        ("", "PCR numbers 0-23"),
    ],
)
def test_arm_refuses_bad_pcrs(box, capsys, pcrs, why):
    assert arm(box, "--tpm2-pcrs", pcrs) == 1
    assert why in capsys.readouterr().err
    assert sorted(box.meta().keyslots) == [0]


@pytest.mark.parametrize("content", [None, b"\x06\x00\x00\x00\x00", b"\x06\x00\x00"])
def test_arm_refuses_without_secure_boot(box, capsys, content):
    if content is None:
        box.secure_boot.unlink()  # no EFI, or no such variable
    else:
        box.secure_boot.write_bytes(content)
    assert arm(box) == 1
    err = capsys.readouterr().err
    assert "Secure Boot is not enabled" in err and "tpm2-tools" in err
    assert "--allow-without-secure-boot" in err and "0+2+4+7" in err
    assert box.argv() == [] and sorted(box.meta().keyslots) == [0]
    assert arm(box, "--allow-without-secure-boot", "--tpm2-pcrs", "0+2+4+7") == 0
    assert "warning: Secure Boot is not enabled" in capsys.readouterr().err


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_while_arming_removes_what_was_added(box, capsys, sig):
    (box.bin / "sigterm").write_text(sig)
    assert arm(box) == 1
    err = capsys.readouterr().err
    assert f"stopped by {sig}" in err and "removed the unfinished key slot 1" in err
    meta = box.meta()
    assert sorted(meta.keyslots) == [0] and meta.tokens == {}
    import signal

    assert signal.getsignal(getattr(signal, sig)) is not ops_arm._Stopped  # handlers restored


def test_the_disarm_timer_is_at_the_absolute_expiry(box, monkeypatch, tmp_path):
    runs = []

    def fake_run(argv, check=True, timeout=None):
        runs.append(list(argv))
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(ops_arm.os.path, "isdir", lambda p: p == "/run/systemd/system" or
                        os.path.isdir(p))  # fmt: skip
    monkeypatch.setattr(ops_arm.shutil, "which", lambda name, **kw: f"/usr/bin/{name}")
    monkeypatch.setattr(ops_arm.process, "run", fake_run)
    monkeypatch.setenv("PYTHONPATH", "/src/tree")
    monkeypatch.setattr(ops_arm.sys, "argv", ["-m"])
    monkeypatch.chdir(tmp_path)
    ops_arm._timer(1_800_000_000, os.path.abspath("rel.toml"))
    assert runs[0] == ["systemctl", "stop", "lczfs-unlockd-disarm.timer",
                       "lczfs-unlockd-disarm.service"]  # fmt: skip
    assert runs[1][:2] == ["systemctl", "reset-failed"]
    started = runs[2]
    assert "--on-calendar=2027-01-15 08:00:00 UTC" in started
    assert not any(a.startswith("--on-active") for a in started)
    assert "--setenv=PYTHONPATH=/src/tree" in started
    at = started.index(ops_arm.sys.executable)
    assert started[at:] == [ops_arm.sys.executable, "-m", "lczfs_unlockd", "disarm", "--config",
                            str(tmp_path / "rel.toml")]  # fmt: skip


def test_the_timer_runs_the_entry_point_that_runs(monkeypatch, tmp_path):
    entry = tmp_path / "lczfs-unlockd"
    entry.write_text("#!/bin/sh\n")
    entry.chmod(0o755)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setattr(ops_arm.sys, "argv", [str(entry), "arm-reboot"])
    assert ops_arm._command() == [str(entry)]
    monkeypatch.setattr(ops_arm.sys, "argv", ["/usr/lib/python3/pytest"])
    assert ops_arm._command() == [ops_arm.sys.executable, "-m", "lczfs_unlockd"]


def test_arm_passes_the_config_path_absolute(box, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(ops_arm, "_timer", lambda expires, path: seen.append(path))
    monkeypatch.chdir(tmp_path)
    assert ops_arm.arm_main(["--config", "etc/x.toml", "--passphrase-file", str(box.passfile)]) == 0
    assert seen == [str(tmp_path / "etc/x.toml")]


def test_arm_uses_the_configured_measurement_pcr(tmp_path, monkeypatch):
    box = make_box(tmp_path, monkeypatch, measure_pcr=12)
    assert arm(box) == 0
    assert f"--tpm2-pcrs=7+12:sha256={ZEROS}" in box.argv()[-1]


def test_arm_refuses_when_measurement_is_off(tmp_path, monkeypatch, capsys):
    box = make_box(tmp_path, monkeypatch, measure_pcr=False)
    assert arm(box) == 1
    assert "could be unsealed again later in the same boot" in capsys.readouterr().err
    assert box.argv() == [] and sorted(box.meta().keyslots) == [0]


def test_arm_refuses_without_tpm(box, capsys):
    box.tpm.unlink()
    assert arm(box) == 1
    assert "no TPM2" in capsys.readouterr().err
    assert sorted(box.meta().keyslots) == [0]


def test_arm_refuses_when_tpm_list_is_empty(box, capsys, monkeypatch):
    box.script.write_text("#!/bin/sh\necho 'No suitable TPM2 devices found.' >&2\n")
    assert arm(box) == 1
    assert "lists no TPM2 device" in capsys.readouterr().err


def test_arm_refuses_when_already_armed(box, capsys):
    assert arm(box) == 0
    assert arm(box) == 1
    err = capsys.readouterr().err
    assert "already armed" in err and "run lczfs-unlockd disarm first" in err
    assert sorted(box.meta().keyslots) == [0, 1]


def test_arm_with_wrong_passphrase_changes_nothing(box, capsys):
    box.passfile.write_bytes(b"wrong")
    assert arm(box) == 1
    assert "does not open" in capsys.readouterr().err
    assert sorted(box.meta().keyslots) == [0] and box.meta().tokens == {}


def test_failed_enrollment_removes_what_it_added(box, capsys):
    (box.bin / "fail").write_text("")
    assert arm(box) == 1
    err = capsys.readouterr().err
    assert "removed the unfinished key slot 1" in err
    assert sorted(box.meta().keyslots) == [0] and box.meta().tokens == {}


def test_failed_marker_import_removes_slot_and_token(box, monkeypatch, capsys):
    def broken(device, token):
        raise luksadmin.LuksAdminError(f"{device}: cannot import a token: simulated")

    monkeypatch.setattr(luksadmin, "import_token", broken)
    assert arm(box) == 1
    assert "nothing armed" in capsys.readouterr().err
    meta = box.meta()
    assert sorted(meta.keyslots) == [0] and meta.tokens == {}


def test_disarm_removes_slot_and_tokens(box, capsys):
    assert arm(box) == 0
    assert ops_arm.disarm_main([]) == 0
    assert "disarmed: removed key slot 1 and tokens 0 and 1" in capsys.readouterr().out
    meta = box.meta()
    assert sorted(meta.keyslots) == [0] and meta.tokens == {}
    assert ops_arm.disarm_main([]) == 0
    assert "not armed" in capsys.readouterr().out


def _slot_only_the_daemon_knows(box: Box) -> None:
    """Key slot 1 + a systemd-tpm2 token, as systemd-cryptenroll makes them."""
    (box.bin / "argv.log").unlink(missing_ok=True)
    luksadmin.cryptenroll(str(box.image), ["--tpm2-device=auto"], PASSPHRASE)


def _priority(box: Box, slot: int, value: str) -> None:
    subprocess.run(
        ["cryptsetup", "config", "--priority", value, "--key-slot", str(slot), str(box.image)],
        check=True,
        timeout=30,
    )


def test_disarm_removes_what_a_boot_cut_short_left(box, capsys):
    """The daemon removed the marker, then the boot stopped: S and T stay,
    S with priority ignore; disarm finds and removes them."""
    assert arm(box) == 0
    luksadmin.remove_token(str(box.image), 1)
    assert keystore.one_time_leftovers(box.meta().keyslots, box.meta().tokens) == [0]
    assert ops_arm.disarm_main([]) == 0
    assert "removed the leftover one-time token 0 (systemd-tpm2, key slot 1)" in (
        capsys.readouterr().out
    )
    meta = box.meta()
    assert sorted(meta.keyslots) == [0] and meta.tokens == {}


def test_disarm_removes_tokens_naming_no_slot(box, capsys):
    assert arm(box) == 0
    subprocess.run(["cryptsetup", "luksKillSlot", "--batch-mode", str(box.image), "1"],
                   check=True, timeout=30)  # fmt: skip
    assert {n: t.keyslots for n, t in box.meta().tokens.items()} == {0: (), 1: ()}
    assert ops_arm.disarm_main([]) == 0
    out = capsys.readouterr().out
    assert "removed the invalid marker token 1" in out
    assert "removed the leftover one-time token 0 (systemd-tpm2, no key slot)" in out
    assert box.meta().tokens == {}


def test_disarm_never_touches_an_enrolled_tpm2_slot(box, capsys):
    _slot_only_the_daemon_knows(box)  # slot 1, token 0: priority normal
    assert ops_arm.disarm_main([]) == 0
    assert "not armed" in capsys.readouterr().out
    assert sorted(box.meta().keyslots) == [0, 1] and sorted(box.meta().tokens) == [0]


@pytest.mark.parametrize("change", ["normal", "recovery"])
def test_disarm_keeps_a_marker_slot_arm_reboot_did_not_make(box, capsys, change):
    assert arm(box) == 0
    if change == "normal":
        _priority(box, 1, "normal")
    else:
        luksadmin.import_token(str(box.image), {"type": "systemd-recovery", "keyslots": ["1"]})
    assert ops_arm.disarm_main([]) == 0
    assert "removed the invalid marker token 1" in capsys.readouterr().out
    assert 1 in box.meta().keyslots


def test_arm_refuses_leftovers(box, capsys):
    assert arm(box) == 0
    luksadmin.remove_token(str(box.image), 1)
    assert arm(box) == 1
    assert "leftovers of an earlier one-time unlock (token 0)" in capsys.readouterr().err


def test_disarm_removes_an_invalid_marker_but_no_slot(box, capsys):
    luksadmin.import_token(
        str(box.image), {**keystore.marker_json(0, 3, 1000, 2000), "keyslots": ["0"]}
    )
    assert ops_arm.disarm_main([]) == 0
    assert "removed the invalid marker token 0" in capsys.readouterr().out
    meta = box.meta()
    assert sorted(meta.keyslots) == [0] and meta.tokens == {}


def test_real_cryptenroll_252_refusal_is_explained(box, monkeypatch, capsys):
    """This host's systemd-cryptenroll (252) rejects PCR values: said plainly."""
    real = shutil.which("systemd-cryptenroll", path="/usr/bin:/bin")
    if real is None:
        pytest.skip("no systemd-cryptenroll")
    monkeypatch.setattr(luksadmin, "CRYPTENROLL", real)
    monkeypatch.setattr(ops_arm, "_check_tpm", lambda device: None)
    code = arm(box, "--tpm2-device", "swtpm:host=127.0.0.1,port=1")
    err = capsys.readouterr().err
    if code == 0:
        pytest.skip("this systemd-cryptenroll accepts PCR values")
    assert "cannot bind a PCR to a given value" in err, err
    assert sorted(box.meta().keyslots) == [0]


def test_help_is_enough_on_its_own(capsys):
    with pytest.raises(SystemExit):
        ops_arm.arm_main(["--help"])
    out = capsys.readouterr().out
    assert "lczfs-unlockd arm-reboot" in out and "7+15:sha256=0000" in out and "example" in out
