"""``lczfs-unlockd enroll`` / ``unenroll``: add or remove one way into the keystore.

Thin wrappers over ``luksadmin``: TPM2 and FIDO2 through
``systemd-cryptenroll``, a passphrase and a recovery key through
``cryptsetup``.  Their one rule of their own: never remove the last key
slot a person can open (``Metadata.human_slots``: bound to no device
token), and never guess which of several passphrases is meant.
"""

from __future__ import annotations

import argparse

from . import config, luksadmin
from .config import DEFAULT_MEASURE_PCR
from .errors import OpsError
from .ops_common import (
    EXIT_OK,
    ask_secret,
    load_config,
    run_command,
    say,
    show_plan,
)
from .secretbuf import wipe
from .text import escape, is_number

ZERO_PCR = "0" * 64
KINDS = ("tpm2", "fido2", "passphrase", "recovery")
# Extra cryptsetup arguments for a new passphrase's slot: none = cryptsetup's
# defaults (argon2id); the tests make it cheap.
PBKDF: tuple[str, ...] = ()
TOKEN_TYPES = {"tpm2": "systemd-tpm2", "fido2": "systemd-fido2", "recovery": "systemd-recovery"}


ZEROS = {"sha1": 40, "sha256": 64, "sha384": 96, "sha512": 128}  # hex digits per bank


def _pcr_parts(user: str) -> list[tuple[int, str | None]]:
    """systemd-cryptenroll's --tpm2-pcrs, numbers only: (PCR, "bank=hex" or None)."""
    out = []
    for part in user.split("+"):
        number, _, value = part.partition(":")
        if not (is_number(number, 2) and int(number) <= 23):
            raise OpsError(
                f"--tpm2-pcrs {escape(user)}: {escape(part)[:40]!r} is not a PCR number 0-23 "
                "(optionally :BANK=HEX); give PCRs by number (names such as system-identity "
                "are not accepted)"
            )
        out.append((int(number), value or None))
    return out


def tpm2_pcrs(user: str | None, measure_pcr: int | bool | None) -> str:
    """The PCR policy: the user's PCRs (default 7) and the measurement PCR at
    its initial value, so that the token unseals only before the daemon measured."""
    parts = _pcr_parts(user) if user is not None else [(7, None)]
    if measure_pcr is False:
        if user is None:
            raise OpsError(
                "keystore.measure_pcr = false: the daemon does not measure the unlock, so a "
                "TPM2 token would unseal all boot long, for anything running after the "
                "daemon; enable the measurement, or accept that by giving --tpm2-pcrs "
                "explicitly"
            )
        return user
    pcr = DEFAULT_MEASURE_PCR if measure_pcr is None or measure_pcr is True else measure_pcr
    for number, value in parts:
        if number != pcr:
            continue
        bank, _, digest = (value or "").partition("=")
        if ZEROS.get(bank) is None or digest.lower() != "0" * ZEROS[bank]:
            raise OpsError(
                f"--tpm2-pcrs {escape(str(user))} names the measurement PCR {pcr} without its "
                f"initial value: sealed to its value now, after this boot's measurement, the "
                "token would unseal for anything running in this system; write "
                f"{pcr}:sha256={ZERO_PCR} (or the zeros of your bank), or leave PCR {pcr} out "
                "(it is added at zero)"
            )
        return user or ""  # the user pinned the measurement PCR to zero already
    pcrs = [user] if user else ["7"]
    return "+".join([*pcrs, f"{pcr}:sha256={ZERO_PCR}"])


def _unlock(device: str, file: str | None) -> bytearray:
    secret = ask_secret(f"Passphrase or recovery key of the keystore {device}: ", file=file)
    try:
        if not luksadmin.test_key(device, secret):
            raise OpsError(
                f"that passphrase or recovery key does not open {device}: nothing changed"
            )
    except BaseException:
        wipe(secret)
        raise
    return secret


def enroll(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    device = cfg.keystore.device
    extra: list[str] = []
    if args.kind == "tpm2":
        extra = [
            f"--tpm2-device={args.tpm2_device}",
            f"--tpm2-pcrs={tpm2_pcrs(args.tpm2_pcrs, cfg.keystore.measure_pcr)}",
        ]
        if args.tpm2_with_pin:
            extra.append("--tpm2-with-pin=yes")
    meta = luksadmin.metadata(device)
    if meta.version != 2 and args.kind in TOKEN_TYPES:
        raise OpsError(f"{device} is LUKS{meta.version}: tokens need LUKS2")
    unlock = _unlock(device, args.passphrase_file)
    try:
        if args.kind == "passphrase":
            new = ask_secret(
                f"New passphrase for {device}: ", twice=True, file=args.new_passphrase_file
            )
            try:
                slot = luksadmin.add_key(device, unlock, new, pbkdf=PBKDF)
            finally:
                wipe(new)
            say(f"enrolled a passphrase in key slot {slot} of {device}")
        elif args.kind == "recovery":
            slot, key = luksadmin.add_recovery_key(device, unlock)
            try:
                say(f"RECOVERY KEY: {key.decode()}")
            finally:
                wipe(key)
            say(
                f"(key slot {slot} of {device}) Keep it away from this machine: on paper or in "
                "a password manager; it opens the keystore when everything else fails."
            )
        else:
            if args.kind == "fido2":
                extra = ["--fido2-device=auto"]
            luksadmin.cryptenroll(device, extra, unlock)
            after = luksadmin.metadata(device)
            added = sorted(set(after.keyslots) - set(meta.keyslots))
            say(f"enrolled {args.kind} in key slot {', '.join(map(str, added)) or '?'} of {device}")
    finally:
        wipe(unlock)
    return EXIT_OK


def _slots_of(meta: luksadmin.Metadata, kind: str, slot: int | None) -> list[int]:
    if kind == "slot":
        if slot is None:
            raise OpsError("unenroll slot needs --slot N")
        if slot not in meta.keyslots:
            raise OpsError(f"{meta.device} has no key slot {slot}")
        return [slot]
    if kind == "passphrase":
        found = [s for s in meta.human_slots() if not meta.tokens_of(s)]
    else:
        found = sorted(
            {s for t in meta.tokens.values() if t.type == TOKEN_TYPES[kind] for s in t.keyslots}
        )
    if slot is not None:
        if slot not in found:
            raise OpsError(f"key slot {slot} of {meta.device} is not a {kind} slot ({found})")
        return [slot]
    if kind == "passphrase" and len(found) > 1:
        raise OpsError(
            f"{meta.device} has several passphrase slots ({', '.join(map(str, found))}): "
            "say which with --slot N"
        )
    return found


def unenroll(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    device = cfg.keystore.device
    meta = luksadmin.metadata(device)
    slots = _slots_of(meta, args.kind, args.slot)
    if not slots:
        say(f"{device} has no {args.kind} key slot: nothing to remove")
        return EXIT_OK
    left = [s for s in meta.human_slots() if s not in slots]
    if not left:
        raise OpsError(
            f"refusing: key slot {', '.join(map(str, slots))} of {device} is the last one a "
            "person can open (passphrase or recovery key); enroll another first "
            "(lczfs-unlockd enroll passphrase / recovery)"
        )
    actions = []
    for s in slots:
        kinds = ", ".join(f"{t.type} token {t.id}" for t in meta.tokens_of(s)) or "no token"
        actions.append(f"destroy key slot {s} of {device} ({kinds})")
    show_plan(f"unenroll {args.kind}:", actions)
    if not args.yes:
        say("Nothing done. Run again with --yes to remove it.")
        return EXIT_OK
    _prove_left(device, left, args.passphrase_file)
    for s in slots:
        luksadmin.kill_slot(device, s)
        say(f"removed key slot {s} of {device}")
    return EXIT_OK


def _prove_left(device: str, left: list[int], file: str | None) -> None:
    """A slot a person can open must stay, and be shown to work: a passphrase
    or recovery key that opens one of ``left`` (a forgotten passphrase's slot
    counts for nothing)."""
    secret = ask_secret(
        f"A passphrase or recovery key that stays in {device} (key slot "
        f"{', '.join(map(str, left))}): ",
        file=file,
    )
    try:
        if not any(luksadmin.test_key(device, secret, slot=s) for s in left):
            raise OpsError(
                f"refusing: that passphrase or recovery key opens none of the key slots of "
                f"{device} that stay ({', '.join(map(str, left))}): nothing removed; give one "
                "that does (--passphrase-file), or enroll one first (lczfs-unlockd enroll "
                "passphrase / recovery)"
            )
    finally:
        wipe(secret)


def enroll_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lczfs-unlockd enroll",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Add a way to open the keystore (config keystore.volume/partition).\n\n"
        "  tpm2        systemd-cryptenroll --tpm2-device: sealed to --tpm2-pcrs (default 7)\n"
        "              plus the daemon's measurement PCR (keystore.measure_pcr, default 15)\n"
        "              at its initial value, e.g. 7+15:sha256=0000...: the TPM releases it\n"
        "              only before the daemon measured the unlock, never later in that boot.\n"
        "              Refused with keystore.measure_pcr = false unless --tpm2-pcrs is given.\n"
        "  fido2       systemd-cryptenroll --fido2-device=auto\n"
        "  passphrase  a new passphrase, typed twice\n"
        "  recovery    a recovery key (systemd's format), printed once: RECOVERY KEY: ...\n\n"
        "It first checks that the existing passphrase or recovery key opens the keystore.",
        epilog="examples:\n  lczfs-unlockd enroll tpm2 --tpm2-pcrs 7\n"
        "  lczfs-unlockd enroll recovery --passphrase-file -",
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--config", default=config.DEFAULT_PATH, metavar="PATH")
    parser.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="an existing passphrase or recovery key from FILE (- = standard input); "
        "default: asked on the terminal",
    )
    parser.add_argument(
        "--new-passphrase-file", metavar="FILE", help="passphrase: the new one from FILE"
    )
    parser.add_argument(
        "--tpm2-pcrs",
        metavar="PCRS",
        help="tpm2: the PCRs to bind to (numbers 0-23 joined by +, each optionally "
        ":BANK=HEX; default 7); the measurement PCR is added at its initial value, or, if "
        "named here, must be given as N:sha256=<64 zeros>",
    )
    parser.add_argument(
        "--tpm2-with-pin", action="store_true", help="tpm2: also ask for a PIN at boot"
    )
    parser.add_argument("--tpm2-device", default="auto", metavar="PATH")
    return run_command(enroll, parser.parse_args(argv))


def unenroll_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lczfs-unlockd unenroll",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Remove a way into the keystore: the key slots of the TPM2/FIDO2/\n"
        "recovery tokens, the passphrase slot (a slot with no token), or --slot N.\n"
        "Prints the plan; changes nothing without --yes. Refuses to remove the last\n"
        "slot a person can open, and asks for --slot when several passphrases match.\n"
        "With --yes it first asks for a passphrase or recovery key that opens one of the\n"
        "slots that stay (or reads it from --passphrase-file), and refuses without one.",
        epilog="examples:\n  lczfs-unlockd unenroll tpm2 --yes\n"
        "  lczfs-unlockd unenroll passphrase --slot 2 --yes --passphrase-file -",
    )
    parser.add_argument("kind", choices=(*KINDS, "slot"))
    parser.add_argument("--slot", type=int, metavar="N")
    parser.add_argument("--config", default=config.DEFAULT_PATH, metavar="PATH")
    parser.add_argument("--yes", action="store_true", help="do it (default: only the plan)")
    parser.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="with --yes: a passphrase or recovery key that opens a key slot that stays, "
        "from FILE (- = standard input); default: asked on the terminal",
    )
    return run_command(unenroll, parser.parse_args(argv))
