"""The measurement: extend a TPM2 PCR with the keystore's unlock, as systemd-cryptsetup does.

A TPM2 token enrolled with a policy on PCR 15's initial value
(``systemd-cryptenroll --tpm2-pcrs=7+15:sha256=0000…``) unseals once per
boot: as soon as the keystore's volume key is known — before the mapping is
even activated, whichever unlock method found the key — PCR 15 is extended
with it, so nothing running later in this boot (a root an attacker put in
place, a shell) can unseal the token again.  Stage-2 secrets can be bound
to "this keystore was unlocked" the same way.

What is measured is systemd's ``tpm2-measure-pcr=yes`` (crypttab(5),
src/cryptsetup/cryptsetup.c): in every PCR bank the TPM has allocated,
HMAC-<bank>(key = the volume key, message = ``cryptsetup:<name>:<LUKS UUID>``),
recorded in systemd's userspace event log with event type ``volume-key``.
An HMAC, not a hash of the key: the digest goes over an unprotected bus
and into the log.  The TPM work is the ``Tpm`` port (``tpm2.py``: tpm2-tss).

Unlike systemd-cryptsetup, which skips the measurement unless the kernel
was booted as a measured UKI and ignores its failure, the measurement here
is on whenever a TPM2 is there (or ``keystore.measure_pcr`` asks for it),
whatever the header lists, and with a TPM2 token enrolled a failed
measurement fails the unlock: a token the PCR no longer guards would be a
key for anyone later in the boot.  A failed unlock of such a keystore
extends the PCR with a marker instead (``cap_on_failure``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging

from .config import DEFAULT_MEASURE_PCR
from .context import Context
from .errors import TpmError
from .ports import LuksDevice, VolumeKeyHook

log = logging.getLogger("lczfs_unlockd")

EVENT_TYPE = "volume-key"  # systemd's Tpm2UserspaceEventType TPM2_EVENT_VOLUME_KEY
TPM2_TOKEN = "systemd-tpm2"


def xescape(text: str, bad: str = ":") -> str:
    """systemd's ``xescape(text, bad)``: control characters, DEL and above,
    backslash and the characters of ``bad`` as ``\\xNN`` of their UTF-8 bytes."""
    out = []
    for byte in text.encode("utf-8", "surrogateescape"):
        ch = chr(byte)
        if byte < 0x20 or byte >= 0x7F or ch == "\\" or ch in bad:
            out.append(f"\\x{byte:02x}")
        else:
            out.append(ch)
    return "".join(out)


def event_string(name: str, uuid: str) -> str:
    """What is measured with the volume key: ``cryptsetup:<name>:<uuid>``."""
    return f"cryptsetup:{xescape(name)}:{uuid}"


def digests(banks: list[str], message: bytes, volume_key: bytearray) -> dict[str, bytes]:
    """HMAC-<bank>(volume_key, message) for each bank.

    ``hmac.new`` with a digest name runs OpenSSL's HMAC on the caller's
    buffer (no Python copy of the key to leave behind).
    """
    return {bank: hmac.new(volume_key, message, bank).digest() for bank in banks}


def wanted(ctx: Context, has_tpm2_token: bool) -> int | None:
    """The PCR to measure the unlock into, or None for no measurement.

    "auto" measures whenever a TPM2 is there — not only when the header
    lists a TPM2 token: the header is the attacker's to edit, and one who
    deleted the token (keeping a copy) must not get an unmeasured
    passphrase unlock that leaves PCR 15 at its initial value.  A TPM2
    token enrolled while no TPM shows yet: the hook checks again when the
    key arrives (the token itself waits for the TPM).
    """
    ks = ctx.config.keystore
    if ks.measure_pcr is False:
        return None
    if isinstance(ks.measure_pcr, int):
        return ks.measure_pcr  # asked for: a missing TPM fails the unlock
    if ctx.ports.tpm.available() or has_tpm2_token:
        return DEFAULT_MEASURE_PCR
    log.info("not measuring the unlock: no TPM2")
    return None  # and no TPM2 token: nothing to wait for


def volume_key_hook(ctx: Context, luks: LuksDevice) -> VolumeKeyHook | None:
    """What keystore.py hands the activation: measures the volume key, once."""
    has_token = any(t.type == TPM2_TOKEN for t in luks.tokens())
    pcr = wanted(ctx, has_token)
    if pcr is None:
        return None
    uuid = luks.uuid
    description = event_string(ctx.config.keystore.name, uuid)
    required = ctx.config.keystore.measure_pcr is not None or has_token

    def measure(volume_key: bytearray) -> None:
        if ctx.report.measured:
            # A second method after the first one's activation failed: the
            # PCR has moved already, for this same volume key.
            return
        if ctx.config.keystore.measure_pcr is None and not ctx.ports.tpm.available():
            # auto, and still no TPM2 now that the key is here: no token can
            # be unsealed in this boot, there is nothing to guard.
            log.info("not measuring the unlock: no TPM2")
            return
        try:
            _extend(volume_key)
        except TpmError as exc:
            if required:
                raise
            # No TPM2 token to guard and nobody asked: the unlock goes on.
            log.warning("cannot measure the unlock (no TPM2 token is enrolled): %s", exc)

    def _extend(volume_key: bytearray) -> None:
        tpm = ctx.ports.tpm
        with ctx.step(f"measuring the keystore's unlock into PCR {pcr}", "measure"):
            banks = tpm.banks()
            if not banks:
                raise TpmError(
                    "the TPM2 has no PCR bank this daemon can compute (sha1, sha256, sha384, "
                    "sha512): cannot measure the unlock; set keystore.measure_pcr = false "
                    "to unlock unmeasured"
                )
            tpm.extend(
                pcr,
                digests(banks, description.encode(), volume_key),
                event_type=EVENT_TYPE,
                description=description,
            )
        ctx.report.measured = f"PCR {pcr} ({', '.join(banks)})"
        log.info(
            'extended PCR %d (%s) with "%s" and the volume key', pcr, ", ".join(banks), description
        )

    return measure


def cap_on_failure(ctx: Context) -> None:
    """Register, first thing: a run that fails leaves the PCR moved anyway."""
    ctx.on_exit("extend the PCR after a failed run", functools.partial(_cap, ctx))


def _cap(ctx: Context) -> None:
    """After a failed real run on a machine with a TPM2: move the PCR anyway.

    A TPM2 token may have been unsealed without a volume key to measure (a
    key no slot took, an interrupted call), or the attacker made the run
    fail before any unlock and kept a copy of the header with the token:
    whatever the header lists now, nothing later in this boot (an emergency
    shell, a root the attacker put in place) may unseal it.  Extended with a
    plain hash of a marker, event type "phase".  Runs in the teardown (no
    signal interrupts it); only a SIGKILL can skip it.
    """
    ks = ctx.config.keystore
    if ctx.state.completed or ctx.report.measured or ctx.config.dry_run:
        return
    if ks.measure_pcr is False or not ctx.ports.tpm.available():
        return
    pcr = DEFAULT_MEASURE_PCR if ks.measure_pcr is None else int(ks.measure_pcr)
    tpm = ctx.ports.tpm
    marker = f"lczfs-unlockd:unlock-failed:{xescape(ks.name)}:{ctx.state.luks_uuid}"
    banks = tpm.banks()
    tpm.extend(
        pcr,
        {bank: hashlib.new(bank, marker.encode()).digest() for bank in banks},
        event_type="phase",
        description=marker,
    )
    ctx.report.measured = f"PCR {pcr} ({', '.join(banks)}, run failed)"
    log.warning(
        'the run failed: extended PCR %d with "%s", so that no TPM2 token can be unsealed '
        "again in this boot",
        pcr, marker,
    )  # fmt: skip


def already_open(ctx: Context) -> None:
    """The keystore was open before we ran: its opener had the key, not us."""
    ks = ctx.config.keystore
    if ks.measure_pcr is False:
        return
    log.warning(
        "%s was opened before lczfs-unlockd ran: its unlock cannot be measured here; measure "
        "it where it is opened (crypttab: tpm2-measure-pcr=yes)",
        ks.mapper_path,
    )
