"""Passphrase and PIN prompts through systemd's password agents.

``systemd-ask-password`` reaches whatever agent is running (console, Plymouth,
``systemd-tty-ask-password-agent``, remote unlock over SSH), and with
``--keyname=cryptsetup --accept-cached`` shares the kernel keyring cache with
systemd-cryptsetup, so a passphrase typed once can open several volumes.
The answer travels on the program's stdout pipe straight into a bytearray.
"""

from __future__ import annotations

import math

from . import paths
from .errors import PromptError
from .process import run_secret
from .secretbuf import wipe

MAX_PASSPHRASE = 4096


class SystemdAskPassword:
    def __init__(self, program: str | None = None) -> None:
        self.program = program or paths.SYSTEMD_ASK_PASSWORD

    def argv(
        self, prompt: str, *, ident: str, timeout: float, keyname: str | None, accept_cached: bool
    ) -> list[str]:
        argv = [self.program, f"--id={ident}"]
        if keyname:
            argv.append(f"--keyname={keyname}")
        argv += [
            "--icon=drive-harddisk",
            f"--timeout={math.ceil(timeout)}s" if timeout else "--timeout=0",
        ]
        if accept_cached and keyname:
            argv.append("--accept-cached")
        argv += ["--", prompt]
        return argv

    def ask(
        self, prompt: str, *, ident: str, timeout: float, keyname: str | None, accept_cached: bool
    ) -> bytearray:
        returncode, secret, stderr = run_secret(
            self.argv(
                prompt, ident=ident, timeout=timeout, keyname=keyname, accept_cached=accept_cached
            ),
            limit=MAX_PASSPHRASE,
        )
        if returncode != 0:
            wipe(secret)
            reason = (
                stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {returncode}"
            )
            raise PromptError(f"no passphrase was entered ({reason})")
        # One answer per line; drop the newline that ends it.
        if secret.endswith(b"\n"):
            secret[-1] = 0
            del secret[-1]
        return secret
