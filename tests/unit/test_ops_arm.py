"""arm-reboot and disarm (lczfs_unlockd/ops_arm.py) on a real LUKS2 image file.

cryptsetup is real; systemd-cryptenroll is a stand-in script (this host's
systemd 252 cannot pin a PCR to a value, and no TPM is here) that does what
it does to the header: a key slot for a fresh secret and a systemd-tpm2
token naming it.  It records its argv, so the tests see the policy asked for.
"""

from __future__ import annotations

import json
import shutil
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
