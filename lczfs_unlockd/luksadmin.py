"""Changing a LUKS header in the running system: the operations commands' adapter.

The daemon only ever reads a header (``cryptsetup.py``, libcryptsetup
through ctypes).  ``setup``, ``enroll``, ``unenroll`` and ``arm-reboot``
change one, and for that they run the tools an operator would:
``cryptsetup`` (format, add or kill a key slot, import or remove a token,
dump the JSON metadata) and ``systemd-cryptenroll`` (TPM2, FIDO2).  Every
secret goes to them through a pipe named ``/proc/self/fd/N``
(``process.run_fed``): never argv, the environment or a file.  Every call
has a deadline; a KDF benchmark with argon2 takes seconds, not minutes.

Metadata read back from a header is whatever whoever holds the disk wrote:
``metadata()`` bounds it and keeps only what it could check.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import process
from .errors import CommandError, LuksAdminError, UnlockError
from .text import escape as printable
from .text import is_number

log = logging.getLogger("lczfs_unlockd")

CRYPTSETUP = "cryptsetup"
CRYPTENROLL = "systemd-cryptenroll"
# luksFormat and luksAddKey run the KDF benchmark and the KDF: seconds with
# argon2id and 1 GiB, more on a slow machine.
KDF_TIMEOUT = 300.0
QUERY_TIMEOUT = 30.0
MAX_METADATA = 4 * 1024 * 1024  # LUKS2's JSON area is at most 4 MiB
# Device tokens: a keyslot only they can open needs the hardware.
DEVICE_TOKENS = frozenset({"systemd-tpm2", "systemd-fido2", "systemd-pkcs11"})
RECOVERY_TOKEN = "systemd-recovery"
# systemd's recovery keys: 32 random bytes in "modhex", 8 groups of 8.
_MODHEX = "cbdefghijklnrtuv"


@dataclass(frozen=True)
class Keyslot:
    id: int
    type: str  # "luks2", or "luks1"
    kdf: str  # "argon2id", "pbkdf2", ...
    priority: int | None = None  # LUKS2: 0 ignore, 1 normal, 2 prefer; None: not set


@dataclass(frozen=True)
class Token:
    id: int
    type: str
    keyslots: tuple[int, ...]
    # The token's JSON as the header has it (bounded by MAX_METADATA): every
    # value in it is hostile input.
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def device_bound(self) -> bool:
        return self.type in DEVICE_TOKENS


@dataclass(frozen=True)
class Metadata:
    """What a LUKS header says: version, UUID, key slots and tokens."""

    device: str
    version: int
    uuid: str
    keyslots: Mapping[int, Keyslot]
    tokens: Mapping[int, Token]

    def tokens_of(self, slot: int) -> list[Token]:
        return [t for t in self.tokens.values() if slot in t.keyslots]

    def human_slots(self) -> list[int]:
        """Key slots a person can open with something typed or a key file:
        bound to no device token (a recovery key's slot counts)."""
        return [
            s for s in sorted(self.keyslots) if not any(t.device_bound for t in self.tokens_of(s))
        ]


def _int(value: object, what: str, device: str, hi: int) -> int:
    if isinstance(value, str) and is_number(value, 6):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
        raise LuksAdminError(f"{device}: the LUKS header has an invalid {what} ({value!r:.40})")
    return value


def parse_metadata(text: str, device: str) -> Metadata:
    """``cryptsetup luksDump --dump-json-metadata``'s JSON, checked and bounded."""
    if len(text) > MAX_METADATA:
        raise LuksAdminError(f"{device}: LUKS2 metadata larger than 4 MiB: refusing it")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise LuksAdminError(f"{device}: unreadable LUKS2 metadata: {exc}") from None
    if not isinstance(data, dict):
        raise LuksAdminError(f"{device}: LUKS2 metadata is not a JSON object")
    slots: dict[int, Keyslot] = {}
    raw_slots = data.get("keyslots") or {}
    raw_tokens = data.get("tokens") or {}
    if not isinstance(raw_slots, dict) or not isinstance(raw_tokens, dict):
        raise LuksAdminError(f"{device}: LUKS2 metadata has no keyslots/tokens objects")
    for key, slot in raw_slots.items():
        n = _int(key, "key slot number", device, 31)
        if not isinstance(slot, dict):
            raise LuksAdminError(f"{device}: key slot {n} is not a JSON object")
        raw_kdf = slot.get("kdf")
        kdf: dict[str, Any] = raw_kdf if isinstance(raw_kdf, dict) else {}
        prio = slot.get("priority")
        slots[n] = Keyslot(
            id=n,
            type=printable(str(slot.get("type", "?")))[:32],
            kdf=printable(str(kdf.get("type", "?")))[:32],
            priority=prio if isinstance(prio, int) and not isinstance(prio, bool) else None,
        )
    tokens: dict[int, Token] = {}
    for key, token in raw_tokens.items():
        n = _int(key, "token number", device, 31)
        if not isinstance(token, dict):
            raise LuksAdminError(f"{device}: token {n} is not a JSON object")
        refs = token.get("keyslots") or []
        if not isinstance(refs, list) or len(refs) > 32:
            raise LuksAdminError(f"{device}: token {n} has an invalid keyslots list")
        tokens[n] = Token(
            id=n,
            type=printable(str(token.get("type", "?")))[:64],
            keyslots=tuple(_int(r, f"key slot of token {n}", device, 31) for r in refs),
            fields=token,
        )
    return Metadata(device, 2, "", slots, tokens)


def _fail(device: str, action: str, exc: UnlockError) -> LuksAdminError:
    return LuksAdminError(f"{device}: cannot {action}: {exc}", errno=exc.errno)


def _cryptsetup(
    device: str,
    action: str,
    args: Sequence[str],
    secrets: Sequence[bytes | bytearray] = (),
    timeout: float = QUERY_TIMEOUT,
) -> process.Result:
    try:
        return process.run_fed([CRYPTSETUP, *args], secrets, timeout=timeout)
    except UnlockError as exc:
        raise _fail(device, action, exc) from None


def is_luks(device: str) -> bool:
    try:
        return process.run([CRYPTSETUP, "isLuks", device], check=False).returncode == 0
    except UnlockError as exc:
        raise _fail(device, "check for a LUKS header", exc) from None


def metadata(device: str) -> Metadata:
    """The header's version, UUID, key slots and tokens."""
    uuid = _cryptsetup(device, "read the LUKS UUID", ["luksUUID", device]).stdout.strip()
    dump = _cryptsetup(device, "read the LUKS header", ["luksDump", device]).stdout
    m = re.search(r"^Version:\s*(\d+)", dump, re.M)
    version = int(m.group(1)) if m else 0
    if version == 1:
        slots = {
            int(n): Keyslot(int(n), "luks1", "pbkdf2")
            for n in re.findall(r"^Key Slot (\d+): ENABLED", dump, re.M)
        }
        return Metadata(device, 1, printable(uuid)[:64], slots, {})
    if version != 2:
        raise LuksAdminError(f"{device}: not a LUKS1 or LUKS2 header (luksDump says {version})")
    text = _cryptsetup(
        device, "read the LUKS2 metadata", ["luksDump", "--dump-json-metadata", device]
    ).stdout
    meta = parse_metadata(text, device)
    return Metadata(device, 2, printable(uuid)[:64], meta.keyslots, meta.tokens)


def format_luks2(
    device: str,
    passphrase: bytes | bytearray,
    *,
    label: str | None = None,
    pbkdf: Sequence[str] = (),
) -> None:
    """luksFormat --type luks2 with ``passphrase`` in key slot 0.

    ``pbkdf``: extra arguments (``--pbkdf argon2id``...); none = cryptsetup's
    defaults (argon2id, 2 s on this machine).
    """
    args = ["luksFormat", "--batch-mode", "--type", "luks2", "--key-file", "{fd0}", *pbkdf]
    if label:
        args += ["--label", label]
    _cryptsetup(device, "format it as LUKS2", [*args, device], [passphrase], KDF_TIMEOUT)


def add_key(
    device: str,
    unlock: bytes | bytearray,
    new: bytes | bytearray,
    *,
    pbkdf: Sequence[str] = (),
) -> int:
    """A new key slot holding ``new``, opened with ``unlock``; returns its number."""
    before = set(metadata(device).keyslots)
    _cryptsetup(
        device,
        "add a key slot",
        ["luksAddKey", "--batch-mode", "--key-file", "{fd0}", *pbkdf, device, "{fd1}"],
        [unlock, new],
        KDF_TIMEOUT,
    )
    added = sorted(set(metadata(device).keyslots) - before)
    if len(added) != 1:
        raise LuksAdminError(f"{device}: luksAddKey did not add exactly one key slot ({added})")
    return added[0]


def test_key(device: str, secret: bytes | bytearray, slot: int | None = None) -> bool:
    """Whether ``secret`` opens a key slot (check only: nothing is activated)."""
    args = ["open", "--test-passphrase", "--batch-mode", "--key-file", "{fd0}"]
    if slot is not None:
        args += ["--key-slot", str(slot)]
    try:
        result = process.run_fed(
            [CRYPTSETUP, *args, device], [secret], check=False, timeout=KDF_TIMEOUT
        )
    except UnlockError as exc:
        raise _fail(device, "test a key", exc) from None
    # 2: no key slot opened with it (cryptsetup(8) EXIT STATUS); anything else is trouble.
    if result.returncode not in (0, 2):
        raise _fail(device, "test a key", result.error())
    return result.returncode == 0


def kill_slot(device: str, slot: int) -> None:
    """Destroy a key slot, and the tokens that name only it (cryptsetup removes
    the slot from the others).  The caller checks that it is not the last way in."""
    meta = metadata(device)
    if slot not in meta.keyslots:
        raise LuksAdminError(f"{device}: there is no key slot {slot}")
    orphans = [t.id for t in meta.tokens_of(slot) if set(t.keyslots) == {slot}]
    _cryptsetup(
        device, f"destroy key slot {slot}", ["luksKillSlot", "--batch-mode", device, str(slot)]
    )
    for token in orphans:
        remove_token(device, token)


def import_token(device: str, token: Mapping[str, Any]) -> int:
    """Add a token (its JSON names its key slots); returns its number."""
    before = set(metadata(device).tokens)
    data = json.dumps(token).encode()
    _cryptsetup(
        device, "import a token", ["token", "import", "--json-file", "{fd0}", device], [data]
    )
    added = sorted(set(metadata(device).tokens) - before)
    if len(added) != 1:
        raise LuksAdminError(f"{device}: token import did not add exactly one token ({added})")
    return added[0]


def remove_token(device: str, token: int) -> None:
    _cryptsetup(
        device, f"remove token {token}", ["token", "remove", "--token-id", str(token), device]
    )


def cryptenroll(
    device: str,
    args: Sequence[str],
    unlock: bytes | bytearray | None = None,
    *,
    timeout: float = KDF_TIMEOUT,
    env: dict[str, str] | None = None,
) -> process.Result:
    """systemd-cryptenroll ARGS DEVICE, unlocking with ``unlock`` (through a pipe;
    None: systemd-cryptenroll asks on the terminal itself)."""
    full = [CRYPTENROLL, *args]
    secrets: list[bytes | bytearray] = []
    if unlock is not None:
        full.append("--unlock-key-file={fd0}")
        secrets.append(unlock)
    try:
        return process.run_fed([*full, device], secrets, timeout=timeout, env=env)
    except CommandError as exc:
        raise _fail(device, f"{CRYPTENROLL} {' '.join(args)}", exc) from None
    except UnlockError as exc:
        raise _fail(device, f"run {CRYPTENROLL}", exc) from None


def random_bytes(count: int) -> bytearray:
    """``count`` bytes from the kernel's generator, read straight into a
    ``bytearray``: ``secrets.token_bytes`` returns an immutable ``bytes`` that
    stays in memory, unwiped, until the allocator reuses it."""
    out = bytearray(count)
    fd = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with memoryview(out) as view:
            filled = 0
            while filled < count:
                got = os.readv(fd, [view[filled:]])
                if got <= 0:
                    raise OSError(f"/dev/urandom gave {filled} of {count} bytes")
                filled += got
    except BaseException:
        out[:] = bytes(count)
        raise
    finally:
        os.close(fd)
    return out


_MODHEX_BYTES = _MODHEX.encode()
RECOVERY_KEY_LENGTH = 8 * 8 + 7  # eight groups of eight, seven dashes


def recovery_key() -> bytearray:
    """A new recovery key in systemd's form (systemd-cryptenroll --recovery-key):
    256 random bits, modhex, eight dash-separated groups of eight.

    Built in place in a buffer of its final size: ``+=`` on a bytearray
    reallocates, and the old buffer is freed without being wiped."""
    raw = random_bytes(32)
    out = bytearray(RECOVERY_KEY_LENGTH)
    try:
        at = 0
        for i, byte in enumerate(raw):
            if i and i % 4 == 0:
                out[at] = ord("-")
                at += 1
            out[at] = _MODHEX_BYTES[byte >> 4]
            out[at + 1] = _MODHEX_BYTES[byte & 15]
            at += 2
        return out
    finally:
        raw[:] = bytes(len(raw))


# A high-entropy key needs no slow KDF (systemd-cryptenroll does the same for
# its recovery keys): pbkdf2 with the fewest iterations cryptsetup allows.
MINIMAL_PBKDF = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")


def add_recovery_key(device: str, unlock: bytes | bytearray) -> tuple[int, bytearray]:
    """Enroll a new recovery key as systemd-cryptenroll would: a key slot plus a
    ``systemd-recovery`` token naming it.  Returns (slot, key): the caller shows
    the key once and wipes it."""
    key = recovery_key()
    slot: int | None = None
    try:
        slot = add_key(device, unlock, key, pbkdf=MINIMAL_PBKDF)
        import_token(device, {"type": RECOVERY_TOKEN, "keyslots": [str(slot)]})
        return slot, key
    except BaseException:
        key[:] = bytes(len(key))
        if slot is not None:  # a slot whose key nobody will ever see
            try:
                kill_slot(device, slot)
            except UnlockError as exc:
                log.error("%s: cannot remove the unfinished key slot %d: %s", device, slot, exc)
        raise
