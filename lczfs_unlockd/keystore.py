"""Step 2, the keystore: find its zvol, open the LUKS volume read-only, close it at the end.

The unlock methods are tried in ``keystore.unlock`` order: a LUKS2 token
(TPM2, FIDO2, PKCS#11: waited for up to ``token_timeout`` while its
hardware is absent, its PIN asked for), the key file, the passphrase
(asked through systemd's password agents, ``tries`` times).  Any failure
of one method falls through to the next, and the error names each.
Secrets are wiped after every try.  ``cryptsetup.py`` is the binding;
the policy is here.

Before them, in real runs, whatever ``keystore.unlock`` says: a one-time
unlock armed in the running system by ``lczfs-unlockd arm-reboot`` (a key
slot S, the systemd-tpm2 token T sealing its secret to PCR 7 and the
measurement PCR's initial value, and a marker token M of type
``lczfs-armed`` naming both, with its expiry).  A marker that parses
strictly and has not expired gets one try of T, measured like any token;
then S, T and M are destroyed whether it worked or not, by the daemon
itself: the keystore's mapping is read-only, its header on the zvol is
not, and leaving the destruction to a stage-2 unit would leave the slot in
place when that unit never runs (a failed boot, a rescue shell).  The
marker is on the disk, so its expiry only holds against whoever cannot
write the disk; the one-boot limit holds against anyone: once the unlock
is measured, T's policy no longer matches for the rest of the boot.  A
dry run neither uses nor destroys it.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import measure
from .config import UnlockMethod, format_duration
from .context import Context
from .errors import (
    KeystoreError,
    NoSuchDatasetError,
    NoTokenError,
    NoUsableKeyslotError,
    PinRefusedError,
    PinRequiredError,
    PoolError,
    PromptError,
    WrongKeyError,
)
from .ports import LuksDevice, MappingState, Tpm2Policy, VolumeKeyHook
from .secretbuf import wipe

log = logging.getLogger("lczfs_unlockd")

ZVOL_WAIT = 30.0  # udev creates /dev/zvol/... shortly after import
PARTITION_WAIT = 5.0  # after the zvol node, its partitions follow
DEVICE_POLL = 0.1
TOKEN_RETRY = 0.5
AMBIGUOUS_TRIES = 3  # a token PIN refused for a reason that may not be the PIN

# arm-reboot's one-time unlock (the marker token's JSON, the report's method).
MARKER_TYPE = "lczfs-armed"
TPM2_TOKEN = "systemd-tpm2"
ONE_TIME_METHOD = "one-time TPM2 unlock (arm-reboot)"
MARKER_KEYS = frozenset({"type", "keyslots", "lczfs_tpm2_token", "armed_at", "expires"})
MAX_ARMED = 7 * 24 * 3600  # the longest an armed unlock may stay valid (arm-reboot --expires)
# The initrd's clock may lag the one stage 2 set (an RTC not written back):
# this much before armed_at is still believed.
CLOCK_SKEW = 600
MAX_MARKER_JSON = 4096  # a marker is ~120 bytes; more is not ours


@dataclass(frozen=True)
class OneTimeUnlock:
    """A valid marker: key slot ``slot``, its systemd-tpm2 token ``token``,
    the marker token ``marker`` itself, and when it was armed and expires
    (Unix seconds)."""

    marker: int
    token: int
    slot: int
    armed_at: int
    expires: int

    def describe(self) -> str:
        return f"key slot {self.slot}, tokens {self.token} and {self.marker}"


def marker_json(slot: int, token: int, armed_at: int, expires: int) -> dict[str, object]:
    """The marker token arm-reboot imports (the format parse_marker accepts)."""
    return {
        "type": MARKER_TYPE,
        "keyslots": [str(slot)],
        "lczfs_tpm2_token": str(token),
        "armed_at": armed_at,
        "expires": expires,
    }


def _number(value: object, what: str) -> int:
    if not (isinstance(value, str) and value.isdigit() and len(value) <= 2 and int(value) <= 31):
        raise ValueError(f"{what} is not a number 0-31 in a string")
    return int(value)


def _seconds(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**40:
        raise ValueError(f"{what} is not a time in Unix seconds")
    return value


def parse_marker(
    marker_id: int, marker: object, token_of: Callable[[int], object | None]
) -> OneTimeUnlock:
    """Check a marker token's JSON strictly (every field is hostile input):
    ``ValueError`` saying what is wrong, without quoting the header.

    ``token_of(n)``: token n's JSON object, None when there is none.  The
    token the marker names must be a systemd-tpm2 token of exactly its slot.
    """
    if not isinstance(marker, Mapping) or marker.get("type") != MARKER_TYPE:
        raise ValueError(f"token {marker_id} is not an {MARKER_TYPE} marker")
    if set(marker) != MARKER_KEYS:
        raise ValueError("its fields are not exactly " + ", ".join(sorted(MARKER_KEYS)))
    slots = marker["keyslots"]
    if not isinstance(slots, list) or len(slots) != 1:
        raise ValueError("keyslots is not a list of one key slot")
    slot = _number(slots[0], "its key slot")
    token = _number(marker["lczfs_tpm2_token"], "lczfs_tpm2_token")
    if token == marker_id:
        raise ValueError("lczfs_tpm2_token names the marker itself")
    armed_at = _seconds(marker["armed_at"], "armed_at")
    expires = _seconds(marker["expires"], "expires")
    if not armed_at < expires <= armed_at + MAX_ARMED:
        raise ValueError(f"expires is not after armed_at by at most {MAX_ARMED // 86400} days")
    tpm2 = token_of(token)
    if not isinstance(tpm2, Mapping) or tpm2.get("type") != TPM2_TOKEN:
        raise ValueError(f"token {token} is not a {TPM2_TOKEN} token")
    if tpm2.get("keyslots") != [str(slot)]:
        raise ValueError(f"token {token} does not belong to key slot {slot} alone")
    return OneTimeUnlock(marker_id, token, slot, armed_at, expires)


def utc(seconds: float) -> str:
    """Unix seconds as ISO 8601 UTC (the form arm-reboot prints)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def open_keystore(ctx: Context) -> str:
    """Wait for the keystore's zvol, open it read-only; close it again at the end.

    Returns the mapping's path.  A mapping that was already open is used; a
    real run closes it at the end whoever opened it (nothing may see the
    keys after us), a dry run leaves it as it was found.
    """
    device = _wait_for_device(ctx)
    ks = ctx.config.keystore
    # Before activation: closes the mapping when we leave, even if the
    # signal lands between activation and the next line.
    ctx.on_exit(
        f"close {ks.mapper_path}",
        functools.partial(_close_mapping, ctx),
        functools.partial(_close_mapping, ctx, deferred=True),
    )
    _open(ctx, device)
    return ks.mapper_path


def _wait_for_device(ctx: Context) -> str:
    c, p = ctx.config, ctx.ports
    ks = c.keystore
    with ctx.step(f"waiting for keystore {ks.device}", "keystore_device"), ctx.extending():
        base = f"/dev/zvol/{ks.volume}"
        if not p.fs.exists(base):
            # A wrong volume name fails at once instead of after ZVOL_WAIT.
            try:
                p.zpool.datasets([ks.volume], recursive=False)
            except NoSuchDatasetError:
                raise KeystoreError(
                    f"keystore.volume = {ks.volume}: no such zvol in pool {c.pool} "
                    "(zfs list -t volume shows the ones there are)",
                    errno=errno.ENOENT,
                ) from None
            except PoolError as exc:
                raise KeystoreError(
                    f"cannot look up keystore.volume = {ks.volume}: {exc}", errno=exc.errno
                ) from None
        start = p.clock.monotonic()
        base_seen: float | None = None
        while not p.fs.exists(ks.device):
            now = p.clock.monotonic()
            if base_seen is None and ks.partition and p.fs.exists(base):
                base_seen = now
            if base_seen is not None and now - base_seen >= PARTITION_WAIT:
                raise KeystoreError(
                    f"{base} has no partition {ks.partition}: check keystore.partition "
                    "(0 = the whole zvol) against the zvol's partition table",
                    errno=errno.ENOENT,
                )
            if now - start >= ZVOL_WAIT:
                raise KeystoreError(
                    f"{ks.device} did not appear within {format_duration(ZVOL_WAIT)} after "
                    f"importing {c.pool}: check keystore.volume and keystore.partition, and "
                    "that udev's ZFS rules (60-zvol.rules, zvol_id) are in the initrd",
                    errno=errno.ENOENT,
                )
            ctx.checkpoint()
            p.clock.sleep(DEVICE_POLL)
        return ks.device


def _open(ctx: Context, device: str) -> None:
    p, ks = ctx.ports, ctx.config.keystore
    with ctx.step(f"opening keystore {device} read-only as {ks.mapper_path}", "keystore_open"):
        if p.crypt.status(ks.name) in (MappingState.ACTIVE, MappingState.BUSY):
            log.warning(
                "%s is already open (a crypttab entry?); using it%s",
                ks.mapper_path,
                "" if ctx.config.dry_run else ", and closing it at the end",
            )
            ctx.report.keystore_method = "already open"
            measure.already_open(ctx)
            return
        luks = p.crypt.open(device)
        try:
            hook = measure.volume_key_hook(ctx, luks)
            ctx.state.activated = True  # from here on, a mapping may be ours
            ctx.state.luks_uuid = luks.uuid
            ctx.report.keystore_method = _unlock(ctx, luks, device, hook)
        finally:
            luks.close()
        log.info("keystore opened with %s", ctx.report.keystore_method)


def _unlock(ctx: Context, luks: LuksDevice, device: str, hook: VolumeKeyHook | None) -> str:
    """Try the methods in order.  ``hook``: measures the volume key before
    activation (any failure of it fails the unlock: it is no method's fault)."""
    ks = ctx.config.keystore
    reasons: list[str] = []
    token_hook = hook
    if ctx.config.dry_run:
        # A dry run measures only what a token released (the TPM gave the key
        # out: the PCR must move); a passphrase checked in stage 2 must not
        # move a PCR that stage-2 secrets are bound to.
        hook = None
    if _one_time(ctx, luks, device, reasons, token_hook):
        return ONE_TIME_METHOD
    for method in ks.unlock:
        ctx.checkpoint()
        if method is UnlockMethod.TOKEN:
            if _try_token(ctx, luks, device, reasons, token_hook):
                return "token"
        elif method is UnlockMethod.KEYFILE:
            if ks.keyfile is None:
                continue
            try:
                luks.activate_by_keyfile(ks.name, ks.keyfile, read_only=True, on_volume_key=hook)
                return "key file"
            except KeystoreError as exc:
                log.warning("key file %s did not open the keystore: %s", ks.keyfile, exc)
                reasons.append(f"key file {ks.keyfile}: {exc}")
        elif method is UnlockMethod.PASSPHRASE and _try_passphrase(
            ctx, luks, device, reasons, hook
        ):
            return "passphrase"
    raise KeystoreError(
        f"cannot open keystore {device}: " + "; ".join(reasons or ["no unlock method left"]),
        errno=errno.EPERM,
    )


def _json_of(luks: LuksDevice, token: int) -> object | None:
    text = luks.token_json(token)
    if text is None or len(text) > MAX_MARKER_JSON:
        return None
    try:
        value: object = json.loads(text)
    except ValueError:
        return None
    return value


def armed(luks: LuksDevice, device: str) -> list[OneTimeUnlock]:
    """The valid markers of the header; each invalid one is a warning naming it."""
    out = []
    for t in luks.tokens():
        if t.type != MARKER_TYPE:
            continue
        try:
            marker = _json_of(luks, t.id)
            if marker is None:
                raise ValueError("its JSON is unreadable or too long")
            out.append(parse_marker(t.id, marker, functools.partial(_json_of, luks)))
        except (ValueError, KeystoreError) as exc:
            log.warning(
                "ignoring the %s marker in token %d of %s: %s (lczfs-unlockd disarm removes it)",
                MARKER_TYPE, t.id, device, exc,
            )  # fmt: skip
    return out


def _one_time(
    ctx: Context, luks: LuksDevice, device: str, reasons: list[str], hook: VolumeKeyHook | None
) -> bool:
    """arm-reboot's one-time unlock: tried once if valid and not expired, then
    destroyed in any case (see the module docstring)."""
    if not any(t.type == MARKER_TYPE for t in luks.tokens()):
        return False
    if ctx.config.dry_run:
        log.info(
            "dry run: the one-time unlock (arm-reboot) on %s is neither used nor destroyed",
            device,
        )
        return False
    opened = False
    for unlock in armed(luks, device):
        try:
            if not opened and _in_time(ctx, unlock, device):
                opened = _try_one_time(ctx, luks, device, unlock, reasons, hook)
        finally:
            destroy(luks, device, unlock)
    return opened


def _in_time(ctx: Context, unlock: OneTimeUnlock, device: str) -> bool:
    now = ctx.ports.clock.time()
    if now >= unlock.expires:
        log.warning(
            "the one-time unlock (arm-reboot) of %s expired at %s (now %s): not using it",
            device, utc(unlock.expires), utc(now),
        )  # fmt: skip
        return False
    if now < unlock.armed_at - CLOCK_SKEW:
        # A clock set back could make any expiry look fresh.
        log.warning(
            "the clock (%s) is before the one-time unlock (arm-reboot) of %s was armed (%s): "
            "not trusting it, not using it",
            utc(now), device, utc(unlock.armed_at),
        )  # fmt: skip
        return False
    return True


def _try_one_time(
    ctx: Context,
    luks: LuksDevice,
    device: str,
    unlock: OneTimeUnlock,
    reasons: list[str],
    hook: VolumeKeyHook | None,
) -> bool:
    """One unseal of token T; only the wait for the TPM to appear is repeated."""
    p, ks = ctx.ports, ctx.config.keystore
    start = p.clock.monotonic()
    while True:
        ctx.checkpoint()
        try:
            # The policy pins the type to systemd-tpm2 (parse_marker checked it).
            luks.activate_by_token(
                ks.name, None, read_only=True, policy=_policy(ctx) or Tpm2Policy(),
                on_volume_key=hook, token=unlock.token,
            )  # fmt: skip
            return True
        except NoTokenError as exc:
            if exc.errno == errno.EAGAIN and p.clock.monotonic() - start < ks.token_timeout:
                with ctx.extending():  # bounded by token_timeout
                    p.clock.sleep(TOKEN_RETRY)
                continue
            failure: KeystoreError = exc
        except KeystoreError as exc:  # PinRequiredError included: armed without a PIN
            failure = exc
        reasons.append(f"one-time TPM2 unlock: {failure}")
        log.warning(
            "the one-time unlock (arm-reboot, token %d) did not open %s: %s",
            unlock.token, device, failure,
        )  # fmt: skip
        return False


def destroy(luks: LuksDevice, device: str, unlock: OneTimeUnlock) -> None:
    """Not a reason to fail the boot: status shows what is left, disarm removes it."""
    try:
        luks.destroy_one_time(unlock.slot, (unlock.token, unlock.marker))
    except KeystoreError as exc:
        log.error(
            "cannot destroy the one-time unlock (%s) of %s: %s: remove it in the running "
            "system with lczfs-unlockd disarm",
            unlock.describe(), device, exc,
        )  # fmt: skip
        return
    log.info("destroyed the one-time unlock (%s)", unlock.describe())


def _policy(ctx: Context) -> Tpm2Policy | None:
    ks = ctx.config.keystore
    if ks.tpm2_signature is None and ks.tpm2_pcrlock is None:
        return None  # NULL to the plugin: its own defaults, and every token type
    return Tpm2Policy(signature=ks.tpm2_signature, pcrlock=ks.tpm2_pcrlock)


def _try_token(
    ctx: Context, luks: LuksDevice, device: str, reasons: list[str], hook: VolumeKeyHook | None
) -> bool:
    """Tokens, falling back to the next method on any token failure.

    Only -EAGAIN (the token's hardware is not there yet) is waited for,
    up to keystore.token_timeout; "no usable token" (no plugin, no
    matching token) falls through at once.
    """
    p, ks = ctx.ports, ctx.config.keystore
    # arm-reboot's markers carry no key (and have no plugin: not worth a warning).
    tokens = [t for t in luks.tokens() if t.type != MARKER_TYPE]
    if not tokens:
        reasons.append("token: none enrolled")
        log.info("no LUKS2 token enrolled on %s", device)
        return False
    unusable = [t for t in tokens if t.unusable]
    for t in unusable:
        log.warning("%s of %s cannot be used: %s", t.describe(), device, t.unusable)
    if len(unusable) == len(tokens):
        reasons.append(
            "token: "
            + "; ".join(f"{t.describe()}: {t.unusable}" for t in unusable)
            + " (put that token plugin into the initrd)"
        )
        return False
    start = p.clock.monotonic()
    announced = False
    while True:
        ctx.checkpoint()
        try:
            # Not extended: besides the plugin, the call runs the key
            # slot's KDF, whose cost is in the header whoever holds the
            # disk can write.  Only the wait for the hardware is.
            luks.activate_by_token(
                ks.name, None, read_only=True, policy=_policy(ctx), on_volume_key=hook
            )
            return True
        except PinRequiredError:
            return _try_token_pin(ctx, luks, device, reasons, hook)
        except NoTokenError as exc:
            waited = p.clock.monotonic() - start
            if exc.errno != errno.EAGAIN or waited >= ks.token_timeout:
                reasons.append(f"token: {exc}")
                log.warning("no token could open %s: %s", device, exc)
                return False
            if not announced:
                log.info(
                    "waiting up to %s for a security token for %s (keystore.token_timeout)",
                    format_duration(ks.token_timeout), device,
                )  # fmt: skip
                ctx.status(f"waiting for a security token for {device}")
                announced = True
            with ctx.extending():  # bounded by token_timeout
                p.clock.sleep(TOKEN_RETRY)
        except KeystoreError as exc:
            # A TPM2 unseal failing after a firmware update, a plugin
            # error...: exactly when the passphrase must still work.
            reasons.append(f"token: {exc}")
            log.warning("token did not open %s: %s", device, exc)
            return False


def _ask(ctx: Context, prompt: str, device: str, *, kind: str, first: bool) -> bytearray:
    ks = ctx.config.keystore
    ctx.status(f"asking for the {kind} of keystore {device}")
    passphrase = kind == "passphrase"
    with ctx.extending():  # a person is typing
        return ctx.ports.askpass.ask(
            prompt,
            # A passphrase prompt in systemd-cryptsetup's own form, so
            # every agent that answers crypttab prompts (clevis' askpass
            # matches "cryptsetup:") answers ours.  Not a PIN prompt:
            # systemd gives those no such id, and an agent answering a
            # PIN with the volume's passphrase burns TPM lockout tries.
            ident=f"cryptsetup:{device}" if passphrase else f"lczfs-unlockd:{device}",
            timeout=ks.prompt_timeout,
            # A passphrase is shared with systemd-cryptsetup through the
            # kernel keyring (typed once for several volumes); a PIN is not.
            keyname="cryptsetup" if passphrase else None,
            accept_cached=first and passphrase,
        )


def _try_token_pin(
    ctx: Context, luks: LuksDevice, device: str, reasons: list[str], hook: VolumeKeyHook | None
) -> bool:
    ks = ctx.config.keystore
    try:
        return _ask_until_right(
            ctx,
            device,
            reasons,
            kind="token PIN",
            prompt=f"Please enter the security token PIN for keystore {ks.volume}:",
            activate=lambda pin: luks.activate_by_token(
                ks.name, pin, read_only=True, policy=_policy(ctx), on_volume_key=hook
            ),
            # WrongKeyError (-EPERM) is no PIN problem: the token's key
            # opens no key slot, whatever the PIN; it falls through.
            wrong=(PinRequiredError,),
            ambiguous=PinRefusedError,
        )
    except KeystoreError as exc:
        reasons.append(f"token: {exc}")
        log.warning("token did not open %s: %s", device, exc)
        return False


def _try_passphrase(
    ctx: Context, luks: LuksDevice, device: str, reasons: list[str], hook: VolumeKeyHook | None
) -> bool:
    ks = ctx.config.keystore
    try:
        return _ask_until_right(
            ctx,
            device,
            reasons,
            kind="passphrase",
            prompt=f"Please enter the passphrase for keystore {ks.volume}:",
            activate=lambda passphrase: luks.activate_by_passphrase(
                ks.name, passphrase, read_only=True, on_volume_key=hook
            ),
            wrong=(WrongKeyError,),
        )
    except NoUsableKeyslotError as exc:
        # No slot can take a passphrase at all: asking again cannot help.
        reasons.append(f"passphrase: {exc}")
        log.warning("no passphrase can open %s: %s", device, exc)
        return False


def _ask_until_right(
    ctx: Context,
    device: str,
    reasons: list[str],
    *,
    kind: str,
    prompt: str,
    activate: Callable[[bytearray], None],
    wrong: tuple[type[KeystoreError], ...],
    ambiguous: type[KeystoreError] | None = None,
) -> bool:
    """Ask and try up to keystore.tries times; the answer is wiped after each try.

    An ``ambiguous`` refusal (the answer may be right and something else
    broken) is given AMBIGUOUS_TRIES in a row at most, even with tries = 0.
    """
    tries = ctx.config.keystore.tries
    of = f" of {tries}" if tries else ""
    attempt = 0
    refused = 0
    while tries == 0 or attempt < tries:
        ctx.checkpoint()
        attempt += 1
        try:
            secret = _ask(ctx, prompt, device, kind=kind, first=attempt == 1)
        except PromptError as exc:
            reasons.append(f"{kind}: {exc}")
            return False
        try:
            activate(secret)
            return True
        except wrong as exc:
            if ambiguous is not None and isinstance(exc, ambiguous):
                refused += 1
                log.warning("%s (try %d%s)", exc, attempt, of)
                if refused >= AMBIGUOUS_TRIES:
                    reasons.append(f"{kind}: refused {refused} times in a row: {exc}")
                    return False
            else:
                refused = 0
                log.warning("wrong %s for keystore %s (try %d%s)", kind, device, attempt, of)
            ctx.status(f"wrong {kind} for keystore {device} (try {attempt}{of})")
        finally:
            wipe(secret)
    reasons.append(f"{kind}: wrong {tries} times")
    return False


def ours(ctx: Context) -> bool:
    """The mapping is ours to close: a real run closes any, a dry run only its own."""
    return ctx.state.activated or not ctx.config.dry_run


def _close_mapping(ctx: Context, *, deferred: bool = False) -> None:
    p, ks = ctx.ports, ctx.config.keystore
    if ours(ctx) and p.crypt.status(ks.name) in (MappingState.ACTIVE, MappingState.BUSY):
        p.crypt.deactivate(ks.name, deferred=deferred)
        if deferred:
            log.warning("%s will be removed when its last user closes it", ks.mapper_path)
        else:
            log.info("closed %s", ks.mapper_path)
