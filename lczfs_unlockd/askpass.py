"""Passphrase and PIN prompts through systemd's password agents.

``systemd-ask-password`` reaches whatever agent is running (console, Plymouth,
``systemd-tty-ask-password-agent``, remote unlock over SSH), and with
``--keyname=cryptsetup --accept-cached`` shares the kernel keyring cache with
systemd-cryptsetup, so a passphrase typed once can open several volumes.
The answer travels on the program's stdout pipe straight into a bytearray.
"""

from __future__ import annotations

import math
import os

from . import paths
from .errors import CommandTimeout, PromptError
from .process import run_secret
from .secretbuf import wipe

MAX_PASSPHRASE = 4096
EXIT_MARGIN = 10.0  # seconds after its --timeout for systemd-ask-password to exit

# The prompt's --id: "cryptsetup:<device>" is what systemd-cryptsetup gives
# a passphrase prompt ("cryptsetup:" + cescape(source device), get_password()
# in src/cryptsetup/cryptsetup.c), and what agents written for crypttab
# volumes answer: clevis-luks-askpass matches Id=cryptsetup:* and takes the
# rest as the LUKS device.  systemd-ask-password writes the id verbatim into
# the ask file every agent parses, so it is escaped here exactly as systemd
# escapes it: a newline cannot add a line, and "cryptsetup:<device>" comes out
# byte for byte as systemd-cryptsetup's.  (systemd asks token PINs with no id
# at all: an agent must not answer a PIN prompt with the volume's passphrase.)
#
# systemd's cescape(): these get a letter, other bytes below 0x20 or from 0x7f
# on a 3-digit octal escape (src/basic/escape.c).
_CESCAPE = {
    0x07: "\\a",
    0x08: "\\b",
    0x0C: "\\f",
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
    0x0B: "\\v",
    0x5C: "\\\\",
    0x22: '\\"',
    0x27: "\\'",
}


def _cescape(text: str) -> str:
    return "".join(
        _CESCAPE.get(b) or (f"\\{b:03o}" if b < 0x20 or b >= 0x7F else chr(b))
        for b in os.fsencode(text)
    )


class SystemdAskPassword:
    def __init__(self, program: str | None = None) -> None:
        self.program = program or paths.SYSTEMD_ASK_PASSWORD

    def argv(
        self, prompt: str, *, ident: str, timeout: float, keyname: str | None, accept_cached: bool
    ) -> list[str]:
        argv = [self.program, f"--id={_cescape(ident)}"]
        if keyname:
            argv.append(f"--keyname={keyname}")
        argv += [
            "--icon=drive-harddisk",
            # 0 and infinity both mean no limit; systemd spells that 0.
            f"--timeout={math.ceil(timeout)}s"
            if timeout and math.isfinite(timeout)
            else "--timeout=0",
        ]
        if accept_cached and keyname:
            argv.append("--accept-cached")
        # systemd-ask-password writes the prompt verbatim into the ask file
        # that every agent parses: a newline in it would add a line (a second
        # Socket=, say) of the caller's choosing.
        argv += ["--", "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in prompt)]
        return argv

    def ask(
        self, prompt: str, *, ident: str, timeout: float, keyname: str | None, accept_cached: bool
    ) -> bytearray:
        argv = self.argv(
            prompt, ident=ident, timeout=timeout, keyname=keyname, accept_cached=accept_cached
        )
        try:
            returncode, secret, stderr = run_secret(
                argv,
                limit=MAX_PASSPHRASE,
                # The program's own --timeout, and a margin for it to exit.
                timeout=timeout + EXIT_MARGIN if timeout and math.isfinite(timeout) else None,
            )
        except CommandTimeout as exc:
            raise PromptError(f"no passphrase was entered ({exc})") from None
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
