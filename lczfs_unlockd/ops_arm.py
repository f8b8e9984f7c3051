"""``lczfs-unlockd arm-reboot`` and ``disarm``: one unattended reboot, then a person again.

arm-reboot adds, with ``systemd-cryptenroll``, a key slot S whose secret
the TPM2 seals to ``--tpm2-pcrs`` (default PCR 7, the Secure Boot state)
and to the measurement PCR's *initial* value (all zeros), gives S the
priority ``ignore`` (libcryptsetup's "any token" passes over it: only a
token named by its number opens it), and adds a marker token M
(``lczfs-armed``) that names S, its systemd-tpm2 token T and an expiry.
The next boot's daemon finds M before anything else, removes it, unseals
T once — possible only before it measured the unlock, so nothing later in
that boot can unseal it again — and destroys S and T (keystore.py).  The
disk alone never suffices: the secret is in the TPM.  The expiry is kept
twice: in M (the daemon refuses an expired one) and, where systemd runs,
as a transient timer that runs ``disarm`` at the deadline (wall clock:
time powered off counts).

Without the measurement (``keystore.measure_pcr = false``) T's policy
would hold all boot long and anything running after the daemon could
unseal it again: arm-reboot refuses.  Without Secure Boot, PCR 7 says
only "Secure Boot off", which any system booted on the machine shows
too, and there the measurement PCR is still zero (the daemon never ran):
refused unless the user accepts that (``--allow-without-secure-boot``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from types import FrameType

from . import config, keystore, luksadmin, process
from .config import DEFAULT_MEASURE_PCR
from .errors import ConfigError, OpsError, UnlockError
from .ops_common import EXIT_OK, ask_secret, check_marker, err, load_config, run_command, say
from .secretbuf import wipe
from .text import escape, is_number

TPM_DEVICE = "/dev/tpmrm0"
DISARM_UNIT = "lczfs-unlockd-disarm"
ZERO_PCR = "0" * 64
LIST_TIMEOUT = 30.0
# The UEFI global variable SecureBoot: 4 attribute bytes, then 1 data byte (1: on).
SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-e98c0ec4fd9c"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _pcrs(user: list[int], measure_pcr: int) -> str:
    """The user's PCRs as they are now, the measurement PCR as it is before
    the daemon measured."""
    return "+".join([*map(str, user), f"{measure_pcr}:sha256={ZERO_PCR}"])


def _user_pcrs(value: str, measure_pcr: int) -> list[int]:
    """--tpm2-pcrs: PCR numbers 0-23 joined by "+" (bound to their values now)."""
    parts = value.split("+")
    if not all(is_number(p, 2) and int(p) <= 23 for p in parts):
        raise OpsError(
            f"--tpm2-pcrs {escape(value)}: PCR numbers 0-23 joined by + (e.g. 7 or 0+2+4+7); "
            "each is bound to its value now"
        )
    pcrs = sorted({int(p) for p in parts})
    if measure_pcr in pcrs:
        raise OpsError(
            f"--tpm2-pcrs {escape(value)} names the measurement PCR {measure_pcr}: its value "
            "now is after this boot's measurement, and arm-reboot binds it to its initial value "
            "itself; leave it out"
        )
    return pcrs


def secure_boot_enabled(path: str | None = None) -> bool:
    """The firmware's SecureBoot variable says 1; no EFI (no variable): False."""
    try:
        with open(path or SECURE_BOOT_VAR, "rb") as f:
            data = f.read(64)
    except OSError:
        return False
    return len(data) == 5 and data[4] == 1


def _check_secure_boot(allow: bool, pcrs: list[int]) -> None:
    if secure_boot_enabled():
        return
    risk = (
        "Secure Boot is not enabled (the EFI variable SecureBoot is not 1, or there is no "
        'EFI), so PCR 7 only says "Secure Boot off", which any system booted on this '
        "machine shows too. While armed (also while it is powered off), whoever boots "
        "another system on it (a USB stick) finds the measurement PCR "
        "still zero, because lczfs-unlockd never ran there, and can unseal the one-time "
        "secret with tpm2-tools and open the keystore with it"
    )
    if allow:
        err(f"warning: {risk}; allowed by --allow-without-secure-boot (PCRs "
            f"{'+'.join(map(str, pcrs))})")  # fmt: skip
        return
    raise OpsError(
        f"refusing: {risk}. Enable Secure Boot; or bind the firmware and boot loader too "
        "(--tpm2-pcrs 0+2+4+7: then another boot loader or firmware no longer matches, but "
        "a system your boot loader can start still does) and accept the rest with "
        "--allow-without-secure-boot"
    )


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


class _Stopped(BaseException):
    """SIGINT, SIGTERM or SIGHUP while arm-reboot changes the header."""


@contextlib.contextmanager
def _stoppable() -> Iterator[None]:
    """Those signals raise _Stopped, so that what was added is removed."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise _Stopped(signal.Signals(signum).name)

    old = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _held_back() -> Iterator[None]:
    """No signal in the middle of the cleanup."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


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


def _enroll(
    device: str, before: luksadmin.Metadata, tpm2_device: str, policy: str, unlock: bytearray
) -> tuple[int, int]:
    """systemd-cryptenroll's new slot S and its systemd-tpm2 token T (diffed);
    the caller removes what was added when this fails."""
    try:
        luksadmin.cryptenroll(device, [f"--tpm2-device={tpm2_device}", f"--tpm2-pcrs={policy}"],
                              unlock)  # fmt: skip
    except UnlockError as exc:
        if "Failed to parse PCR" in str(exc):
            raise OpsError(
                f"this {luksadmin.CRYPTENROLL} cannot bind a PCR to a given value "
                f"(--tpm2-pcrs={policy} needs a newer systemd): arm-reboot needs it, "
                "since the measurement PCR has already moved in this boot"
            ) from None
        raise
    after = luksadmin.metadata(device)
    slots = sorted(set(after.keyslots) - set(before.keyslots))
    tokens = sorted(
        n for n, t in after.tokens.items() if n not in before.tokens and t.type == "systemd-tpm2"
    )
    if len(slots) != 1 or len(tokens) != 1 or after.tokens[tokens[0]].keyslots != tuple(slots):
        raise OpsError(
            f"{device}: {luksadmin.CRYPTENROLL} did not add one key slot with one "
            f"systemd-tpm2 token (key slots {slots}, tokens {tokens}): nothing armed"
        )
    return slots[0], tokens[0]


def _command() -> list[str]:
    """How systemd runs this program later: the entry point that runs now, if
    it is one, else this interpreter with the package."""
    entry = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(entry) == "lczfs-unlockd" and os.access(entry, os.X_OK):
        return [entry]
    pythonpath = os.environ.get("PYTHONPATH")
    env = [f"--setenv=PYTHONPATH={pythonpath}"] if pythonpath else []
    return [*env, sys.executable, "-m", "lczfs_unlockd"]


def _timer(expires: int, config_path: str) -> None:
    """The deadline as a transient timer too, at the wall-clock expiry (a
    relative one would not count time powered off); the marker's expiry
    stays either way."""
    if not os.path.isdir("/run/systemd/system") or shutil.which("systemd-run") is None:
        return
    units = [f"{DISARM_UNIT}.timer", f"{DISARM_UNIT}.service"]
    # A unit of that name from an earlier arm (failed, or still waiting) would
    # make systemd-run refuse the name.
    for action in ("stop", "reset-failed"):
        with contextlib.suppress(UnlockError):
            process.run(["systemctl", action, *units], check=False, timeout=LIST_TIMEOUT)
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
    try:
        process.run(
            ["systemd-run", f"--on-calendar={at}", f"--unit={DISARM_UNIT}",
             "--timer-property=AccuracySec=1s",
             "--description=lczfs-unlockd: disarm the one-time unlock (arm-reboot) at its expiry",
             *_command(), "disarm", "--config", config_path],
            timeout=LIST_TIMEOUT,
        )  # fmt: skip
        say(f"timer {DISARM_UNIT}.timer runs lczfs-unlockd disarm at {at}")
    except UnlockError as exc:
        err(f"warning: cannot start the timer {DISARM_UNIT}.timer ({exc}); the expiry in the "
            "header still holds: the boot after it will not use the one-time unlock")  # fmt: skip


def _set_ignore(device: str, slot: int) -> None:
    """Priority ignore: "any token" (the daemon's token method, systemd-cryptsetup)
    never opens S; only T named by its number does."""
    try:
        process.run(
            [luksadmin.CRYPTSETUP, "config", "--priority", "ignore", "--key-slot", str(slot),
             device],
            timeout=luksadmin.QUERY_TIMEOUT,
        )  # fmt: skip
    except UnlockError as exc:
        raise OpsError(f"{device}: cannot set key slot {slot} to priority ignore: {exc}") from None


def arm(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    config_path = os.path.abspath(args.config)
    device = cfg.keystore.device
    pcr = _measure_pcr(cfg, args.config)
    pcrs = _user_pcrs(args.tpm2_pcrs, pcr)
    expires_in = _parse_expires(args.expires)
    _check_secure_boot(args.allow_without_secure_boot, pcrs)
    _check_tpm(args.tpm2_device)
    meta = luksadmin.metadata(device)
    if meta.version != 2:
        raise OpsError(f"{device} is LUKS{meta.version}: tokens need LUKS2")
    if _markers(meta):
        raise OpsError(
            f"{device} is already armed (token {', '.join(map(str, _markers(meta)))}): "
            "run lczfs-unlockd disarm first"
        )
    leftovers = keystore.one_time_leftovers(meta.keyslots, meta.tokens)
    if leftovers:
        raise OpsError(
            f"{device} has the leftovers of an earlier one-time unlock (token "
            f"{', '.join(map(str, leftovers))}): run lczfs-unlockd disarm first"
        )
    unlock = ask_secret(
        f"Passphrase or recovery key of the keystore {device}: ", file=args.passphrase_file
    )
    try:
        with _stoppable():
            try:
                try:
                    if not luksadmin.test_key(device, unlock):
                        raise OpsError(f"that passphrase or recovery key does not open {device}")
                    slot, token = _enroll(device, meta, args.tpm2_device, _pcrs(pcrs, pcr),
                                          unlock)  # fmt: skip
                finally:
                    wipe(unlock)
                _set_ignore(device, slot)
                now = int(time.time())
                expires = now + expires_in
                _add_marker(device, keystore.marker_json(slot, token, now, expires))
            except BaseException as exc:
                with _held_back():
                    _undo(device, meta)
                if isinstance(exc, _Stopped):
                    what = f"stopped by {exc}: removed what it added, nothing armed"
                    raise OpsError(what) from None
                raise
    finally:
        wipe(unlock)
    say(f"armed: key slot {slot} (token {token}), expires {keystore.utc(expires)}")
    _timer(expires, config_path)
    return EXIT_OK


def _add_marker(device: str, fields: dict[str, object]) -> int:
    try:
        marker = luksadmin.import_token(device, fields)
        # What the daemon will read: checked with the daemon's own checks.
        check_marker(luksadmin.metadata(device), marker)
    except (UnlockError, ValueError, KeyError) as exc:
        raise OpsError(f"{device}: cannot add the marker token ({exc}): nothing armed") from None
    return marker


def _undo(device: str, before: luksadmin.Metadata) -> None:
    """Remove the key slots added since ``before`` (and with them their tokens)."""
    try:
        after = luksadmin.metadata(device)
    except UnlockError as exc:
        err(f"cannot read {device} to remove what arm-reboot added ({exc}): check it with "
            f"cryptsetup luksDump {device} and run lczfs-unlockd disarm")  # fmt: skip
        return
    _remove_added(device, sorted(set(after.keyslots) - set(before.keyslots)))
    for n in sorted(set(after.tokens) - set(before.tokens)):
        with contextlib.suppress(UnlockError):
            if n in luksadmin.metadata(device).tokens:
                luksadmin.remove_token(device, n)


def disarm(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    device = cfg.keystore.device
    meta = luksadmin.metadata(device)
    markers = _markers(meta)
    for m in markers:
        try:
            unlock = check_marker(meta, m)
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
    removed = _remove_leftovers(device)
    if not markers and not removed:
        say(f"{device} is not armed: nothing to remove")
    _stop_timer()
    return EXIT_OK


def _remove_leftovers(device: str) -> int:
    """What a one-time unlock cut short left (keystore.one_time_leftovers):
    tokens naming no slot, systemd-tpm2 tokens of slots only they name,
    with priority ignore and pbkdf2 (so never a person's slot)."""
    meta = luksadmin.metadata(device)
    found = keystore.one_time_leftovers(meta.keyslots, meta.tokens)
    for n in found:
        t = meta.tokens[n]
        if set(meta.keyslots) <= set(t.keyslots):
            err(f"{device}: not removing token {n} ({t.type}): its key slot is the last one")
            continue
        for s in t.keyslots:
            luksadmin.kill_slot(device, s)  # and t: it names only its slots
        if n in luksadmin.metadata(device).tokens:
            luksadmin.remove_token(device, n)
        slots = f"key slot {', '.join(map(str, t.keyslots))}" if t.keyslots else "no key slot"
        say(f"removed the leftover one-time token {n} ({t.type}, {slots})")
    return len(found)


def _stop_timer() -> None:
    if not os.path.isdir("/run/systemd/system") or shutil.which("systemctl") is None:
        return
    result = process.run(
        ["systemctl", "stop", f"{DISARM_UNIT}.timer"], check=False, timeout=LIST_TIMEOUT
    )
    if result.returncode == 0:
        say(f"stopped {DISARM_UNIT}.timer")


def arm_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lczfs-unlockd arm-reboot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Let the next boot unlock the keystore once without a person.\n\n"
        "Adds a key slot whose secret the TPM2 seals to --tpm2-pcrs (default 7, the Secure\n"
        "Boot state) as they are now and to the measurement PCR (keystore.measure_pcr,\n"
        "default 15) at its initial value (7+15:sha256=0000...), with priority ignore (no\n"
        '"any token" unlock uses it), plus a marker token naming it and its expiry. The\n'
        "next boot's daemon removes the marker, tries the slot's token once, then destroys\n"
        "slot and token whether it worked or not; after the daemon measured the unlock, the\n"
        "TPM no longer releases it in that boot. Refuses without a TPM2, with\n"
        "keystore.measure_pcr = false, when already armed, and without Secure Boot unless\n"
        "--allow-without-secure-boot (then anyone who boots another system on this machine\n"
        "while it is armed can unseal the secret: the measurement PCR is zero there).\n"
        "Only the TPM holds the secret: the disk alone never opens the keystore. The expiry\n"
        "is in the header (checked by the daemon against the clock) and, under systemd,\n"
        "also a timer at that wall-clock time running lczfs-unlockd disarm.\n"
        "SIGINT, SIGTERM or SIGHUP while it works: what it added is removed.",
        epilog="examples:\n  lczfs-unlockd arm-reboot --expires 2h && systemctl reboot\n"
        "  lczfs-unlockd arm-reboot --tpm2-pcrs 0+2+4+7 --allow-without-secure-boot\n"
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
    parser.add_argument(
        "--tpm2-pcrs", default="7", metavar="PCRS",
        help="PCR numbers 0-23 joined by + whose values now the secret is bound to (default "
        "7; 0+2+4+7 also binds firmware, option ROMs and boot loader); the measurement PCR "
        "is added at its initial value, never named here",
    )  # fmt: skip
    parser.add_argument(
        "--allow-without-secure-boot", action="store_true",
        help="arm even though Secure Boot is off: whoever boots another system on this "
        "machine while it is armed can then unseal the secret (better with --tpm2-pcrs "
        "0+2+4+7)",
    )  # fmt: skip
    return run_command(arm, parser.parse_args(argv))


def disarm_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lczfs-unlockd disarm",
        description="Remove a one-time unlock made by arm-reboot: every lczfs-armed marker "
        "token, its systemd-tpm2 token and its key slot (only a slot of priority ignore and "
        "pbkdf2 that no other token names: never a passphrase's, recovery key's or enrolled "
        "token's slot), what a boot cut short left of one (systemd-tpm2 or lczfs-armed "
        "tokens naming no key slot, systemd-tpm2 tokens without marker on such a slot), "
        "and stop the disarm timer. Safe to run when nothing is armed.",
        epilog="example: lczfs-unlockd disarm",
    )
    parser.add_argument("--config", default=config.DEFAULT_PATH, metavar="PATH")
    return run_command(disarm, parser.parse_args(argv))
