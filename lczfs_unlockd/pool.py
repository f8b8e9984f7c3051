"""Step 1, the pool: wait for its disks, import it (a dry run exports it again).

Waiting is cheap (stat the configured devices, list dev_nodes) and only the
expensive ``zpool import -d`` scan runs when something changed; with
``pool_guid`` the scan must show that GUID under the configured name before
anything is imported.  Every zpool call gets what is left of the pool's
deadline (``timeout``).
"""

from __future__ import annotations

import errno
import functools
import logging
import math

from .config import format_duration, no_limit
from .context import Context
from .errors import AmbiguousPoolError, PoolError
from .ports import PoolScan

log = logging.getLogger("lczfs_unlockd")

POLL_INTERVAL = 0.2  # seconds between pool scans: sub-second, cheap
RESCAN_INTERVAL = 2.0  # zpool import -d without a change in dev_nodes
IMPORT_RETRY = 1.0
TEARDOWN_CALL_TIMEOUT = 30.0  # each zpool call during teardown (dry-run export, verification)


def import_pool(ctx: Context) -> None:
    """Wait for the pool's disks and import it; after a dry run, export it again.

    A pool that was imported before is used as it is and left imported.
    """
    c, p = ctx.config, ctx.ports
    with ctx.step(f"importing pool {c.pool}", "pool"), ctx.extending():
        # The deadline counts from here: the first zpool call alone can
        # take seconds (libzfs initialising, a slow CPU).
        start = p.clock.monotonic()
        health = p.zpool.health(c.pool, timeout=_call_timeout(ctx, start))
        if health is not None:
            log.info("pool %s is already imported (%s)", c.pool, health)
            ctx.report.pool_imported_before = True  # not ours to export
            _check_imported_guid(ctx, start, imported_by_us=False)
            return
        if c.dry_run:
            # Before the import: exports only if it got imported.
            ctx.on_exit(f"export {c.pool}", functools.partial(_export_if_imported, ctx))
        last_error = ""
        while True:
            scan = _wait_for_pool(ctx, start)
            if scan is not None and scan.state == "DEGRADED":
                log.warning(
                    "importing %s DEGRADED after waiting %s: missing %s",
                    c.pool, format_duration(c.online_grace), ", ".join(scan.missing) or "?",
                )  # fmt: skip
            try:
                ours = p.zpool.import_pool(
                    c.pool,
                    _sources(ctx),
                    guid=c.pool_guid,
                    force=c.force_import,
                    readonly=c.dry_run,
                    timeout=_call_timeout(ctx, start),
                )
                break
            except PoolError as exc:
                # Links can change between scan and import (a second
                # disk arriving): retry until the deadline, like the
                # import scripts this replaces — unless retrying cannot help.
                left = _pool_left(ctx, start)
                final = (errno.EADDRINUSE, errno.ENOTUNIQ, errno.ETIMEDOUT)
                if exc.errno in final or (left is not None and left <= 0):
                    raise
                if str(exc) != last_error:
                    log.warning("import of %s failed, trying again: %s", c.pool, exc)
                    last_error = str(exc)
                p.clock.sleep(IMPORT_RETRY)
        if not ours:
            log.info("pool %s was imported meanwhile by another service; using it", c.pool)
            ctx.report.pool_imported_before = True  # not ours to export
            _check_imported_guid(ctx, start, imported_by_us=False)
            return
        _check_imported_guid(ctx, start, imported_by_us=True)
        if scan is None:
            # Imported on the strength of the devices list alone: say so
            # if that list left out a disk the pool is missing.
            health = p.zpool.health(c.pool, timeout=_call_timeout(ctx, start))
            if health not in (None, "ONLINE"):
                log.warning(
                    "pool %s was imported %s as soon as every device in devices existed: "
                    "the pool has disks not named there, or named differently (the whole "
                    "disk instead of its partition?); list the vdev paths zpool status -P "
                    "shows", c.pool, health,
                )  # fmt: skip
        if c.dry_run:
            log.info("imported %s read-only (dry run; exported again at the end)", c.pool)


def _pool_left(ctx: Context, start: float) -> float | None:
    """Seconds left of the pool deadline (None: no deadline; the adapter's bound)."""
    c = ctx.config
    if no_limit(c.timeout):
        return None
    return max(c.timeout - (ctx.ports.clock.monotonic() - start), 0.0)


def _call_timeout(ctx: Context, start: float) -> float | None:
    """The deadline of one zpool call in the pool step: what is left, at least 2 s."""
    left = _pool_left(ctx, start)
    return None if left is None else max(left, 2.0)


def _sources(ctx: Context, present: list[str] | None = None) -> list[str]:
    """What ``zpool import -d`` reads: the listed devices (those present), else dev_nodes.

    Devices rather than the directory when the operator named them: a
    stale disk or a USB stick with another pool of the same name in
    dev_nodes is then never even looked at.
    """
    c = ctx.config
    if c.devices:
        return list(c.devices if present is None else present)
    return [c.dev_nodes]


def _check_imported_guid(ctx: Context, start: float, *, imported_by_us: bool) -> None:
    c = ctx.config
    if c.pool_guid is None:
        return
    guid = ctx.ports.zpool.guid(c.pool, timeout=_call_timeout(ctx, start))
    if guid is None and imported_by_us:
        # The scan showed that GUID under this name; someone renamed or
        # exported it in between.  Never go on with a pool we cannot name.
        raise PoolError(
            f"the pool with pool_guid = {c.pool_guid} is not imported as {c.pool} after "
            "importing it: check zpool list and the pool's name",
            errno=errno.ENOTUNIQ,
        )
    if guid is not None and guid != c.pool_guid:
        raise PoolError(
            f"the imported pool {c.pool} has GUID {guid}, not pool_guid = {c.pool_guid}: "
            "another pool of that name was imported (by another service, or from another "
            "disk); export it, or fix pool_guid",
            errno=errno.ENOTUNIQ,
        )


def _wait_for_pool(ctx: Context, start: float) -> PoolScan | None:
    """Poll cheaply until the pool can be imported.

    None means every configured device is present: import at once, from
    those devices only (the import reads the labels itself; a scan first
    would read them twice, seconds on a slow machine).  Otherwise, or
    while some are missing, every POLL_INTERVAL: stat the devices and
    list dev_nodes.
    The expensive part — ``zpool import -d`` reads every label in
    dev_nodes — only runs when that listing changed (a disk arrived),
    when the grace period just ran out, or every RESCAN_INTERVAL; on
    two slow CPUs, scanning at every poll competed with udev's coldplug.
    """
    c, p = ctx.config, ctx.ports
    last_text = ""
    scan = PoolScan(state=None)
    last_listing: tuple[str, ...] | None = None
    last_scan_at = float("-inf")
    was_past_grace = False
    while True:
        ctx.checkpoint()
        now = p.clock.monotonic()
        waited = now - start
        missing_devices = [d for d in c.devices if not p.fs.exists(d)]
        # With pool_guid, never import unseen: the import by GUID would
        # take the pool under whatever name its labels carry; the scan
        # shows that GUID under the configured name first.
        if c.devices and not missing_devices and c.pool_guid is None:
            return None
        past_grace = waited >= c.online_grace
        if not missing_devices or past_grace:
            listing = p.fs.listing(c.dev_nodes)
            due = (
                listing != last_listing
                or now - last_scan_at >= RESCAN_INTERVAL
                or (past_grace and not was_past_grace)
            )
            if due:
                last_listing, last_scan_at = listing, now
                # The scan itself must not run past the deadline.
                present = [d for d in c.devices if d not in missing_devices]
                if c.devices and not present:
                    scan = PoolScan(state=None)  # no -d at all would scan /dev
                else:
                    scan = p.zpool.scan(
                        c.pool,
                        _sources(ctx, present),
                        guid=c.pool_guid,
                        timeout=_call_timeout(ctx, start),
                    )
                if scan.duplicates and c.pool_guid is None:
                    raise AmbiguousPoolError(c.pool, scan.duplicates)
                if scan.state == "ONLINE" or (scan.state == "DEGRADED" and past_grace):
                    return scan
                if (
                    scan.state is None
                    and p.zpool.health(c.pool, timeout=_call_timeout(ctx, start)) is not None
                ):
                    # Imported meanwhile by someone else (zfs-import-scan, an admin).
                    return PoolScan(state="ONLINE")
        was_past_grace = past_grace
        if missing_devices:
            count = len(c.devices) - len(missing_devices)
            text = f"waiting for {c.pool}: {count} of {len(c.devices)} devices"
        elif scan.state is None:
            text = f"waiting for {c.pool} to appear in {c.dev_nodes}"
        else:
            text = f"waiting for {c.pool}: pool is {scan.state}" + (
                f", missing {', '.join(scan.missing)}" if scan.missing else ""
            )
            if scan.state == "DEGRADED" and math.isfinite(c.online_grace):
                text += f"; accepted after {format_duration(c.online_grace)}"
            elif scan.state == "DEGRADED":
                text += "; not accepted (online_grace = infinity)"
        left = _pool_left(ctx, start)
        if left is not None and left <= 0:
            raise PoolError(_pool_missing_message(ctx, missing_devices, scan))
        if text != last_text:
            log.info("%s", text)
            ctx.status(text)
            last_text = text
        p.clock.sleep(POLL_INTERVAL)


def _pool_missing_message(ctx: Context, missing_devices: list[str], scan: PoolScan) -> str:
    c = ctx.config
    head = f"pool {c.pool} did not become importable within {format_duration(c.timeout)}"
    if missing_devices:
        return (
            f"{head}: missing device(s) {', '.join(missing_devices)}; check the disks "
            "and the devices list"
        )
    if scan.state is None:
        detail = f" (zpool said {scan.detail})" if scan.detail else ""
        return (
            f"{head}: no pool named {c.pool} was found in {c.dev_nodes}{detail}; check the "
            "pool name, dev_nodes, and that the disk drivers are in the initrd"
        )
    missing = f", missing {', '.join(scan.missing)}" if scan.missing else ""
    detail = f" ({scan.detail})" if scan.detail else ""
    return f"{head}: it is {scan.state}{missing}{detail}"


def _export_if_imported(ctx: Context) -> None:
    zpool, pool = ctx.ports.zpool, ctx.config.pool
    if ctx.report.pool_imported_before:
        return  # someone else imported it while we waited: theirs, left imported
    if zpool.health(pool, timeout=TEARDOWN_CALL_TIMEOUT) is not None:
        zpool.export_pool(pool, timeout=TEARDOWN_CALL_TIMEOUT)
        log.info("exported %s again: left as it was found", ctx.config.pool)
