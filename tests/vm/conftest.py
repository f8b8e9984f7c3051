"""Fixtures for the VM scenarios; the harness lives next to them (tests/vm/lczfsvm,
importable through pyproject.toml's pytest pythonpath)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lczfsvm import scenarios
from lczfsvm.vm import Guest, Result, Session

_TIMES: list[tuple[str, str]] = []


@pytest.fixture(scope="session")
def guest() -> Guest:
    if os.geteuid() != 0:
        pytest.skip("the VM tests need root (debootstrap, chroot, unshare)")
    for tool in ("qemu-system-x86_64", "qemu-img", "debootstrap", "swtpm", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (see tests/vm/host-packages.txt)")
    start = time.monotonic()
    g = Guest.get()
    _TIMES.append(("(build guest, cached)", f"{time.monotonic() - start:.0f} s"))
    return g


@pytest.fixture
def boot(guest: Guest, tmp_path: Path) -> Iterator[object]:
    def run(name: str) -> Result:
        result = guest.boot(scenarios.get(name, guest), tmp_path / name)
        _TIMES.append((name, result.describe()))
        print(result.describe())
        return result

    yield run


@pytest.fixture
def session(guest: Guest, tmp_path: Path) -> Iterator[Callable[..., Session]]:
    """Sessions (Guest.session) in the test's temporary directory; their boot times
    join the summary."""
    made: list[Session] = []

    def start(name: str, disks: dict[str, str | None], **kw: Any) -> Session:
        s = guest.session(name, tmp_path / name, disks, **kw)
        made.append(s)
        return s

    yield start
    for s in made:
        for r in s.results:
            _TIMES.append((r.boot.name, r.describe()))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _TIMES:
        terminalreporter.section("VM boot times")
        for name, text in _TIMES:
            terminalreporter.write_line(f"{name}: {text}" if name.startswith("(") else text)
