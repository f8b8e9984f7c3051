"""SystemdUnits.stop_and_mask against a stateful fake of PID 1's manager.

The fake keeps what systemd keeps: which units are loaded (from a unit file
or from /proc/self/mountinfo) or only not-found stubs, which are masked, how
many reloads happened.  Like systemd, it loads a not-found stub again when
it is named after the unit directories changed (a mask).
"""

from __future__ import annotations

from typing import Any

from lczfs_unlockd.errors import TeardownError
from lczfs_unlockd.units import SystemdUnits


class FakeManager(SystemdUnits):
    def __init__(self, loaded=(), stop_error=None):
        super().__init__("unix:path=/nonexistent")
        self.load_state = {u: "loaded" for u in loaded}
        self.masked: set[str] = set()
        self.stopped: list[str] = []
        self.reloads = 0
        self.stop_error = stop_error

    def name(self, unit: str) -> str:
        """What PID 1 does when a unit is named (StopUnit, a dependency...)."""
        state = self.load_state.get(unit, "not-found")
        if state == "not-found":
            state = "masked" if unit in self.masked else "not-found"
            self.load_state[unit] = state
        return state

    def _call(self, method: bytes, signature: bytes, args: list[Any]) -> Any:
        if method == b"StopUnit":
            unit = args[0].decode()
            if self.stop_error:
                raise TeardownError(self.stop_error)
            if self.name(unit) != "loaded":
                raise TeardownError(f"StopUnit failed: [err -2]: b'Unit {unit} not loaded.'")
            self.stopped.append(unit)
            return (b"/job/1",)
        if method == b"MaskUnitFiles":
            self.masked.update(a.decode() for a in args[0])
            return ([],)
        if method == b"Reload":
            self.reloads += 1
            for unit in self.load_state:
                if unit in self.masked:
                    self.load_state[unit] = "masked"
            return ()
        raise AssertionError(method)


UNITS = ["systemd-cryptsetup@secretsroot.service", "bootsecrets.mount"]


def test_units_that_are_not_loaded_are_masked_without_a_reload():
    pid1 = FakeManager()
    pid1.stop_and_mask(UNITS)
    assert pid1.masked == set(UNITS)
    assert pid1.reloads == 0
    # The next time anything names them, systemd finds the mask.
    assert [pid1.name(u) for u in UNITS] == ["masked", "masked"]


def test_a_loaded_unit_is_stopped_and_needs_the_reload():
    # The seed's setup: a crypttab entry made systemd-cryptsetup@secretsroot.service.
    pid1 = FakeManager(loaded={UNITS[0]})
    pid1.stop_and_mask(UNITS)
    assert pid1.stopped == [UNITS[0]]
    assert pid1.reloads == 1
    assert [pid1.name(u) for u in UNITS] == ["masked", "masked"]


def test_any_other_stop_failure_keeps_the_reload():
    pid1 = FakeManager(stop_error="Connection timed out")
    pid1.stop_and_mask(UNITS)
    assert pid1.reloads == 1
