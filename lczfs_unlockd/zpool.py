"""The zpool/zfs command-line tools: scan, import, export, properties.

libzfs_core has no import and libzfs has no stable API, so the CLI is the
right tool here (DESIGN.md).  Output is parsed in the C locale with ``-H``
(tab-separated, no header) and ``-p`` (exact numbers) wherever zfs has them.
"""

from __future__ import annotations

import dataclasses
import errno
import re
import shlex
import time
from collections.abc import Sequence

from . import paths
from .errors import (
    AmbiguousPoolError,
    CommandTimeout,
    NoSuchDatasetError,
    PoolError,
    UnlockError,
)
from .ports import DatasetInfo, PoolScan
from .process import Result, run
from .text import escape, is_number

# Properties read for every candidate dataset, in this order.
_PROPERTIES = (
    "encryption",
    "encryptionroot",
    "keyformat",
    "keylocation",
    "keystatus",
    "pbkdf2salt",
    "pbkdf2iters",
)
# vdev states that mean "this device is not there (or not usable)".
_MISSING_STATES = ("UNAVAIL", "FAULTED", "REMOVED", "OFFLINE")
_CONTAINERS = re.compile(
    r"^(mirror|raidz\d?|draid\d?|spare|replacing|logs|cache|spares|special|dedup)\b"
)


# How long one query (zpool list, zfs get, export) may take when the caller
# names no deadline: seconds on a healthy pool even under emulation; a call
# that takes longer is stuck on a failing disk.
QUERY_TIMEOUT = 60.0
# An import on real hardware can replay a log or mount nothing for a while.
IMPORT_TIMEOUT = 300.0
_DETAIL_MAX = 300  # characters of zpool's own text kept per pool in messages
FOLLOW_UP_MIN = 2.0  # seconds a query after a failed import gets, however late


def _blocks(text: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if re.match(r"^\s*pool: ", line):
            blocks.append([])
        if blocks:
            blocks[-1].append(line)
    return blocks


def _parse_block(block: list[str], pool: str) -> PoolScan:
    state = None
    guid: int | None = None
    missing: list[str] = []
    devices: list[str] = []
    detail: list[str] = []
    in_config = False
    for line in block[1:]:
        key, sep, value = line.strip().partition(":")
        if not in_config and sep and key == "id" and is_number(value.strip()):
            guid = int(value.strip())
            continue
        if not in_config and sep and key in ("state", "status", "action"):
            if key == "state":
                state = value.strip()
            else:
                detail.append(value.strip())
            continue
        if line.strip() == "config:":
            in_config = True
            continue
        if in_config:
            fields = line.split()
            if len(fields) >= 2 and fields[0] != pool and not _CONTAINERS.match(fields[0]):
                devices.append(fields[0])
                if fields[1] in _MISSING_STATES:
                    missing.append(fields[0])
        elif detail and line.startswith(("\t", "        ")) and not sep:
            detail[-1] += " " + line.strip()
    return PoolScan(
        state=state,
        missing=tuple(missing),
        detail=" ".join(detail)[:_DETAIL_MAX],
        guid=guid,
        duplicates=(_describe(guid, state, devices, " ".join(detail)),),
    )


def _describe(guid: int | None, state: str | None, devices: list[str], detail: str) -> str:
    shown = ", ".join(devices[:8]) + (f" and {len(devices) - 8} more" if len(devices) > 8 else "")
    other_host = "; last used by another system" if "another system" in detail else ""
    ident = guid if guid is not None else "?"
    return f"GUID {ident} ({state or '?'}, devices {shown or '?'}{other_host})"


def parse_import_listing(text: str, pool: str, guid: int | None = None) -> PoolScan:
    """Parse ``zpool import -d ...`` output for one pool (the one with ``guid``, if given).

    When several pools carry the name, the healthiest one is reported and
    ``duplicates`` describes each of them.
    """
    order = ("ONLINE", "DEGRADED")

    def rank(scan: PoolScan) -> int:
        return order.index(scan.state) if scan.state in order else len(order)

    found = [
        _parse_block(block, pool)
        for block in _blocks(text)
        if block[0].split(":", 1)[1].strip() == pool
    ]
    if guid is not None:
        found = [scan for scan in found if scan.guid == guid]
    if not found:
        return PoolScan(state=None)
    best = min(found, key=rank)
    duplicates = tuple(d for scan in found for d in scan.duplicates) if len(found) > 1 else ()
    return dataclasses.replace(best, duplicates=duplicates)


def parse_properties(
    text: str, asked: Sequence[str] = (), *, recursive: bool = True
) -> list[DatasetInfo]:
    """``zfs get -H -p -o name,property,value`` output.

    A property value comes from the disk and may hold a newline (zfs -H
    prints it raw): a line that names a dataset not asked for, or repeats a
    property, is such a forgery and fails the whole answer (PoolError).
    """
    values: dict[str, dict[str, str]] = {}
    names: list[str] = []
    for line in text.splitlines():
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            # A tab or newline in a name or value from the disk (zfs never
            # writes one): the rest of the answer cannot be trusted either.
            raise PoolError(
                f"zfs get printed a line that is not name, property and value "
                f"({_printable_name(line)}): the pool's metadata is not what zfs wrote; "
                "inspect it from a trusted system"
            )
        name, prop, value = fields
        if asked and not any(name == a or (recursive and name.startswith(a + "/")) for a in asked):
            raise PoolError(
                f"zfs get printed a line for {_printable_name(name)}, which was not asked for "
                "(a property value with a newline in it?): the pool's metadata is not what "
                "zfs wrote; inspect it from a trusted system"
            )
        if name not in values:
            values[name] = {}
            names.append(name)
        if prop in values[name]:
            raise PoolError(
                f"zfs get printed {prop} of {_printable_name(name)} twice (a property value "
                "with a newline in it?): the pool's metadata is not what zfs wrote; inspect "
                "it from a trusted system"
            )
        values[name][prop] = value

    def number(v: str) -> int:
        return int(v) if is_number(v) else 0

    return [
        DatasetInfo(
            name=name,
            encryption=values[name].get("encryption", "off"),
            encryption_root=values[name].get("encryptionroot", "-"),
            keyformat=values[name].get("keyformat", "none"),
            keylocation=values[name].get("keylocation", "none"),
            keystatus=values[name].get("keystatus", "-"),
            pbkdf2salt=number(values[name].get("pbkdf2salt", "0")),
            pbkdf2iters=number(values[name].get("pbkdf2iters", "0")),
        )
        for name in names
    ]


def _printable_name(name: str) -> str:
    return escape(name[:300])


def _timed_out(exc: CommandTimeout) -> UnlockError:
    return PoolError(f"{exc}; check the pool's disks (dmesg)", errno=errno.ETIMEDOUT)


def _limit(timeout: float | None, default: float) -> float:
    """The caller's deadline for one call, or this adapter's bound for that kind of call."""
    return default if timeout is None else timeout


def _sources(sources: Sequence[str]) -> list[str]:
    argv: list[str] = []
    for source in sources:
        argv += ["-d", source]
    return argv


class ZpoolCli:
    """Zpool port over the zpool/zfs programs (paths.ZPOOL, paths.ZFS)."""

    def _run(self, argv: list[str], timeout: float | None, default: float) -> Result:
        try:
            return run(argv, check=False, timeout=_limit(timeout, default))
        except CommandTimeout as exc:
            raise _timed_out(exc) from None

    def health(self, pool: str, *, timeout: float | None = None) -> str | None:
        result = self._run(
            [paths.ZPOOL, "list", "-H", "-o", "health", pool], timeout, QUERY_TIMEOUT
        )
        if result.returncode == 0:
            return result.stdout.strip() or None
        if "no such pool" in result.stderr:
            return None
        raise PoolError(str(result.error()))

    def guid(self, pool: str, *, timeout: float | None = None) -> int | None:
        argv = [paths.ZPOOL, "get", "-H", "-p", "-o", "value", "guid", pool]
        result = self._run(argv, timeout, QUERY_TIMEOUT)
        value = result.stdout.strip()
        if result.returncode == 0 and is_number(value):
            return int(value)
        if "no such pool" in result.stderr:
            return None
        raise PoolError(str(result.error()))

    def bootfs(self, pool: str, *, timeout: float | None = None) -> str | None:
        argv = [paths.ZPOOL, "get", "-H", "-o", "value", "bootfs", pool]
        result = self._run(argv, timeout, QUERY_TIMEOUT)
        if result.returncode != 0:
            raise PoolError(str(result.error()))
        value = result.stdout.rstrip("\n")
        return None if value in ("", "-") else value

    def scan(
        self,
        pool: str,
        sources: Sequence[str],
        *,
        guid: int | None = None,
        timeout: float | None = None,
    ) -> PoolScan:
        argv = [paths.ZPOOL, "import", *_sources(sources)]
        try:
            result = run(argv, check=False, timeout=_limit(timeout, QUERY_TIMEOUT))
        except CommandTimeout as exc:
            # Reading every label can take seconds on a slow machine, and
            # forever on a failing disk; the pool deadline must not wait for it.
            return PoolScan(state=None, detail=str(exc))
        scan = parse_import_listing(result.stdout, pool, guid)
        # Exit code 1 with "no pools available" just means nothing is there
        # yet; anything else zpool says is worth showing if we give up.
        error = result.stderr.strip()
        if (
            scan.state is None
            and result.returncode != 0
            and error
            and "no pools available" not in error
        ):
            return PoolScan(
                state=None, detail=f'"{shlex.join(result.argv)}": {error[:_DETAIL_MAX]}'
            )
        return scan

    def import_pool(
        self,
        pool: str,
        sources: Sequence[str],
        *,
        guid: int | None = None,
        force: bool,
        readonly: bool,
        timeout: float | None = None,
    ) -> bool:
        argv = [paths.ZPOOL, "import", "-N", *_sources(sources)]
        if force:
            argv.append("-f")
        if readonly:
            argv += ["-o", "readonly=on"]
        # By GUID when the operator pinned it: the name alone is ambiguous
        # when a second disk carries another pool of the same name.
        argv.append(str(guid) if guid is not None else pool)
        # One deadline for the whole call: the follow-up queries get what
        # the import left of it (at least a moment each).
        end = time.monotonic() + _limit(timeout, IMPORT_TIMEOUT)

        def left() -> float:
            return max(end - time.monotonic(), FOLLOW_UP_MIN)

        result = self._run(argv, timeout, IMPORT_TIMEOUT)
        if result.returncode == 0:
            return True
        if self.health(pool, timeout=left()) is not None:
            return False  # imported meanwhile (zfs-import-scan, udev): fine, and not ours
        if (
            "was previously in use from another system" in result.stderr
            or "hostid" in result.stderr
        ):
            raise PoolError(
                f"cannot import pool {pool}: {result.error()}; the pool was last used by "
                "another host: set force_import = true or fix /etc/hostid in the initrd",
                errno=errno.EADDRINUSE,  # retrying cannot help
            )
        if "more than one matching pool" in result.stderr:
            raise self.ambiguous(pool, sources, timeout=left())
        raise PoolError(f"cannot import pool {pool}: {result.error()}")

    def ambiguous(
        self, pool: str, sources: Sequence[str], *, timeout: float | None = None
    ) -> PoolError:
        """The error for two importable pools named ``pool``, naming each of them."""
        scan = self.scan(pool, sources, timeout=timeout)
        return AmbiguousPoolError(pool, scan.duplicates)

    def export_pool(self, pool: str, *, timeout: float | None = None) -> None:
        result = self._run([paths.ZPOOL, "export", pool], timeout, QUERY_TIMEOUT)
        if result.returncode != 0:
            busy = errno.EBUSY if "busy" in result.stderr else errno.EIO
            raise PoolError(f"cannot export pool {pool}: {result.error()}", errno=busy)

    def datasets(
        self, names: Sequence[str], *, recursive: bool, timeout: float | None = None
    ) -> list[DatasetInfo]:
        argv = [paths.ZFS, "get", "-H", "-p", "-o", "name,property,value"]
        argv += ["-t", "filesystem,volume"]
        if recursive:
            argv.append("-r")
        argv += [",".join(_PROPERTIES), *names]
        try:
            result = run(argv, check=False, timeout=_limit(timeout, QUERY_TIMEOUT))
        except CommandTimeout as exc:
            raise _timed_out(exc) from None
        if result.returncode != 0:
            missing = re.findall(r"cannot open '([^']+)': dataset does not exist", result.stderr)
            if missing:
                raise NoSuchDatasetError(f"dataset {missing[0]} does not exist")
            raise PoolError(str(result.error()))
        return parse_properties(result.stdout, names, recursive=recursive)
