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
slot S with priority ``ignore``, the systemd-tpm2 token T sealing its
secret to the PCRs arm-reboot chose and the measurement PCR's initial
value, and a marker token M of type ``lczfs-armed`` naming both, with its
expiry).  A marker that parses strictly, whose S is such a slot (priority
ignore, pbkdf2, no token but T and M) and that has not expired gets one
try of T, measured like any token.  The order makes it one-time even when
the boot is cut short: M is removed from the header first (a header that
cannot be written means T is not used at all), then T is tried by its
number, then S and T are destroyed with SIGTERM held back.  Whatever is
left after an interruption is a T without its marker on a slot of
priority ignore: libcryptsetup's "any token" passes over such a slot, the
daemon names a token only when a marker does, so nothing uses it again;
status shows it and disarm removes it (``one_time_leftovers``).  The
destruction is the daemon's own: the keystore's mapping is read-only,
its header on the zvol is not, and a stage-2 unit would never run after
a failed boot.  The marker is on the disk, so its expiry only holds
against whoever cannot write the disk; the one-boot limit holds against
anyone: once the unlock is measured, T's policy no longer matches for the
rest of the boot.  A dry run neither uses nor destroys it.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

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
from .text import is_number

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
MAX_TOKEN_JSON = 65536  # any token (a systemd-tpm2 one with a signed policy is ~2 KiB)
PRIORITY_IGNORE = 0  # LUKS2 key slot priority: opened only through a token named explicitly
# systemd-cryptenroll's KDF for a TPM2 secret (high entropy: minimal pbkdf2);
# a passphrase's slot has argon2 (cryptsetup's default).
ONE_TIME_KDF = "pbkdf2"


class SlotInfo(Protocol):
    """What one_time_leftovers and check_one_time_slot need of a key slot
    (``ports.Keyslot``, ``luksadmin.Keyslot``)."""

    @property
    def priority(self) -> int | None: ...

    @property
    def kdf(self) -> str: ...


class TokenInfo(Protocol):
    """What one_time_leftovers needs of a token (``luksadmin.Token``)."""

    @property
    def type(self) -> str: ...

    @property
    def keyslots(self) -> tuple[int, ...]: ...


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
    if not (isinstance(value, str) and is_number(value, 2) and int(value) <= 31):
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


def check_one_time_slot(
    unlock: OneTimeUnlock, slot: SlotInfo | None, naming: Iterable[int]
) -> None:
    """``ValueError`` unless key slot S is one arm-reboot made: active, priority
    ignore, systemd-cryptenroll's pbkdf2, and named by no token but T and M
    (``naming``: the tokens naming it).  Never a reason to use or destroy a
    slot a passphrase, a recovery key or another token also opens."""
    s = unlock.slot
    if slot is None:
        raise ValueError(f"key slot {s} is not active")
    if slot.priority != PRIORITY_IGNORE:
        raise ValueError(f"key slot {s} does not have priority ignore (arm-reboot sets it)")
    if slot.kdf != ONE_TIME_KDF:
        raise ValueError(
            f"key slot {s} has the KDF {slot.kdf[:32]}, not {ONE_TIME_KDF} "
            "(systemd-cryptenroll's for a TPM2 secret)"
        )
    others = sorted(set(naming) - {unlock.token, unlock.marker})
    if others:
        raise ValueError(
            f"key slot {s} also belongs to token {', '.join(map(str, others))}: not a one-time slot"
        )


def one_time_leftovers(
    keyslots: Mapping[int, SlotInfo], tokens: Mapping[int, TokenInfo]
) -> list[int]:
    """The tokens a one-time unlock can leave behind when its boot was cut
    short or its header write failed, in the header described by
    ``keyslots`` and ``tokens`` (``luksadmin.Metadata``'s): disarm removes
    them, status reports them.

    - a systemd-tpm2 or lczfs-armed token naming no key slot (libcryptsetup
      drops a destroyed slot's number from its tokens), and
    - a systemd-tpm2 token without marker whose every key slot has priority
      ignore and pbkdf2 and belongs to no other token: no unlock uses it
      (any-token passes over it, and no marker names it).

    A valid armed unlock is none of them: its marker names its slot.
    """
    out = []
    for n, t in sorted(tokens.items()):
        if t.type not in (TPM2_TOKEN, MARKER_TYPE):
            continue
        if not t.keyslots:
            out.append(n)
            continue
        if t.type != TPM2_TOKEN:
            continue
        alone = all(
            s in keyslots
            and keyslots[s].priority == PRIORITY_IGNORE
            and keyslots[s].kdf == ONE_TIME_KDF
            and not any(m != n and s in o.keyslots for m, o in tokens.items())
            for s in t.keyslots
        )
        if alone:
            out.append(n)
    return out


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
    wait = _TokenWait(ctx)
    if _one_time(ctx, luks, device, reasons, token_hook, wait):
        return ONE_TIME_METHOD
    for method in ks.unlock:
        ctx.checkpoint()
        if method is UnlockMethod.TOKEN:
            if _try_token(ctx, luks, device, reasons, token_hook, wait):
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


def _json_of(luks: LuksDevice, token: int, limit: int = MAX_MARKER_JSON) -> object | None:
    text = luks.token_json(token)
    if text is None or len(text) > limit:
        return None
    try:
        value: object = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value


def _token_slots(luks: LuksDevice) -> dict[int, frozenset[int] | None]:
    """Each token's key slots, from its JSON; None when that is unreadable."""
    out: dict[int, frozenset[int] | None] = {}
    for t in luks.tokens():
        value = _json_of(luks, t.id, MAX_TOKEN_JSON)
        refs = value.get("keyslots") if isinstance(value, Mapping) else None
        if isinstance(refs, list) and all(isinstance(r, str) and is_number(r, 2) for r in refs):
            out[t.id] = frozenset(int(r) for r in refs)
        else:
            out[t.id] = None
    return out


def armed(luks: LuksDevice, device: str) -> list[OneTimeUnlock]:
    """The valid markers of the header; each invalid one is a warning naming it."""
    out = []
    slots_of: dict[int, frozenset[int] | None] | None = None
    for t in luks.tokens():
        if t.type != MARKER_TYPE:
            continue
        try:
            marker = _json_of(luks, t.id)
            if marker is None:
                raise ValueError("its JSON is unreadable or too long")
            unlock = parse_marker(t.id, marker, functools.partial(_json_of, luks))
            if slots_of is None:
                slots_of = _token_slots(luks)
            # An unreadable token might name the slot: counted as naming it.
            naming = [n for n, refs in slots_of.items() if refs is None or unlock.slot in refs]
            check_one_time_slot(unlock, luks.keyslot(unlock.slot), naming)
            out.append(unlock)
        except (ValueError, KeystoreError) as exc:
            log.warning(
                "ignoring the %s marker in token %d of %s: %s (lczfs-unlockd disarm removes it)",
                MARKER_TYPE, t.id, device, exc,
            )  # fmt: skip
    return out


class _TokenWait:
    """One deadline (keystore.token_timeout) for every wait for token hardware
    in one unlock: the one-time try and the token method share it."""

    def __init__(self, ctx: Context) -> None:
        self._clock = ctx.ports.clock
        self._timeout = ctx.config.keystore.token_timeout
        self._start: float | None = None

    def begin(self) -> None:
        if self._start is None:
            self._start = self._clock.monotonic()

    def left(self) -> bool:
        return self._start is None or self._clock.monotonic() - self._start < self._timeout


def _one_time(
    ctx: Context,
    luks: LuksDevice,
    device: str,
    reasons: list[str],
    hook: VolumeKeyHook | None,
    wait: _TokenWait,
) -> bool:
    """arm-reboot's one-time unlock: consumed (its marker removed), tried once
    if not expired, then destroyed (see the module docstring)."""
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
        if not _consume(luks, device, unlock, reasons):
            continue
        try:
            if not opened and _in_time(ctx, unlock, device):
                opened = _try_one_time(ctx, luks, device, unlock, reasons, hook, wait)
        finally:
            destroy(luks, device, unlock)
    return opened


def _consume(luks: LuksDevice, device: str, unlock: OneTimeUnlock, reasons: list[str]) -> bool:
    """Remove the marker before T is tried: once it is gone nothing uses T
    again, whatever stops this boot later.  No header write, no try."""
    try:
        luks.remove_token(unlock.marker)
    except KeystoreError as exc:
        reasons.append(f"one-time TPM2 unlock: not used, its marker cannot be removed: {exc}")
        log.error(
            "not using the one-time unlock (arm-reboot, %s) of %s: its marker token %d cannot "
            "be removed from the header (%s), and without that nothing makes sure it is used "
            "only once; going on with keystore.unlock; remove it in the running system with "
            "lczfs-unlockd disarm",
            unlock.describe(), device, unlock.marker, exc,
        )  # fmt: skip
        return False
    return True


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
    wait: _TokenWait,
) -> bool:
    """One unseal of token T; only the wait for the TPM to appear is repeated."""
    p, ks = ctx.ports, ctx.config.keystore
    wait.begin()
    while True:
        ctx.checkpoint()
        try:
            # By its number: its slot's priority ignore keeps "any token" off it.
            # The policy pins the type to systemd-tpm2 (parse_marker checked it).
            luks.activate_by_token(
                ks.name, None, read_only=True, policy=_policy(ctx) or Tpm2Policy(),
                on_volume_key=hook, token=unlock.token,
            )  # fmt: skip
            return True
        except NoTokenError as exc:
            if exc.errno == errno.EAGAIN and wait.left():
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
    """S and T (and M, if still there).  Not a reason to fail the boot: what
    is left is never used again (module docstring); status shows it,
    disarm removes it."""
    tokens = [unlock.token]
    if luks.token_json(unlock.marker) is not None:
        tokens.append(unlock.marker)
    try:
        luks.destroy_one_time(unlock.slot, tokens)
    except KeystoreError as exc:
        log.error(
            "cannot destroy the one-time unlock (%s) of %s: %s: its marker is gone, so it is "
            "not used again; remove it in the running system with lczfs-unlockd disarm",
            unlock.describe(), device, exc,
        )  # fmt: skip
        return
    log.info("destroyed the one-time unlock (%s)", unlock.describe())


def _policy(ctx: Context) -> Tpm2Policy | None:
    ks = ctx.config.keystore
    if ks.tpm2_signature is None and ks.tpm2_pcrlock is None:
        return None  # NULL to the plugin: its own defaults, and every token type
    return Tpm2Policy(signature=ks.tpm2_signature, pcrlock=ks.tpm2_pcrlock)


def _marker_tokens(luks: LuksDevice) -> set[int]:
    """The tokens an lczfs-armed marker names, by number or through a key slot,
    valid marker or not: only a marker's own path (by number) may use them."""
    markers = [t.id for t in luks.tokens() if t.type == MARKER_TYPE]
    if not markers:
        return set()
    slots_of = _token_slots(luks)
    named: set[int] = set()
    slots: set[int] = set()
    for m in markers:
        value = _json_of(luks, m, MAX_TOKEN_JSON)
        if not isinstance(value, Mapping):
            continue
        t = value.get("lczfs_tpm2_token")
        if isinstance(t, str) and is_number(t, 2):
            named.add(int(t))
        slots |= slots_of.get(m) or frozenset()
    return (named | {n for n, refs in slots_of.items() if refs and refs & slots}) - set(markers)


def _failure_rank(exc: KeystoreError) -> int:
    """Which of several tokens' failures speaks for them all: a PIN to ask
    for, then hardware still to wait for, then a real failure, then "none"."""
    if isinstance(exc, (PinRequiredError, PinRefusedError)):
        return 3
    if isinstance(exc, NoTokenError):
        return 2 if exc.errno == errno.EAGAIN else 0
    return 1


def _activate_token(
    ctx: Context,
    luks: LuksDevice,
    ids: list[int] | None,
    pin: bytearray | None,
    hook: VolumeKeyHook | None,
) -> None:
    """Any token (``ids`` None: libcryptsetup's own choice), or each of ``ids``
    in turn, failing with the most telling failure of them."""
    ks = ctx.config.keystore
    if ids is None:
        luks.activate_by_token(
            ks.name, pin, read_only=True, policy=_policy(ctx), on_volume_key=hook
        )
        return
    worst: KeystoreError | None = None
    for n in ids:
        try:
            luks.activate_by_token(
                ks.name, pin, read_only=True, policy=_policy(ctx), on_volume_key=hook, token=n
            )
            return
        except KeystoreError as exc:
            if worst is None or _failure_rank(exc) > _failure_rank(worst):
                worst = exc
    raise worst or NoTokenError("no token can be used", errno=errno.ENOENT)


def _try_token(
    ctx: Context,
    luks: LuksDevice,
    device: str,
    reasons: list[str],
    hook: VolumeKeyHook | None,
    wait: _TokenWait,
) -> bool:
    """Tokens, falling back to the next method on any token failure.

    Only -EAGAIN (the token's hardware is not there yet) is waited for,
    up to keystore.token_timeout (counted from the first token try of this
    unlock); "no usable token" (no plugin, no matching token) falls through
    at once.  A token a marker names is never tried here: when one is
    there, the others are tried one by one, by number.
    """
    p, ks = ctx.ports, ctx.config.keystore
    # arm-reboot's markers carry no key (and have no plugin: not worth a warning).
    skipped = _marker_tokens(luks)
    tokens = [t for t in luks.tokens() if t.type != MARKER_TYPE and t.id not in skipped]
    if skipped:
        log.info(
            "not trying token %s of %s here: an %s marker names it (lczfs-unlockd disarm "
            "removes it)",
            ", ".join(map(str, sorted(skipped))), device, MARKER_TYPE,
        )  # fmt: skip
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
    ids = None
    if skipped:
        only_tpm2 = _policy(ctx) is not None  # the policy is for systemd-tpm2's plugin
        ids = [t.id for t in tokens if not t.unusable and (not only_tpm2 or t.type == TPM2_TOKEN)]
    wait.begin()
    announced = False
    while True:
        ctx.checkpoint()
        try:
            # Not extended: besides the plugin, the call runs the key
            # slot's KDF, whose cost is in the header whoever holds the
            # disk can write.  Only the wait for the hardware is.
            _activate_token(ctx, luks, ids, None, hook)
            return True
        except PinRequiredError:
            return _try_token_pin(ctx, luks, device, reasons, hook, ids)
        except NoTokenError as exc:
            if exc.errno != errno.EAGAIN or not wait.left():
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
    ctx: Context,
    luks: LuksDevice,
    device: str,
    reasons: list[str],
    hook: VolumeKeyHook | None,
    ids: list[int] | None,
) -> bool:
    ks = ctx.config.keystore
    try:
        return _ask_until_right(
            ctx,
            device,
            reasons,
            kind="token PIN",
            prompt=f"Please enter the security token PIN for keystore {ks.volume}:",
            activate=lambda pin: _activate_token(ctx, luks, ids, pin, hook),
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
