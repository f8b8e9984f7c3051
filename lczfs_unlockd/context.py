"""What every boot step is given: the configuration, the ports, the report,
the signals, and the little state the steps share.

Also the three things every step does the same way: announce itself
(:meth:`Context.step`: the journal and ``STATUS=``), keep systemd from
timing out while it waits for something with a deadline of its own
(:meth:`Context.extending`), and undo what it makes (:meth:`Context.on_exit`:
registered *before* the thing exists, on the one ``ExitStack`` of the run;
run by :meth:`Context.guarded`: EBUSY retried, a failure recorded, never
raised).
"""

from __future__ import annotations

import errno
import logging
import select
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import FrameType

from . import log as logsetup
from .config import Config
from .errors import Interrupted, UnlockError
from .ports import Ports
from .report import Report

log = logging.getLogger("lczfs_unlockd")

# While a wait with a bound of its own (the pool deadline, token_timeout,
# the zvol's 30 s) or a person typing is in progress, systemd's start
# timeout is pushed out: EXTEND_USEC more every HEARTBEAT.  Nothing else is
# extended — a stuck zpool call, a KDF with an attacker's cost, a stop after
# SIGTERM — so systemd's own timeouts still end a daemon that hangs.
EXTEND_USEC = 60_000_000
HEARTBEAT = 10.0
BUSY_RETRIES = 10  # teardown actions failing with EBUSY: 10 tries, 0.2 s apart
BUSY_RETRY_INTERVAL = 0.2


class Signals:
    """SIGTERM/SIGINT become ``Interrupted`` — except during teardown.

    The signal is always recorded; the handler raises at once — once per
    run: a second signal while the first one's ``Interrupted`` unwinds the
    steps must not cut an undo action short — and :meth:`checkpoint` raises
    again at the next step, so that a raise swallowed where Python cannot
    propagate it (a ctypes callback from C) does not lose the signal.
    """

    def __init__(self) -> None:
        self.interruptible = True
        self.pending: int | None = None
        self.raised = False
        # Written by the C-level signal handler the moment a signal arrives,
        # even while the main thread sits in a C call and Python's handler
        # cannot run yet: the heartbeat thread watches it.
        self.wakeup: socket.socket | None = None

    def _interrupted(self) -> Interrupted:
        assert self.pending is not None
        return Interrupted(f"received {signal.Signals(self.pending).name}: stopped")

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        self.pending = signum
        if self.interruptible and not self.raised:
            self.raised = True
            raise self._interrupted()

    def checkpoint(self) -> None:
        if self.pending is not None and self.interruptible:
            self.raised = True
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


@dataclass
class State:
    """What this run made, so that the teardown undoes exactly that."""

    activated: bool = False  # this run opened the keystore's mapping
    created_dirs: list[str] = field(default_factory=list)  # made by this run, outermost first
    mount_id: int | None = None  # the keystore's mount, once mounted
    mounting: bool = False  # mount(2) was called: the path may hold our mount
    # Keys that did not load: raised after the root check, which must run
    # even then (a hostile pool adds a failing dataset to skip it).
    key_errors: list[UnlockError] = field(default_factory=list)
    # The root check vouched for the root (its flag is written): the keys stay.
    root_checked: bool = False
    unloaded: set[str] = field(default_factory=set)  # keys unloaded again by this run
    luks_uuid: str = ""  # the keystore's, once its header is loaded
    completed: bool = False  # every step ran without an error


class Context:
    def __init__(self, config: Config, ports: Ports) -> None:
        self.config = config
        self.ports = ports
        self.report = Report(dry_run=config.dry_run)
        self.signals = Signals()
        self.state = State()
        # The undo actions, last registered first run; the sequence unwinds
        # it after :meth:`tear_down`, so that nothing interrupts them.
        self.undo = ExitStack()

    def status(self, text: str) -> None:
        self.ports.notifier.send(STATUS=text)

    def checkpoint(self) -> None:
        """Raise ``Interrupted`` here if a signal came (not during teardown)."""
        self.signals.checkpoint()

    @contextmanager
    def step(self, what: str, name: str) -> Iterator[None]:
        """One step of the boot: logged with its duration, shown as STATUS=.

        ``name`` is the step's fixed name in ``--timings``."""
        self.checkpoint()
        logsetup.mark(name)
        with logsetup.step(what, self.status, self.ports.clock.monotonic):
            yield
        logsetup.mark(f"{name}_done")
        self.checkpoint()

    @contextmanager
    def extending(self) -> Iterator[None]:
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

    def on_exit(
        self, what: str, action: Callable[[], None], fallback: Callable[[], None] | None = None
    ) -> None:
        """Undo something at the end of the run, whatever way it ends.

        Called *before* the thing is made: the action checks what is really
        there, so a signal between a C call returning and the next line
        leaves nothing behind.
        """
        self.undo.callback(self.guarded, what, action, fallback)

    def tear_down(self) -> None:
        """From here on nothing interrupts (the sequence calls it before unwinding)."""
        if self.signals.interruptible:  # the first call: say so once
            self.signals.interruptible = False
            self.status("tearing down: closing the keystore")

    def guarded(
        self, what: str, action: Callable[[], None], fallback: Callable[[], None] | None = None
    ) -> None:
        """Run one teardown action; a failure is recorded, the others still run.

        EBUSY is retried for a moment: right after a mount or a mapping
        appears, udev's probes (blkid) briefly hold the device open.  If it
        still fails, ``fallback`` (lazy unmount, deferred removal) makes sure
        the thing goes away once its last user lets go — still reported.
        """
        self.tear_down()  # again: a signal may have cut the sequence's call short
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
                    self.guarded(f"{what} (fallback)", fallback)
                return
            except Exception as exc:  # a bug must not stop the rest of the teardown
                log.exception("teardown: %s failed unexpectedly", what)
                self.report.teardown_problems.append(f"{what}: {exc!r}")
                return
