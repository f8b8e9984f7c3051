"""The unlock sequence: pool, keystore, mount, keys, teardown, report.

Every resource gets its teardown registered in one ``ExitStack`` *before*
it is created (the callbacks check what is really there), so a failure or a
SIGTERM at any point — even between a C call returning and the next line —
leaves nothing mounted, mapped or imported that was not there before.  The
teardown itself cannot be interrupted, and is verified afterwards.

This module only talks to the protocols in ``ports.py``.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import select
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import FrameType

from . import log as logsetup
from .config import Config, UnlockMethod, check_real_path, format_duration, no_limit
from .errors import (
    AmbiguousPoolError,
    Interrupted,
    KeyLoadError,
    KeystoreError,
    NoTokenError,
    NoUsableKeyslotError,
    PinRefusedError,
    PinRequiredError,
    PoolError,
    PromptError,
    TeardownError,
    UnlockError,
    WrongKeyError,
)
from .ports import (
    AskPassword,
    Clock,
    Cryptsetup,
    DatasetInfo,
    Filesystem,
    KeyLoader,
    LuksDevice,
    MappingState,
    Mounts,
    Notifier,
    PoolScan,
    Units,
    Zpool,
)
from .secretbuf import wipe
from .units import cryptsetup_unit, mount_unit
from .zfskeys import KeyAlreadyLoadedError, derive_wrapping_key, key_file_path

log = logging.getLogger("lczfs_unlockd")

POLL_INTERVAL = 0.2  # seconds between pool scans: sub-second, cheap
ZVOL_WAIT = 30.0  # udev creates /dev/zvol/... shortly after import
PARTITION_WAIT = 5.0  # after the zvol node, its partitions follow
TOKEN_RETRY = 0.5
# While a wait with a bound of its own (the pool deadline, token_timeout,
# the zvol's 30 s) or a person typing is in progress, systemd's start
# timeout is pushed out: EXTEND_USEC more every HEARTBEAT.  Nothing else is
# extended — a stuck zpool call, a KDF with an attacker's cost, a stop after
# SIGTERM — so systemd's own timeouts still end a daemon that hangs.
EXTEND_USEC = 60_000_000
HEARTBEAT = 10.0
BUSY_RETRIES = 10  # teardown actions failing with EBUSY: 10 tries, 0.2 s apart
BUSY_RETRY_INTERVAL = 0.2
IMPORT_RETRY = 1.0
TEARDOWN_CALL_TIMEOUT = 30.0  # each zpool call during teardown (dry-run export)
SUMMARY_NAMES = 8  # datasets named in the one-line summary; the journal has all
AMBIGUOUS_TRIES = 3  # a token PIN refused for a reason that may not be the PIN
RESCAN_INTERVAL = 2.0  # zpool import -d without a change in dev_nodes

ReadKeyFile = Callable[[str, str, str], bytearray]  # (mountpoint, path, dataset)


@dataclass
class Ports:
    zpool: Zpool
    keys: KeyLoader
    crypt: Cryptsetup
    mounts: Mounts
    units: Units
    askpass: AskPassword
    notifier: Notifier
    fs: Filesystem
    clock: Clock
    read_key_file: ReadKeyFile


@dataclass
class Report:
    ok: bool = False
    dry_run: bool = False
    pool_imported_before: bool = False
    keystore_method: str = ""
    loaded: list[tuple[str, str]] = field(default_factory=list)  # (dataset, keyformat)
    already_loaded: list[str] = field(default_factory=list)
    masked: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    teardown_problems: list[str] = field(default_factory=list)
    error: UnlockError | Interrupted | None = None
    elapsed: float = 0.0
    verified: bool = False  # teardown verified: nothing of ours is left

    @property
    def errno(self) -> int:
        return self.error.errno if self.error is not None else 0

    def _left_behind(self) -> str:
        """What the teardown could not undo, for a failure summary."""
        if self.teardown_problems:
            return "; left behind: " + "; ".join(self.teardown_problems)
        return "; nothing is left open" if self.verified else ""

    @property
    def summary(self) -> str:
        keys = _names([f"{name} ({fmt})" for name, fmt in self.loaded])
        if self.dry_run:
            if self.ok:
                verb = f"would unlock {keys}" if keys else "would load no key"
                if self.already_loaded:
                    verb += f" ({_names(self.already_loaded)} already loaded)"
                return (
                    f"dry run: {verb} using the keystore ({self.keystore_method}); "
                    f"checked in {self.elapsed:.1f} s; nothing changed"
                )
            return f"dry run: a real run would fail: {self.error}{self._left_behind()}"
        if not self.ok:
            if isinstance(self.error, TeardownError):
                return f"failed: {self.error}"  # it is the list of what was left behind
            return f"failed: {self.error}{self._left_behind()}"
        parts = []
        if keys:
            parts.append(f"unlocked {keys}")
        if self.already_loaded:
            parts.append(f"{_names(self.already_loaded)} already unlocked")
        return f"{'; '.join(parts)} in {self.elapsed:.1f} s; keystore closed"


def _key_failure(d: DatasetInfo, path: str, exc: Exception) -> KeyLoadError:
    """One dataset's key did not load: the error to report, naming the dataset."""
    if isinstance(exc, KeyLoadError):
        if exc.errno == errno.EACCES:  # zfs refused it: say which file and format
            return KeyLoadError(
                f"{exc} (key file {path}, keyformat={d.keyformat})", errno=exc.errno
            )
        return exc
    if isinstance(exc, UnlockError):
        return KeyLoadError(f"cannot load the key of {d.name}: {exc}", errno=exc.errno)
    log.debug("unexpected error loading the key of %s", d.name, exc_info=exc)
    return KeyLoadError(
        f"cannot load the key of {d.name}: unexpected {type(exc).__name__} "
        f"(key file {path}, keyformat={d.keyformat}; rd.lczfs.debug shows more)",
        errno=errno.EIO,
    )


def _names(names: list[str]) -> str:
    """A bounded list for the one-line summary (systemd drops long STATUS= lines)."""
    shown = ", ".join(names[:SUMMARY_NAMES])
    if len(names) > SUMMARY_NAMES:
        shown += f" and {len(names) - SUMMARY_NAMES} more"
    return shown


class _Signals:
    """SIGTERM/SIGINT become ``Interrupted`` — except during teardown.

    The signal is always recorded; the handler raises at once, and
    :meth:`checkpoint` raises again at the next step, so that a raise
    swallowed where Python cannot propagate it (a ctypes callback from C)
    does not lose the signal.
    """

    def __init__(self) -> None:
        self.interruptible = True
        self.pending: int | None = None
        # Written by the C-level signal handler the moment a signal arrives,
        # even while the main thread sits in a C call and Python's handler
        # cannot run yet: the heartbeat thread watches it.
        self.wakeup: socket.socket | None = None

    def _interrupted(self) -> Interrupted:
        assert self.pending is not None
        return Interrupted(f"received {signal.Signals(self.pending).name}: stopped")

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        self.pending = signum
        if self.interruptible:
            raise self._interrupted()

    def checkpoint(self) -> None:
        if self.pending is not None and self.interruptible:
            raise self._interrupted()

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self.handler) for s in (signal.SIGTERM, signal.SIGINT)}
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self.wakeup = reader
        try:
            yield
        finally:
            signal.set_wakeup_fd(old_fd)
            self.wakeup = None
            reader.close()
            writer.close()
            for s, h in old.items():
                signal.signal(s, h)

    def arrived(self) -> bool:
        """A signal came, even if Python's handler has not run yet."""
        if self.pending is not None:
            return True
        if self.wakeup is None:
            return False
        readable, _, _ = select.select([self.wakeup], [], [], 0)
        return bool(readable)


class Unlocker:
    def __init__(self, config: Config, ports: Ports) -> None:
        self.config = config
        self.ports = ports
        self.report = Report(dry_run=config.dry_run)
        self.signals = _Signals()
        self._start = ports.clock.monotonic()
        self._activated = False  # this run opened the mapping
        self._created_dirs: list[str] = []  # made by this run, outermost first
        self._mount_id: int | None = None  # the keystore's mount, once mounted
        self._mounting = False  # mount(2) was called: the path may hold our mount

    # --- reporting -----------------------------------------------------------

    def _status(self, text: str) -> None:
        self.ports.notifier.send(STATUS=text)

    def _checkpoint(self) -> None:
        self.signals.checkpoint()

    @contextmanager
    def _step(self, what: str) -> Iterator[None]:
        self._checkpoint()
        with logsetup.step(what, self._status, self.ports.clock.monotonic):
            yield
        self._checkpoint()

    @contextmanager
    def _extending(self) -> Iterator[None]:
        """Push systemd's start timeout out while a bounded or human wait runs.

        Only around waits with a deadline of their own (the pool's timeout,
        token_timeout, the zvol's wait) or a person answering a prompt.  Not
        once a signal arrived: EXTEND_TIMEOUT_USEC also extends the stop
        timeout, and systemd's SIGKILL must still come.
        """
        stop_reader, stop_writer = socket.socketpair()
        watched = [stop_reader] + ([self.signals.wakeup] if self.signals.wakeup else [])

        def extend() -> bool:
            if self.signals.arrived():
                return False  # never again in this run
            self.ports.notifier.send(EXTEND_TIMEOUT_USEC=EXTEND_USEC)
            return True

        def beat() -> None:
            while True:
                readable, _, _ = select.select(watched, [], [], HEARTBEAT)
                if readable or not extend():
                    return

        extend()
        thread = threading.Thread(target=beat, name="extend-timeout", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop_writer.send(b"x")
            thread.join()
            stop_reader.close()
            stop_writer.close()

    # --- the sequence ----------------------------------------------------------

    def run(self) -> Report:
        """Run the whole sequence; never raises UnlockError (it is in the report)."""
        c = self.config
        mode = "dry run: " if c.dry_run else ""
        log.info(
            "%sunlocking %s with keystore %s (config %s)",
            mode, c.pool, c.keystore.device, c.source,
        )  # fmt: skip
        try:
            with self.signals.installed():
                try:
                    with ExitStack() as stack:
                        try:
                            self._sequence(stack)
                        finally:
                            self.signals.interruptible = False
                            self._status("tearing down: closing the keystore")
                finally:
                    self._verify()
        except (UnlockError, Interrupted) as exc:
            self.report.error = exc
        except Exception as exc:
            # A bug, or input nobody foresaw: still a reported failure
            # (STATUS=, ERRNO=, the teardown above has run), not a traceback
            # in place of a status line.  Only the type and a bounded text:
            # an exception's text is no place to trust with key material.
            log.debug("unexpected error", exc_info=True)
            self.report.error = UnlockError(
                f"unexpected {type(exc).__name__}: {str(exc)[:200]} (a bug: please report it "
                "with journalctl -b -u lczfs-unlockd; rd.lczfs.debug shows the traceback)"
            )
        self.report.elapsed = self.ports.clock.monotonic() - self._start
        if self.report.error is None and self.report.teardown_problems:
            self.report.error = TeardownError("; ".join(self.report.teardown_problems))
        if self.report.error is None and self.signals.pending is not None:
            # Arrived while the teardown ran (or was swallowed and never re-raised).
            self.report.error = Interrupted(
                f"received {signal.Signals(self.signals.pending).name} during teardown"
            )
        self.report.ok = self.report.error is None
        return self.report

    def _sequence(self, stack: ExitStack) -> None:
        c = self.config
        if not c.dry_run:
            # Registered first, so it runs last: after unmount and close.
            stack.callback(self._guarded, "mask units", self._mask)
        self._import_pool(stack)
        device = self._wait_for_keystore_device()
        self._open_keystore(stack, device)
        self._mount_keystore(stack)
        self._load_keys()

    def _guarded(
        self, what: str, action: Callable[[], None], fallback: Callable[[], None] | None = None
    ) -> None:
        """Run one teardown action; a failure is recorded, the others still run.

        EBUSY is retried for a moment: right after a mount or a mapping
        appears, udev's probes (blkid) briefly hold the device open.  If it
        still fails, ``fallback`` (lazy unmount, deferred removal) makes sure
        the thing goes away once its last user lets go — still reported.
        """
        for attempt in range(1, BUSY_RETRIES + 1):
            try:
                action()
                return
            except UnlockError as exc:
                if exc.errno == errno.EBUSY and attempt < BUSY_RETRIES:
                    log.debug("teardown: %s: busy, retrying (%d)", what, attempt)
                    self.ports.clock.sleep(BUSY_RETRY_INTERVAL)
                    continue
                log.error("teardown: %s failed: %s", what, exc)
                self.report.teardown_problems.append(f"{what}: {exc}")
                if fallback is not None:
                    self._guarded(f"{what} (fallback)", fallback)
                return
            except Exception as exc:  # a bug must not stop the rest of the teardown
                log.exception("teardown: %s failed unexpectedly", what)
                self.report.teardown_problems.append(f"{what}: {exc!r}")
                return

    # --- pool ------------------------------------------------------------------

    def _import_pool(self, stack: ExitStack) -> None:
        c, p = self.config, self.ports
        with self._step(f"importing pool {c.pool}"), self._extending():
            # The deadline counts from here: the first zpool call alone can
            # take seconds (libzfs initialising, a slow CPU).
            start = p.clock.monotonic()
            health = p.zpool.health(c.pool, timeout=self._call_timeout(start))
            if health is not None:
                log.info("pool %s is already imported (%s)", c.pool, health)
                self.report.pool_imported_before = True  # not ours to export
                self._check_imported_guid(start, imported_by_us=False)
                return
            if c.dry_run:
                # Registered before the import: exports only if it got imported.
                stack.callback(self._guarded, f"export {c.pool}", self._export_if_imported)
            last_error = ""
            while True:
                scan = self._wait_for_pool(start)
                if scan is not None and scan.state == "DEGRADED":
                    log.warning(
                        "importing %s DEGRADED after waiting %s: missing %s",
                        c.pool, format_duration(c.online_grace), ", ".join(scan.missing) or "?",
                    )  # fmt: skip
                try:
                    p.zpool.import_pool(
                        c.pool,
                        self._sources(),
                        guid=c.pool_guid,
                        force=c.force_import,
                        readonly=c.dry_run,
                        timeout=self._call_timeout(start),
                    )
                    break
                except PoolError as exc:
                    # Links can change between scan and import (a second
                    # disk arriving): retry until the deadline, like the
                    # import scripts this replaces — unless retrying cannot help.
                    left = self._pool_left(start)
                    final = (errno.EADDRINUSE, errno.ENOTUNIQ, errno.ETIMEDOUT)
                    if exc.errno in final or (left is not None and left <= 0):
                        raise
                    if str(exc) != last_error:
                        log.warning("import of %s failed, trying again: %s", c.pool, exc)
                        last_error = str(exc)
                    p.clock.sleep(IMPORT_RETRY)
            self._check_imported_guid(start, imported_by_us=True)
            if scan is None:
                # Imported on the strength of the devices list alone: say so
                # if that list left out a disk the pool is missing.
                health = p.zpool.health(c.pool, timeout=self._call_timeout(start))
                if health not in (None, "ONLINE"):
                    log.warning(
                        "pool %s was imported %s as soon as every device in devices existed: "
                        "the pool has disks not named there, or named differently (the whole "
                        "disk instead of its partition?); list the vdev paths zpool status -P "
                        "shows", c.pool, health,
                    )  # fmt: skip
            if c.dry_run:
                log.info("imported %s read-only (dry run; exported again at the end)", c.pool)

    def _pool_left(self, start: float) -> float | None:
        """Seconds left of the pool deadline (None: no deadline; the adapter's bound)."""
        c = self.config
        if no_limit(c.timeout):
            return None
        return max(c.timeout - (self.ports.clock.monotonic() - start), 0.0)

    def _call_timeout(self, start: float) -> float | None:
        """The deadline of one zpool call in the pool step: what is left, at least 2 s."""
        left = self._pool_left(start)
        return None if left is None else max(left, 2.0)

    def _sources(self, present: list[str] | None = None) -> list[str]:
        """What ``zpool import -d`` reads: the listed devices (those present), else dev_nodes.

        Devices rather than the directory when the operator named them: a
        stale disk or a USB stick with another pool of the same name in
        dev_nodes is then never even looked at.
        """
        c = self.config
        if c.devices:
            return list(c.devices if present is None else present)
        return [c.dev_nodes]

    def _check_imported_guid(self, start: float, *, imported_by_us: bool) -> None:
        c = self.config
        if c.pool_guid is None:
            return
        guid = self.ports.zpool.guid(c.pool, timeout=self._call_timeout(start))
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

    def _wait_for_pool(self, start: float) -> PoolScan | None:
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
        c, p = self.config, self.ports
        last_text = ""
        scan = PoolScan(state=None)
        last_listing: tuple[str, ...] | None = None
        last_scan_at = float("-inf")
        was_past_grace = False
        while True:
            self._checkpoint()
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
                            self._sources(present),
                            guid=c.pool_guid,
                            timeout=self._call_timeout(start),
                        )
                    if scan.duplicates and c.pool_guid is None:
                        raise AmbiguousPoolError(c.pool, scan.duplicates)
                    if scan.state == "ONLINE" or (scan.state == "DEGRADED" and past_grace):
                        return scan
                    if (
                        scan.state is None
                        and p.zpool.health(c.pool, timeout=self._call_timeout(start)) is not None
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
            left = self._pool_left(start)
            if left is not None and left <= 0:
                raise PoolError(self._pool_missing_message(missing_devices, scan))
            if text != last_text:
                log.info("%s", text)
                self._status(text)
                last_text = text
            p.clock.sleep(POLL_INTERVAL)

    def _pool_missing_message(self, missing_devices: list[str], scan: PoolScan) -> str:
        c = self.config
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

    def _export_if_imported(self) -> None:
        zpool, pool = self.ports.zpool, self.config.pool
        if zpool.health(pool, timeout=TEARDOWN_CALL_TIMEOUT) is not None:
            zpool.export_pool(pool, timeout=TEARDOWN_CALL_TIMEOUT)
            log.info("exported %s again: left as it was found", self.config.pool)

    # --- keystore -------------------------------------------------------------

    def _wait_for_keystore_device(self) -> str:
        c, p = self.config, self.ports
        ks = c.keystore
        with self._step(f"waiting for keystore {ks.device}"), self._extending():
            base = f"/dev/zvol/{ks.volume}"
            if not p.fs.exists(base):
                # A wrong volume name fails at once instead of after ZVOL_WAIT.
                try:
                    p.zpool.datasets([ks.volume], recursive=False)
                except KeyLoadError as exc:
                    if exc.errno != errno.ENOENT:
                        raise KeystoreError(
                            f"cannot look up keystore.volume = {ks.volume}: {exc}",
                            errno=exc.errno,
                        ) from None
                    raise KeystoreError(
                        f"keystore.volume = {ks.volume}: no such zvol in pool {c.pool} "
                        "(zfs list -t volume shows the ones there are)",
                        errno=errno.ENOENT,
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
                self._checkpoint()
                p.clock.sleep(POLL_INTERVAL / 2)
            return ks.device

    def _open_keystore(self, stack: ExitStack, device: str) -> None:
        p, ks = self.ports, self.config.keystore
        # Registered before activation: closes the mapping when we leave,
        # even if the signal lands between activation and the next line.
        stack.callback(
            self._guarded,
            f"close {ks.mapper_path}",
            self._close_mapping,
            functools.partial(self._close_mapping, deferred=True),
        )
        with self._step(f"opening keystore {device} read-only as {ks.mapper_path}"):
            if p.crypt.status(ks.name) in (MappingState.ACTIVE, MappingState.BUSY):
                log.warning(
                    "%s is already open (a crypttab entry?); using it%s",
                    ks.mapper_path,
                    "" if self.config.dry_run else ", and closing it at the end",
                )
                self.report.keystore_method = "already open"
                return
            luks = p.crypt.open(device)
            try:
                self._activated = True  # from here on, a mapping may be ours
                self.report.keystore_method = self._unlock(luks, device)
            finally:
                luks.close()
            log.info("keystore opened with %s", self.report.keystore_method)

    def _unlock(self, luks: LuksDevice, device: str) -> str:
        ks = self.config.keystore
        reasons: list[str] = []
        for method in ks.unlock:
            self._checkpoint()
            if method is UnlockMethod.TOKEN:
                if self._try_token(luks, device, reasons):
                    return "token"
            elif method is UnlockMethod.KEYFILE:
                if ks.keyfile is None:
                    continue
                try:
                    luks.activate_by_keyfile(ks.name, ks.keyfile, read_only=True)
                    return "key file"
                except KeystoreError as exc:
                    log.warning("key file %s did not open the keystore: %s", ks.keyfile, exc)
                    reasons.append(f"key file {ks.keyfile}: {exc}")
            elif method is UnlockMethod.PASSPHRASE and self._try_passphrase(luks, device, reasons):
                return "passphrase"
        raise KeystoreError(
            f"cannot open keystore {device}: " + "; ".join(reasons or ["no unlock method left"]),
            errno=errno.EPERM,
        )

    def _try_token(self, luks: LuksDevice, device: str, reasons: list[str]) -> bool:
        """Tokens, falling back to the next method on any token failure.

        Only -EAGAIN (the token's hardware is not there yet) is waited for,
        up to keystore.token_timeout; "no usable token" (no plugin, no
        matching token) falls through at once.
        """
        p, ks = self.ports, self.config.keystore
        tokens = luks.tokens()
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
                + " (NixOS: boot.initrd.lczfs-unlockd.keystore.tokenPlugins)"
            )
            return False
        start = p.clock.monotonic()
        announced = False
        while True:
            self._checkpoint()
            try:
                # Not extended: besides the plugin, the call runs the key
                # slot's KDF, whose cost is in the header whoever holds the
                # disk can write.  Only the wait for the hardware is.
                luks.activate_by_token(ks.name, None, read_only=True)
                return True
            except PinRequiredError:
                return self._try_token_pin(luks, device, reasons)
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
                    self._status(f"waiting for a security token for {device}")
                    announced = True
                with self._extending():  # bounded by token_timeout
                    p.clock.sleep(TOKEN_RETRY)
            except KeystoreError as exc:
                # A TPM2 unseal failing after a firmware update, a plugin
                # error...: exactly when the passphrase must still work.
                reasons.append(f"token: {exc}")
                log.warning("token did not open %s: %s", device, exc)
                return False

    def _ask(self, prompt: str, device: str, *, kind: str, first: bool) -> bytearray:
        ks = self.config.keystore
        self._status(f"asking for the {kind} of keystore {device}")
        passphrase = kind == "passphrase"
        with self._extending():  # a person is typing
            return self.ports.askpass.ask(
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

    def _try_token_pin(self, luks: LuksDevice, device: str, reasons: list[str]) -> bool:
        ks = self.config.keystore
        try:
            return self._ask_until_right(
                device,
                reasons,
                kind="token PIN",
                prompt=f"Please enter the security token PIN for keystore {ks.volume}:",
                activate=lambda pin: luks.activate_by_token(ks.name, pin, read_only=True),
                # WrongKeyError (-EPERM) is no PIN problem: the token's key
                # opens no key slot, whatever the PIN; it falls through.
                wrong=(PinRequiredError,),
                ambiguous=PinRefusedError,
            )
        except KeystoreError as exc:
            reasons.append(f"token: {exc}")
            log.warning("token did not open %s: %s", device, exc)
            return False

    def _try_passphrase(self, luks: LuksDevice, device: str, reasons: list[str]) -> bool:
        ks = self.config.keystore
        try:
            return self._ask_until_right(
                device,
                reasons,
                kind="passphrase",
                prompt=f"Please enter the passphrase for keystore {ks.volume}:",
                activate=lambda passphrase: luks.activate_by_passphrase(
                    ks.name, passphrase, read_only=True
                ),
                wrong=(WrongKeyError,),
            )
        except NoUsableKeyslotError as exc:
            # No slot can take a passphrase at all: asking again cannot help.
            reasons.append(f"passphrase: {exc}")
            log.warning("no passphrase can open %s: %s", device, exc)
            return False

    def _ask_until_right(
        self,
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
        tries = self.config.keystore.tries
        of = f" of {tries}" if tries else ""
        attempt = 0
        refused = 0
        while tries == 0 or attempt < tries:
            self._checkpoint()
            attempt += 1
            try:
                secret = self._ask(prompt, device, kind=kind, first=attempt == 1)
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
                self._status(f"wrong {kind} for keystore {device} (try {attempt}{of})")
            finally:
                wipe(secret)
        reasons.append(f"{kind}: wrong {tries} times")
        return False

    def _ours(self) -> bool:
        """The mapping is ours to close: a real run closes any, a dry run only its own."""
        return self._activated or not self.config.dry_run

    def _close_mapping(self, *, deferred: bool = False) -> None:
        p, ks = self.ports, self.config.keystore
        if self._ours() and p.crypt.status(ks.name) in (MappingState.ACTIVE, MappingState.BUSY):
            p.crypt.deactivate(ks.name, deferred=deferred)
            if deferred:
                log.warning("%s will be removed when its last user closes it", ks.mapper_path)
            else:
                log.info("closed %s", ks.mapper_path)

    # --- mount -----------------------------------------------------------------

    def _mount_keystore(self, stack: ExitStack) -> None:
        p, ks = self.ports, self.config.keystore
        with self._step(f"mounting {ks.mapper_path} read-only on {ks.mountpoint}"):
            # Checked at config load and again here, where it counts: a
            # mount point under a symlink (/var/run -> /run) is mounted
            # where mountinfo shows another path, and would outlive us.
            check_real_path(ks.mountpoint, "keystore.mountpoint", realpath=p.fs.real_path)
            # Registered first, so it runs after the unmount.  A dry run
            # leaves an existing mount point exactly as it is; both remove
            # what they created, parents included, innermost first.
            stack.callback(self._guarded, "remove created directories", self._remove_created_dirs)
            keep = self.config.dry_run and p.fs.exists(ks.mountpoint)
            if not keep:
                self._created_dirs = p.fs.make_dirs(ks.mountpoint, 0o700)
            if p.mounts.is_mounted(ks.mountpoint):
                raise KeystoreError(
                    f"something is already mounted on {ks.mountpoint}: remove the old "
                    f"{mount_unit(ks.mountpoint)} / fstab entry, or choose another "
                    "keystore.mountpoint",
                    errno=errno.EBUSY,
                )
            stack.callback(
                self._guarded,
                f"unmount {ks.mountpoint}",
                self._unmount,
                functools.partial(self._unmount, lazy=True),
            )
            self._mounting = True
            self._mount_id = p.mounts.mount(ks.mapper_path, ks.mountpoint, "")

    def _remove_created_dirs(self) -> None:
        for path in reversed(self._created_dirs):
            if self.ports.fs.exists(path):
                self.ports.fs.remove_dir(path)
                log.debug("removed %s (created by this run)", path)

    def _mounted(self) -> bool:
        """The keystore's own mount is still there: by its mount ID, not a path string."""
        p, mp = self.ports, self.config.keystore.mountpoint
        if self._mount_id is not None:
            return p.mounts.mount_exists(self._mount_id)
        # Someone else's mount found there is not ours to report or remove.
        return self._mounting and p.mounts.is_mounted(mp)

    def _unmount(self, *, lazy: bool = False) -> None:
        p, mp = self.ports, self.config.keystore.mountpoint
        if self._mounted():
            p.mounts.unmount(mp, lazy=lazy)
            if lazy:
                log.warning("detached %s lazily: it goes away when its last user closes it", mp)
            else:
                log.info("unmounted %s", mp)

    # --- keys --------------------------------------------------------------------

    def _targets(self) -> list[DatasetInfo]:
        c, p = self.config, self.ports
        mp = c.keystore.mountpoint
        if c.datasets is None:
            infos = p.zpool.datasets([c.pool], recursive=True)
            roots = [
                d for d in infos if d.encryption not in ("off", "-") and d.encryption_root == d.name
            ]
            targets = [d for d in roots if key_file_path(d.keylocation, mp)]
            for d in roots:
                if d not in targets:
                    log.info(
                        "not mine: %s (keylocation=%s is not under %s)", d.name, d.keylocation, mp
                    )
            if not targets:
                raise KeyLoadError(
                    f"no encryption root of {c.pool} has its keylocation under {mp}: set "
                    f"keylocation=file://{mp}/<key> on the encrypted datasets, or list them in "
                    "datasets",
                    errno=errno.ENOENT,
                )
            return targets
        targets = p.zpool.datasets(list(c.datasets), recursive=False)
        for d in targets:
            if d.encryption in ("off", "-"):
                raise KeyLoadError(f"datasets: {d.name} is not encrypted; remove it from datasets")
            if d.encryption_root != d.name:
                raise KeyLoadError(
                    f"datasets: {d.name} is not an encryption root; its key is the one of "
                    f"{d.encryption_root}: list {d.encryption_root} instead"
                )
            if key_file_path(d.keylocation, mp) is None:
                raise KeyLoadError(
                    f"{d.name} has keylocation={d.keylocation}, which is not a file under the "
                    f"keystore mount point {mp}: zfs set keylocation=file://{mp}/<key> {d.name}"
                )
        return targets

    def _load_keys(self) -> None:
        c, p = self.config, self.ports
        verb = "verifying" if c.dry_run else "loading"
        with self._step(f"{verb} keys"):
            mp = c.keystore.mountpoint
            errors: list[KeyLoadError] = []
            for d in self._targets():
                self._checkpoint()
                if d.keystatus == "available":
                    log.info("key of %s is already loaded", d.name)
                    self.report.already_loaded.append(d.name)
                    continue
                path = key_file_path(d.keylocation, mp)
                assert path is not None
                material: bytearray | None = None
                wrapping_key: bytearray | None = None
                try:
                    material = p.read_key_file(mp, path, d.name)
                    wrapping_key = derive_wrapping_key(
                        d.keyformat, material,
                        salt=d.pbkdf2salt, iters=d.pbkdf2iters, dataset=d.name, path=path,
                        max_iters=c.max_pbkdf2iters,
                    )  # fmt: skip
                    p.keys.load_key(d.name, wrapping_key, noop=c.dry_run)
                except KeyAlreadyLoadedError:
                    self.report.already_loaded.append(d.name)
                    continue
                except Exception as exc:
                    # Whatever one dataset's properties do to us, the other
                    # encryption roots are still loaded.
                    failure = _key_failure(d, path, exc)
                    log.error("%s", failure)
                    errors.append(failure)
                    continue
                finally:
                    wipe(material)
                    wipe(wrapping_key)
                self.report.loaded.append((d.name, d.keyformat))
                log.info(
                    "%s key of %s (%s)", "verified" if c.dry_run else "loaded", d.name, d.keyformat
                )
            if errors:
                raise KeyLoadError("; ".join(str(e) for e in errors), errno=errors[0].errno)

    # --- teardown ----------------------------------------------------------------

    def _units_to_mask(self) -> list[str]:
        ks = self.config.keystore
        units = [cryptsetup_unit(ks.name), mount_unit(ks.mountpoint), *self.config.mask]
        return list(dict.fromkeys(units))

    def _mask(self) -> None:
        units = self._units_to_mask()
        self.ports.units.stop_and_mask(units)
        self.report.masked = units
        log.info("masked %s", ", ".join(units))

    def _verify(self) -> None:
        """Check that nothing outlives the run; record what is left."""
        c, p = self.config, self.ports
        ks = c.keystore
        problems: list[str] = []
        checked: list[str] = []
        try:
            if self._mounted():
                problems.append(f"{ks.mountpoint} is still mounted")
            else:
                checked.append(f"nothing mounted on {ks.mountpoint}")
            left_dirs = [d for d in self._created_dirs if p.fs.exists(d)]
            if left_dirs:
                problems.append(f"directories this run created remain: {', '.join(left_dirs)}")
            elif self._created_dirs:
                checked.append(f"removed {', '.join(reversed(self._created_dirs))}")
            state = p.crypt.status(ks.name)
            if state in (MappingState.ACTIVE, MappingState.BUSY) and not self._ours():
                checked.append(f"{ks.mapper_path} left open as it was found (dry run)")
            elif state in (MappingState.ACTIVE, MappingState.BUSY):
                problems.append(f"{ks.mapper_path} is still open")
            elif state is MappingState.INACTIVE:
                checked.append(f"{ks.mapper_path} closed")
            else:
                checked.append(f"{ks.mapper_path} not present (device-mapper unavailable)")
            if not c.dry_run:
                for unit in self._units_to_mask():
                    unit_state = p.units.unit_file_state(unit)
                    if unit_state.startswith("masked"):
                        checked.append(f"{unit} {unit_state}")
                    else:
                        problems.append(f"{unit} is {unit_state}, not masked")
            if c.dry_run and not self.report.pool_imported_before:
                if p.zpool.health(c.pool, timeout=TEARDOWN_CALL_TIMEOUT) is not None:
                    problems.append(f"pool {c.pool} is still imported")
                else:
                    checked.append(f"pool {c.pool} not imported, as before")
        except UnlockError as exc:
            problems.append(f"verification: {exc}")
        if checked:
            log.info("verified: %s", "; ".join(checked))
        for problem in problems:
            log.error("left behind: %s", problem)
        self.report.teardown_problems += problems
        self.report.verified = not self.report.teardown_problems
