"""Configuration: ``/etc/lczfs-unlockd.toml`` and the kernel command line.

The file describes the pool, the keystore and the keys.  The kernel command
line may only change harmless knobs (dry run, debug, timeouts, disabling the
daemon): never a path, a device or a key location, because anyone at the
boot loader can edit it.

Every error names the key and the value and says what is expected.
"""

from __future__ import annotations

import difflib
import enum
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ConfigError

DEFAULT_PATH = "/etc/lczfs-unlockd.toml"

# OpenZFS creates keyformat=passphrase datasets with pbkdf2iters = 350,000
# (DEFAULT_PBKDF2_ITERATIONS); 10^8 is minutes of PBKDF2-SHA1 on a slow CPU.
DEFAULT_MAX_PBKDF2ITERS = 100_000_000
# zfs refuses fewer (MIN_PBKDF2_ITERATIONS): a lower cap would refuse every dataset.
MIN_PBKDF2ITERS = 100_000
# hashlib.pbkdf2_hmac takes a C int (OverflowError above it).
MAX_PBKDF2ITERS = 2**31 - 1
GUID_MAX = 2**64 - 1
# keystore.measure_pcr: systemd-cryptsetup's tpm2-measure-pcr= default, and
# the PCRs a TPM2 has (0-23).
DEFAULT_MEASURE_PCR = 15
MAX_PCR = 23


class UnlockMethod(enum.Enum):
    TOKEN = "token"
    KEYFILE = "keyfile"
    PASSPHRASE = "passphrase"


@dataclass(frozen=True)
class KeystoreConfig:
    volume: str
    partition: int = 1
    name: str = "lczfs-keystore"
    mountpoint: str = "/bootsecrets"
    unlock: tuple[UnlockMethod, ...] = (
        UnlockMethod.TOKEN,
        UnlockMethod.KEYFILE,
        UnlockMethod.PASSPHRASE,
    )
    keyfile: str | None = None
    tries: int = 3  # 0 = ask until the passphrase is right
    prompt_timeout: float = 0.0  # 0 or math.inf = no limit
    token_timeout: float = 30.0  # 0 = do not wait for a token; math.inf = wait for ever
    # The PCR the unlock is measured into; None = "auto" (DEFAULT_MEASURE_PCR
    # whenever a TPM2 is there), False = never.
    measure_pcr: int | bool | None = None
    # For systemd's TPM2 token plugin; None = the plugin's own default.
    tpm2_signature: str | None = None
    tpm2_pcrlock: str | None = None

    @property
    def device(self) -> str:
        """The block device udev creates for the zvol (or its partition)."""
        base = f"/dev/zvol/{self.volume}"
        return f"{base}-part{self.partition}" if self.partition else base

    @property
    def mapper_path(self) -> str:
        return f"/dev/mapper/{self.name}"


@dataclass(frozen=True)
class Config:
    pool: str
    keystore: KeystoreConfig
    devices: tuple[str, ...] = ()
    dev_nodes: str = "/dev/disk/by-id"
    force_import: bool = False
    online_grace: float = 10.0  # 0 = accept DEGRADED at once; math.inf = never
    timeout: float = 300.0  # 0 or math.inf = no limit
    datasets: tuple[str, ...] | None = None  # None = "auto"
    mask: tuple[str, ...] = ()
    pool_guid: int | None = None  # import this pool only (zpool import by numeric id)
    # Cap on a passphrase dataset's pbkdf2iters, which whoever holds the disk can set:
    max_pbkdf2iters: int = DEFAULT_MAX_PBKDF2ITERS
    # The root check: the dataset that will be mounted as / (None: from the
    # kernel command line's root=zfs:..., else none), the other datasets
    # checked the same way, and the encryption roots they may belong to
    # (None: the ones this run unlocked).
    root_dataset: str | None = None
    verify_datasets: tuple[str, ...] = ()
    trusted_roots: tuple[str, ...] | None = None
    # root= on the kernel command line, when it names a ZFS dataset:
    # the dataset, or BOOTFS ("root=zfs:AUTO": the pool's bootfs property).
    kernel_root: str | None = None
    # From the kernel command line or the command line, not the file:
    enabled: bool = True
    dry_run: bool = False
    debug: bool = False
    source: str = field(default=DEFAULT_PATH, compare=False)


def _q(value: str) -> str:
    """Quote a string for a message the way TOML would write it (control characters escaped)."""
    return json.dumps(value, ensure_ascii=False)


# --- durations ---------------------------------------------------------------

# systemd.time(7) units, in seconds.
_UNITS = {
    "us": 1e-6, "usec": 1e-6, "µs": 1e-6,
    "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}  # fmt: skip
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zµ]*)", re.IGNORECASE)


def parse_duration(value: object, key: str) -> float:
    """A systemd time span ("10s", "5min", "1min 30s", "0", "infinity") or a number of seconds.

    "infinity" (systemd's spelling, or a TOML ``inf``) is ``math.inf``: no limit.
    What 0 means depends on the key (see the README's configuration table):
    no limit for timeout and keystore.prompt_timeout, "at once" for
    online_grace and keystore.token_timeout.
    """
    if isinstance(value, bool):
        raise ConfigError(f'{key} = {value!r}: expected a duration such as "10s" or a number')
    if isinstance(value, int | float):
        if value == math.inf:
            return math.inf
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{key} = {value!r}: a duration must be a number of seconds >= 0")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f'{key} = {value!r}: expected a duration such as "10s" or a number')
    text = value.strip()
    if text == "infinity":
        return math.inf
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if not match or match.end() == pos:
            break
        number, unit = match.groups()
        if unit.lower() not in _UNITS and unit != "":
            break
        total += float(number) * _UNITS.get(unit.lower(), 1.0)
        pos = match.end()
    if not text or pos != len(text) or not math.isfinite(total) or total > 10 * 365 * 86400:
        raise ConfigError(
            f'{key} = {_q(value)}: not a duration; use systemd\'s syntax like "10s", "5min", '
            '"0" or "infinity"'
        )
    return total


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration: "10s", "5min", "0s", "infinity"."""
    if seconds == math.inf:
        return "infinity"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}min"
    # Fixed point to the microsecond (systemd's resolution): no "1e+06s".
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"


def no_limit(seconds: float) -> bool:
    """For timeout and keystore.prompt_timeout, where 0 (like "infinity") means no limit."""
    return seconds == 0 or seconds == math.inf


# --- names -------------------------------------------------------------------

# OpenZFS zpool_name_valid() as used for create and import (isopen = B_FALSE,
# lib/libzfs/libzfs_pool.c) on top of pool_namecheck()
# (module/zcommon/zfs_namecheck.c):
# - fewer than ZFS_MAX_DATASET_NAME_LEN - 2 - 2 * strlen("$ORIGIN") = 240 bytes;
# - only [A-Za-z0-9_.: -] (a space is allowed), the first one a letter;
# - not a name that begins with "mirror", "raidz", "draid" or "spare"
#   (strncmp), and not exactly "log".  "logs", "cache", "special", "dedup"
#   and "c0d0" are valid: the vdev class names are not reserved, and the
#   old disk-like "c[0-9]" rule is gone from OpenZFS.
_POOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.: -]*")
POOL_NAME_MAX = 239
_RESERVED_POOL_PREFIXES = ("mirror", "raidz", "draid", "spare")
_RESERVED_POOL_NAMES = ("log",)
_DATASET_COMPONENT = re.compile(r"[A-Za-z0-9_.: -]+")
# dm names: no '/', and libdevmapper mangles anything outside this set.
_DM_NAME = re.compile(r"[A-Za-z0-9#+\-.:=@_]{1,127}")
_UNIT_NAME = re.compile(
    r"[A-Za-z0-9:_.\\@-]+\.(service|mount|socket|target|device|path|timer|swap|automount|slice|scope)"
)


def pool_name_problem(name: str) -> str | None:
    """Why OpenZFS would refuse to import a pool of this name, or None if it would not."""
    if not name:
        return "the name is empty"
    if len(name.encode()) > POOL_NAME_MAX:
        return f"the name is too long (at most {POOL_NAME_MAX} characters)"
    bad = sorted({c for c in name if not _POOL_NAME.fullmatch("a" + c)})
    if bad:
        return (
            "invalid character "
            + ", ".join(_q(c) for c in bad)
            + ' (letters, digits, "_", "-", ".", ":" and space only)'
        )
    if not _POOL_NAME.fullmatch(name):
        return "the name must begin with a letter"
    if name in _RESERVED_POOL_NAMES or name.startswith(_RESERVED_POOL_PREFIXES):
        return (
            'the name is reserved (zpool refuses names beginning with "mirror", "raidz", '
            '"draid" or "spare", and "log")'
        )
    return None


def _check_pool_name(value: str, key: str) -> None:
    problem = pool_name_problem(value)
    if problem is not None:
        raise ConfigError(f"{key} = {_q(value)}: not a valid pool name: {problem}")


def _check_dataset_in_pool(value: str, key: str, pool: str) -> None:
    parts = value.split("/")
    if len(value.encode()) > 255:
        raise ConfigError(f"{key} = {_q(value)}: a dataset name is at most 255 characters")
    if parts[0] != pool:
        raise ConfigError(
            f"{key} = {_q(value)}: the dataset is not in pool {_q(pool)}; it must be {_q(pool)} "
            f'or start with "{pool}/"'
        )
    if any(not _DATASET_COMPONENT.fullmatch(p) or p in (".", "..") for p in parts[1:]):
        raise ConfigError(f"{key} = {_q(value)}: not a valid dataset name")


def _check_absolute(value: str, key: str, *, allow_root: bool = True) -> None:
    if not value.startswith("/") or "\0" in value:
        raise ConfigError(f"{key} = {_q(value)}: must be an absolute path")
    if not allow_root and value == "/":
        raise ConfigError(f'{key} = "/": the keystore cannot be mounted on /')
    if value != "/" and (".." in value.split("/") or os.path.normpath(value) != value):
        raise ConfigError(f'{key} = {_q(value)}: use a normalized absolute path (no "..", "//")')


def check_real_path(
    path: str, key: str, *, realpath: Callable[[str], str] = os.path.realpath
) -> None:
    """Refuse a path that is not its own realpath: a symlink in it, or in a parent.

    ``/var/run/bootsecrets`` with ``/var/run -> ../run`` would be mounted on
    ``/run/bootsecrets``; mountinfo names that path, so a comparison with the
    configured one misses the mount, and the keys stay mounted into the
    booted system.  Checked when the configuration is read and again right
    before mounting (the initrd's tree is not the one the file was checked in),
    there through the sequence's Filesystem port (``realpath``).
    """
    resolved = realpath(path)
    if resolved != path:
        raise ConfigError(
            f"{key} = {_q(path)}: the path goes through a symbolic link and is really "
            f"{_q(resolved)}; use {resolved}"
        )


# --- typed getters -----------------------------------------------------------


class _Table:
    """A TOML table whose reads are type-checked and whose leftovers are errors."""

    def __init__(self, data: Mapping[str, Any], prefix: str) -> None:
        self.data = dict(data)
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def _take(self, name: str) -> Any:
        return self.data.pop(name)

    def has(self, name: str) -> bool:
        return name in self.data

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        if name not in self.data:
            if required or default is None:
                raise ConfigError(f"{self.key(name)} is missing: it is required")
            return default
        value = self._take(name)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.key(name)} = {value!r}: expected a non-empty string")
        return value

    def optional_string(self, name: str) -> str | None:
        return self.string(name) if name in self.data else None

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        if name not in self.data:
            return default
        value = self._take(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.key(name)} = {value!r}: expected an integer")
        if not lo <= value <= hi:
            raise ConfigError(f"{self.key(name)} = {value}: must be between {lo} and {hi}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        if name not in self.data:
            return default
        value = self._take(name)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)} = {value!r}: expected true or false")
        return value

    def duration(self, name: str, default: float) -> float:
        if name not in self.data:
            return default
        return parse_duration(self._take(name), self.key(name))

    def string_list(self, name: str) -> tuple[str, ...]:
        if name not in self.data:
            return ()
        value = self._take(name)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self.key(name)} = {value!r}: expected a list of strings")
        return tuple(value)

    def table(self, name: str) -> _Table:
        if name not in self.data:
            raise ConfigError(f"[{self.key(name)}] is missing: it is required")
        value = self._take(name)
        if not isinstance(value, dict):
            raise ConfigError(f"{self.key(name)} = {value!r}: expected a table [{name}]")
        return _Table(value, f"{self.key(name)}.")

    def finish(self) -> None:
        if self.data:
            raise ConfigError(_unknown_keys_message(list(self.data), self.prefix))


TOP_KEYS = (
    "pool", "pool_guid", "devices", "dev_nodes", "force_import", "online_grace", "timeout",
    "datasets", "mask", "max_pbkdf2iters", "root_dataset", "verify_datasets", "trusted_roots",
    "keystore",
)  # fmt: skip
KEYSTORE_KEYS = (
    "volume", "partition", "name", "mountpoint", "unlock", "keyfile", "tries",
    "prompt_timeout", "token_timeout", "measure_pcr", "tpm2_signature", "tpm2_pcrlock",
)  # fmt: skip
BOOTFS = "AUTO"  # Config.kernel_root for root=zfs:AUTO
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _show_key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _q(name)


def _unknown_keys_message(names: Sequence[str], prefix: str) -> str:
    """Each unknown key, with the valid key it most likely meant."""
    here, there = (KEYSTORE_KEYS, TOP_KEYS) if prefix else (TOP_KEYS, KEYSTORE_KEYS)
    parts = []
    for name in sorted(names):
        hint = ""
        close = difflib.get_close_matches(name, here, n=1)
        elsewhere = difflib.get_close_matches(name, there, n=1, cutoff=0.8)
        if close:
            hint = f" (did you mean {prefix}{close[0]}?)"
        elif elsewhere and prefix:
            hint = (
                f" ({elsewhere[0]} belongs at the top of the file, before [keystore]: keys "
                "after a [table] header belong to that table)"
            )
        elif elsewhere:
            hint = f" (did you mean keystore.{elsewhere[0]}, under [keystore]?)"
        parts.append(f"{prefix}{_show_key(name)}: unknown key{hint}")
    return "; ".join(parts) + "; see the configuration reference in the README"


def _check_unknown_keys(data: Mapping[str, Any]) -> None:
    """Unknown keys first: a misspelt key would otherwise be reported as a missing one."""
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(_unknown_keys_message(unknown, ""))
    keystore = data.get("keystore")
    if isinstance(keystore, dict):
        unknown = [k for k in keystore if k not in KEYSTORE_KEYS]
        if unknown:
            raise ConfigError(_unknown_keys_message(unknown, "keystore."))


def _parse_guid(value: object, key: str) -> int:
    """A zpool GUID: unsigned 64-bit, as ``zpool get guid`` prints it (decimal).

    TOML integers are signed 64-bit, so half of all GUIDs can only be written
    as a string; both forms are accepted.
    """
    what = (
        f"{key} = {value!r}: expected the pool's GUID as zpool get -H -o value guid POOL "
        'prints it, e.g. 12345678901234567890 or "12345678901234567890"'
    )
    if isinstance(value, bool):
        raise ConfigError(what)
    if isinstance(value, str):
        text = value.strip()
        if not text.isascii() or not text.isdigit():
            raise ConfigError(what)
        value = int(text)
    if not isinstance(value, int):
        raise ConfigError(what)
    if not 1 <= value <= GUID_MAX:
        raise ConfigError(f"{key} = {value}: a pool GUID is between 1 and {GUID_MAX}")
    return value


_ZVOL_DEVICE = re.compile(r"/dev/zvol/(.+?)(?:-part([0-9]+))?")


def _check_volume(value: str, key: str) -> None:
    if not value.startswith("/"):
        return
    match = _ZVOL_DEVICE.fullmatch(value)
    if match:
        hint = f"keystore.volume = {_q(match[1])}"
        if match[2]:
            hint += f" and keystore.partition = {int(match[2])}"
        raise ConfigError(
            f"{key} = {_q(value)}: give the dataset name, not the device: {hint} "
            "(the device is found under /dev/zvol/)"
        )
    raise ConfigError(
        f"{key} = {_q(value)}: give the dataset name of the zvol, e.g. rpool/volumes/bootsecrets"
    )


def _parse_unlock(value: object, key: str) -> tuple[UnlockMethod, ...]:
    known = ", ".join(m.value for m in UnlockMethod)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} = {value!r}: expected a non-empty list of {known}")
    methods: list[UnlockMethod] = []
    for item in value:
        try:
            method = UnlockMethod(item)
        except ValueError:
            raise ConfigError(f"{key}: unknown unlock method {item!r}; use {known}") from None
        if method in methods:
            raise ConfigError(f"{key}: {item!r} is listed twice")
        methods.append(method)
    return tuple(methods)


def _parse_keystore(table: _Table, pool: str) -> KeystoreConfig:
    volume = table.string("volume", required=True)
    _check_volume(volume, table.key("volume"))
    _check_dataset_in_pool(volume, table.key("volume"), pool)
    if volume == pool:
        raise ConfigError(f"{table.key('volume')} = {_q(volume)}: name the zvol, not the pool")
    name = table.string("name", KeystoreConfig.name)
    if not _DM_NAME.fullmatch(name):
        raise ConfigError(
            f"{table.key('name')} = {_q(name)}: not a usable device-mapper name "
            "(letters, digits and #+-.:=@_, at most 127)"
        )
    mountpoint = table.string("mountpoint", KeystoreConfig.mountpoint)
    _check_absolute(mountpoint, table.key("mountpoint"), allow_root=False)
    check_real_path(mountpoint, table.key("mountpoint"))
    unlock = KeystoreConfig.unlock
    if table.has("unlock"):
        unlock = _parse_unlock(table._take("unlock"), table.key("unlock"))
    keyfile = table.optional_string("keyfile")
    if keyfile is not None:
        _check_absolute(keyfile, table.key("keyfile"))
        if UnlockMethod.KEYFILE not in unlock:
            raise ConfigError(
                f'{table.key("keyfile")} is set but "keyfile" is not in {table.key("unlock")}: '
                "add it or remove the key file"
            )
        if keyfile == mountpoint or keyfile.startswith(mountpoint + "/"):
            raise ConfigError(
                f"{table.key('keyfile')} = {_q(keyfile)}: the keystore's own key cannot live "
                "inside the keystore"
            )
    measure_pcr: int | bool | None = None
    if table.has("measure_pcr"):
        raw = table._take("measure_pcr")
        if raw is True:
            raw = DEFAULT_MEASURE_PCR
        if raw is not False and (not isinstance(raw, int) or not 0 <= raw <= MAX_PCR):
            raise ConfigError(
                f"{table.key('measure_pcr')} = {raw!r}: expected a PCR number 0-{MAX_PCR} "
                f"(systemd's default is {DEFAULT_MEASURE_PCR}), or false to never measure"
            )
        measure_pcr = raw
    tpm2_files: dict[str, str | None] = {}
    for key in ("tpm2_signature", "tpm2_pcrlock"):
        value = table.optional_string(key)
        if value is not None:
            _check_absolute(value, table.key(key))
            if UnlockMethod.TOKEN not in unlock:
                raise ConfigError(
                    f'{table.key(key)} is set but "token" is not in {table.key("unlock")}: '
                    "add it or remove the setting"
                )
        tpm2_files[key] = value
    config = KeystoreConfig(
        volume=volume,
        partition=table.integer("partition", KeystoreConfig.partition, 0, 128),
        name=name,
        mountpoint=mountpoint,
        unlock=unlock,
        keyfile=keyfile,
        tries=table.integer("tries", KeystoreConfig.tries, 0, 1000),
        prompt_timeout=table.duration("prompt_timeout", KeystoreConfig.prompt_timeout),
        token_timeout=table.duration("token_timeout", KeystoreConfig.token_timeout),
        measure_pcr=measure_pcr,
        tpm2_signature=tpm2_files["tpm2_signature"],
        tpm2_pcrlock=tpm2_files["tpm2_pcrlock"],
    )
    table.finish()
    return config


def parse(data: Mapping[str, Any], source: str = DEFAULT_PATH) -> Config:
    """Build a validated Config from parsed TOML."""
    _check_unknown_keys(data)
    top = _Table(data, "")
    pool = top.string("pool", required=True)
    _check_pool_name(pool, "pool")
    pool_guid = _parse_guid(top._take("pool_guid"), "pool_guid") if top.has("pool_guid") else None
    devices = top.string_list("devices")
    for i, device in enumerate(devices):
        _check_absolute(device, f"devices[{i}]")
    dev_nodes = top.string("dev_nodes", Config.dev_nodes)
    _check_absolute(dev_nodes, "dev_nodes")
    datasets: tuple[str, ...] | None = None
    if top.has("datasets"):
        raw = top._take("datasets")
        if raw != "auto":
            if not isinstance(raw, list) or not raw or not all(isinstance(d, str) for d in raw):
                raise ConfigError(
                    f'datasets = {raw!r}: expected "auto" or a non-empty list of dataset names'
                )
            for i, name in enumerate(raw):
                _check_dataset_in_pool(name, f"datasets[{i}]", pool)
            if len(set(raw)) != len(raw):
                raise ConfigError(f"datasets = {raw!r}: a dataset is listed twice")
            datasets = tuple(raw)
    mask = top.string_list("mask")
    for i, unit in enumerate(mask):
        if not _UNIT_NAME.fullmatch(unit):
            raise ConfigError(
                f'mask[{i}] = {_q(unit)}: not a unit name (e.g. "bootsecrets.mount", '
                '"systemd-cryptsetup@secretsroot.service")'
            )
    online_grace = top.duration("online_grace", Config.online_grace)
    timeout = top.duration("timeout", Config.timeout)
    force_import = top.boolean("force_import", Config.force_import)
    max_pbkdf2iters = top.integer(
        "max_pbkdf2iters", Config.max_pbkdf2iters, MIN_PBKDF2ITERS, MAX_PBKDF2ITERS
    )
    root_dataset = top.optional_string("root_dataset")
    if root_dataset is not None:
        _check_dataset_in_pool(root_dataset, "root_dataset", pool)
    verify_datasets = top.string_list("verify_datasets")
    for i, name in enumerate(verify_datasets):
        _check_dataset_in_pool(name, f"verify_datasets[{i}]", pool)
    trusted_roots: tuple[str, ...] | None = None
    if top.has("trusted_roots"):
        trusted_roots = top.string_list("trusted_roots")
        if not trusted_roots:
            raise ConfigError(
                "trusted_roots = []: no dataset could pass the root check; list the "
                "encryption roots the root may belong to, or remove the key"
            )
        for i, name in enumerate(trusted_roots):
            _check_dataset_in_pool(name, f"trusted_roots[{i}]", pool)
    keystore = _parse_keystore(top.table("keystore"), pool)
    if datasets is not None and keystore.volume in datasets:
        raise ConfigError(f'datasets: "{keystore.volume}" is the keystore volume, not a dataset')
    for key, names in (("root_dataset", (root_dataset,)), ("verify_datasets", verify_datasets)):
        if keystore.volume in names:
            raise ConfigError(f'{key}: "{keystore.volume}" is the keystore volume, not a dataset')
    top.finish()
    if _grace_outlasts_timeout(online_grace, timeout):
        raise ConfigError(
            f"online_grace = {format_duration(online_grace)} is longer than timeout = "
            f"{format_duration(timeout)}: a degraded pool would never be accepted (say "
            'online_grace = "infinity" if that is what you want)'
        )
    return Config(
        pool=pool,
        keystore=keystore,
        devices=devices,
        dev_nodes=dev_nodes,
        force_import=force_import,
        online_grace=online_grace,
        timeout=timeout,
        datasets=datasets,
        mask=mask,
        pool_guid=pool_guid,
        max_pbkdf2iters=max_pbkdf2iters,
        root_dataset=root_dataset,
        verify_datasets=verify_datasets,
        trusted_roots=trusted_roots,
        source=source,
    )


def _grace_outlasts_timeout(online_grace: float, timeout: float) -> bool:
    """A finite grace longer than a finite deadline: a mistake ("infinity" is a choice)."""
    return not no_limit(timeout) and math.isfinite(online_grace) and online_grace > timeout


def load(path: str = DEFAULT_PATH) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist: write the configuration there or pass --config"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8") from None
    try:
        return parse(data, source=path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from None


# --- kernel command line -----------------------------------------------------

_TRUE = ("1", "yes", "true", "on", "")
_FALSE = ("0", "no", "false", "off")
_CMDLINE_DURATIONS = ("timeout", "online_grace")
_CMDLINE_KEYSTORE_DURATIONS = ("prompt_timeout", "token_timeout")


def split_cmdline(text: str) -> list[str]:
    """Split /proc/cmdline the way the kernel does (double quotes group words)."""
    words: list[str] = []
    current: list[str] = []
    quoted = started = False
    for ch in text:
        if ch == '"':
            quoted, started = not quoted, True
        elif ch.isspace() and not quoted:
            if started:
                words.append("".join(current))
            current, started = [], False
        else:
            current.append(ch)
            started = True
    if started:
        words.append("".join(current))
    return words


def apply_cmdline(config: Config, cmdline: str) -> tuple[Config, list[str]]:
    """Apply ``rd.lczfs*`` parameters; return the new config and warnings.

    A bad value on the command line is a warning, not a failure: a typo at the
    boot loader must not keep the machine from booting with its file's values.
    """
    warnings: list[str] = []
    changes: dict[str, Any] = {}
    keystore_changes: dict[str, Any] = {}
    for word in split_cmdline(cmdline):
        name, _, value = word.partition("=")
        if name == "rd.lczfs":
            if value.lower() in _FALSE:
                changes["enabled"] = False
            elif value.lower() in _TRUE:
                changes["enabled"] = True
            else:
                warnings.append(f'{word}: ignored; use "rd.lczfs=0" to disable lczfs-unlockd')
            continue
        if not name.startswith("rd.lczfs."):
            continue  # root=, rootfstype=: kernel_root()
        knob = name[len("rd.lczfs.") :]
        if knob in ("dry_run", "debug"):
            if value.lower() in _TRUE:
                changes[knob] = True
            elif value.lower() in _FALSE:
                changes[knob] = False
            else:
                warnings.append(f"{word}: ignored; use {name}=1 or {name}=0")
        elif knob in _CMDLINE_DURATIONS or knob in _CMDLINE_KEYSTORE_DURATIONS:
            try:
                seconds = parse_duration(value, name)
            except ConfigError as exc:
                warnings.append(f"{exc.message}; ignored, keeping the configured value")
                continue
            target = changes if knob in _CMDLINE_DURATIONS else keystore_changes
            target[knob] = seconds
        else:
            allowed = ", ".join(
                ["rd.lczfs=0", "rd.lczfs.dry_run", "rd.lczfs.debug"]
                + [f"rd.lczfs.{k}=" for k in _CMDLINE_DURATIONS + _CMDLINE_KEYSTORE_DURATIONS]
            )
            warnings.append(
                f"{name}: unknown or not allowed on the kernel command line ({allowed})"
            )
    if keystore_changes:
        changes["keystore"] = replace(config.keystore, **keystore_changes)
    changes["kernel_root"] = kernel_root(cmdline)
    new = replace(config, **changes)
    if _grace_outlasts_timeout(new.online_grace, new.timeout):
        warnings.append(
            f"online_grace ({format_duration(new.online_grace)}) is longer than timeout "
            f"({format_duration(new.timeout)}): a degraded pool will not be accepted"
        )
    return new, warnings


def kernel_root(cmdline: str) -> str | None:
    """The ZFS dataset the kernel command line's root= names (see zfs_root)."""
    root: str | None = None
    rootfstype = ""
    for word in split_cmdline(cmdline):
        name, _, value = word.partition("=")
        if name == "root":
            root = value  # the last root= wins, as for the kernel and dracut
        elif name == "rootfstype":
            rootfstype = value
    if root is None:
        return BOOTFS if rootfstype == "zfs" else None  # dracut: rootfstype=zfs alone is AUTO
    return zfs_root(root, rootfstype)


def zfs_root(value: str, rootfstype: str = "") -> str | None:
    """The dataset ``root=`` names, BOOTFS for the pool's bootfs, None when not ZFS.

    The forms dracut's zfs module and initramfs-tools' zfs script take:
    ``zfs:DATASET``, ``ZFS=DATASET``, ``zfs:AUTO``, bare ``zfs`` (= AUTO),
    and ``root=DATASET rootfstype=zfs``.
    The name is not validated here: whatever it is, it is what the
    distribution will try to mount, so the root check checks exactly it.
    """
    if value in ("zfs", "zfs:", "ZFS", "ZFS="):
        return BOOTFS
    for prefix in ("zfs:", "ZFS="):
        if value.startswith(prefix):
            rest = value[len(prefix) :]
            return BOOTFS if rest in (BOOTFS, "") else rest
    if rootfstype == "zfs" and value and not value.startswith("/") and "=" not in value:
        return value
    return None


def disabled_on_cmdline(cmdline: str) -> bool:
    """``rd.lczfs=0``: checked before the configuration is even read, so that
    it also rescues a machine whose configuration is missing or broken."""
    enabled = True
    for word in split_cmdline(cmdline):
        name, _, value = word.partition("=")
        if name == "rd.lczfs":
            enabled = value.lower() not in _FALSE
    return not enabled


def read_cmdline(path: str = "/proc/cmdline") -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _limit(seconds: float, zero: str) -> str:
    if seconds == math.inf:
        return "no limit"
    return zero if seconds == 0 else format_duration(seconds)


def summary(config: Config) -> Sequence[str]:
    """Human-readable lines describing what the configuration asks for (for --debug/check)."""
    ks = config.keystore
    targets = "auto (encryption roots with keylocation under the mount point)"
    if config.datasets is not None:
        targets = ", ".join(config.datasets)
    if config.online_grace == math.inf:
        degraded = "degraded never accepted"
    elif config.online_grace == 0:
        degraded = "degraded accepted at once"
    else:
        degraded = f"degraded accepted after {format_duration(config.online_grace)}"
    return [
        f"pool {config.pool}"
        + (f" (GUID {config.pool_guid})" if config.pool_guid is not None else "")
        + f": scan {config.dev_nodes}"
        + (f", wait for {', '.join(config.devices)}" if config.devices else "")
        + f", {degraded}"
        + f", deadline {_limit(config.timeout, 'no limit')}"
        + (", force import" if config.force_import else ""),
        f"keystore {ks.device} -> {ks.mapper_path} (read-only) on {ks.mountpoint}; "
        f"unlock by {', '.join(m.value for m in ks.unlock)}"
        + (f" (key file {ks.keyfile})" if ks.keyfile else "")
        + f", {ks.tries or 'unlimited'} tries"
        + f", prompt time limit {_limit(ks.prompt_timeout, 'no limit')}"
        + f", token wait {_limit(ks.token_timeout, 'none')}",
        f"keys for: {targets}; passphrase keys with pbkdf2iters up to {config.max_pbkdf2iters:,}",
        _measure_summary(ks),
        _root_check_summary(config),
    ]


def _measure_summary(ks: KeystoreConfig) -> str:
    if ks.measure_pcr is False:
        line = "TPM2 measurement: off (keystore.measure_pcr = false)"
    elif ks.measure_pcr is None:
        line = (
            f"TPM2 measurement: the unlock is measured into PCR {DEFAULT_MEASURE_PCR} whenever "
            "a TPM2 is present; a failed measurement fails it when a systemd-tpm2 token is "
            "enrolled (keystore.measure_pcr)"
        )
    else:
        line = f"TPM2 measurement: the unlock is measured into PCR {ks.measure_pcr}, required"
    for what, path in (("signed PCR policy", ks.tpm2_signature), ("pcrlock", ks.tpm2_pcrlock)):
        if path is not None:
            line += f"; TPM2 tokens use the {what} {path}"
    return line


def _root_check_summary(config: Config) -> str:
    if config.root_dataset is not None:
        root = f"root_dataset {config.root_dataset}"
    else:
        root = "the root=zfs:... dataset of the kernel command line (zfs:AUTO: the pool's bootfs)"
    extra = f" and {', '.join(config.verify_datasets)}" if config.verify_datasets else ""
    roots = (
        ", ".join(config.trusted_roots)
        if config.trusted_roots is not None
        else "the ones this run unlocked"
    )
    return (
        f"root check before READY=1: {root}{extra} must exist, be encrypted, have its key "
        f"loaded, and belong to an encryption root among {roots}; otherwise the boot is refused "
        "(keys unloaded, sysroot.mount blocked)"
    )
