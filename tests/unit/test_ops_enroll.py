"""enroll / unenroll (lczfs_unlockd/ops_enroll.py) on a real LUKS2 image file, with
the stand-in systemd-cryptenroll of test_ops_arm for TPM2 and FIDO2."""

from __future__ import annotations

import pytest

from lczfs_unlockd import luksadmin, ops_enroll
from tests.unit.test_ops_arm import ZEROS, Box, make_box

pytestmark = pytest.mark.skipif(
    not __import__("shutil").which("cryptsetup"), reason="no cryptsetup CLI"
)


@pytest.fixture
def box(tmp_path, monkeypatch) -> Box:
    monkeypatch.setattr(ops_enroll, "PBKDF", luksadmin.MINIMAL_PBKDF)
    return make_box(tmp_path, monkeypatch)


def enroll(box: Box, *args: str) -> int:
    return ops_enroll.enroll_main([*args, "--passphrase-file", str(box.passfile)])


def test_tpm2_policy_pins_the_measurement_pcr():
    assert ops_enroll.tpm2_pcrs(None, None) == f"7+15:sha256={ZEROS}"
    assert ops_enroll.tpm2_pcrs("0+7", 12) == f"0+7+12:sha256={ZEROS}"
    pinned = f"7+15:sha256={ZEROS}"
    assert ops_enroll.tpm2_pcrs(pinned, None) == pinned  # pinned by the user: as given
    assert ops_enroll.tpm2_pcrs(f"7+15:sha1={'0' * 40}", None) == f"7+15:sha1={'0' * 40}"
    assert ops_enroll.tpm2_pcrs("7", False) == "7"
    with pytest.raises(ops_enroll.OpsError, match="measure_pcr = false"):
        ops_enroll.tpm2_pcrs(None, False)


@pytest.mark.parametrize(
    ("pcrs", "why"),
    [
        ("7+15", "names the measurement PCR 15 without its initial value"),
        (f"7+15:sha256={'0' * 63}1", "without its initial value"),
        (f"7+15:sha1={'0' * 64}", "without its initial value"),
        ("7+system-identity", "is not a PCR number 0-23"),
        ("7+24", "is not a PCR number 0-23"),
        ("", "is not a PCR number 0-23"),
    ],
)
def test_tpm2_policy_refuses_an_unpinned_measurement_pcr_and_names(pcrs, why):
    with pytest.raises(ops_enroll.OpsError, match=why):
        ops_enroll.tpm2_pcrs(pcrs, None)


def test_enroll_tpm2_with_unpinned_measurement_pcr_changes_nothing(box, capsys):
    assert enroll(box, "tpm2", "--tpm2-pcrs", "7+15") == 1
    assert "sealed to its value now" in capsys.readouterr().err
    assert box.argv() == [] and sorted(box.meta().keyslots) == [0]


def test_enroll_tpm2(box, capsys):
    assert enroll(box, "tpm2", "--tpm2-with-pin") == 0
    argv = box.argv()[-1]
    assert f"--tpm2-pcrs=7+15:sha256={ZEROS}" in argv and "--tpm2-with-pin=yes" in argv
    assert "enrolled tpm2 in key slot 1" in capsys.readouterr().out
    assert box.meta().human_slots() == [0]


def test_enroll_refuses_a_wrong_unlock_secret(box, capsys):
    box.passfile.write_bytes(b"wrong")
    assert enroll(box, "recovery") == 1
    assert "does not open" in capsys.readouterr().err
    assert sorted(box.meta().keyslots) == [0]


def test_enroll_recovery_prints_it_once_and_it_opens(box, capsys):
    assert enroll(box, "recovery") == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("RECOVERY KEY: ")]
    assert len(lines) == 1
    key = lines[0].removeprefix("RECOVERY KEY: ").encode()
    assert luksadmin.test_key(str(box.image), key, slot=1)
    assert {t.type for t in box.meta().tokens.values()} == {"systemd-recovery"}


def test_enroll_passphrase_then_unenroll_needs_slot(box, capsys, tmp_path):
    new = tmp_path / "new"
    new.write_bytes(b"second passphrase")
    assert enroll(box, "passphrase", "--new-passphrase-file", str(new)) == 0
    assert luksadmin.test_key(str(box.image), b"second passphrase", slot=1)
    assert ops_enroll.unenroll_main(["passphrase", "--yes"]) == 1
    assert "several passphrase slots (0, 1)" in capsys.readouterr().err
    assert ops_enroll.unenroll_main(["passphrase", "--slot", "0"]) == 0
    assert "Nothing done" in capsys.readouterr().out  # the plan only
    assert sorted(box.meta().keyslots) == [0, 1]
    # proof that a staying slot works: the passphrase of slot 0 (the one to go) is not
    args = ["passphrase", "--slot", "0", "--yes", "--passphrase-file"]
    assert ops_enroll.unenroll_main([*args, str(box.passfile)]) == 1
    assert "opens none of the key slots of" in capsys.readouterr().err
    assert sorted(box.meta().keyslots) == [0, 1]
    assert ops_enroll.unenroll_main([*args, str(new)]) == 0
    assert sorted(box.meta().keyslots) == [1]


def test_unenroll_refuses_the_last_human_slot(box, capsys):
    assert enroll(box, "tpm2") == 0
    assert ops_enroll.unenroll_main(["passphrase", "--yes"]) == 1
    assert "last one a person can open" in capsys.readouterr().err
    assert ops_enroll.unenroll_main(["slot", "--slot", "0", "--yes"]) == 1
    assert sorted(box.meta().keyslots) == [0, 1]


def test_unenroll_tpm2_removes_slot_and_token(box, capsys):
    assert enroll(box, "tpm2") == 0
    assert ops_enroll.unenroll_main(["tpm2"]) == 0
    out = capsys.readouterr().out
    assert "destroy key slot 1" in out and "systemd-tpm2 token 0" in out
    wrong = box.tmp / "wrong"
    wrong.write_bytes(b"not it")
    assert ops_enroll.unenroll_main(["tpm2", "--yes", "--passphrase-file", str(wrong)]) == 1
    assert sorted(box.meta().keyslots) == [0, 1]
    assert ops_enroll.unenroll_main(["tpm2", "--yes", "--passphrase-file", str(box.passfile)]) == 0
    meta = box.meta()
    assert sorted(meta.keyslots) == [0] and meta.tokens == {}
    assert ops_enroll.unenroll_main(["fido2", "--yes"]) == 0
    assert "no fido2 key slot" in capsys.readouterr().out


def test_unenroll_recovery_keeps_the_passphrase(box):
    assert enroll(box, "recovery") == 0
    assert (
        ops_enroll.unenroll_main(["recovery", "--yes", "--passphrase-file", str(box.passfile)]) == 0
    )
    meta = box.meta()
    assert sorted(meta.keyslots) == [0] and meta.tokens == {}


def test_help_explains_the_tpm2_policy(capsys):
    with pytest.raises(SystemExit):
        ops_enroll.enroll_main(["--help"])
    out = capsys.readouterr().out
    assert "7+15:sha256=0000" in out and "measure_pcr = false" in out
