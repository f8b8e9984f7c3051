"""Stop and mask units through PID 1's private bus.

The initrd has no dbus-daemon; systemd listens on ``/run/systemd/private``
for root (peer-to-peer, no bus name routing).  Methods are called directly
with their signatures from org.freedesktop.systemd1(5): pystemd's
introspection-driven objects would parse XML for nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from typing import Any

from . import paths
from .errors import TeardownError

log = logging.getLogger("lczfs_unlockd.units")

_DEST = b"org.freedesktop.systemd1"
_PATH = b"/org/freedesktop/systemd1"
_MANAGER = b"org.freedesktop.systemd1.Manager"


def _dbuslib() -> Any:
    """Import ``pystemd.dbuslib`` without running ``pystemd/__init__.py``.

    The package's __init__ imports its introspection layer and with it lxml
    (~65 ms on a fast host, many MiB in an initrd); the low-level bus module
    needs none of that.  When pystemd was already imported normally, use it.
    """
    if "pystemd" not in sys.modules:
        spec = importlib.util.find_spec("pystemd")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("no module named pystemd")
        package = importlib.util.module_from_spec(spec)  # not executed
        sys.modules["pystemd"] = package
    return importlib.import_module("pystemd.dbuslib")


class SystemdUnits:
    """Units port over pystemd's low-level bus on /run/systemd/private."""

    def __init__(self, address: str = paths.SYSTEMD_PRIVATE_BUS) -> None:
        self.address = address

    def _call(self, method: bytes, signature: bytes, args: list[Any]) -> Any:
        try:
            dbuslib = _dbuslib()
        except ImportError as exc:
            raise TeardownError(f"pystemd is missing from the initrd: {exc}") from None
        try:
            with dbuslib.DBusAddress(self.address.encode(), peer_to_peer=True) as bus:
                call_args = dbuslib.apply_signature(signature, args) if signature else []
                return bus.call_method(_DEST, _PATH, _MANAGER, method, call_args).body
        except Exception as exc:  # pystemd raises DBusBaseError subclasses
            raise TeardownError(
                f"systemd's private bus {self.address}: {method.decode()} failed: {exc}"
            ) from None

    def stop_and_mask(self, units: Sequence[str]) -> None:
        loaded = False
        for unit in units:
            try:
                self._call(b"StopUnit", b"ss", [unit.encode(), b"replace"])
                loaded = True
            except TeardownError as exc:
                # A unit that was never loaded, or only as not-found, cannot
                # be stopped ("Unit ... not loaded."): nothing to stop.
                log.debug("stop %s: %s", unit, exc)
                if "not loaded" not in str(exc) and "NoSuchUnit" not in str(exc):
                    loaded = True  # some other failure: assume it is loaded
        encoded = [u.encode() for u in units]
        # MaskUnitFiles(in as files, in b runtime, in b force)
        self._call(b"MaskUnitFiles", b"asbb", [encoded, True, True])
        # Like `systemctl mask`: reload so that loaded units see the mask.
        # Only then: a reload re-runs every generator and re-reads every unit
        # (seconds on a slow machine, PID 1 busy meanwhile), and a unit that
        # is not loaded (the usual case: no crypttab entry, no .mount file,
        # our own mount's unit gone with the mount) is read from disk the
        # next time anything names it -- systemd retries not-found units
        # when its unit directories changed -- and is then masked.
        if loaded:
            self._call(b"Reload", b"", [])
        else:
            log.debug("%s not loaded: masked without a reload", ", ".join(units))

    def unit_file_state(self, unit: str) -> str:
        state = self._call(b"GetUnitFileState", b"s", [unit.encode()])
        if isinstance(state, tuple | list):
            state = state[0]
        return state.decode() if isinstance(state, bytes) else str(state)
