"""Step 4, the keys: find the encryption roots whose key is in the keystore, load them.

Targets are the encryption roots of the pool whose ``keylocation`` is a
file beneath the keystore's mount point (or exactly the ``datasets``
configured).  A key already loaded is skipped.  Each key file is read
without following symlinks, turned into the wrapping key as libzfs would
(:mod:`keyformat`, with ``max_pbkdf2iters`` against a hostile pool), handed
to ZFS, and wiped.
"""

from __future__ import annotations

import errno
import functools
import logging

from .context import Context
from .errors import (
    KeyAlreadyLoadedError,
    KeyLoadError,
    NoSuchDatasetError,
    PoolError,
    UnlockError,
)
from .keyformat import derive_wrapping_key, key_file_path
from .ports import DatasetInfo
from .secretbuf import wipe

log = logging.getLogger("lczfs_unlockd")


def _datasets(ctx: Context, names: list[str], *, recursive: bool) -> list[DatasetInfo]:
    """``zfs get`` of the targets; its failures are key-loading failures."""
    try:
        return ctx.ports.zpool.datasets(names, recursive=recursive)
    except NoSuchDatasetError as exc:
        raise KeyLoadError(f"{exc}: fix datasets in the configuration", errno=exc.errno) from None
    except PoolError as exc:
        code = exc.errno if exc.errno == errno.ETIMEDOUT else KeyLoadError.errno
        raise KeyLoadError(str(exc), errno=code) from None


def _targets(ctx: Context) -> list[DatasetInfo]:
    c = ctx.config
    mp = c.keystore.mountpoint
    if c.datasets is None:
        infos = _datasets(ctx, [c.pool], recursive=True)
        roots = [
            d for d in infos if d.encryption not in ("off", "-") and d.encryption_root == d.name
        ]
        targets = [d for d in roots if key_file_path(d.keylocation, mp)]
        for d in roots:
            if d not in targets:
                log.info("not mine: %s (keylocation=%s is not under %s)", d.name, d.keylocation, mp)
        if not targets:
            raise KeyLoadError(
                f"no encryption root of {c.pool} has its keylocation under {mp}: set "
                f"keylocation=file://{mp}/<key> on the encrypted datasets, or list them in "
                "datasets",
                errno=errno.ENOENT,
            )
        return targets
    targets = _datasets(ctx, list(c.datasets), recursive=False)
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


def load_keys(ctx: Context) -> None:
    """Load (a dry run: verify) the key of every target; the others still load if one fails."""
    c, p = ctx.config, ctx.ports
    verb = "verifying" if c.dry_run else "loading"
    if not c.dry_run:
        # Registered before any key loads: whatever ends the run before the
        # root check vouched for the root (a refusal, SIGTERM in a later
        # dataset's KDF, a bug), the keys are gone again when it exits.
        ctx.on_exit("unload the keys of a root nobody vouched for",
                    functools.partial(_unload_unless_checked, ctx))  # fmt: skip
    with ctx.step(f"{verb} keys", "keys"):
        mp = c.keystore.mountpoint
        errors: list[KeyLoadError] = []
        for d in _targets(ctx):
            ctx.checkpoint()
            if d.keystatus == "available":
                log.info("key of %s is already loaded", d.name)
                ctx.report.already_loaded.append(d.name)
                continue
            path = key_file_path(d.keylocation, mp)
            assert path is not None
            material: bytearray | None = None
            wrapping_key: bytearray | None = None
            try:
                material = p.keys.read_key_file(mp, path, dataset=d.name)
                wrapping_key = derive_wrapping_key(
                    d.keyformat, material,
                    salt=d.pbkdf2salt, iters=d.pbkdf2iters, dataset=d.name, path=path,
                    max_iters=c.max_pbkdf2iters,
                )  # fmt: skip
                p.keys.load_key(d.name, wrapping_key, noop=c.dry_run)
            except KeyAlreadyLoadedError:
                ctx.report.already_loaded.append(d.name)
                continue
            except Exception as exc:
                # Whatever one dataset's properties do to us, the other
                # encryption roots are still loaded.
                failure = _failure(d, path, exc)
                log.error("%s", failure)
                errors.append(failure)
                continue
            finally:
                wipe(material)
                wipe(wrapping_key)
            ctx.report.loaded.append((d.name, d.keyformat))
            log.info(
                "%s key of %s (%s)", "verified" if c.dry_run else "loaded", d.name, d.keyformat
            )
        if errors:
            # Raised by raise_failures(), after the root check: the keys that
            # did load must not skip it.
            ctx.state.key_errors.append(
                KeyLoadError("; ".join(str(e) for e in errors), errno=errors[0].errno)
            )


def _unload_unless_checked(ctx: Context) -> None:
    if ctx.state.root_checked:
        return
    failed = []
    for name, _ in ctx.report.loaded:
        if name in ctx.state.unloaded:
            continue
        try:
            ctx.ports.keys.unload_key(name)
        except KeyLoadError as exc:
            failed.append(f"{exc}: zfs unload-key {name} by hand")
            continue
        ctx.state.unloaded.add(name)
        log.warning("unloaded the key of %s again: the root was not vouched for", name)
    if failed:
        raise KeyLoadError("; ".join(failed))


def raise_failures(ctx: Context) -> None:
    """The keys that did not load, as the run's error (after the root check)."""
    if ctx.state.key_errors:
        raise ctx.state.key_errors[0]


def _failure(d: DatasetInfo, path: str, exc: Exception) -> KeyLoadError:
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
