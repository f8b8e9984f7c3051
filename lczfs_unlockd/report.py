"""What a run did: the :class:`Report` every step fills in, and its one-line summary.

The summary becomes systemd's ``STATUS=`` and the journal's last line, so it
is bounded: a long list of datasets is cut to a count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Interrupted, TeardownError, UnlockError

SUMMARY_NAMES = 8  # datasets named in the one-line summary; the journal has all


@dataclass
class Report:
    ok: bool = False
    dry_run: bool = False
    pool_imported_before: bool = False
    keystore_method: str = ""
    measured: str = ""  # "PCR 15 (sha256)" once the unlock was measured
    checked: list[str] = field(default_factory=list)  # datasets the root check passed
    loaded: list[tuple[str, str]] = field(default_factory=list)  # (dataset, keyformat)
    already_loaded: list[str] = field(default_factory=list)
    masked: list[str] = field(default_factory=list)
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
        keys = names([f"{name} ({fmt})" for name, fmt in self.loaded])
        if self.dry_run:
            if self.ok:
                verb = f"would unlock {keys}" if keys else "would load no key"
                if self.already_loaded:
                    verb += f" ({names(self.already_loaded)} already loaded)"
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
            parts.append(f"{names(self.already_loaded)} already unlocked")
        if self.checked:
            parts.append(f"root checked ({names(self.checked)})")
        if self.measured:
            parts.append(f"measured into {self.measured}")
        return f"{'; '.join(parts)} in {self.elapsed:.1f} s; keystore closed"


def names(listed: list[str]) -> str:
    """A bounded list for the one-line summary (systemd drops long STATUS= lines)."""
    shown = ", ".join(listed[:SUMMARY_NAMES])
    if len(listed) > SUMMARY_NAMES:
        shown += f" and {len(listed) - SUMMARY_NAMES} more"
    return shown
