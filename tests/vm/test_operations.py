"""The operations commands (issue 11) in the guest, then the boots after them.

Each test is a session (vm.Session): an operations boot, a provisioning-style
boot that stands in for the running system (build.ops_initrd: the daemon's
package and launcher, the tools, lczfs-unlockd.service masked), runs a
script of guest/ops/ with the commands as a person would, then the real
initrd boots on the disks and the TPM state it left.  Every secret the
session made or saw (the old passphrases, the new key files, the recovery
key) is grepped for in each later boot's journal, /run and console.

Run: ``.venv/bin/python -m pytest -m vm tests/vm/test_operations.py -v -s``.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lczfsvm import build
from lczfsvm.paths import GUEST_DIR
from lczfsvm.vm import Boot, Checks, OpsBoot, OpsResult, Result, Session, toml_config

pytestmark = pytest.mark.vm

Start = Callable[..., Session]
OPS = GUEST_DIR / "ops"
ROOT_CMDLINE = "root=zfs:rpool/crypt/local/root"
SEED_CRYPT = ["rpool/crypt", "rpool/crypt/local", "rpool/crypt/local/root",
              "rpool/crypt/local/nix", "rpool/crypt/safe", "rpool/crypt/safe/persist"]  # fmt: skip
ZFS_WRAP = ("usr/lib/lczfs-test/zfs-wrap", (GUEST_DIR / "zfs-wrap").read_bytes(), 0o755)


def passphrases(*names: str) -> Callable[[Path], None]:
    """A session's secrets: one random passphrase per name (no newline, >= 8 bytes for ZFS)."""

    def make(d: Path) -> None:
        d.mkdir()
        for name in names:
            (d / name).write_bytes(f"lczfs-{name.split('.')[0]}-{secrets.token_hex(8)}".encode())

    return make


# --- what the boots after an operation must show -------------------------------------
def keystore_names(config: str) -> tuple[str, str]:
    import tomllib

    keystore = tomllib.loads(config)["keystore"]
    return keystore.get("name", "lczfs-keystore"), keystore.get("mountpoint", "/bootsecrets")


def assert_clean(r: Result, session: Session, config: str) -> None:
    """Keystore closed and unmounted, its units masked; no secret of the session
    (nor the typed answers) in /run, the journal or on the console."""
    name, mountpoint = keystore_names(config)
    assert not any(name in m for m in r.mappings()), f"mapping left: {r.mappings()}"
    assert r.mounts_at(mountpoint) == [], r.mounts_at(mountpoint)
    assert r.report["needle_hits"] == [], f"secret found under /run: {r.report['needle_hits']}"
    assert r.report["needle_hits_journal_text"] == [], "secret found in the journal"
    console = (r.workdir / "console.log").read_bytes()
    shown = [n.hex()[:16] for n in session.secrets.needles if len(n) >= 8 and n in console]
    assert shown == [], f"secrets on the console (hex prefixes): {shown}"
    for unit, state in r.report["units"].items():
        assert state["is_enabled"] == "masked-runtime", (unit, state)


def assert_unlocked(r: Result, session: Session, config: str, datasets: list[str]) -> None:
    assert r.unit["ActiveState"] == "active", r.describe() + "\n" + r.journal
    assert r.unit["Result"] == "success", r.describe()
    ks = r.keystatus()
    for ds in datasets:
        assert ks.get(ds) == "available", f"{ds}: {ks.get(ds)}\n{r.journal}"
    assert "unlocked" in r.status, r.status
    assert_clean(r, session, config)


def assert_step(r: OpsResult, step: str, rc: int = 0) -> None:
    assert r.rc(step) == rc, r.explain(step)


def lines_of(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


# --- A: setup on a pool whose roots use passphrase prompts ------------------------------
def test_setup_then_the_daemon_unlocks_with_the_keystore_passphrase(session: Start) -> None:
    """setup moves rpool/crypt and rpool/data (keyformat=passphrase,
    keylocation=prompt, on a pool made from nothing) into a new keystore; the
    old passphrases no longer load them, the key files do, the recovery key
    opens the keystore; the next boot asks for the keystore passphrase once and
    loads both."""
    s = session(
        "setup", {"new0": "512M"}, secrets=passphrases("crypt.pass", "data.pass", "keystore.pass")
    )
    r = s.ops(OpsBoot("setup-ops", OPS / "setup.sh", disks=("new0",)))
    print(r.describe())
    assert_step(r, "setup")
    out = r.out("setup")
    for ds in ("rpool/crypt", "rpool/data"):
        where = f"file:///bootsecrets/{ds}.key"
        assert f"changing key of {ds} to {where} ..." in out, out
        assert f"changed key of {ds}: now keyformat=hex keylocation={where}" in out, out
        name = ds.split("/")[1]
        assert r.records[f"{name}.keylocation"] == where, r.records
        assert r.records[f"{name}.keyformat"] == "hex", r.records
        # The old passphrase no longer loads it; the key file in the keystore does.
        assert r.rc(f"{name}-old") != 0, r.explain(f"{name}-old")
        assert_step(r, f"{name}-new")
    recovery = lines_of(out, "RECOVERY KEY: ")
    assert len(recovery) == 1, out
    key = recovery[0].removeprefix("RECOVERY KEY: ").strip()
    assert re.fullmatch(r"[cbdefghijklnrtuv]{8}(-[cbdefghijklnrtuv]{8}){7}", key), key
    assert s.secrets.bytes("recovery.key").decode() == key
    assert_step(r, "recovery-opens")
    assert_step(r, "passphrase-opens")
    assert r.rc("wrong-refused") != 0, r.explain("wrong-refused")
    # The key files are secrets of the session now: later boots are grepped for them.
    assert {"keyfile-rpool_crypt.key", "keyfile-rpool_data.key"} <= {
        p.name for p in (s.dir / "secrets").iterdir()
    }
    assert r.records["left-mappings"] in ("", "No devices found;"), r.records
    header = json.loads(r.out("dump"))
    kinds = sorted(t["type"] for t in header["tokens"].values())
    assert kinds == ["systemd-recovery"], header["tokens"]
    assert len(header["keyslots"]) == 2, header["keyslots"]  # passphrase, recovery key

    config = s.file("config").decode()
    b = s.boot(
        Boot(
            "setup-boot",
            config,
            disks=("new0",),
            cmdline=ROOT_CMDLINE,
            answers=(s.secrets.bytes("keystore.pass").decode(),),
        )
    )
    print(b.describe())
    assert len(b.prompts) == 1, b.prompts
    assert_unlocked(b, s, config, ["rpool/crypt", "rpool/data", "rpool/crypt/local/root"])
    assert "keystore opened with passphrase" in b.journal, b.journal
    assert b.report["root_checked"] is True and b.report["root_refused"] is False, b.journal


# --- B: setup interrupted ------------------------------------------------------------
def assert_one_key(r: OpsResult, name: str, dataset: str, old_location: str = "prompt") -> str:
    """Exactly one of (old passphrase, new key file) loads dataset, and its
    keylocation says which; returns "old" or "new"."""
    old_ok = r.rc(f"{name}-old") == 0
    new_ok = r.records[f"{name}-new.rc"] == "0"
    location = r.records[f"{name}.keylocation"]
    detail = f"{dataset}: {r.records}\n{r.explain(f'{name}-old')}\n{r.explain(f'{name}-new')}"
    assert old_ok != new_ok, detail
    if old_ok:
        assert location == old_location, detail
        assert r.records[f"{name}.keyformat"] == "passphrase", detail
        return "old"
    assert location == f"file:///bootsecrets/{dataset}.key" or location.startswith("file://"), (
        detail
    )
    assert r.records[f"{name}.keyformat"] == "hex", detail
    return "new"


def test_setup_interrupted_loses_no_key(session: Start) -> None:
    """rpool: setup killed (SIGKILL) between the key changes of its two roots;
    tank: `zfs change-key` fails for the second root.  Every root still loads
    with exactly one of its old passphrase and its new key file, keylocation
    says which, and the failed setup (exit 1) says which root uses which key."""
    s = session(
        "setup-interrupted",
        {"new0": "512M", "new1": "512M"},
        secrets=passphrases("one.pass", "two.pass", "keystore.pass"),
    )
    r = s.ops(
        OpsBoot(
            "setup-interrupted-ops",
            OPS / "setup-interrupted.sh",
            disks=("new0", "new1"),
            files=(ZFS_WRAP,),
        )
    )
    print(r.describe())
    killed_out = r.files["killed.out"].decode(errors="replace")
    killed_err = r.files["killed.err"].decode(errors="replace")
    assert r.records["killed.line-seen"] == "1", killed_out + killed_err
    assert r.records["killed.blocked"] == "yes", killed_out + killed_err
    assert "changing key of rpool/two to" in killed_out, killed_out
    # Killed between the two: one has its new key, two its old one.
    assert assert_one_key(r, "killed-one", "rpool/one") == "new"
    assert assert_one_key(r, "killed-two", "rpool/two") == "old"

    # The failing zfs change-key: exit 1, and stderr names each root's key.
    assert_step(r, "failed", 1)
    err = r.err("failed")
    states = {
        "one": assert_one_key(r, "failed-one", "tank/one"),
        "two": assert_one_key(r, "failed-two", "tank/two"),
    }
    assert states["two"] == "old", r.records
    assert "tank/two: still uses its old key (keylocation=prompt)" in err, r.explain("failed")
    if states["one"] == "new":
        assert "tank/one: now uses the key file /run/tankks/tank/one.key in the keystore" in err, (
            r.explain("failed")
        )
    else:  # rolled back
        assert "tank/one: still uses its old key (keylocation=prompt)" in err, r.explain("failed")


# --- C: status on the seed layout ---------------------------------------------------
SEED_KEYSTORE = "/dev/zvol/rpool/volumes/bootsecrets-part1"
SEED_CONFIG = toml_config(unlock=("token", "passphrase"))


def with_initrd(s: Session, config: str) -> tuple[str, bytes, int]:
    """/boot/initrd.img: a base initrd built with config in the tree (the dracut
    module copies it in), as dracut gives a user: for status --initrd."""
    initrd = build.base_initrd(s.guest.root, build.InitrdConfig(config))
    return ("boot/initrd.img", initrd.read_bytes(), 0o644)


def status_of(r: OpsResult, step: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(r.out(step))
    except json.JSONDecodeError:
        raise AssertionError(r.explain(step)) from None
    assert data["exit"] == r.rc(step), (data["exit"], r.explain(step))
    print(
        f"{step}: exit {data['exit']}, warnings:", *(f"  {w}" for w in data["warnings"]), sep="\n"
    )
    return data


def warned(data: dict[str, Any], phrase: str) -> list[str]:
    return [w for w in data["warnings"] if phrase in w]


def test_status_on_the_seed_layout(session: Start) -> None:
    """status with the seed's TPM2 token (predicted to match: exit 0, but no
    recovery key), after enroll recovery (no warning), after the passphrase
    slots went (unenroll refuses the last human slot), after a PCR 7 change
    (exit 1: the recovery key is needed), and with token-bound slots only
    (exit 2, DANGER)."""
    s = session("status", {"seed0": None}, tpm=True)
    r = s.ops(
        OpsBoot(
            "status-ops",
            OPS / "status.sh",
            tpm=True,
            config=SEED_CONFIG,
            files=(with_initrd(s, SEED_CONFIG),),
        )
    )
    print(r.describe())
    golden = status_of(r, "status-golden")
    (token,) = [t for t in golden["tpm2"]["tokens"]]
    assert token["prediction"] == "match", golden["tpm2"]
    assert golden["initrd"]["config"] == "same", golden["initrd"]
    assert golden["exit"] == 0 and golden["unattended"] is True, golden
    assert warned(golden, "no recovery key"), golden["warnings"]

    assert_step(r, "enroll-recovery")
    assert len(lines_of(r.out("enroll-recovery"), "RECOVERY KEY: ")) == 1
    assert_step(r, "recovery-opens")
    recovered = status_of(r, "status-recovery")
    assert not warned(recovered, "no recovery key"), recovered["warnings"]
    assert recovered["exit"] == 0, recovered

    # Slots 0 (passphrase) and 1 (key file) both look like passphrases.
    assert r.rc("unenroll-ambiguous") != 0, r.explain("unenroll-ambiguous")
    assert "--slot" in r.err("unenroll-ambiguous"), r.explain("unenroll-ambiguous")
    assert_step(r, "unenroll-keyfile")
    assert_step(r, "unenroll-passphrase")
    humans_gone = json.loads(r.files["header-humans-gone.json"])
    bound = {k for t in humans_gone["tokens"].values() for k in t["keyslots"]}
    assert set(humans_gone["keyslots"]) == bound, humans_gone  # TPM2 and recovery only
    assert not {"0", "1"} & set(humans_gone["keyslots"]), humans_gone["keyslots"]
    # The last slot a person can open: refused, the header unchanged.
    assert r.rc("unenroll-recovery") != 0, r.explain("unenroll-recovery")
    assert "last" in r.err("unenroll-recovery").lower(), r.explain("unenroll-recovery")
    assert r.files["header-refused.json"] == r.files["header-humans-gone.json"]
    both = status_of(r, "status-tpm-and-recovery")
    assert both["exit"] == 0, both
    assert not warned(both, "only token-bound key slots"), both["warnings"]

    assert_step(r, "pcrextend")
    changed = status_of(r, "status-pcr7-changed")
    assert changed["exit"] == 1 and changed["unattended"] is False, changed
    n = token["token"]
    assert warned(changed, f"TPM2 policy of token {n} will not match"), changed["warnings"]
    assert changed["tpm2"]["tokens"][0]["prediction"] == "mismatch", changed["tpm2"]

    only = status_of(r, "status-token-only")
    assert only["exit"] == 2, only
    assert warned(only, "only token-bound key slots"), only["warnings"]
    header = json.loads(r.files["header-token-only.json"])
    assert [t["type"] for t in header["tokens"].values()] == ["systemd-tpm2"], header["tokens"]


# --- D: arm-reboot ------------------------------------------------------------------
ARMED_MARKER = "lczfs-armed"


def tokens(header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(header["tokens"])


def test_arm_reboot_unlocks_once_without_a_prompt(session: Start) -> None:
    """With the seed's permanent TPM2 token removed: arm then disarm leaves the
    header as it was; armed again, the next boot opens the keystore with the
    one-time token, no prompt, and destroys it; the boot after asks for the
    passphrase."""
    s = session("arm-reboot", {"seed0": None}, tpm=True)
    r = s.ops(
        OpsBoot(
            "arm-ops",
            OPS / "arm.sh",
            tpm=True,
            config=SEED_CONFIG,
            files=(with_initrd(s, SEED_CONFIG),),
        )
    )
    print(r.describe())
    assert_step(r, "unenroll-tpm2")
    unarmed = json.loads(r.files["header-unarmed.json"])
    assert not [t for t in tokens(unarmed).values() if t["type"] == "systemd-tpm2"], unarmed
    for n in (1, 2):
        assert_step(r, f"arm-{n}")
        line = lines_of(r.out(f"arm-{n}"), "armed: ")
        assert len(line) == 1, r.explain(f"arm-{n}")
        assert re.fullmatch(
            r"armed: key slot (\d+) \(token (\d+)\), expires \d{4}-\d\d-\d\dT\S+", line[0]
        ), line
    armed = json.loads(r.files["header-armed-2.json"])
    m = re.match(r"armed: key slot (\d+) \(token (\d+)\)", lines_of(r.out("arm-2"), "armed: ")[0])
    assert m is not None
    slot, token = m.group(1), m.group(2)
    markers = [t for t in tokens(armed).values() if t["type"] == ARMED_MARKER]
    assert len(markers) == 1 and markers[0]["keyslots"] == [slot], armed["tokens"]
    assert markers[0]["lczfs_tpm2_token"] == token, markers
    assert tokens(armed)[token]["type"] == "systemd-tpm2", armed["tokens"]
    # The one-time slot: priority ignore (libcryptsetup's "any token" passes
    # over it), pbkdf2, named by no token but T and M.
    assert armed["keyslots"][slot].get("priority") == 0, armed["keyslots"][slot]
    assert armed["keyslots"][slot]["kdf"]["type"] == "pbkdf2", armed["keyslots"][slot]
    naming = sorted(n for n, t in tokens(armed).items() if slot in t["keyslots"])
    assert naming == sorted([token, *(n for n, t in tokens(armed).items() if t in markers)])
    # disarm: back to the header before the first arm (slots and tokens).
    assert_step(r, "disarm")
    disarmed = json.loads(r.files["header-disarmed.json"])
    assert disarmed["keyslots"].keys() == unarmed["keyslots"].keys(), disarmed
    assert disarmed["tokens"] == unarmed["tokens"], disarmed
    status = status_of(r, "status-armed")
    assert status["armed"]["armed"] is True, status["armed"]
    assert status["exit"] == 0, status

    config = SEED_CONFIG
    checks = Checks(tpm=True, luks_dump=(SEED_KEYSTORE,))
    # No answers: a prompt would wait until the deadline.
    b1 = s.boot(Boot("arm-boot-1", config, tpm=True, checks=checks, timeout=180))
    print(b1.describe())
    assert b1.prompts == [] and "Please enter" not in b1.console
    assert_unlocked(b1, s, config, SEED_CRYPT)
    assert "keystore opened with one-time TPM2 unlock (arm-reboot)" in b1.journal, b1.journal
    destroyed = f"destroyed the one-time unlock (key slot {slot}, tokens {token} and "
    assert destroyed in b1.journal, b1.journal
    after = b1.luks_metadata(SEED_KEYSTORE)
    assert not [t for t in tokens(after).values() if t["type"] in (ARMED_MARKER, "systemd-tpm2")]
    assert slot not in after["keyslots"], after["keyslots"]
    assert after["keyslots"].keys() == unarmed["keyslots"].keys(), after["keyslots"]

    b2 = s.boot(
        Boot(
            "arm-boot-2",
            config,
            tpm=True,
            checks=checks,
            answers=(s.secrets.passphrase,),
        )
    )
    print(b2.describe())
    assert len(b2.prompts) == 1, b2.prompts
    assert_unlocked(b2, s, config, SEED_CRYPT)
    assert "keystore opened with passphrase" in b2.journal, b2.journal
    assert "one-time" not in b2.journal, b2.journal
    assert b2.luks_metadata(SEED_KEYSTORE)["keyslots"].keys() == unarmed["keyslots"].keys()
