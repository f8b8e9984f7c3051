"""Escaping and bounding text for sd_notify and the journal (lczfs_unlockd.text)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lczfs_unlockd import text
from lczfs_unlockd.text import bound, escape

ROOT = Path(__file__).resolve().parents[2]

# Every character that ends a line for systemd ("\n\r"), the journal, a
# terminal or str.splitlines(), or that cannot be encoded as UTF-8.
LINE_BREAKERS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text, ünïcödé → ok", "plain text, ünïcödé → ok"),
        ("a\nb", "a\\nb"),
        ("a\r\nb", "a\\r\\nb"),
        ("tab\there", "tab\\there"),
        ("nul\x00", "nul\\x00"),
        ("esc\x1b[31mred", "esc\\x1b[31mred"),
        ("del\x7f", "del\\x7f"),
        ("nel\x85", "nel\\x85"),
        ("c1\x9b", "c1\\x9b"),
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("surrogate\udcff", "surrogate\\udcff"),
        ("back\\slash", "back\\slash"),  # kept: unit names are full of \x2d
    ],
)
def test_escape(raw, shown):
    assert escape(raw) == shown


def test_forged_notify_lines_stay_in_one_line():
    host = "evil\nREADY=1\nMAINPID=1\rERRNO=0"
    escaped = escape(f"pool rpool was last used by {host}")
    assert "\n" not in escaped and "\r" not in escaped
    assert escaped.endswith("evil\\nREADY=1\\nMAINPID=1\\rERRNO=0")


def test_escape_works_without_the_unicode_escape_codec():
    """The initrd's trimmed standard library has no unicode_escape: a fresh
    interpreter where that codec cannot be imported, as there."""
    code = (
        "import sys\n"
        "sys.modules['encodings.unicode_escape'] = None\n"
        "sys.modules['encodings.raw_unicode_escape'] = None\n"
        "try:\n"
        "    'x'.encode('unicode_escape')\n"
        "    raise SystemExit('the codec is still there')\n"
        "except LookupError:\n"
        "    pass\n"
        "from lczfs_unlockd.text import escape\n"
        "print(escape('a\\nb\\x85\\u2028\\x1b'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "a\\nb\\x85\\u2028\\x1b\n"


def test_text_module_imports_nothing_of_the_package():
    import lczfs_unlockd.text as module

    source = Path(module.__file__).read_text(encoding="utf-8")
    assert "from ." not in source and "import lczfs_unlockd" not in source
    assert "unicode_escape" not in source.replace("``unicode_escape``", "")


@given(st.text())
def test_escaped_text_is_one_line_and_valid_utf8(text):
    escaped = escape(text)
    assert not any(ch in escaped for ch in LINE_BREAKERS)
    assert escaped.splitlines() in ([escaped], [])
    assert all(ch.isprintable() or ch == " " or ord(ch) > 0x9F for ch in escaped)
    escaped.encode("utf-8")  # no lone surrogate left


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))))
def test_harmless_text_is_unchanged(text):
    assert escape(text) == text


# --- bound ---------------------------------------------------------------------------


def test_bound_keeps_short_text():
    assert bound("short", 100) == "short"


def test_bound_cuts_with_a_marker_saying_how_much():
    text = "x" * 5000
    cut = bound(text, 4000)
    assert len(cut.encode()) <= 4000
    head, _, marker = cut.partition("…")
    assert marker.startswith(" (") and marker.endswith(" more characters)")
    assert int(marker[2:].split()[0]) == 5000 - len(head)


def test_bound_never_splits_a_character_or_an_escape():
    text = escape("é\n" * 3000)
    cut = bound(text, 1001)
    assert len(cut.encode()) <= 1001
    head = cut.rpartition("…")[0]
    assert head.endswith(("é", "\\n"))
    cut.encode("utf-8")


@given(st.text(max_size=3000), st.integers(min_value=40, max_value=5000))
def test_bound_always_fits(text, limit):
    cut = bound(escape(text), limit)
    assert len(cut.encode()) <= limit
    if len(escape(text).encode()) <= limit:
        assert cut == escape(text)
    else:
        assert cut.endswith(" more characters)")


@pytest.mark.parametrize(
    ("value", "ok"),
    [("0", True), ("31", True), ("", False), ("\u00b2", False), ("\u0663", False),
     ("1 ", False), ("-1", False), ("9" * 21, False), ("9" * 20, True)],
)  # fmt: skip
def test_is_number_takes_ascii_digits_only(value, ok):
    assert text.is_number(value) is ok
