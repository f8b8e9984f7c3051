"""The passphrase prompt as a crypttab password agent sees it (real systemd-ask-password).

Agents written for systemd-cryptsetup, clevis-luks-askpass first among them,
scan /run/systemd/ask-password/ask.* and answer only ``Id=cryptsetup:<device>``,
taking the rest of the line as the LUKS device.  The agent here does exactly
what clevis-luks-askpass does (``case "$line" in Id=cryptsetup:*)``) and
answers through the ask file's socket.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from lczfs_unlockd.askpass import SystemdAskPassword

ASK_DIR = "/run/systemd/ask-password"
PROGRAM = shutil.which("systemd-ask-password")
pytestmark = pytest.mark.skipif(
    PROGRAM is None or os.geteuid() != 0 or not os.access(ASK_DIR, os.W_OK),
    reason="needs systemd-ask-password, root and a writable /run/systemd/ask-password",
)


class CryptsetupAgent(threading.Thread):
    """Answers the first ask file whose Id= is ``cryptsetup:<device>``, as clevis does."""

    def __init__(self, device: str, answer: bytes) -> None:
        super().__init__(daemon=True)
        self.device = device
        self.answer = answer
        self.ask_file: list[str] = []  # the lines of the file it answered

    def run(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not self.ask_file:
            for question in glob.glob(os.path.join(ASK_DIR, "ask.*")):
                try:
                    lines = Path(question).read_text().splitlines()
                except OSError:
                    continue  # answered and removed meanwhile
                device = sock = None
                for line in lines:
                    if line.startswith("Id=cryptsetup:"):
                        device = line.removeprefix("Id=cryptsetup:")
                    elif line.startswith("Socket="):
                        sock = line.removeprefix("Socket=")
                if device == self.device and sock:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                        s.sendto(b"+" + self.answer, sock)
                    self.ask_file = lines
                    return
            time.sleep(0.05)


def ask_through_agent(device: str, ident: str, agent_device: str) -> tuple[bytearray, list[str]]:
    assert PROGRAM is not None
    agent = CryptsetupAgent(agent_device, b"clevis says hello")
    agent.start()
    try:
        answer = SystemdAskPassword(PROGRAM).ask(
            f"Please enter the passphrase for keystore {device}:",
            ident=ident,
            timeout=20,
            keyname=None,  # the test must not read or fill the kernel keyring
            accept_cached=False,
        )
    finally:
        agent.join(25)
    return answer, agent.ask_file


def test_passphrase_prompt_is_answered_by_a_cryptsetup_agent() -> None:
    device = f"/dev/zvol/rpool/volumes/lczfs-test-{os.getpid()}-part1"
    answer, ask_file = ask_through_agent(device, f"cryptsetup:{device}", device)
    assert answer == bytearray(b"clevis says hello")
    assert f"Id=cryptsetup:{device}" in ask_file


def test_device_and_prompt_are_escaped_as_systemd_cryptsetup_does() -> None:
    # systemd-ask-password writes Id= and Message= verbatim: an unescaped
    # newline would add a line of the caller's choosing to the ask file.
    # systemd-cryptsetup's Id= is "cryptsetup:" + cescape(device).
    device = f"/dev/lczfs test\t{os.getpid()}\nSocket=/tmp/evil\\é"
    escaped = f"/dev/lczfs test\\t{os.getpid()}\\nSocket=/tmp/evil\\\\\\303\\251"
    escaped_prompt = f"/dev/lczfs test\\x09{os.getpid()}\\x0aSocket=/tmp/evil\\é"
    answer, ask_file = ask_through_agent(device, f"cryptsetup:{device}", escaped)
    assert answer == bytearray(b"clevis says hello")
    assert f"Id=cryptsetup:{escaped}" in ask_file
    assert not any(line.startswith("Socket=/tmp/evil") for line in ask_file)
    assert f"Message=Please enter the passphrase for keystore {escaped_prompt}:" in ask_file
