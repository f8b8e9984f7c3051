"""Wrapping-key derivation (known answers computed outside this code) and key-file reading."""

from __future__ import annotations

import os

import pytest

from lczfs_unlockd.errors import KeyFileError
from lczfs_unlockd.keyformat import _wipe_immutable, derive_wrapping_key, key_file_path
from lczfs_unlockd.secretbuf import read_bounded, wipe
from lczfs_unlockd.zfskeys import read_key_file

# Known answers.  The PBKDF2 vectors were computed with OpenSSL's CLI, not
# with Python:
#   openssl kdf -keylen 32 -kdfopt digest:SHA1 -kdfopt pass:"correct horse battery" \
#       -kdfopt hexsalt:8877665544332211 -kdfopt iter:1000 PBKDF2
# (pbkdf2salt=0x1122334455667788 as 8 little-endian bytes, the way libzfs
# hashes it after LE_64()).
PBKDF2_VECTORS = [
    (
        b"correct horse battery",
        0x1122334455667788,
        1000,
        "85d5cdff1a517e07c8a85f29c79bb8d78fde228e5d9a648da5a6d46c82c015eb",
    ),
    (
        b"password",
        1,
        350000,
        "652da2ac313bf2e3d937008d910b54701dab3c4f001103b37b77fcd990959e0d",
    ),
]


def derive(fmt, material, salt=0, iters=0):
    return derive_wrapping_key(
        fmt, bytearray(material), salt=salt, iters=iters, dataset="rpool/crypt", path="/b/k"
    )


@pytest.mark.parametrize(("passphrase", "salt", "iters", "expect"), PBKDF2_VECTORS)
def test_passphrase_known_answers(passphrase, salt, iters, expect):
    assert derive("passphrase", passphrase, salt, iters).hex() == expect
    # one trailing newline is ignored, like libzfs's getline() trim
    assert derive("passphrase", passphrase + b"\n", salt, iters).hex() == expect
    # only the first line counts; a NUL ends the passphrase (libzfs uses strlen)
    assert derive("passphrase", passphrase + b"\nsecond line\n", salt, iters).hex() == expect
    assert derive("passphrase", passphrase + b"\0junk", salt, iters).hex() == expect


def test_passphrase_salt_is_little_endian():
    big_endian = derive("passphrase", b"correct horse battery", 0x8877665544332211, 1000)
    assert big_endian.hex() != PBKDF2_VECTORS[0][3]


def test_hex_known_answer():
    text = "00112233445566778899aabbccddeeffFFEEDDCCBBAA99887766554433221100"
    expect = bytes.fromhex(text)
    assert bytes(derive("hex", text.encode())) == expect
    assert bytes(derive("hex", text.encode() + b"\n")) == expect


@pytest.mark.parametrize(
    ("material", "message"),
    [
        (b"ab" * 31, "holds 62 characters"),
        (b"ab" * 33, "holds 66 characters"),
        (b"ab" * 32 + b"\r\n", "holds 65 characters"),
        (b"ab" * 31 + b"g0", "not a hex digit"),
        (b"", "holds 0 characters"),
    ],
)
def test_bad_hex(material, message):
    with pytest.raises(KeyFileError, match=message) as info:
        derive("hex", material)
    assert "/b/k" in str(info.value) and "rpool/crypt" in str(info.value)


def test_raw_is_used_as_is_newlines_included():
    raw = bytes(range(22)) + b"\n" * 10
    assert bytes(derive("raw", raw)) == raw


@pytest.mark.parametrize("size", [0, 31, 33])
def test_raw_must_be_32_bytes(size):
    with pytest.raises(KeyFileError, match=f"holds {size} bytes; a raw key is exactly 32"):
        derive("raw", b"x" * size)


def test_empty_passphrase_and_unknown_format():
    with pytest.raises(KeyFileError, match="is empty"):
        derive("passphrase", b"\n", 1, 1000)
    with pytest.raises(KeyFileError, match="keyformat=none"):
        derive("none", b"x")


def test_wipe_zeroes_in_place():
    buf = bytearray(b"secret")
    wipe(buf)
    assert buf == bytearray(6)


def test_wipe_immutable_zeroes_bytes_object():
    data = bytes(bytearray(b"sixteen byte key"))  # a fresh object, not interned
    _wipe_immutable(data)
    assert data == bytes(16)


def test_key_file_path():
    assert key_file_path("file:///bootsecrets/k.key", "/bootsecrets") == "/bootsecrets/k.key"
    assert key_file_path("file:///bootsecrets/sub/k", "/bootsecrets") == "/bootsecrets/sub/k"
    assert key_file_path("file:///etc/k.key", "/bootsecrets") is None
    assert key_file_path("file:///bootsecretsX/k", "/bootsecrets") is None
    assert key_file_path("file:///bootsecrets/../etc/shadow", "/bootsecrets") is None
    assert key_file_path("prompt", "/bootsecrets") is None
    assert key_file_path("https://example.com/k", "/bootsecrets") is None


# --- reading key files beneath the mount point --------------------------------


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "bootsecrets"
    (root / "sub").mkdir(parents=True)
    (root / "k.key").write_bytes(b"ab" * 32 + b"\n")
    (root / "sub" / "k2.key").write_bytes(b"x" * 32)
    return root


def test_reads_key_files(store):
    assert read_key_file(str(store), f"{store}/k.key", dataset="d") == bytearray(b"ab" * 32 + b"\n")
    assert read_key_file(str(store), f"{store}/sub/k2.key", dataset="d") == bytearray(b"x" * 32)


def test_missing_key_file_names_dataset_and_path(store):
    with pytest.raises(KeyFileError) as info:
        read_key_file(str(store), f"{store}/none.key", dataset="rpool/crypt")
    assert f"key file {store}/none.key of rpool/crypt does not exist" in str(info.value)


def test_symlinked_key_file_refused(store, tmp_path):
    (tmp_path / "outside").write_bytes(b"ab" * 32)
    os.symlink(tmp_path / "outside", store / "link.key")
    with pytest.raises(KeyFileError, match="symlink"):
        read_key_file(str(store), f"{store}/link.key", dataset="d")


def test_symlinked_directory_refused(store, tmp_path):
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "k").write_bytes(b"x" * 32)
    os.symlink(tmp_path / "outdir", store / "dirlink")
    with pytest.raises(KeyFileError, match="symlink"):
        read_key_file(str(store), f"{store}/dirlink/k", dataset="d")


@pytest.mark.parametrize(
    "path", ["{s}/../escape.key", "/etc/passwd", "{s}", "{s}/./k.key", "{s}//k.key"]
)
def test_paths_outside_or_odd_are_refused(store, tmp_path, path):
    (tmp_path / "escape.key").write_bytes(b"x" * 32)
    with pytest.raises(KeyFileError, match="not beneath the keystore mount point"):
        read_key_file(str(store), path.format(s=store), dataset="d")


def test_directory_and_big_files_refused(store):
    with pytest.raises(KeyFileError, match="is not a regular file|cannot open"):
        read_key_file(str(store), f"{store}/sub", dataset="d")
    (store / "big.key").write_bytes(b"x" * 5000)
    with pytest.raises(KeyFileError, match="5000 bytes, more than a key can be"):
        read_key_file(str(store), f"{store}/big.key", dataset="d")


def test_fifo_is_refused_without_blocking(store):
    os.mkfifo(store / "fifo.key")
    with pytest.raises(KeyFileError):
        read_key_file(str(store), f"{store}/fifo.key", dataset="d")


def test_read_bounded_refuses_more_than_the_limit_and_wipes(tmp_path):
    path = tmp_path / "k"
    path.write_bytes(b"x" * 17)
    with open(path, "rb") as f:
        assert read_bounded(f.fileno(), 16) is None
    with open(path, "rb") as f:
        assert read_bounded(f.fileno(), 17) == bytearray(b"x" * 17)
