"""The man pages: they render without warnings and document every key, command and option.

What is documented is read from the code (config's key lists, each
command's ``--help``), so a new option without a word in the man page fails
here, naming it.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lczfs_unlockd import cli, config

MAN = Path(__file__).resolve().parents[2] / "docs" / "man"
DAEMON = MAN / "lczfs-unlockd.8"
CONFIG = MAN / "lczfs-unlockd.toml.5"


@pytest.mark.parametrize("page", [DAEMON, CONFIG], ids=lambda p: p.name)
def test_the_page_renders_without_warnings(page: Path) -> None:
    groff = shutil.which("groff")
    assert groff, "groff (groff-base) is in scripts/setup-host's package list"
    out = subprocess.run(
        [groff, "-man", "-ww", "-z", str(page)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr


def _documented(page: Path) -> str:
    # Roff escapes of a hyphen (\-) read as plain text.
    return page.read_text().replace("\\-", "-")


@pytest.mark.parametrize(
    "key", [k for k in (*config.TOP_KEYS, *config.KEYSTORE_KEYS) if k != "keystore"]
)
def test_every_config_key_has_an_entry(key: str) -> None:
    entries = re.findall(r"^\.BR? (\w+)", _documented(CONFIG), re.M)
    assert key in entries, f"{key}: no .TP entry in {CONFIG.name}"


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(argv)
    return out.getvalue()


def _options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", help_text)) - {"--help"}


@pytest.mark.parametrize("command", ["run", "check-config", *cli.OPERATIONS])
def test_every_command_and_option_is_documented(command: str) -> None:
    text = _documented(DAEMON)
    assert re.search(rf"^\.SS {re.escape(command)}\b", text, re.M), (
        f"{command}: no .SS section in {DAEMON.name}"
    )
    section = text.split(f".SS {command}", 1)[1].split("\n.SS ", 1)[0].split("\n.SH ", 1)[0]
    missing = sorted(o for o in _options(_help([command, "--help"])) if o not in section)
    assert not missing, f"{command}: options not in its section of {DAEMON.name}: {missing}"
