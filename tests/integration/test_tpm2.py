"""The TPM2 adapter (lczfs_unlockd/tpm2.py) against a real software TPM.

Each test gets its own swtpm (``swtpm socket --tpm2`` on two free TCP
ports, state copied from one ``swtpm_setup`` run with the sha1 and sha256
banks allocated) and talks to it through the real tpm2-tss libraries and
their swtpm TCTI.  What the TPM holds afterwards is read back with
tpm2-tools (``tpm2_pcrread``, ``tpm2_getcap``), a reader independent of
the adapter; the expected values are computed here with hashlib.

scripts/setup-host installs all of it; the tests skip without it, except
under CI (``CI=true``), where a missing piece is a failure.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lczfs_unlockd import paths, tpm2
from lczfs_unlockd.errors import TpmError
from lczfs_unlockd.tpm2 import Tpm2Device

LOGGER = "lczfs_unlockd.tpm2"
PROGRAMS = ("swtpm", "swtpm_setup", "tpm2_pcrread", "tpm2_getcap")
LIBRARIES = (*paths.LIBTSS2_ESYS[:1], *paths.LIBTSS2_TCTILDR[:1], "libtss2-tcti-swtpm.so.0")
D1 = hashlib.sha1(b"first").digest()
D256 = hashlib.sha256(b"first").digest()


def _missing() -> str | None:
    programs = [p for p in PROGRAMS if shutil.which(p) is None]
    if programs:
        return f"not installed: {', '.join(programs)} (scripts/setup-host installs them)"
    for name in LIBRARIES:
        try:
            ctypes.CDLL(name)
        except OSError:
            return f"cannot load {name} (scripts/setup-host installs tpm2-tss)"
    return None


def unavailable(reason: str) -> None:
    """Skip, or fail under CI: CI must never pass because the TPM was not there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kw)  # type: ignore[no-any-return]


# --- the software TPM ------------------------------------------------------------


@pytest.fixture(scope="module")
def tpm_state(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Manufactured swtpm states, one per bank set, made once per module."""
    reason = _missing()
    if reason:
        unavailable(reason)
    made: dict[str, Path] = {}

    def state(banks: str) -> Path:
        if banks not in made:
            path = tmp_path_factory.mktemp(f"swtpm-{banks.replace(',', '-')}")
            result = _run(
                ["swtpm_setup", "--tpm2", "--tpm-state", str(path), "--pcr-banks", banks,
                 "--overwrite"]
            )  # fmt: skip
            assert result.returncode == 0, result.stdout + result.stderr
            made[banks] = path
        return made[banks]

    return state


def _free_port_pair() -> int:
    """A port P with P and P+1 free (swtpm's TCTI finds the control channel at P+1)."""
    for _ in range(100):
        port = random.randrange(20000, 60000, 2)
        sockets = []
        try:
            for p in (port, port + 1):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise AssertionError("no two free consecutive ports")


@dataclass
class Swtpm:
    port: int
    state: Path

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def pcr(self, bank: str, index: int) -> bytes:
        """The PCR as tpm2_pcrread reads it."""
        result = _run(["tpm2_pcrread", "-T", self.tcti, f"{bank}:{index}"])
        assert result.returncode == 0, result.stderr
        match = re.search(rf"^\s*{index}\s*:\s*0x([0-9A-Fa-f]+)\s*$", result.stdout, re.M)
        assert match, result.stdout
        return bytes.fromhex(match[1])

    def allocated_banks(self) -> list[str]:
        """The banks with PCRs allocated, as tpm2_getcap pcrs lists them."""
        result = _run(["tpm2_getcap", "-T", self.tcti, "pcrs"])
        assert result.returncode == 0, result.stderr
        listed = re.findall(r"^\s*-\s*(\w+)\s*:\s*\[(.*)\]", result.stdout, re.M)
        assert listed, result.stdout
        return [bank for bank, pcrs in listed if pcrs.strip()]


def _start(state: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    for _ in range(5):
        port = _free_port_pair()
        process = subprocess.Popen(
            ["swtpm", "socket", "--tpm2",
             "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
             "--tpmstate", f"dir={state}", "--flags", "not-need-init,startup-clear",
             "--log", f"file={workdir / 'swtpm.log'},level=1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port + 1), timeout=1).close()
                return process, port
            except OSError:
                time.sleep(0.05)
        process.kill()
        process.wait()
    raise AssertionError(f"swtpm did not start: {(workdir / 'swtpm.log').read_text()}")


def _swtpm(tpm_state: Callable[[str], Path], tmp_path: Path, banks: str) -> Iterator[Swtpm]:
    state = tmp_path / "tpm-state"
    shutil.copytree(tpm_state(banks), state)
    process, port = _start(state, tmp_path)
    try:
        yield Swtpm(port, state)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def swtpm(tpm_state: Callable[[str], Path], tmp_path: Path) -> Iterator[Swtpm]:
    """A fresh TPM with the sha1 and sha256 banks: every PCR 0..23 zero."""
    yield from _swtpm(tpm_state, tmp_path, "sha1,sha256")


@pytest.fixture
def device(swtpm: Swtpm, tmp_path: Path) -> Tpm2Device:
    return Tpm2Device(swtpm.tcti, str(tmp_path / "run/log/systemd/tpm2-measure.log"))


def bounded(call: Callable[[], object], seconds: float = 20) -> object:
    """call() in a thread: its result or exception, or a failure when it hangs."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    assert time.monotonic() - started < seconds
    return outcome[0]


def extended(*digests: bytes, bank: str) -> bytes:
    """A PCR of ``bank`` after extending it from zero with ``digests``."""
    value = bytes(hashlib.new(bank).digest_size)
    for digest in digests:
        value = hashlib.new(bank, value + digest).digest()
    return value


def records(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data.startswith(b"\x1e") and data.endswith(b"\n")
    return [json.loads(chunk) for chunk in data.split(b"\x1e")[1:]]


def boottime_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000


def measure(device: Tpm2Device, pcr: int = 15, d1: bytes = D1, d256: bytes = D256) -> None:
    device.extend(
        pcr, {"sha1": d1, "sha256": d256}, event_type="volume-key",
        description="cryptsetup:lczfs\\x2dkeystore:0b5d8a2e-8f0a-4d0c-9a54-6c1e1f2a3b4c",
    )  # fmt: skip


# --- 1. banks ----------------------------------------------------------------------


def test_banks_are_the_allocated_ones(swtpm, device):
    assert swtpm.allocated_banks() == ["sha1", "sha256"]
    assert device.banks() == ["sha1", "sha256"]


def test_banks_of_a_sha256_only_tpm(tpm_state, tmp_path):
    for tpm in _swtpm(tpm_state, tmp_path, "sha256"):
        assert tpm.allocated_banks() == ["sha256"]
        assert Tpm2Device(tpm.tcti, str(tmp_path / "log")).banks() == ["sha256"]


def test_available():
    assert Tpm2Device("device:/nonexistent/tpmrm0").available() is False
    assert Tpm2Device("device:/dev/null").available() is True
    assert Tpm2Device("swtpm:host=127.0.0.1,port=1").available() is True


# --- 2. extend ---------------------------------------------------------------------


def test_extend_sets_both_banks_and_chains(swtpm, device):
    measure(device)
    assert swtpm.pcr("sha256", 15) == extended(D256, bank="sha256")
    assert swtpm.pcr("sha1", 15) == extended(D1, bank="sha1")
    assert swtpm.pcr("sha256", 15) == hashlib.sha256(bytes(32) + D256).digest()

    second1, second256 = hashlib.sha1(b"second").digest(), hashlib.sha256(b"second").digest()
    measure(device, d1=second1, d256=second256)
    assert swtpm.pcr("sha256", 15) == extended(D256, second256, bank="sha256")
    assert swtpm.pcr("sha1", 15) == extended(D1, second1, bank="sha1")
    assert swtpm.pcr("sha256", 14) == bytes(32)  # only PCR 15


def test_extend_of_one_bank_leaves_the_other(swtpm, device):
    device.extend(15, {"sha256": D256}, event_type="volume-key", description="x")
    assert swtpm.pcr("sha256", 15) == extended(D256, bank="sha256")
    assert swtpm.pcr("sha1", 15) == bytes(20)


@pytest.mark.parametrize(
    ("pcr", "digests", "message"),
    [
        (24, {"sha256": D256}, "PCR 24 is not one of 0..23"),
        (-1, {"sha256": D256}, "PCR -1"),
        (15, {}, "at least one digest"),
        (15, {"sha256": D1}, "a sha256 digest has 32 bytes, not 20"),
        (15, {"md5": bytes(16)}, "unknown PCR bank 'md5'"),
    ],
)
def test_a_callers_mistake_is_a_value_error_before_any_tpm_call(monkeypatch, pcr, digests, message):
    monkeypatch.setattr(paths, "LIBTSS2_ESYS", ("libtss2-never-loaded.so.0",))
    with pytest.raises(ValueError, match=re.escape(message)):
        Tpm2Device("swtpm:host=127.0.0.1,port=1", "/nonexistent/log").extend(
            pcr, digests, event_type="volume-key", description="x"
        )


# --- 3. the event log ----------------------------------------------------------------


def test_the_log_record_is_systemds_and_replays_to_the_pcrs(swtpm, device, tmp_path):
    log = Path(device.log_path)
    assert not log.parent.exists()
    before = boottime_usec()
    measure(device)
    measure(device, pcr=14, d1=hashlib.sha1(b"b").digest(), d256=hashlib.sha256(b"b").digest())
    measure(device, d1=hashlib.sha1(b"c").digest(), d256=hashlib.sha256(b"c").digest())
    after = boottime_usec()

    for directory in (log.parent, log.parent.parent):  # run/log/systemd, run/log
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755 & ~_umask()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600  # the in-progress sticky bit is cleared
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    found = records(log)
    assert len(found) == 3
    first = found[0]
    assert list(first) == ["pcr", "digests", "content_type", "content"]
    assert first["pcr"] == 15
    assert first["digests"] == [
        {"hashAlg": "sha1", "digest": D1.hex()},
        {"hashAlg": "sha256", "digest": D256.hex()},
    ]
    assert first["content_type"] == "systemd"
    content = first["content"]
    assert list(content) == ["string", "bootId", "timestamp", "eventType"]
    assert content["string"] == (
        "cryptsetup:lczfs\\x2dkeystore:0b5d8a2e-8f0a-4d0c-9a54-6c1e1f2a3b4c"
    )
    assert content["bootId"] == boot_id and re.fullmatch("[0-9a-f]{32}", boot_id)
    assert content["eventType"] == "volume-key"
    stamps = [r["content"]["timestamp"] for r in found]
    assert before <= stamps[0] <= stamps[1] <= stamps[2] <= after
    # Compact JSON, one record a line, as systemd's JSON_FORMAT_SEQ.
    assert b'"pcr":15,"digests":[{"hashAlg":"sha1"' in log.read_bytes()
    assert log.read_bytes().count(b"\n") == 3

    # Replaying every record from zero gives what the TPM holds.
    replayed: dict[tuple[int, str], bytes] = {}
    for record in found:
        for d in record["digests"]:
            key = (record["pcr"], d["hashAlg"])
            start = replayed.get(key, bytes(hashlib.new(d["hashAlg"]).digest_size))
            replayed[key] = hashlib.new(d["hashAlg"], start + bytes.fromhex(d["digest"])).digest()
    assert set(replayed) == {(15, "sha1"), (15, "sha256"), (14, "sha1"), (14, "sha256")}
    for (pcr, bank), value in replayed.items():
        assert swtpm.pcr(bank, pcr) == value, (pcr, bank)


def test_the_log_is_appended_to_not_replaced(swtpm, device):
    log = Path(device.log_path)
    log.parent.mkdir(parents=True)
    earlier = b'\x1e{"pcr":11,"digests":[],"content_type":"systemd","content":{}}\n'
    log.write_bytes(earlier)
    log.chmod(0o600)
    measure(device)
    assert log.read_bytes().startswith(earlier)
    assert [r["pcr"] for r in records(log)] == [11, 15]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- 4. failures -------------------------------------------------------------------


def test_no_tpm_behind_the_tcti_fails_fast_and_clearly(tpm_state, tmp_path):
    port = _free_port_pair()  # nothing listens there
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    log = tmp_path / "tpm2-measure.log"
    device = Tpm2Device(tcti, str(log))
    for call in (device.banks, lambda: measure(device)):
        error = bounded(call)
        assert isinstance(error, TpmError), error
        assert error.errno == errno.ENODEV
        text = str(error)
        assert text.startswith(f"cannot reach the TPM2 through TCTI {tcti}: ")
        assert "libtss2-tcti-swtpm.so.0" in text and "\n" not in text
        assert "Traceback" not in text
    assert not log.exists()  # the log is only touched once the TPM answers


def test_a_missing_library_is_named(monkeypatch, tmp_path):
    esys = paths.LIBTSS2_ESYS
    monkeypatch.setattr(paths, "LIBTSS2_ESYS", ("libtss2-esys-bogus.so.0",))
    with pytest.raises(TpmError) as caught:
        Tpm2Device("swtpm:host=127.0.0.1,port=1", str(tmp_path / "log")).banks()
    assert caught.value.errno == errno.EOPNOTSUPP
    assert str(caught.value).startswith(
        "cannot load libtss2-esys-bogus.so.0 for the TPM2 measurement: libtss2-esys-bogus.so.0 ("
    )
    assert "put tpm2-tss's libraries" in str(caught.value) and "into the initrd" in str(
        caught.value
    )
    reason = _missing()
    if reason:
        unavailable(reason)
    monkeypatch.setattr(paths, "LIBTSS2_TCTILDR", ("libtss2-tctildr-bogus.so.0",))
    monkeypatch.setattr(paths, "LIBTSS2_ESYS", esys)
    with pytest.raises(TpmError, match="cannot load libtss2-tctildr-bogus.so.0 "):
        measure(Tpm2Device("swtpm:host=127.0.0.1,port=1", str(tmp_path / "log")))
    assert not (tmp_path / "log").exists()


def test_a_command_the_tpm_refuses_is_decoded_and_leaves_the_log_clean(swtpm, device, caplog):
    # PCR 17 is a DRTM PCR: locality 0 may not extend it.
    with pytest.raises(TpmError) as caught:
        device.extend(17, {"sha256": D256}, event_type="volume-key", description="x")
    text = str(caught.value)
    assert text.startswith(f"extending PCR 17 of the TPM2 at {swtpm.tcti} failed: ")
    assert "locality" in text and "(0x907)" in text and "tpm2_selftest" in text
    log = Path(device.log_path)
    assert log.read_bytes() == b""
    assert stat.S_IMODE(log.stat().st_mode) == 0o600  # not marked incomplete
    measure(device)  # so the next measurement is logged
    assert [r["pcr"] for r in records(log)] == [15]


def test_without_rc_decoder_the_code_is_shown(monkeypatch):
    monkeypatch.setattr(tpm2, "_rc_decoder", lambda: None)
    assert tpm2.describe_rc(0x907) == "TSS2 return code 0x907"


def test_only_a_tpm_layer_code_means_nothing_was_extended():
    assert tpm2._tpm_answered(0x907)  # TPM2_RC_LOCALITY, from the TPM
    assert not tpm2._tpm_answered(0xA000A)  # the TCTI: the command may be lost mid-way
    assert not tpm2._tpm_answered(0x70001)  # ESAPI


def test_a_record_that_cannot_be_written_leaves_the_log_marked(swtpm, device, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    monkeypatch.setattr(tpm2, "BOOT_ID", "/nonexistent/boot_id")
    measure(device)
    assert swtpm.pcr("sha256", 15) == extended(D256, bank="sha256")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "the PCR was extended but its record could not be written" in warning
    assert "stays marked incomplete" in warning
    log = Path(device.log_path)
    assert log.read_bytes() == b"" and log.stat().st_mode & stat.S_ISVTX


def _assert_extended_without_record(swtpm: Swtpm, caplog: pytest.LogCaptureFixture, why: str):
    assert swtpm.pcr("sha256", 15) == extended(D256, bank="sha256")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert why in warnings[0] and "measuring without a record there" in warnings[0]


def test_a_symlink_at_the_log_is_not_followed(swtpm, device, tmp_path, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    log = Path(device.log_path)
    log.parent.mkdir(parents=True)
    log.symlink_to(target)
    measure(device)
    _assert_extended_without_record(swtpm, caplog, "it is a symlink")
    assert target.read_bytes() == b"keep" and log.is_symlink()


def test_a_fifo_at_the_log_does_not_block(swtpm, device, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    log = Path(device.log_path)
    log.parent.mkdir(parents=True)
    os.mkfifo(log)
    bounded(lambda: measure(device))  # nobody reads it
    _assert_extended_without_record(swtpm, caplog, "it is not a regular file")


def test_a_fifo_with_a_reader_is_refused_too(swtpm, device, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    log = Path(device.log_path)
    log.parent.mkdir(parents=True)
    os.mkfifo(log)
    reader = os.open(log, os.O_RDONLY | os.O_NONBLOCK)
    try:
        bounded(lambda: measure(device))
        assert os.read(reader, 100) == b""  # nothing was written into it
    finally:
        os.close(reader)
    _assert_extended_without_record(swtpm, caplog, "it is not a regular file")


def test_a_log_marked_incomplete_is_not_appended_to(swtpm, device, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    log = Path(device.log_path)
    log.parent.mkdir(parents=True)
    log.write_bytes(b"\x1e{}\n")
    log.chmod(0o600 | stat.S_ISVTX)
    measure(device)
    _assert_extended_without_record(swtpm, caplog, "it is marked incomplete")
    assert log.read_bytes() == b"\x1e{}\n"
    assert log.stat().st_mode & stat.S_ISVTX


def test_the_lock_is_waited_for(swtpm, device, tmp_path):
    log = Path(device.log_path)
    log.parent.mkdir(parents=True)
    log.touch(mode=0o600)
    holder = os.open(log, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_SH)  # a reader taking a quote with its log
    threading.Timer(0.5, os.close, [holder]).start()
    started = time.monotonic()
    measure(device)
    assert time.monotonic() - started >= 0.4
    assert [r["pcr"] for r in records(log)] == [15]


def test_a_lock_held_too_long_costs_the_record_not_the_measurement(
    swtpm, device, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING, LOGGER)
    monkeypatch.setattr(tpm2, "LOG_LOCK_TIMEOUT", 0.3)
    log = Path(device.log_path)
    log.parent.mkdir(parents=True)
    log.touch(mode=0o600)
    holder = os.open(log, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        measure(device)
    finally:
        os.close(holder)
    _assert_extended_without_record(swtpm, caplog, "another process held its lock for 0.3 s")
    assert log.read_bytes() == b""


def test_the_log_is_locked_and_marked_while_extending(swtpm, device, monkeypatch):
    """Between the extend and the record the file is locked and its sticky bit set."""
    seen: list[tuple[bool, int]] = []
    original = tpm2.Tpm2Device._append

    def spy(self, fd, *args):
        probe = os.open(self.log_path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
                locked = False
            except BlockingIOError:
                locked = True
        finally:
            os.close(probe)
        seen.append((locked, os.stat(self.log_path).st_mode & stat.S_ISVTX))
        assert swtpm.pcr("sha256", 15) == extended(D256, bank="sha256")  # extended already
        return original(self, fd, *args)

    monkeypatch.setattr(tpm2.Tpm2Device, "_append", spy)
    measure(device)
    assert seen == [(True, stat.S_ISVTX)]
    assert not os.stat(device.log_path).st_mode & stat.S_ISVTX


# --- 5. the C layout -----------------------------------------------------------------


def test_ctypes_layout_sizes():
    assert ctypes.sizeof(tpm2.TPMT_HA) == 66
    assert ctypes.sizeof(tpm2.TPML_DIGEST_VALUES) == 1060
    assert tpm2.TPML_DIGEST_VALUES.digests.offset == 4
    assert ctypes.sizeof(tpm2.TPMS_PCR_SELECTION) == 8
    assert ctypes.sizeof(tpm2.TPML_PCR_SELECTION) == 4 + 16 * 8
    assert tpm2._TPMS_CAPABILITY_DATA_PCRS.assignedPCR.offset == 4


def _mu() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libtss2-mu.so.0")
    except OSError:
        unavailable("cannot load libtss2-mu.so.0 (scripts/setup-host installs tpm2-tss)")
        raise


def test_the_layout_is_tpm2_tss_own():
    """tpm2-tss's marshaller reads our TPML_DIGEST_VALUES and fills our
    TPMS_CAPABILITY_DATA as its C code lays them out."""
    mu = _mu()
    values = tpm2.digest_values({"sha1": D1, "sha256": D256})
    wire = (ctypes.c_uint8 * 2048)()
    offset = ctypes.c_size_t(0)
    rc = mu.Tss2_MU_TPML_DIGEST_VALUES_Marshal(
        ctypes.byref(values), wire, ctypes.c_size_t(len(wire)), ctypes.byref(offset)
    )
    assert rc == 0
    assert bytes(wire[: offset.value]) == (
        (2).to_bytes(4, "big") + b"\x00\x04" + D1 + b"\x00\x0b" + D256
    )

    # TPMS_CAPABILITY_DATA of TPM2_CAP_PCRS, as a TPM sends it: sha1 with
    # PCRs 0..23, sha384 with none, SM3 (not measured with) with PCR 0.
    answer = (5).to_bytes(4, "big") + (3).to_bytes(4, "big")
    answer += b"\x00\x04\x03\xff\xff\xff" + b"\x00\x0c\x03\x00\x00\x00"
    answer += b"\x00\x12\x03\x01\x00\x00"
    buffer = (ctypes.c_uint8 * 8192)()  # larger than any TPMS_CAPABILITY_DATA
    offset = ctypes.c_size_t(0)
    rc = mu.Tss2_MU_TPMS_CAPABILITY_DATA_Unmarshal(
        (ctypes.c_uint8 * len(answer)).from_buffer_copy(answer), ctypes.c_size_t(len(answer)),
        ctypes.byref(offset), buffer,
    )  # fmt: skip
    assert rc == 0 and offset.value == len(answer)
    data = tpm2._TPMS_CAPABILITY_DATA_PCRS.from_buffer(buffer)
    assert data.capability == 5 and data.assignedPCR.count == 3
    first, second = data.assignedPCR.pcrSelections[0], data.assignedPCR.pcrSelections[1]
    assert (first.hash, first.sizeofSelect, list(first.pcrSelect[:3])) == (4, 3, [255] * 3)
    assert (second.hash, second.sizeofSelect, list(second.pcrSelect[:3])) == (12, 3, [0] * 3)
    assert Tpm2Device("x")._parse_banks(data) == ["sha1"]


def test_a_nonsense_pcr_answer_is_refused():
    data = tpm2._TPMS_CAPABILITY_DATA_PCRS(capability=5)
    data.assignedPCR.count = 17
    with pytest.raises(TpmError, match="answered the PCR bank query with nonsense"):
        Tpm2Device("x")._parse_banks(data)
    data.assignedPCR.count = 1
    data.assignedPCR.pcrSelections[0].hash = 4
    data.assignedPCR.pcrSelections[0].sizeofSelect = 5
    with pytest.raises(TpmError, match="a PCR selection of 5 bytes"):
        Tpm2Device("x")._parse_banks(data)
