"""The libcryptsetup binding against real LUKS1/LUKS2 images.

The images are made with the real ``cryptsetup`` CLI in a temporary
directory.  This host has no device-mapper, so every unlock is check-only
(``name=None``): libcryptsetup derives the key and verifies it against the
keyslot digest without creating a mapping.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from lczfs_unlockd import cryptsetup, paths
from lczfs_unlockd.cryptsetup import LibCryptsetup, LuksVolume
from lczfs_unlockd.errors import (
    KeystoreError,
    NoTokenError,
    PinRefusedError,
    PinRequiredError,
    WrongKeyError,
)
from lczfs_unlockd.ports import MappingState, Token

CRYPTSETUP = shutil.which("cryptsetup")
pytestmark = pytest.mark.skipif(CRYPTSETUP is None, reason="the cryptsetup CLI is not installed")

PASSPHRASE = b"correct horse battery staple 7f3a"
WRONG = b"incorrect horse battery staple 7f3a"
KEY_FILE_CONTENT = b"\x00\x01binary key file\xff\xfe" * 4


def have_device_mapper() -> bool:
    # /dev/mapper/control may exist without the driver (it does on this host):
    # the kernel lists its misc device only when device-mapper is there.
    try:
        with open("/proc/misc") as f:
            return any(line.split()[-1:] == ["device-mapper"] for line in f)
    except OSError:
        return False


# Device-mapper decides what crypt_status() can say about a name.
HAVE_DEVICE_MAPPER = have_device_mapper()
LOGGER = "lczfs_unlockd.cryptsetup"


@dataclass(frozen=True)
class Image:
    kind: str
    path: Path
    key_file: Path  # accepted by a second keyslot


# luksFormat options per kind; pbkdf costs forced low so that tests take seconds.
FORMATS = {
    "luks1": ["--type", "luks1", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    "luks2-pbkdf2": ["--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    "luks2-argon2id": [
        "--type",
        "luks2",
        "--pbkdf",
        "argon2id",
        "--pbkdf-memory",
        "32768",
        "--pbkdf-parallel",
        "1",
        "--pbkdf-force-iterations",
        "4",
    ],
}


def cli(*args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    assert CRYPTSETUP is not None
    return subprocess.run(
        [CRYPTSETUP, "--batch-mode", *map(str, args)],
        input=stdin,
        capture_output=True,
        check=True,
        timeout=60,
    )


def make_image(directory: Path, kind: str) -> Image:
    path = directory / f"{kind}.img"
    with path.open("wb") as f:
        f.truncate(20 * 1024 * 1024)  # sparse; LUKS2's default header takes 16 MiB
    cli("luksFormat", *FORMATS[kind], "--key-file", "-", path, stdin=PASSPHRASE)
    key_file = directory / f"{kind}.key"
    key_file.write_bytes(KEY_FILE_CONTENT)
    key_file.chmod(0o600)
    pbkdf = FORMATS[kind][2:]  # the same cost options for the new keyslot
    cli("luksAddKey", *pbkdf, "--key-file", "-", path, key_file, stdin=PASSPHRASE)
    return Image(kind, path, key_file)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Image]:
    directory = tmp_path_factory.mktemp("luks")
    return {kind: make_image(directory, kind) for kind in FORMATS}


@pytest.fixture(params=sorted(FORMATS))
def image(request: pytest.FixtureRequest, images: dict[str, Image]) -> Image:
    return images[request.param]


@pytest.fixture
def luks2_copy(images: dict[str, Image], tmp_path: Path) -> Image:
    """A private copy of the LUKS2 image that a test may modify."""
    source = images["luks2-pbkdf2"]
    path = tmp_path / "copy.img"
    shutil.copyfile(source.path, path)
    return Image("luks2-pbkdf2", path, source.key_file)


@pytest.fixture
def cs() -> LibCryptsetup:
    return LibCryptsetup()


def assert_no_secret(text: str) -> None:
    for secret in (PASSPHRASE, WRONG, KEY_FILE_CONTENT):
        assert secret.decode("latin-1") not in text


# --- loading headers ---------------------------------------------------------


def test_luks_type(cs: LibCryptsetup, image: Image) -> None:
    with cs.open(str(image.path)) as dev:
        assert dev.luks_type == ("LUKS1" if image.kind == "luks1" else "LUKS2")


def test_missing_device_is_a_clear_error(cs: LibCryptsetup, tmp_path: Path) -> None:
    missing = str(tmp_path / "bootsecrets-part1")
    with pytest.raises(KeystoreError) as e:
        cs.open(missing)
    assert e.type is KeystoreError
    assert str(e.value) == (
        f"{missing} does not exist or is not a block device: check keystore.volume and "
        "keystore.partition, and that the pool is imported"
    )
    assert e.value.errno == errno.ENOTBLK


def test_directory_is_not_a_device(cs: LibCryptsetup, tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="does not exist or is not a block device") as e:
        cs.open(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_plain_file_is_not_luks(cs: LibCryptsetup, tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    with plain.open("wb") as f:
        f.truncate(4 * 1024 * 1024)
    with pytest.raises(KeystoreError) as e:
        cs.open(str(plain))
    assert str(e.value) == (
        f"{plain} is not a LUKS device: check keystore.volume and keystore.partition"
    )
    assert e.value.errno == errno.EINVAL


def test_tiny_file_cannot_hold_a_header(cs: LibCryptsetup, tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"LUKS\xba\xbe" + bytes(100))
    with pytest.raises(KeystoreError, match="cannot read a LUKS header from") as e:
        cs.open(str(tiny))
    assert str(tiny) in str(e.value)
    assert e.value.errno == errno.EIO


def test_corrupted_luks1_header(
    cs: LibCryptsetup, images: dict[str, Image], tmp_path: Path
) -> None:
    broken = tmp_path / "luks1-broken.img"
    shutil.copyfile(images["luks1"].path, broken)
    with broken.open("r+b") as f:
        f.write(os.urandom(4096))  # magic, cipher, keyslot table: LUKS1 has one header
    with pytest.raises(KeystoreError, match="is not a LUKS device") as e:
        cs.open(str(broken))
    assert str(broken) in str(e.value)


def test_luks2_survives_a_corrupted_primary_header(cs: LibCryptsetup, luks2_copy: Image) -> None:
    # LUKS2 keeps a second copy of its binary header and JSON area (at 16 KiB
    # with the default metadata size); libcryptsetup loads that one.
    with luks2_copy.path.open("r+b") as f:
        f.write(os.urandom(4096))
    with cs.open(str(luks2_copy.path)) as dev:
        assert dev.luks_type == "LUKS2"
        dev.activate_by_passphrase(None, bytearray(PASSPHRASE), read_only=True)


def test_luks2_with_both_headers_wiped(cs: LibCryptsetup, luks2_copy: Image) -> None:
    with luks2_copy.path.open("r+b") as f:
        f.write(bytes(32 * 1024))
    with pytest.raises(KeystoreError, match="is not a LUKS device") as e:
        cs.open(str(luks2_copy.path))
    assert str(luks2_copy.path) in str(e.value)


# --- passphrases -------------------------------------------------------------


@pytest.mark.parametrize("read_only", [True, False])
def test_right_passphrase_is_accepted(cs: LibCryptsetup, image: Image, read_only: bool) -> None:
    passphrase = bytearray(PASSPHRASE)
    with cs.open(str(image.path)) as dev:
        dev.activate_by_passphrase(None, passphrase, read_only=read_only)
    # The binding released its view of the buffer: the caller can wipe it.
    passphrase[:] = bytes(len(passphrase))
    passphrase.clear()


def test_wrong_passphrase_raises_wrong_key(cs: LibCryptsetup, image: Image) -> None:
    with cs.open(str(image.path)) as dev, pytest.raises(WrongKeyError) as e:
        dev.activate_by_passphrase(None, bytearray(WRONG), read_only=True)
    assert str(e.value) == f"no key slot of {image.path} accepts this passphrase"
    assert e.value.errno == errno.EPERM
    assert_no_secret(str(e.value))
    assert_no_secret(repr(e.value.args))


def test_empty_passphrase_is_wrong_not_a_crash(cs: LibCryptsetup, image: Image) -> None:
    empty = bytearray()
    with cs.open(str(image.path)) as dev, pytest.raises(WrongKeyError):
        dev.activate_by_passphrase(None, empty, read_only=True)
    empty.extend(b"still resizable")


def test_prefix_of_passphrase_is_wrong(cs: LibCryptsetup, image: Image) -> None:
    # The length comes from the bytearray, not from a NUL terminator.
    with cs.open(str(image.path)) as dev, pytest.raises(WrongKeyError):
        dev.activate_by_passphrase(None, bytearray(PASSPHRASE[:-1]), read_only=True)


def test_passphrase_with_nul_byte(cs: LibCryptsetup, tmp_path: Path) -> None:
    binary = b"pass\x00phrase"
    path = tmp_path / "nul.img"
    with path.open("wb") as f:
        f.truncate(20 * 1024 * 1024)
    cli("luksFormat", *FORMATS["luks2-pbkdf2"], "--key-file", "-", path, stdin=binary)
    with cs.open(str(path)) as dev:
        dev.activate_by_passphrase(None, bytearray(binary), read_only=True)
        with pytest.raises(WrongKeyError):
            dev.activate_by_passphrase(None, bytearray(b"pass"), read_only=True)


# --- key files ---------------------------------------------------------------


def test_key_file_is_accepted(cs: LibCryptsetup, image: Image) -> None:
    with cs.open(str(image.path)) as dev:
        dev.activate_by_keyfile(None, str(image.key_file), read_only=True)


def test_wrong_key_file_is_rejected(cs: LibCryptsetup, image: Image, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(KEY_FILE_CONTENT[:-1] + b"!")
    with cs.open(str(image.path)) as dev, pytest.raises(WrongKeyError) as e:
        dev.activate_by_keyfile(None, str(wrong), read_only=True)
    assert str(e.value).startswith(f"no key slot of {image.path} accepts the key file {wrong}")
    assert_no_secret(str(e.value))


def test_passphrase_file_also_works_as_key_file(
    cs: LibCryptsetup, images: dict[str, Image], tmp_path: Path
) -> None:
    # A key file is the passphrase slot's input read whole: no newline stripping.
    as_file = tmp_path / "passphrase.key"
    as_file.write_bytes(PASSPHRASE)
    with cs.open(str(images["luks2-pbkdf2"].path)) as dev:
        dev.activate_by_keyfile(None, str(as_file), read_only=True)
        as_file.write_bytes(PASSPHRASE + b"\n")
        with pytest.raises(WrongKeyError):
            dev.activate_by_keyfile(None, str(as_file), read_only=True)


def test_missing_key_file(cs: LibCryptsetup, images: dict[str, Image], tmp_path: Path) -> None:
    missing = tmp_path / "no-such.key"
    image = images["luks2-pbkdf2"]
    with cs.open(str(image.path)) as dev, pytest.raises(KeystoreError) as e:
        dev.activate_by_keyfile(None, str(missing), read_only=True)
    assert e.type is KeystoreError
    assert str(e.value) == (
        f"cannot read key file {missing} for {image.path}: check that it exists and is readable"
    )
    assert e.value.errno == errno.ENOENT


# --- tokens ------------------------------------------------------------------


def test_no_tokens_on_fresh_images(cs: LibCryptsetup, image: Image) -> None:
    with cs.open(str(image.path)) as dev:
        assert dev.tokens() == []


@pytest.mark.parametrize("pin", [None, bytearray(b"1234"), bytearray()])
def test_token_activation_without_tokens(
    cs: LibCryptsetup, image: Image, pin: bytearray | None
) -> None:
    with cs.open(str(image.path)) as dev, pytest.raises(NoTokenError) as e:
        dev.activate_by_token(None, pin, read_only=True)
    assert f"no token of {image.path} can be used" in str(e.value)
    # LUKS2: -ENOENT (nothing eligible); LUKS1 has no tokens at all: -EINVAL.
    assert e.value.errno == (errno.EINVAL if image.kind == "luks1" else errno.ENOENT)
    assert_no_secret(str(e.value))


def test_token_without_plugin_counts_but_cannot_unlock(
    cs: LibCryptsetup, luks2_copy: Image
) -> None:
    token = {"type": "user-test", "keyslots": ["1"], "note": "no plugin exists for this type"}
    cli("token", "import", "--json-file", "-", luks2_copy.path, stdin=json.dumps(token).encode())
    with cs.open(str(luks2_copy.path)) as dev:
        (t,) = dev.tokens()
        assert (t.id, t.type) == (0, "user-test")
        # Named with the file libcryptsetup would have needed.
        assert t.unusable is not None
        assert t.unusable.startswith("no plugin /")
        assert t.unusable.endswith(
            "/libcryptsetup-token-user-test.so: install it and rebuild the initrd"
        )
        with pytest.raises(NoTokenError):
            dev.activate_by_token(None, None, read_only=True)
        # The other methods still work beside a useless token.
        dev.activate_by_keyfile(None, str(luks2_copy.key_file), read_only=True)


@pytest.mark.parametrize(
    ("code", "pin_given", "kind", "words"),
    [
        (errno.ENOANO, False, PinRequiredError, "needs a PIN"),
        (errno.ENOANO, True, PinRequiredError, "did not accept this PIN: try again"),
        # systemd's TPM2 plugin, wrong PIN (seen in the VM: TPM_RC_AUTH_FAIL)
        (
            errno.ENOTRECOVERABLE,
            True,
            PinRefusedError,
            "refused this PIN or failed (state not recoverable): a wrong PIN, or the TPM's",
        ),
        # ...the same code without a PIN is no PIN problem (a PCR mismatch)
        (errno.ENOTRECOVERABLE, False, KeystoreError, "with a token: state not recoverable"),
        (errno.ENOLCK, True, KeystoreError, "is locked out"),
        (errno.EPERM, False, WrongKeyError, "no key slot accepts"),
        (errno.EAGAIN, False, NoTokenError, "no token of"),
    ],
)
def test_token_failures_are_told_apart(
    cs: LibCryptsetup, luks2_copy: Image, code: int, pin_given: bool, kind: type, words: str
) -> None:
    with cs.open(str(luks2_copy.path)) as dev:
        assert isinstance(dev, LuksVolume)
        err = dev._token_error("secretsroot", code, pin_given=pin_given)
    assert type(err) is kind, err
    assert words in str(err), str(err)
    assert err.errno == code


def test_token_type_from_the_header_cannot_forge_lines(
    cs: LibCryptsetup, luks2_copy: Image
) -> None:
    token = {"type": "evil\nSTATUS=unlocked", "keyslots": ["1"]}
    cli("token", "import", "--json-file", "-", luks2_copy.path, stdin=json.dumps(token).encode())
    with cs.open(str(luks2_copy.path)) as dev:
        (t,) = dev.tokens()
    assert t.type == "evil\\x0aSTATUS=unlocked"
    assert t.unusable is not None and "\n" not in t.unusable


def test_plugin_present_but_not_loadable_is_told_apart(tmp_path: Path) -> None:
    missing = cryptsetup._plugin_problem(str(tmp_path), "systemd-tpm2")
    assert missing == (
        f"no plugin {tmp_path}/libcryptsetup-token-systemd-tpm2.so: install it and rebuild the initrd"
    )
    (tmp_path / "libcryptsetup-token-systemd-tpm2.so").write_bytes(b"")
    broken = cryptsetup._plugin_problem(str(tmp_path), "systemd-tpm2")
    assert "is there but could not be loaded" in broken
    assert "without token plugin support" in cryptsetup._plugin_problem(None, "systemd-tpm2")


def test_built_in_token_type_has_a_handler(cs: LibCryptsetup, luks2_copy: Image) -> None:
    cli("token", "add", "--key-description", "lczfs-test", luks2_copy.path)
    with cs.open(str(luks2_copy.path)) as dev:
        assert dev.tokens() == [Token(0, "luks2-keyring")]


# --- mappings ----------------------------------------------------------------


def test_status_of_unknown_name(cs: LibCryptsetup) -> None:
    # Observed here: without device-mapper, crypt_status() cannot ask the
    # kernel and returns CRYPT_INVALID (it also logs "Cannot initialize
    # device-mapper"); with device-mapper an unknown name is CRYPT_INACTIVE.
    expected = MappingState.INACTIVE if HAVE_DEVICE_MAPPER else MappingState.INVALID
    assert cs.status("lczfs-test-nonexistent") is expected


def test_deactivate_unknown_name(cs: LibCryptsetup) -> None:
    if HAVE_DEVICE_MAPPER:
        cs.deactivate("lczfs-test-nonexistent")  # nothing to do is not an error
        return
    with pytest.raises(KeystoreError) as e:
        cs.deactivate("lczfs-test-nonexistent")
    assert str(e.value).startswith("cannot deactivate /dev/mapper/lczfs-test-nonexistent: ")
    assert e.value.errno == errno.ENODEV


def test_named_activation(cs: LibCryptsetup, images: dict[str, Image]) -> None:
    image = images["luks2-pbkdf2"]
    name = "lczfs-test-keystore"
    with cs.open(str(image.path)) as dev:
        if HAVE_DEVICE_MAPPER:
            dev.activate_by_passphrase(name, bytearray(PASSPHRASE), read_only=True)
            try:
                assert cs.status(name) in (MappingState.ACTIVE, MappingState.BUSY)
            finally:
                cs.deactivate(name)
            assert cs.status(name) is MappingState.INACTIVE
            return
        with pytest.raises(KeystoreError) as e:
            dev.activate_by_passphrase(name, bytearray(PASSPHRASE), read_only=True)
    assert e.type is KeystoreError
    assert str(e.value).startswith(
        f"cannot activate {image.path} as /dev/mapper/{name} with a passphrase: "
    )
    assert "include dm_mod and dm_crypt in the initrd" in str(e.value)
    assert_no_secret(str(e.value))


# --- handle lifetime ---------------------------------------------------------


def test_close_is_idempotent_and_use_after_close_fails(
    cs: LibCryptsetup, images: dict[str, Image]
) -> None:
    dev = cs.open(str(images["luks1"].path))
    assert isinstance(dev, LuksVolume)
    dev.close()
    dev.close()
    with pytest.raises(RuntimeError, match="used after close"):
        dev.tokens()
    with pytest.raises(RuntimeError):
        dev.activate_by_passphrase(None, bytearray(PASSPHRASE), read_only=True)


def test_many_handles(cs: LibCryptsetup, images: dict[str, Image]) -> None:
    for _ in range(50):
        with cs.open(str(images["luks1"].path)) as dev:
            assert dev.luks_type == "LUKS1"


def test_library_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cryptsetup, "_lib", None)
    monkeypatch.setattr(paths, "LIBCRYPTSETUP", ("libcryptsetup.so.999", str(tmp_path / "x.so")))
    with pytest.raises(KeystoreError) as e:
        LibCryptsetup().open("/dev/null")
    assert "cannot load libcryptsetup (libcryptsetup.so.999: " in str(e.value)
    assert e.value.errno == errno.ELIBACC


# --- logging -----------------------------------------------------------------


def test_library_messages_reach_python_logging(
    cs: LibCryptsetup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with pytest.raises(KeystoreError):
        cs.open(str(tmp_path / "missing"))
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("does not exist or access denied" in m for m in messages), messages
    # libcryptsetup's errors are shown (WARNING), its chatter only with debug
    errors = [r for r in caplog.records if r.name == LOGGER and "access denied" in r.getMessage()]
    assert all(r.levelno == logging.WARNING for r in errors)
    assert cryptsetup.last_error().endswith("does not exist or access denied.")


def test_debug_messages_never_contain_key_material(
    cs: LibCryptsetup, images: dict[str, Image], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    cryptsetup.set_debug(True)
    try:
        with cs.open(str(images["luks2-argon2id"].path)) as dev:
            dev.activate_by_passphrase(None, bytearray(PASSPHRASE), read_only=True)
            with pytest.raises(WrongKeyError):
                dev.activate_by_passphrase(None, bytearray(WRONG), read_only=True)
            dev.activate_by_keyfile(None, str(images["luks2-argon2id"].key_file), read_only=True)
    finally:
        cryptsetup.set_debug(False)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert "libcryptsetup debug: " in text
    assert "keyslot" in text.lower()
    assert_no_secret(text)


# --- the volume-key path (measured unlocks) ------------------------------------


def dumped_volume_key(image: Image) -> bytes:
    """The volume key as the cryptsetup CLI dumps it, not through the binding."""
    out = cli(
        "luksDump", "--dump-volume-key", "--key-file", "-", image.path, stdin=PASSPHRASE
    ).stdout.decode()
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(("MK dump:", "Volume key:")))
    text = lines[start].split(":", 1)[1]
    for line in lines[start + 1 :]:
        if ":" in line or not line.strip():
            break
        text += line
    return bytes.fromhex(text.replace(" ", "").replace("\t", ""))


def dumped_uuid(image: Image) -> str:
    return cli("luksUUID", image.path).stdout.decode().strip()


@pytest.mark.parametrize("method", ["passphrase", "key file"])
def test_the_hook_gets_the_volume_key_and_it_is_wiped(
    cs: LibCryptsetup, image: Image, method: str
) -> None:
    seen: list[bytes] = []
    buffers: list[bytearray] = []

    def hook(key: bytearray) -> None:
        seen.append(bytes(key))
        buffers.append(key)

    with cs.open(str(image.path)) as luks:
        assert luks.uuid == dumped_uuid(image)
        if method == "passphrase":
            luks.activate_by_passphrase(
                None, bytearray(PASSPHRASE), read_only=True, on_volume_key=hook
            )
        else:
            luks.activate_by_keyfile(None, str(image.key_file), read_only=True, on_volume_key=hook)
    assert seen == [dumped_volume_key(image)]
    assert buffers[0] == bytearray(len(buffers[0]))  # zeroed after the call


def test_a_wrong_passphrase_never_reaches_the_hook(cs: LibCryptsetup, image: Image) -> None:
    def hook(key: bytearray) -> None:
        raise AssertionError("called")

    with cs.open(str(image.path)) as luks, pytest.raises(WrongKeyError):
        luks.activate_by_passphrase(None, bytearray(WRONG), read_only=True, on_volume_key=hook)


def test_a_failing_hook_stops_the_activation(cs: LibCryptsetup, images: dict[str, Image]) -> None:
    class Boom(Exception):
        pass

    kept: list[bytearray] = []

    def hook(key: bytearray) -> None:
        kept.append(key)
        raise Boom

    with cs.open(str(images["luks2-pbkdf2"].path)) as luks, pytest.raises(Boom):
        luks.activate_by_passphrase(
            "lczfs-never", bytearray(PASSPHRASE), read_only=True, on_volume_key=hook
        )
    assert kept[0] == bytearray(len(kept[0]))
    assert cs.status("lczfs-never") in (MappingState.INACTIVE, MappingState.INVALID)


def test_a_token_through_the_volume_key_without_tokens(
    cs: LibCryptsetup, images: dict[str, Image]
) -> None:
    def hook(key: bytearray) -> None:
        raise AssertionError("called")

    with cs.open(str(images["luks2-pbkdf2"].path)) as luks, pytest.raises(NoTokenError):
        luks.activate_by_token(None, None, read_only=True, on_volume_key=hook)


def test_plugin_params_match_systemds_struct() -> None:
    import ctypes

    from lczfs_unlockd.ports import Tpm2Policy

    params = cryptsetup._tpm2_params(Tpm2Policy(signature="/s.json", pcrlock=None))
    # uint32_t search_pcr_mask; const char *device, *signature_path, *pcrlock_path
    assert ctypes.sizeof(params) == 8 + 3 * ctypes.sizeof(ctypes.c_void_p)
    assert cryptsetup._Tpm2PluginParams.device.offset == 8
    assert params.search_pcr_mask == 0xFFFFFFFF
    assert (params.device, params.signature_path, params.pcrlock_path) == (None, b"/s.json", None)
