"""The scenario matrix: one Boot per promise the daemon makes.

test_scenarios.py asserts on the results; the CLI can boot any of them by
name (``python3 -m lczfsvm boot passphrase --console``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from typing import IO

from .build import InitrdConfig
from .paths import GUEST_DIR
from .vm import Boot, Checks, Guest, toml_config

KEYFILE = "/etc/lczfs-unlockd/keystore.key"
SEED_PART = "/dev/disk/by-id/virtio-seed0-part1"
MIRROR_PARTS = ("/dev/disk/by-id/virtio-mirror0-part1", "/dev/disk/by-id/virtio-mirror1-part1")
DEBUG = "rd.lczfs.debug"
SEED_KEYSTORE = "/dev/zvol/rpool/volumes/bootsecrets-part1"
ROOT_CMDLINE = "root=zfs:rpool/crypt/local/root"
# Where the signed-policy scenarios' config names the PCR signature: the dracut
# module copies it from the build tree into the initrd.
SIGNATURE = "/etc/lczfs-unlockd/tpm2-pcr-signature.json"
PCRLOCK = "/etc/lczfs-unlockd/pcrlock.json"


def _keyfile_config(**kw: object) -> str:
    return toml_config(unlock=("keyfile", "passphrase"), keyfile=KEYFILE, **kw)  # type: ignore[arg-type]


def _dropin(name: str, text: str) -> tuple[str, bytes, int]:
    return (f"etc/systemd/system/lczfs-unlockd.service.d/{name}.conf", text.encode(), 0o644)


def _guest_file(name: str, dest: str, mode: int = 0o755) -> tuple[str, bytes, int]:
    return (dest, (GUEST_DIR / name).read_bytes(), mode)


def _evil(mode: str) -> tuple[tuple[str, bytes, int], ...]:
    """An evil maid's changes to the pool (guest/evil-dataset.py's mode), before the daemon."""
    return (
        _guest_file("evil-dataset.py", "usr/lib/lczfs-test/evil-dataset.py"),
        _guest_file(
            "lczfs-test-evil.service", "usr/lib/systemd/system/lczfs-test-evil.service", 0o644
        ),
        ("etc/lczfs-test/evil-mode", f"{mode}\n".encode(), 0o644),
        _dropin("evil", "[Unit]\nWants=lczfs-test-evil.service\nAfter=lczfs-test-evil.service\n"),
    )


# An attacker's dataset, written into keys0's pool before the daemon runs.
EVIL_DATASET = _evil("hostile-kdf")

# After a refused root, sysroot.mount's failure sends initrd-root-fs.target to
# emergency.target; dracut's emergency.service would then power off
# (rd.emergency=poweroff) under the report.  Here it only says it was reached.
EMERGENCY_REACHED = (
    "etc/systemd/system/emergency.service.d/lczfs-test.conf",
    b"[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=\n"
    b"ExecStart=/usr/bin/echo lczfs-test: emergency.service reached\nExecStopPost=\n"
    b"StandardInput=null\nStandardOutput=journal+console\nStandardError=journal+console\n",
    0o644,
)


def _evil_root(name: str, mode: str, late: bool) -> Callable[[Guest], Boot]:
    """seed0 with an impostor at root=zfs:rpool/crypt/local/root, TPM only."""
    return lambda g: Boot(
        name,
        toml_config(unlock=("token",)),
        tpm=True,
        cmdline=ROOT_CMDLINE + (" lczfs.test.report=late" if late else ""),
        files=(*_evil(mode), EMERGENCY_REACHED),
        checks=Checks(tpm=True, sysroot=True),
    )


def _signed_config() -> str:
    return toml_config(
        unlock=("token", "passphrase"),
        volume="rpool/volumes/signedks",
        datasets=["rpool/crypt"],
        tpm2_signature=SIGNATURE,
    )


def _signed_initrd(g: Guest) -> InitrdConfig:
    """The config and signature A in the tree when dracut runs: the module copies both."""
    return InitrdConfig(_signed_config(), ((SIGNATURE, g.file("tpm2-pcr-signature-a.json")),))


def _pcrlock_config() -> str:
    return toml_config(
        unlock=("token", "passphrase"),
        volume="rpool/volumes/pcrlockks",
        datasets=["rpool/crypt"],
        tpm2_pcrlock=PCRLOCK,
    )


def _pcrlock_initrd(g: Guest) -> InitrdConfig:
    """The config and provisioning's pcrlock.json in the tree: the module copies both."""
    return InitrdConfig(_pcrlock_config(), ((PCRLOCK, g.file("pcrlock.json")),))


def _stale_pcrlock(policy: bytes) -> bytes:
    """The pcrlock policy predicted for another firmware (PCR 0): it matches neither
    this boot's PCRs nor the policy in the TPM's NV index."""
    data = json.loads(policy)
    other = hashlib.sha256(b"another firmware").hexdigest()
    for entry in data["pcrValues"]:
        if entry["pcr"] == 0:
            entry["values"] = [other]
    return json.dumps(data).encode()


def _bad_key(which: str) -> Callable[[Guest], Boot]:
    return lambda g: Boot(
        f"keyfile-{which}",
        _keyfile_config(datasets=[f"rpool/bad/{which}"]),
        disks=("keys0",),
        keyfile=True,
    )


SCENARIOS: dict[str, Callable[[Guest], Boot]] = {
    # The seed's everyday boot: a person types the keystore passphrase.  The
    # keystore also has a TPM2 token, but this machine has no TPM: the daemon
    # must fall through to the prompt.
    "passphrase": lambda g: Boot(
        "passphrase",
        toml_config(token_timeout="5s"),
        answers=(g.secrets.passphrase,),
    ),
    "keyfile": lambda g: Boot("keyfile", _keyfile_config(), keyfile=True),
    # rd.lczfs.debug: libcryptsetup's debug log goes through a callback.
    "debug": lambda g: Boot("debug", _keyfile_config(), keyfile=True, cmdline=DEBUG),
    # The token opens the keystore, then the daemon measures the volume key
    # into PCR 15 (by default: a TPM and a systemd-tpm2 token), which the
    # token is sealed to as all zero: a second unseal in this boot fails.
    "tpm2": lambda g: Boot(
        "tpm2",
        toml_config(unlock=("token",)),
        tpm=True,
        checks=Checks(tpm=True, unseal=SEED_KEYSTORE),
    ),
    # The control: measure_pcr = false leaves PCR 15 alone, a second unseal works.
    "tpm2-unmeasured": lambda g: Boot(
        "tpm2-unmeasured",
        toml_config(unlock=("token",), measure_pcr=False),
        tpm=True,
        checks=Checks(tpm=True, unseal=SEED_KEYSTORE),
    ),
    # A token sealed to a signed PCR 11 policy, the signature named by the
    # config and copied into the initrd by the dracut module: A is for this
    # boot's PCR 11; B (laid over it) for another kernel's, so the token
    # fails and the passphrase is asked.
    "tpm2-signed": lambda g: Boot(
        "tpm2-signed",
        _signed_config(),
        disks=("keys0",),
        tpm=True,
        initrd_config=_signed_initrd(g),
        checks=Checks(tpm=True),
    ),
    "tpm2-signed-changed": lambda g: Boot(
        "tpm2-signed-changed",
        _signed_config(),
        disks=("keys0",),
        tpm=True,
        initrd_config=_signed_initrd(g),
        files=((SIGNATURE.lstrip("/"), g.file("tpm2-pcr-signature-b.json"), 0o644),),
        answers=(g.secrets.passphrase,),
        checks=Checks(tpm=True),
    ),
    # A token sealed to a pcrlock policy (systemd-pcrlock, NV index), the
    # policy file named by the config and copied into the initrd by the dracut
    # module; then one predicted for another firmware laid over it.
    "tpm2-pcrlock": lambda g: Boot(
        "tpm2-pcrlock",
        _pcrlock_config(),
        disks=("keys0",),
        tpm=True,
        initrd_config=_pcrlock_initrd(g),
        checks=Checks(tpm=True),
    ),
    "tpm2-pcrlock-stale": lambda g: Boot(
        "tpm2-pcrlock-stale",
        _pcrlock_config(),
        disks=("keys0",),
        tpm=True,
        initrd_config=_pcrlock_initrd(g),
        files=((PCRLOCK.lstrip("/"), _stale_pcrlock(g.file("pcrlock.json")), 0o644),),
        answers=(g.secrets.passphrase,),
        checks=Checks(tpm=True),
    ),
    # Evil maids: the name root= mounts is an unencrypted impostor (the real
    # encryption root renamed away, still loaded by datasets = auto), or an
    # encryption root of the attacker's.  The daemon refuses the root (after
    # measuring the keystore); the distribution's sysroot.mount must fail.
    # The first reports after systemd's own sysroot.mount attempt.
    "evil-unencrypted-root": _evil_root("evil-unencrypted-root", "unencrypted-root", late=True),
    "evil-foreign-root": _evil_root("evil-foreign-root", "foreign-root", late=False),
    "disabled": lambda g: Boot("disabled", _keyfile_config(), keyfile=True, cmdline="rd.lczfs=0"),
    "dry-run": lambda g: Boot(
        "dry-run", _keyfile_config(), keyfile=True, cmdline="rd.lczfs.dry_run=1"
    ),
    "wrong-passphrase": lambda g: Boot(
        "wrong-passphrase",
        toml_config(unlock=("passphrase",), tries=3),
        answers=("wrong-one", "wrong-two", "wrong-three"),
    ),
    "disk-missing": lambda g: Boot(
        "disk-missing",
        _keyfile_config(devices=[SEED_PART]),
        disks=(),
        keyfile=True,
        cmdline="rd.lczfs.timeout=20s",
    ),
    "disk-late": lambda g: Boot(
        "disk-late",
        _keyfile_config(devices=[SEED_PART]),
        disks=(),
        hotplug=("seed0",),
        hotplug_delay=5.0,
        keyfile=True,
    ),
    "mirror-degraded": lambda g: Boot(
        "mirror-degraded",
        _keyfile_config(devices=list(MIRROR_PARTS)),
        disks=("mirror0",),
        keyfile=True,
        cmdline="rd.lczfs.online_grace=5s",
    ),
    # The hand-off: zfs-dracut then mounts the root dataset with the keys
    # lczfs-unlockd loaded (no prompt from zfs-load-key.sh).
    "handoff": lambda g: Boot(
        "handoff",
        _keyfile_config(),
        keyfile=True,
        cmdline="root=zfs:rpool/crypt/local/root lczfs.test.report=late",
    ),
    "mirror-online": lambda g: Boot(
        "mirror-online",
        _keyfile_config(devices=list(MIRROR_PARTS)),
        disks=("mirror0", "mirror1"),
        keyfile=True,
    ),
    "keyfile-missing": _bad_key("missing"),
    "keyfile-trunc": _bad_key("trunc"),
    "keyfile-garbage": _bad_key("garbage"),
    "keyfile-wrong": _bad_key("wrong"),
    "luks-corrupt": lambda g: Boot(
        "luks-corrupt",
        _keyfile_config(volume="rpool/volumes/badluks"),
        disks=("keys0",),
        keyfile=True,
    ),
    "sigterm-at-prompt": lambda g: Boot(
        "sigterm-at-prompt",
        toml_config(unlock=("passphrase",)),
        cmdline="lczfs.test.sigterm_at_prompt",
    ),
    # A TPM2 token that needs a PIN: asked for on the console, a wrong one
    # asked again (the TPM's dictionary-attack counter allows it).
    "tpm2-pin": lambda g: Boot(
        "tpm2-pin",
        toml_config(unlock=("token",), volume="rpool/volumes/pinks", datasets=["rpool/crypt"]),
        disks=("keys0",),
        tpm=True,
        answers=("pin-wrong", g.secrets.tpm2_pin),
    ),
    # ext4 flagged needs_recovery on a read-only mapping: mounted with noload.
    "ext4-needs-recovery": lambda g: Boot(
        "ext4-needs-recovery",
        _keyfile_config(volume="rpool/volumes/dirtyks", datasets=["rpool/crypt"]),
        disks=("keys0",),
        keyfile=True,
    ),
    # Every key format, auto-discovered, next to the broken key files and an
    # attacker's root with pbkdf2iters=2^32: the good ones load, each bad one
    # is named, none stops the others.
    "key-formats": lambda g: Boot(
        "key-formats",
        _keyfile_config(),
        disks=("keys0",),
        keyfile=True,
        files=EVIL_DATASET,
    ),
    # A zpool import that never returns, in D state (SIGKILL cannot end it):
    # the pool deadline still ends the run, and says so.
    "hung-zpool": lambda g: Boot(
        "hung-zpool",
        _keyfile_config(devices=[SEED_PART]),
        keyfile=True,
        cmdline="rd.lczfs.timeout=20s",
        files=(
            _guest_file("zpool-hung", "usr/local/sbin/zpool"),
            # The unkillable child keeps the unit deactivating until systemd
            # gives up on it (twice this); the report waits for that.
            _dropin("stop", "[Service]\nTimeoutStopSec=5s\n"),
        ),
    ),
    # A KDF cost from the disk (LUKS1 key slot with 2^32-1 iterations): one C
    # call of hours.  No EXTEND_TIMEOUT_USEC during it, so systemd's start
    # timeout fires; SIGTERM waits for the C call; systemd's SIGKILL ends it.
    "slow-kdf": lambda g: Boot(
        "slow-kdf",
        toml_config(
            unlock=("keyfile",),
            keyfile=KEYFILE,
            volume="rpool/volumes/slowkdf",
            datasets=["rpool/crypt"],
        ),
        disks=("keys0",),
        keyfile=True,
        files=(_dropin("timeouts", "[Service]\nTimeoutStartSec=30s\nTimeoutStopSec=10s\n"),),
    ),
    # A second disk carrying another pool named rpool.
    "duplicate-pool": lambda g: Boot(
        "duplicate-pool", _keyfile_config(), disks=("seed0", "dup0"), keyfile=True
    ),
    "pool-guid": lambda g: Boot(
        "pool-guid",
        _keyfile_config(pool_guid=g.guids["seed0"]),
        disks=("seed0", "dup0"),
        keyfile=True,
    ),
}
NAMES = tuple(SCENARIOS)


def get(name: str, guest: Guest, echo: IO[str] | None = None) -> Boot:
    return replace(SCENARIOS[name](guest), echo=echo)
