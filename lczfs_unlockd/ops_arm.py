"""``lczfs-unlockd arm-reboot`` and ``disarm``: one unattended reboot, then a person again.

arm-reboot adds, with ``systemd-cryptenroll``, a key slot S whose secret
the TPM2 seals to PCR 7 (Secure Boot state) and to the measurement PCR's
*initial* value (all zeros), plus a marker token M (``lczfs-armed``) that
names S, its systemd-tpm2 token T and an expiry.  The next boot's daemon
finds M before anything else, unseals T once — possible only before it
measured the unlock, so nothing later in that boot can unseal it again —
and destroys S, T and M whether that worked or not (keystore.py).  The
disk alone never suffices: the secret is in the TPM.  The expiry is kept
twice: in M (the daemon refuses an expired one) and, where systemd runs,
as a transient timer that runs ``disarm`` at the deadline.

Without the measurement (``keystore.measure_pcr = false``) T's policy
would hold all boot long and anything running after the daemon could
unseal it again: arm-reboot refuses.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable

from . import config, keystore, luksadmin, process
from .config import DEFAULT_MEASURE_PCR
from .errors import ConfigError, OpsError, UnlockError
from .ops_common import EXIT_FAILURE, EXIT_NOTCONFIGURED, EXIT_OK, ask_secret, err, load_config, say
from .secretbuf import wipe
from .text import escape

TPM_DEVICE = "/dev/tpmrm0"
DISARM_UNIT = "lczfs-unlockd-disarm"
ZERO_PCR = "0" * 64
LIST_TIMEOUT = 30.0


def _pcrs(measure_pcr: int) -> str:
    """PCR 7 as it is now, the measurement PCR as it is before the daemon measured."""
    return f"7+{measure_pcr}:sha256={ZERO_PCR}"


def _measure_pcr(cfg: config.Config, path: str) -> int:
    pcr = cfg.keystore.measure_pcr
    if pcr is False:
        raise OpsError(
            f"{path}: keystore.measure_pcr = false: without the measurement the one-time "
            "secret could be unsealed again later in the same boot (by whatever runs after "
            "the daemon); remove that setting (and rebuild the initrd) to arm a reboot"
        )
    return DEFAULT_MEASURE_PCR if pcr is None or pcr is True else int(pcr)


def _check_tpm(device: str) -> None:
    if device != "auto":
        return  # a device or TCTI the user named: systemd-cryptenroll will say
    if not os.path.exists(TPM_DEVICE):
        raise OpsError(
            f"no TPM2 ({TPM_DEVICE} does not exist): an unattended reboot needs one; "
            "without it nothing but the disk would hold the secret"
        )
    try:
        listing = process.run(
            [luksadmin.CRYPTENROLL, "--tpm2-device=list"], check=False, timeout=LIST_TIMEOUT
        )
    except UnlockError as exc:
        raise OpsError(f"cannot list TPM2 devices: {exc}") from None
    if "/dev/tpm" not in listing.stdout:
        raise OpsError(
            f"{luksadmin.CRYPTENROLL} --tpm2-device=list lists no TPM2 device "
            f"({escape(listing.stderr.strip())[:200]}): an unattended reboot needs one"
        )


def _markers(meta: luksadmin.Metadata) -> list[int]:
    return sorted(n for n, t in meta.tokens.items() if t.type == keystore.MARKER_TYPE)


def _parse_expires(value: str) -> int:
    try:
        seconds = config.parse_duration(value, "--expires")
    except ConfigError as exc:
        raise OpsError(str(exc)) from None
    if not 60 <= seconds <= keystore.MAX_ARMED:
        raise OpsError(
            f"--expires {escape(value)}: between 1min and {keystore.MAX_ARMED // 86400} days"
        )
    return int(seconds)


def _remove_added(device: str, slots: list[int]) -> None:
    """Undo: kill_slot also removes the tokens that name only that slot."""
    for slot in slots:
        try:
            luksadmin.kill_slot(device, slot)
            err(f"removed the unfinished key slot {slot} of {device}")
        except UnlockError as exc:
            err(
                f"cannot remove the unfinished key slot {slot} of {device}: {exc}: "
                f"remove it with cryptsetup luksKillSlot {device} {slot}"
            )


def _enroll(device: str, tpm2_device: str, pcr: int, unlock: bytearray) -> tuple[int, int]:
    """systemd-cryptenroll's new slot S and its systemd-tpm2 token T (diffed)."""
    before = luksadmin.metadata(device)
    try:
        luksadmin.cryptenroll(
            device, [f"--tpm2-device={tpm2_device}", f"--tpm2-pcrs={_pcrs(pcr)}"], unlock
        )
    except UnlockError as exc:
        after = luksadmin.metadata(device)
        _remove_added(device, sorted(set(after.keyslots) - set(before.keyslots)))
        if "Failed to parse PCR" in str(exc):
            raise OpsError(
                f"this {luksadmin.CRYPTENROLL} cannot bind a PCR to a given value "
                f"(--tpm2-pcrs={_pcrs(pcr)} needs a newer systemd): arm-reboot needs it, "
                f"since PCR {pcr} has already moved in this boot"
            ) from None
        raise
    after = luksadmin.metadata(device)
    slots = sorted(set(after.keyslots) - set(before.keyslots))
    tokens = sorted(
        n for n, t in after.tokens.items() if n not in before.tokens and t.type == "systemd-tpm2"
    )
    if len(slots) != 1 or len(tokens) != 1 or after.tokens[tokens[0]].keyslots != tuple(slots):
        _remove_added(device, slots)
        raise OpsError(
            f"{device}: {luksadmin.CRYPTENROLL} did not add one key slot with one "
            f"systemd-tpm2 token (key slots {slots}, tokens {tokens}): nothing armed"
        )
    return slots[0], tokens[0]


def _timer(expires_in: int, config_path: str) -> None:
    """The deadline as a transient timer too; the marker's expiry stays either way."""
    if not os.path.isdir("/run/systemd/system") or shutil.which("systemd-run") is None:
        return
    program = shutil.which("lczfs-unlockd")
    command = [program] if program else [sys.executable, "-m", "lczfs_unlockd"]
    try:
        process.run(
            ["systemd-run", f"--on-active={expires_in}s", f"--unit={DISARM_UNIT}",
             "--description=lczfs-unlockd: disarm the one-time unlock (arm-reboot) at its expiry",
             *command, "disarm", "--config", config_path],
            timeout=LIST_TIMEOUT,
        )  # fmt: skip
        say(f"timer {DISARM_UNIT}.timer runs lczfs-unlockd disarm at the expiry")
    except UnlockError as exc:
        err(f"warning: cannot start the timer {DISARM_UNIT}.timer ({exc}); the expiry in the "
            "header still holds: the boot after it will not use the one-time unlock")  # fmt: skip


def arm(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    device = cfg.keystore.device
    pcr = _measure_pcr(cfg, args.config)
    expires_in = _parse_expires(args.expires)
    _check_tpm(args.tpm2_device)
    meta = luksadmin.metadata(device)
    if meta.version != 2:
        raise OpsError(f"{device} is LUKS{meta.version}: tokens need LUKS2")
    if _markers(meta):
        raise OpsError(
            f"{device} is already armed (token {', '.join(map(str, _markers(meta)))}): "
            "run lczfs-unlockd disarm first"
        )
    unlock = ask_secret(
        f"Passphrase or recovery key of the keystore {device}: ", file=args.passphrase_file
    )
    try:
        if not luksadmin.test_key(device, unlock):
            raise OpsError(f"that passphrase or recovery key does not open {device}")
        slot, token = _enroll(device, args.tpm2_device, pcr, unlock)
    finally:
        wipe(unlock)
    now = int(time.time())
    marker_fields = keystore.marker_json(slot, token, now, now + expires_in)
    try:
        marker = luksadmin.import_token(device, marker_fields)
        meta = luksadmin.metadata(device)
        # What the daemon will read: checked with the daemon's own parser.
        keystore.parse_marker(
            marker,
            meta.tokens[marker].fields,
            lambda n: meta.tokens[n].fields if n in meta.tokens else None,
        )
    except (UnlockError, ValueError, KeyError) as exc:
        _remove_added(device, [slot])
        raise OpsError(f"{device}: cannot add the marker token ({exc}): nothing armed") from None
    say(f"armed: key slot {slot} (token {token}), expires {keystore.utc(now + expires_in)}")
    _timer(expires_in, args.config)
    return EXIT_OK


def disarm(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    device = cfg.keystore.device
    meta = luksadmin.metadata(device)
    markers = _markers(meta)
    for m in markers:
        fields = meta.tokens[m].fields
        try:
            unlock = keystore.parse_marker(
                m, fields, lambda n: meta.tokens[n].fields if n in meta.tokens else None
            )
        except ValueError as exc:
            # Its slot cannot be trusted to be the armed one: only the marker goes.
            luksadmin.remove_token(device, m)
            say(f"removed the invalid marker token {m} ({exc}); no key slot touched")
            continue
        # Never a person's slot: an armed slot has its systemd-tpm2 token.
        if unlock.slot in meta.human_slots():
            luksadmin.remove_token(device, m)
            say(f"removed marker token {m}; key slot {unlock.slot} is not token-bound: kept")
            continue
        luksadmin.kill_slot(device, unlock.slot)  # and T, M: they name only that slot
        left = luksadmin.metadata(device)
        for n in (unlock.token, m):
            if n in left.tokens:
                luksadmin.remove_token(device, n)
        say(f"disarmed: removed key slot {unlock.slot} and tokens {unlock.token} and {m}")
    if not markers:
        say(f"{device} is not armed: nothing to remove")
    _stop_timer()
    return EXIT_OK


def _stop_timer() -> None:
    if not os.path.isdir("/run/systemd/system") or shutil.which("systemctl") is None:
        return
    result = process.run(
        ["systemctl", "stop", f"{DISARM_UNIT}.timer"], check=False, timeout=LIST_TIMEOUT
    )
    if result.returncode == 0:
        say(f"stopped {DISARM_UNIT}.timer")


def _run(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return fn(args)
    except OpsError as exc:
        err(str(exc))
        return EXIT_NOTCONFIGURED if "check-config" in str(exc) else EXIT_FAILURE
    except UnlockError as exc:
        err(str(exc))
        return EXIT_FAILURE


def arm_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lczfs-unlockd arm-reboot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Let the next boot unlock the keystore once without a person.\n\n"
        "Adds a key slot whose secret the TPM2 seals to PCR 7 (Secure Boot state) and to\n"
        "the measurement PCR (keystore.measure_pcr, default 15) at its initial value\n"
        "(7+15:sha256=0000...), plus a marker token naming it and its expiry. The next\n"
        "boot's daemon uses it first, then destroys it whether it worked or not; after the\n"
        "daemon measured the unlock, the TPM no longer releases it in that boot. Refuses\n"
        "without a TPM2, with keystore.measure_pcr = false, and when already armed.\n"
        "Only the TPM holds the secret: the disk alone never opens the keystore. The\n"
        "expiry is in the header (checked by the daemon against the clock) and, under\n"
        "systemd, also a timer running lczfs-unlockd disarm.",
        epilog="example:\n  lczfs-unlockd arm-reboot --expires 2h && systemctl reboot\n"
        "prints: armed: key slot S (token T), expires 2026-01-01T12:00:00Z",
    )
    parser.add_argument("--config", default=config.DEFAULT_PATH, metavar="PATH")
    parser.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="a passphrase or the recovery key that opens the keystore, from FILE (- = "
        "standard input); default: asked on the terminal",
    )
    parser.add_argument(
        "--expires", default="24h", metavar="SPAN",
        help="how long the one-time unlock stays valid (systemd time span, 1min to 7 "
        "days; default 24h)",
    )  # fmt: skip
    parser.add_argument(
        "--tpm2-device", default="auto", metavar="PATH",
        help="the TPM2 for systemd-cryptenroll (default auto)",
    )  # fmt: skip
    return _run(arm, parser.parse_args(argv))


def disarm_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lczfs-unlockd disarm",
        description="Remove a one-time unlock made by arm-reboot: every lczfs-armed marker "
        "token, its systemd-tpm2 token and its key slot (never a passphrase's or recovery "
        "key's slot), and stop the disarm timer. Safe to run when nothing is armed.",
        epilog="example: lczfs-unlockd disarm",
    )
    parser.add_argument("--config", default=config.DEFAULT_PATH, metavar="PATH")
    return _run(disarm, parser.parse_args(argv))
