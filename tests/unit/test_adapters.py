"""Parsers and pure helpers of the real adapters."""

from __future__ import annotations

import pytest

from lczfs_unlockd.filesystem import _unescape, mount_points
from lczfs_unlockd.unitnames import cryptsetup_unit, escape, escape_path, mount_unit
from lczfs_unlockd.zpool import parse_import_listing, parse_properties

ONLINE = """\
   pool: rpool
     id: 1234567890
  state: ONLINE
 action: The pool can be imported using its name or numeric identifier.
 config:

\trpool       ONLINE
\t  vda       ONLINE
"""

DEGRADED = """\
   pool: tank
     id: 42
  state: ONLINE
 action: The pool can be imported using its name or numeric identifier.
 config:

\ttank        ONLINE
\t  vdc       ONLINE

   pool: rpool
     id: 9876
  state: DEGRADED
 status: One or more devices are missing from the system.
 action: The pool can be imported despite missing or damaged devices.  The
\tfault tolerance of the pool may be compromised if imported.
   see: https://openzfs.github.io/openzfs-docs/msg/ZFS-8000-2Q
 config:

\trpool                     DEGRADED
\t  mirror-0                DEGRADED
\t    virtio-disk1          ONLINE
\t    11754930211446470342  UNAVAIL
"""

UNAVAIL = """\
   pool: rpool
     id: 9876
  state: UNAVAIL
 status: One or more devices are missing from the system.
 action: The pool cannot be imported. Attach the missing
\tdevices and try again.
 config:

\trpool        UNAVAIL  insufficient replicas
\t  vda        ONLINE
\t  vdb        UNAVAIL
"""


def test_online_listing():
    scan = parse_import_listing(ONLINE, "rpool")
    assert scan.state == "ONLINE" and scan.missing == ()


def test_degraded_listing_picks_the_right_pool_and_missing_vdev():
    scan = parse_import_listing(DEGRADED, "rpool")
    assert scan.state == "DEGRADED"
    assert scan.missing == ("11754930211446470342",)
    assert "missing from the system" in scan.detail
    assert "fault tolerance of the pool may be compromised" in scan.detail
    assert parse_import_listing(DEGRADED, "tank").state == "ONLINE"


def test_unavailable_listing():
    scan = parse_import_listing(UNAVAIL, "rpool")
    assert scan.state == "UNAVAIL" and scan.missing == ("vdb",)


def test_absent_pool():
    assert parse_import_listing("no pools available to import\n", "rpool").state is None
    assert parse_import_listing(ONLINE, "other").state is None


def test_healthiest_duplicate_wins():
    assert parse_import_listing(UNAVAIL + "\n" + ONLINE, "rpool").state == "ONLINE"


def test_properties():
    text = (
        "rpool/crypt\tencryption\taes-256-gcm\n"
        "rpool/crypt\tencryptionroot\trpool/crypt\n"
        "rpool/crypt\tkeyformat\tpassphrase\n"
        "rpool/crypt\tkeylocation\tfile:///bootsecrets/a b.key\n"
        "rpool/crypt\tkeystatus\tunavailable\n"
        "rpool/crypt\tpbkdf2salt\t18446744073709551615\n"
        "rpool/crypt\tpbkdf2iters\t350000\n"
        "rpool/plain\tencryption\toff\n"
        "rpool/plain\tencryptionroot\t-\n"
    )
    crypt, plain = parse_properties(text)
    assert crypt.name == "rpool/crypt"
    assert crypt.keylocation == "file:///bootsecrets/a b.key"
    assert crypt.pbkdf2salt == 2**64 - 1 and crypt.pbkdf2iters == 350000
    assert plain.encryption == "off" and plain.encryption_root == "-"


@pytest.mark.parametrize(
    ("text", "escaped"),
    [("secretsroot", "secretsroot"), ("lczfs-keystore", r"lczfs\x2dkeystore"),
     ("a b", r"a\x20b"), (".hidden", r"\x2ehidden"), ("ü", r"\xc3\xbc"), ("a/b", "a-b")],
)  # fmt: skip
def test_escape(text, escaped):
    assert escape(text) == escaped


def test_unit_names():
    assert mount_unit("/bootsecrets") == "bootsecrets.mount"
    assert mount_unit("/run/lczfs/key-store/") == r"run-lczfs-key\x2dstore.mount"
    assert escape_path("/") == "-"
    assert cryptsetup_unit("secretsroot") == "systemd-cryptsetup@secretsroot.service"


def test_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw,relatime - tmpfs tmpfs rw\n"
        "40 22 253:0 / /bootsecrets ro,nosuid,nodev,noexec - ext4 /dev/mapper/k ro\n"
        "41 22 0:50 / /with\\040space rw - tmpfs none rw\n"
    )
    assert mount_points(str(info)) == ["/", "/bootsecrets", "/with space"]
    assert _unescape("a\\134b") == "a\\b"


@pytest.mark.parametrize(
    ("timeout", "flag"),
    [(0.0, "--timeout=0"), (float("inf"), "--timeout=0"), (90.5, "--timeout=91s")],
)
def test_prompt_timeout_of_infinity_means_no_limit(timeout, flag):
    from lczfs_unlockd.askpass import SystemdAskPassword

    argv = SystemdAskPassword("systemd-ask-password").argv(
        "Passphrase:", ident="cryptsetup:/dev/x", timeout=timeout, keyname=None, accept_cached=False
    )
    assert flag in argv


def test_a_guid_in_other_digits_is_no_guid_and_no_traceback():
    """ "id: ²" passes str.isdigit(); int() would raise."""
    forged = ONLINE.replace("id: 1234567890", "id: \u00b21234567890")
    assert forged != ONLINE
    scan = parse_import_listing(forged, "rpool")
    assert scan.state == "ONLINE" and scan.guid is None
