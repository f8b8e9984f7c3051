"""Secrets for the operations commands: typed on a real terminal (a pty), or from a file.

The prompt must not echo what is typed, must ask twice for a new secret and
refuse two different answers, and must say what to do without a terminal.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lczfs_unlockd import ops_common
from lczfs_unlockd.errors import OpsError

CHILD = """
import sys
from lczfs_unlockd import ops_common
from lczfs_unlockd.errors import OpsError
try:
    secret = ops_common.ask_secret("New passphrase: ", twice={twice})
except OpsError as exc:
    open(sys.argv[1], "w").write("error: " + str(exc))
else:
    open(sys.argv[1], "w").write("ok: " + secret.hex())
"""


def _read_until(fd: int, needle: bytes, seen: bytearray, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while needle not in seen:
        left = end - time.monotonic()
        assert left > 0, f"no {needle!r} on the terminal: {bytes(seen)!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                seen += os.read(fd, 1024)
            except OSError:
                break


def _on_a_terminal(tmp_path: Path, answers: list[bytes], *, twice: bool) -> tuple[str, bytes]:
    out = tmp_path / "result"
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        os.execv(sys.executable, [sys.executable, "-c", CHILD.format(twice=twice), str(out)])
    seen = bytearray()
    try:
        for prompt, answer in zip([b"New passphrase: ", b"Again: "], answers, strict=False):
            _read_until(fd, prompt, seen)
            time.sleep(0.2)  # after the echo is off (TCSAFLUSH drops what came before)
            os.write(fd, answer + b"\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        with_rest = bytearray(seen)
        try:
            while select.select([fd], [], [], 0.2)[0]:
                with_rest += os.read(fd, 1024)
        except OSError:
            pass
    finally:
        os.close(fd)
    return out.read_text(), bytes(with_rest)


def test_a_new_secret_is_asked_twice_without_echo(tmp_path):
    result, screen = _on_a_terminal(tmp_path, [b"s3cret-pass", b"s3cret-pass"], twice=True)
    assert result == "ok: " + b"s3cret-pass".hex()
    assert b"Again: " in screen
    assert b"s3cret" not in screen  # never echoed


def test_two_different_entries_change_nothing(tmp_path):
    result, screen = _on_a_terminal(tmp_path, [b"first-one", b"second-one"], twice=True)
    assert result.startswith("error: the two entries differ")
    assert b"first" not in screen and b"second" not in screen


def test_without_a_terminal_the_message_names_the_option():
    code = (
        "from lczfs_unlockd import ops_common\n"
        "from lczfs_unlockd.errors import OpsError\n"
        "try:\n    ops_common.ask_secret('Passphrase: ')\n"
        "except OpsError as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # no controlling terminal: /dev/tty cannot be opened
        stdin=subprocess.DEVNULL,
    )
    assert "no terminal to ask on" in out.stdout and "--passphrase-file" in out.stdout


def test_a_secret_file_loses_one_trailing_newline_only(tmp_path):
    f = tmp_path / "pass"
    f.write_bytes(b"with space \n\n")
    assert ops_common.read_secret_file(str(f), "passphrase") == bytearray(b"with space \n")


@pytest.mark.parametrize(
    ("content", "why"), [(b"", "is empty"), (b"\n", "is empty"), (b"x" * 5000, "more than")]
)
def test_a_secret_file_that_cannot_be_one_is_refused(tmp_path, content, why):
    f = tmp_path / "pass"
    f.write_bytes(content)
    with pytest.raises(OpsError, match=why):
        ops_common.read_secret_file(str(f), "passphrase")


def test_a_secret_file_that_is_a_symlink_is_refused(tmp_path):
    (tmp_path / "real").write_bytes(b"secret")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OpsError, match="cannot read"):
        ops_common.read_secret_file(str(tmp_path / "link"), "passphrase")
