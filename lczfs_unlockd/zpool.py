"""The zpool/zfs command-line tools: scan, import, export, properties.

libzfs_core has no import and libzfs has no stable API, so the CLI is the
right tool here (DESIGN.md).  Output is parsed in the C locale with ``-H``
(tab-separated, no header) and ``-p`` (exact numbers) wherever zfs has them.
"""

from __future__ import annotations

import errno
import re
import shlex
from collections.abc import Sequence

from . import paths
from .errors import KeyLoadError, PoolError
from .ports import DatasetInfo, PoolScan
from .process import CommandError, CommandTimeout, run

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


def parse_import_listing(text: str, pool: str) -> PoolScan:
    """Parse ``zpool import -d DIR`` output for one pool.

    When several pools carry the name, the healthiest one is reported.
    """
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if re.match(r"^\s*pool: ", line):
            blocks.append([])
        if blocks:
            blocks[-1].append(line)
    best: PoolScan | None = None
    order = ("ONLINE", "DEGRADED")
    for block in blocks:
        name = block[0].split(":", 1)[1].strip()
        if name != pool:
            continue
        state = None
        missing: list[str] = []
        detail: list[str] = []
        in_config = False
        for line in block[1:]:
            key, sep, value = line.strip().partition(":")
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
                if (
                    len(fields) >= 2
                    and fields[0] != pool
                    and not _CONTAINERS.match(fields[0])
                    and fields[1] in _MISSING_STATES
                ):
                    missing.append(fields[0])
            elif detail and line.startswith(("\t", "        ")) and not sep:
                detail[-1] += " " + line.strip()
        scan = PoolScan(state=state, missing=tuple(missing), detail=" ".join(detail))
        rank = order.index(state) if state in order else len(order)
        if best is None or rank < (order.index(best.state) if best.state in order else len(order)):
            best = scan
    return best or PoolScan(state=None)


def parse_properties(text: str) -> list[DatasetInfo]:
    values: dict[str, dict[str, str]] = {}
    names: list[str] = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) != 3:
            continue
        name, prop, value = fields
        if name not in values:
            values[name] = {}
            names.append(name)
        values[name][prop] = value

    def number(v: str) -> int:
        return int(v) if v.isdigit() else 0

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


class ZpoolCli:
    """Zpool port over the zpool/zfs programs (paths.ZPOOL, paths.ZFS)."""

    def health(self, pool: str) -> str | None:
        result = run([paths.ZPOOL, "list", "-H", "-o", "health", pool], check=False)
        if result.returncode == 0:
            return result.stdout.strip() or None
        if "no such pool" in result.stderr:
            return None
        raise PoolError(str(CommandError(result)))

    def scan(self, pool: str, dev_nodes: str, *, timeout: float | None = None) -> PoolScan:
        argv = [paths.ZPOOL, "import", "-d", dev_nodes]
        try:
            result = run(argv, check=False, timeout=timeout)
        except CommandTimeout as exc:
            # Reading every label in dev_nodes can take seconds on a slow
            # machine; the pool deadline must not wait for it.
            return PoolScan(state=None, detail=str(exc))
        scan = parse_import_listing(result.stdout, pool)
        # Exit code 1 with "no pools available" just means nothing is there
        # yet; anything else zpool says is worth showing if we give up.
        error = result.stderr.strip()
        if (
            scan.state is None
            and result.returncode != 0
            and error
            and "no pools available" not in error
        ):
            return PoolScan(state=None, detail=f'"{shlex.join(result.argv)}": {error}')
        return scan

    def import_pool(self, pool: str, dev_nodes: str, *, force: bool, readonly: bool) -> None:
        argv = [paths.ZPOOL, "import", "-N", "-d", dev_nodes]
        if force:
            argv.append("-f")
        if readonly:
            argv += ["-o", "readonly=on"]
        argv.append(pool)
        result = run(argv, check=False)
        if result.returncode == 0:
            return
        if self.health(pool) is not None:
            return  # imported meanwhile (zfs-import-scan, udev): that is fine
        if (
            "was previously in use from another system" in result.stderr
            or "hostid" in result.stderr
        ):
            raise PoolError(
                f"cannot import pool {pool}: {CommandError(result)}; the pool was last used by "
                "another host: set force_import = true or fix /etc/hostid in the initrd",
                errno=errno.EADDRINUSE,  # retrying cannot help
            )
        raise PoolError(f"cannot import pool {pool}: {CommandError(result)}")

    def export_pool(self, pool: str) -> None:
        try:
            run([paths.ZPOOL, "export", pool])
        except CommandError as exc:
            busy = errno.EBUSY if "busy" in exc.result.stderr else errno.EIO
            raise PoolError(f"cannot export pool {pool}: {exc}", errno=busy) from None

    def datasets(self, names: Sequence[str], *, recursive: bool) -> list[DatasetInfo]:
        argv = [paths.ZFS, "get", "-H", "-p", "-o", "name,property,value"]
        argv += ["-t", "filesystem,volume"]
        if recursive:
            argv.append("-r")
        argv += [",".join(_PROPERTIES), *names]
        result = run(argv, check=False)
        if result.returncode != 0:
            missing = re.findall(r"cannot open '([^']+)': dataset does not exist", result.stderr)
            if missing:
                raise KeyLoadError(
                    f"dataset {missing[0]} does not exist: fix datasets in the configuration",
                )
            raise KeyLoadError(str(CommandError(result)))
        return parse_properties(result.stdout)
