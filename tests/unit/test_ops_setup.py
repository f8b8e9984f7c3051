"""lczfs-unlockd setup against a fake machine: plan, refusals, the whole run,
rollback at every failure point, an interrupt between two key changes.

The fake keeps the machine's state (datasets with their wrapping keys, zvols,
LUKS volumes, mappings, mounts); the keystore's files are real files in a
temporary directory, so the real key-file writer and the daemon's reader run.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from lczfs_unlockd import config, ops_setup
from lczfs_unlockd.errors import (
    CommandError,
    CommandTimeout,
    KeyRejectedError,
    OpsError,
    UnlockError,
    WrongKeyError,
)
from lczfs_unlockd.ports import DatasetInfo

PASSPHRASE = b"keystore passphrase 4711"
OLD_KEY = b"\x11" * 32
RECOVERY = bytearray(b"cbdefghi-jklnrtuv-cbdefghi-jklnrtuv-cbdefghi-jklnrtuv-cbdefghi-jklnrtuv")
RECOVERY_TEXT = RECOVERY.decode()


class Fail(Exception):
    pass


class FakeMachine(ops_setup.Machine):
    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self.tmp = tmp
        self.uid = 0
        self.programs = {"cryptsetup", "mkfs.ext4", "mount", "umount", "sfdisk",
                         "systemd-cryptenroll", "dracut", "setsid"}  # fmt: skip
        self.imported = {"rpool"}
        self.ds: dict[str, dict[str, Any]] = {
            "rpool": {"encryption": "off"},
            "rpool/ROOT": {"encryption": "off"},
            "rpool/crypt": self._root("prompt", "passphrase"),
            "rpool/crypt/home": {"encryption": "aes-256-gcm", "root": "rpool/crypt"},
            "rpool/data": self._root("file:///etc/zfs/data.key", "raw"),
        }
        self.devices: set[str] = set()
        self.luks: dict[str, dict[str, Any]] = {}
        self.mappings: dict[str, tuple[str, bool]] = {}
        self.mounts: dict[str, tuple[str, bool]] = {}  # target -> (source, read-only)
        self.disk = tmp / "keystore-fs"  # the ext4 file system's content
        self.existing: set[str] = set()
        self.calls: list[str] = []
        self.fail: dict[str, Callable[[], None]] = {}
        self.enrolled: list[list[str]] = []
        self.initrd_rebuilt = False
        self.lock_path = str(tmp / "setup.lock")

    @staticmethod
    def _root(location: str, keyformat: str, *, loaded: bool = True) -> dict[str, Any]:
        return {"encryption": "aes-256-gcm", "root": None, "keylocation": location,
                "keyformat": keyformat, "loaded": loaded, "key": OLD_KEY}  # fmt: skip

    def hit(self, point: str) -> None:
        self.calls.append(point)
        action = self.fail.get(point)
        if action is not None:
            action()

    # Queries.
    def euid(self) -> int:
        return self.uid

    def have_program(self, name: str) -> bool:
        return name in self.programs

    def path_exists(self, path: str) -> bool:
        return path in self.existing or os.path.lexists(path)

    def pools(self) -> list[str]:
        return sorted(self.imported)

    def pool_imported(self, pool: str) -> bool:
        return pool in self.imported

    def info(self, name: str) -> DatasetInfo:
        d = self.ds[name]
        root = d.get("root") or (name if d["encryption"] != "off" else "-")
        own = self.ds[root] if root != "-" else {}
        is_root = root == name
        return DatasetInfo(
            name=name,
            encryption=d["encryption"],
            encryption_root=root,
            keyformat=own.get("keyformat", "none"),
            keylocation=d.get("keylocation", "none") if is_root else "none",
            keystatus=("available" if own.get("loaded") else "unavailable") if own else "-",
        )

    def datasets(self, names: Sequence[str], *, recursive: bool) -> list[DatasetInfo]:
        self.hit("query")
        out = []
        for name in sorted(self.ds):
            if any(name == n or (recursive and name.startswith(n + "/")) for n in names):
                out.append(self.info(name))
        return out

    def dataset_exists(self, name: str) -> bool:
        return name in self.ds

    def mapping_active(self, name: str) -> bool:
        return name in self.mappings

    def is_mounted(self, path: str) -> bool:
        return path in self.mounts

    # Changes.
    def private_namespace(self) -> None:
        self.hit("unshare")

    def create_parent(self, name: str, run_id: str = "") -> None:
        self.hit("create_parent")
        self.ds[name] = {"encryption": "off", "run": run_id}

    def create_zvol(self, volume: str, size: str, volmode: str, run_id: str = "") -> None:
        self.hit("create_zvol")
        self.ds[volume] = {"encryption": "off", "volmode": volmode, "size": size, "run": run_id}
        self.devices.add(f"/dev/zvol/{volume}")

    def run_id_of(self, name: str) -> str | None:
        run: str | None = self.ds.get(name, {}).get("run")
        return run

    def sync_pool(self, pool: str) -> None:
        self.hit("sync_pool")

    def key_is(self, dataset: str, wrapping_key: bytearray, material: bytearray) -> bool | None:
        self.hit("probe")
        assert bytes.fromhex(bytes(material[:64]).decode()) == bytes(wrapping_key)
        return bytes(wrapping_key) == self.ds[dataset]["key"]

    def destroy(self, name: str) -> None:
        self.hit("destroy")
        assert not self.mappings and not self.mounts, "destroyed while in use"
        del self.ds[name]
        self.devices = {d for d in self.devices if not d.startswith(f"/dev/zvol/{name}")}
        self.luks = {k: v for k, v in self.luks.items() if not k.startswith(f"/dev/zvol/{name}")}

    def wait_for(self, path: str, timeout: float) -> None:
        self.hit("wait")
        if path not in self.devices:
            raise OpsError(f"{path} did not appear")

    def partition(self, device: str) -> None:
        self.hit("partition")
        self.devices.add(f"{device}-part1")

    def format_luks(self, device: str, passphrase: bytearray, label: str) -> None:
        self.hit("format")
        self.luks[device] = {"keys": [bytes(passphrase)], "tokens": []}

    def open_luks(self, device: str, name: str, passphrase: bytearray, *, read_only: bool) -> str:
        self.hit("open_ro" if read_only else "open")
        if bytes(passphrase) not in self.luks[device]["keys"]:
            raise WrongKeyError(f"no key slot of {device} accepts this passphrase")
        self.mappings[name] = (device, read_only)
        mapper = f"/dev/mapper/{name}"
        self.devices.add(mapper)
        return mapper

    def close_luks(self, name: str) -> None:
        self.hit("close")
        assert not any(src == f"/dev/mapper/{name}" for src, _ in self.mounts.values())
        del self.mappings[name]
        self.devices.discard(f"/dev/mapper/{name}")

    def add_recovery_key(self, device: str, passphrase: bytearray) -> tuple[int, bytearray]:
        self.hit("recovery")
        self.luks[device]["keys"].append(bytes(RECOVERY))
        self.luks[device]["tokens"].append("systemd-recovery")
        return 1, bytearray(RECOVERY)

    def test_key(self, device: str, key: bytearray, slot: int) -> bool:
        self.hit("test_key")
        return bytes(key) in self.luks[device]["keys"]

    def make_private(self, path: str) -> None:
        self.hit("make_private")
        os.chmod(path, 0o700)

    def cryptenroll(self, device: str, args: Sequence[str], passphrase: bytearray) -> None:
        self.hit("cryptenroll")
        assert bytes(passphrase) in self.luks[device]["keys"]
        self.enrolled.append(list(args))

    def mkfs(self, device: str, label: str) -> None:
        self.hit("mkfs")
        self.disk.mkdir()

    def make_private_dir(self) -> str:
        self.hit("private_dir")
        path = self.tmp / "run" / "lczfs-setup.x"
        path.mkdir(parents=True, mode=0o700)
        return str(path)

    def mount(self, device: str, target: str, *, read_only: bool) -> None:
        self.hit("mount_ro" if read_only else "mount")
        shutil.copytree(self.disk, target, dirs_exist_ok=True, symlinks=True)
        self.mounts[target] = (device, read_only)

    def bind_mount(self, source: str, target: str) -> None:
        self.hit("bind")
        self.mounts[target] = (source, False)

    def unmount(self, target: str) -> None:
        self.hit("unmount")
        source, read_only = self.mounts.pop(target)
        if source.startswith("/dev/"):
            if not read_only:
                shutil.rmtree(self.disk)
                shutil.copytree(target, self.disk, symlinks=True)
            for entry in Path(target).iterdir():
                if entry.is_dir():
                    for sub in entry.rglob("*"):
                        sub.chmod(0o700) if sub.is_dir() else sub.chmod(0o600)
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def _real(self, path: str) -> str:
        """A path under a bind mount, as the file it names."""
        for target, (source, _) in self.mounts.items():
            if path.startswith(target + "/") and not source.startswith("/dev/"):
                return source + path[len(target) :]
        return path

    def write_key_file(self, root: str, rel: str, material: bytearray) -> None:
        self.hit("write_key")
        super().write_key_file(root, rel, material)

    def read_key_file(self, root: str, rel: str, dataset: str) -> bytearray:
        self.hit("read_key")
        return super().read_key_file(root, rel, dataset)

    def change_key(self, dataset: str, keylocation: str) -> None:
        self.hit(f"change_key:{dataset}")
        d = self.ds[dataset]
        assert d["loaded"], "zfs change-key needs the key loaded"
        text = Path(self._real(keylocation[len("file://") :])).read_bytes()
        assert re.fullmatch(rb"[0-9a-f]{64}\n", text), text
        d.update(keyformat="hex", keylocation=keylocation, key=bytes.fromhex(text[:64].decode()))
        self.hit(f"changed:{dataset}")

    def verify_key(self, dataset: str, wrapping_key: bytearray, path: str) -> None:
        self.hit("verify_key")
        if bytes(wrapping_key) != self.ds[dataset]["key"]:
            raise KeyRejectedError(f"zfs rejected the key for {dataset}: wrong key")

    def write_config(self, path: str, text: str) -> None:
        self.hit("config")
        super().write_config(path, text)

    def rebuild_initrd(self) -> None:
        self.hit("initrd")
        self.initrd_rebuilt = True


MUTATING = {"unshare", "create_parent", "create_zvol", "partition", "format", "open", "mkfs", "mount",
            "recovery", "cryptenroll", "bind", "write_key", "config", "initrd"}  # fmt: skip


@pytest.fixture
def machine(tmp_path: Path) -> FakeMachine:
    return FakeMachine(tmp_path)


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    secret = tmp_path / "passphrase"
    secret.write_bytes(PASSPHRASE + b"\n")
    return {
        "config": str(tmp_path / "etc" / "lczfs-unlockd.toml"),
        "mountpoint": str(tmp_path / "bootsecrets"),
        "passphrase": str(secret),
    }


class Outcome:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def all(self) -> str:
        return self.out + self.err


@pytest.fixture
def setup(machine: FakeMachine, paths: dict[str, str]) -> Callable[..., Outcome]:
    Path(paths["config"]).parent.mkdir(exist_ok=True)

    def go(*extra: str, yes: bool = True, base: Sequence[str] | None = None) -> Outcome:
        argv = list(base) if base is not None else [
            "--pool", "rpool", "--config", paths["config"], "--mountpoint", paths["mountpoint"],
            "--passphrase-file", paths["passphrase"],
        ]  # fmt: skip
        argv += list(extra) + (["--yes"] if yes else [])
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
        err = io.StringIO()
        code = ops_setup.run(argv, machine, out=out, error=err)
        out.flush()
        return Outcome(code, raw.getvalue().decode(), err.getvalue())

    return go


def key_files(machine: FakeMachine) -> dict[str, bytes]:
    return (
        {str(p.relative_to(machine.disk)): p.read_bytes() for p in machine.disk.rglob("*.key")}
        if machine.disk.exists()
        else {}
    )


def assert_nothing_open(machine: FakeMachine, paths: dict[str, str]) -> None:
    assert machine.mappings == {} and machine.mounts == {}
    assert not os.path.exists(machine.tmp / "run" / "lczfs-setup.x")
    assert not os.path.exists(paths["mountpoint"])


def assert_rolled_back(machine: FakeMachine, paths: dict[str, str], result: Outcome) -> None:
    assert result.code == 1
    assert "rpool/volumes/bootsecrets" not in machine.ds
    assert "rpool/volumes" not in machine.ds
    assert not os.path.exists(paths["config"])
    assert machine.ds["rpool/crypt"]["keylocation"] == "prompt"
    assert machine.ds["rpool/crypt"]["key"] == OLD_KEY
    assert machine.ds["rpool/data"]["keylocation"] == "file:///etc/zfs/data.key"
    assert_nothing_open(machine, paths)
    assert "rolled back: no encryption root was changed" in result.err


# --- the plan -----------------------------------------------------------------


def test_plan_without_yes_changes_nothing(setup, machine, paths):
    result = setup(yes=False)
    assert result.code == 0
    assert not MUTATING & set(machine.calls)
    mp = paths["mountpoint"]
    for text in (
        "create the zvol rpool/volumes/bootsecrets: 64M, encryption=off",
        "volmode=full", "com.sun:auto-snapshot=false", "GPT with one partition",
        "argon2id, aes-xts-plain64", "recovery key",
        f"rpool/crypt: write a new random 256-bit hex key to {mp}/rpool/crypt.key",
        f"keylocation=file://{mp}/rpool/crypt.key",
        "rpool/data: write", f"write {paths['config']}", "dracut --force",
        "Nothing done. Run again with --yes",
    ):  # fmt: skip
        assert text in result.out, text
    assert "rpool/crypt/home" not in result.out  # not an encryption root


def test_dry_run_with_yes_changes_nothing(setup, machine):
    result = setup("--dry-run")
    assert result.code == 0
    assert "--dry-run: set the keystore up not done." in result.out
    assert not MUTATING & set(machine.calls)


def test_whole_zvol_and_tpm2_fido2_plan(setup, machine):
    machine.existing.add("/dev/tpmrm0")
    result = setup("--whole-zvol", "--tpm2", "--tpm2-pcrs", "7+14", "--fido2", yes=False)
    assert result.code == 0
    assert "volmode=dev" in result.out and "partition = 0" in result.out
    assert f"--tpm2-pcrs=7+14+15:sha256={'0' * 64}" in result.out
    assert "--fido2-device=auto" in result.out


def test_encrypted_parent_is_named_in_the_plan(setup, machine):
    result = setup("--roots", "rpool/crypt", "--volume", "rpool/crypt/keystore", yes=False)
    assert result.code == 0
    assert "below the encrypted rpool/crypt: OpenZFS 2.2 or later" in result.out


# --- refusals -----------------------------------------------------------------


def _not_root(m: FakeMachine, p: dict[str, str]) -> None:
    m.uid = 1000


def _no_pool(m: FakeMachine, p: dict[str, str]) -> None:
    m.imported = set()


def _zvol_exists(m: FakeMachine, p: dict[str, str]) -> None:
    m.ds["rpool/volumes"] = {"encryption": "off"}
    m.ds["rpool/volumes/bootsecrets"] = {"encryption": "off"}


def _unloaded(m: FakeMachine, p: dict[str, str]) -> None:
    m.ds["rpool/other"] = m._root("prompt", "passphrase", loaded=False)


def _config_exists(m: FakeMachine, p: dict[str, str]) -> None:
    Path(p["config"]).write_text("pool = 'x'\n")


def _mapping_open(m: FakeMachine, p: dict[str, str]) -> None:
    m.mappings["lczfs-keystore"] = ("/dev/sdz", True)


def _tpm(m: FakeMachine, p: dict[str, str]) -> None:
    m.existing.add("/dev/tpmrm0")


def _no_sfdisk(m: FakeMachine, p: dict[str, str]) -> None:
    m.programs.discard("sfdisk")


def _nothing_to_move(m: FakeMachine, p: dict[str, str]) -> None:
    for name in ("rpool/crypt", "rpool/data"):
        m.ds[name]["keylocation"] = f"file://{p['mountpoint']}/{name}.key"


@pytest.mark.parametrize(
    ("arrange", "extra", "message"),
    [
        (_not_root, (), "setup must run as root"),
        (_no_pool, (), "pool rpool is not imported: zpool import rpool first"),
        (None, ("--roots", "rpool/crypt/home"),
         "rpool/crypt/home is not an encryption root of pool rpool (its encryption root is "
         "rpool/crypt)"),
        (None, ("--roots", "rpool/ROOT"), "rpool/ROOT is not an encryption root of pool rpool "
         "(it is not encrypted)"),
        (None, ("--roots", "rpool/nope"), "(no such dataset)"),
        (_unloaded, ("--roots", "rpool/other"),
         "the key of rpool/other is not loaded: zfs load-key rpool/other first"),
        (_unloaded, (), "or leave it out with --roots"),
        (_zvol_exists, (), "rpool/volumes/bootsecrets already exists"),
        (_config_exists, (), "already exists: setup does not overwrite a configuration"),
        (_mapping_open, (), "/dev/mapper/lczfs-keystore is already open"),
        (_no_sfdisk, (), "sfdisk not found"),
        (None, ("--tpm2",), "this machine has no TPM2"),
        (_tpm, ("--tpm2", "--tpm2-pcrs", "7+15"), "PCR 15 is added by setup itself"),
        (_tpm, ("--tpm2", "--tpm2-pcrs", "7,15"), "expected PCR numbers joined by +"),
        (None, ("--size", "16M"), "at least 32M"),
        (None, ("--volume", "tank/ks"), "the keystore must be a zvol of pool rpool"),
        (_nothing_to_move, (), "name the ones to move with --roots"),
    ],
)  # fmt: skip
def test_refusals_change_nothing(setup, machine, paths, arrange, extra, message):
    if arrange is not None:
        arrange(machine, paths)
    before = {k: dict(v) for k, v in machine.ds.items()}
    result = setup(*extra)
    assert result.code == 1
    assert message in result.err
    assert not MUTATING & set(machine.calls)
    assert machine.ds == before


def test_an_invalid_configuration_is_exit_6(setup, machine):
    result = setup("--name", "bad/name")
    assert result.code == 6
    assert "keystore.name" in result.err
    assert not MUTATING & set(machine.calls)


# --- the whole run ------------------------------------------------------------


def test_setup_moves_every_key_and_verifies(setup, machine, paths):
    result = setup("--rebuild-initrd")
    assert result.code == 0, result.err
    mp = paths["mountpoint"]
    for name in ("rpool/crypt", "rpool/data"):
        location = f"file://{mp}/{name}.key"
        assert machine.ds[name]["keyformat"] == "hex"
        assert machine.ds[name]["keylocation"] == location
        assert f"changing key of {name} to {location} ...\n" in result.out
        assert f"changed key of {name}: now keyformat=hex keylocation={location}\n" in result.out
        assert result.out.index(f"changing key of {name}") < result.out.index(
            f"changed key of {name}"
        )
    files = key_files(machine)
    assert set(files) == {"rpool/crypt.key", "rpool/data.key"}
    for rel, data in files.items():
        assert bytes.fromhex(data[:64].decode()) == machine.ds[rel[:-4]]["key"]
        assert stat.S_IMODE((machine.disk / rel).stat().st_mode) == 0o400
    zvol = machine.ds["rpool/volumes/bootsecrets"]
    assert zvol["volmode"] == "full" and "rpool/volumes" in machine.ds
    assert "systemd-recovery" in machine.luks["/dev/zvol/rpool/volumes/bootsecrets-part1"]["tokens"]
    cfg = config.load(paths["config"])
    assert cfg.pool == "rpool" and cfg.datasets == ("rpool/crypt", "rpool/data")
    assert cfg.keystore.volume == "rpool/volumes/bootsecrets" and cfg.keystore.partition == 1
    assert cfg.keystore.mountpoint == mp
    assert cfg.keystore.unlock == (config.UnlockMethod.PASSPHRASE,)
    assert stat.S_IMODE(os.stat(paths["config"]).st_mode) == 0o644
    assert machine.initrd_rebuilt
    # Verified from a closed keystore, opened read-only again.
    calls = machine.calls
    assert calls.index("open_ro") > calls.index("changed:rpool/data")
    assert calls.count("verify_key") == 4  # after each change, and again from the re-opened one
    assert_nothing_open(machine, paths)
    # The recovery key once; no other key material anywhere.
    assert result.out.count("RECOVERY KEY: ") == 1
    assert f"RECOVERY KEY: {RECOVERY_TEXT}\n" in result.out
    assert "offline" in result.out
    assert result.all.count(RECOVERY_TEXT) == 1
    assert PASSPHRASE.decode() not in result.all
    for data in files.values():
        assert data[:64].decode() not in result.all
        assert data[:16].decode() not in result.all


def test_tpm2_and_fido2_enrollment_and_unlock(setup, machine, paths):
    machine.existing.add("/dev/tpmrm0")
    result = setup("--tpm2", "--fido2")
    assert result.code == 0, result.err
    assert machine.enrolled == [
        ["--tpm2-device=auto", f"--tpm2-pcrs=7+15:sha256={'0' * 64}"],
        ["--fido2-device=auto"],
    ]
    cfg = config.load(paths["config"])
    assert cfg.keystore.unlock == (config.UnlockMethod.TOKEN, config.UnlockMethod.PASSPHRASE)


def test_whole_zvol(setup, machine, paths):
    result = setup("--whole-zvol", "--roots", "rpool/crypt")
    assert result.code == 0, result.err
    assert "partition" not in machine.calls
    assert machine.ds["rpool/volumes/bootsecrets"]["volmode"] == "dev"
    assert config.load(paths["config"]).keystore.partition == 0
    assert machine.ds["rpool/data"]["keyformat"] == "raw"


def test_nixos_prints_the_options_and_writes_no_file(setup, machine, paths):
    result = setup("--nixos", "--roots", "rpool/crypt")
    assert result.code == 0, result.err
    assert not os.path.exists(paths["config"])
    assert "boot.initrd.lczfs-unlockd.enable = true;" in result.out
    assert 'volume = "rpool/volumes/bootsecrets";' in result.out
    assert 'datasets = [ "rpool/crypt" ];' in result.out
    assert "nixos-rebuild boot" in result.out
    # That these are the module's option names: tests/nix/test_nix.py (the
    # package's check phase has no nix/ directory).


# --- failures -----------------------------------------------------------------


def _raise(exc: BaseException) -> Callable[[], None]:
    def action() -> None:
        raise exc

    return action


EARLY = ["create_parent", "create_zvol", "wait", "partition", "format", "open", "mkfs",
         "private_dir", "mount", "recovery", "cryptenroll", "bind", "write_key", "read_key",
         "change_key:rpool/crypt"]  # fmt: skip


@pytest.mark.parametrize("point", EARLY)
def test_a_failure_before_any_key_change_rolls_everything_back(setup, machine, paths, point):
    machine.existing.add("/dev/tpmrm0")
    machine.fail[point] = _raise(CommandError(f"fake {point}", 1, "it broke"))
    result = setup("--tpm2")
    assert_rolled_back(machine, paths, result)
    assert "it broke" in result.err
    if "recovery" in machine.calls and point != "recovery":
        assert "RECOVERY KEY" in result.out
        assert "belonged to the destroyed keystore: discard it" in result.err


def test_a_key_file_that_does_not_read_back_rolls_back(setup, machine, paths, monkeypatch):
    real = ops_setup.Machine.read_key_file

    def corrupt(self: Any, root: str, rel: str, dataset: str) -> bytearray:
        data = real(self, root, rel, dataset)
        data[0] = ord("0") if data[0] != ord("0") else ord("1")
        return data

    monkeypatch.setattr(ops_setup.Machine, "read_key_file", corrupt)
    result = setup()
    assert_rolled_back(machine, paths, result)
    assert "does not read back as written" in result.err


def test_an_os_error_writing_a_key_rolls_back(setup, machine, paths):
    machine.fail["write_key"] = _raise(PermissionError(13, "Permission denied", "/x/y.key"))
    result = setup()
    assert_rolled_back(machine, paths, result)
    assert "/x/y.key: Permission denied" in result.err


UNDO = {
    "rpool/crypt": "-o keyformat=passphrase -o keylocation=prompt",
    "rpool/data": "-o keyformat=raw -o keylocation=file:///etc/zfs/data.key",
}


def _assert_kept(machine, paths, result, new: Sequence[str], old: Sequence[str]) -> None:
    mp = paths["mountpoint"]
    assert result.code == 1
    assert "rpool/volumes/bootsecrets" in machine.ds  # holds live keys: never destroyed
    assert_nothing_open(machine, paths)
    for name in new:
        assert (
            f"{name}: now uses the key file {mp}/{name}.key in the keystore "
            "rpool/volumes/bootsecrets\n"
        ) in result.err
        assert machine.ds[name]["keylocation"] == f"file://{mp}/{name}.key"
        assert f"zfs change-key {UNDO[name]} {name}" in result.err
    for name in old:
        location = "prompt" if name == "rpool/crypt" else "file:///etc/zfs/data.key"
        assert f"{name}: still uses its old key (keylocation={location})\n" in result.err
        assert machine.ds[name]["key"] == OLD_KEY
        assert (
            f"zfs change-key -o keyformat=hex -o keylocation=file://{mp}/{name}.key {name}"
        ) in result.err
    assert "To finish by hand:" in result.err and "Or to undo" in result.err
    assert "cryptsetup open /dev/zvol/rpool/volumes/bootsecrets-part1 lczfs-keystore" in (
        result.err
    )
    assert result.all.count(RECOVERY_TEXT) == 1
    for data in key_files(machine).values():
        assert data[:64].decode() not in result.all


def test_a_failing_second_change_key_keeps_the_keystore(setup, machine, paths):
    machine.fail["change_key:rpool/data"] = _raise(CommandError("zfs change-key", 1, "no"))
    result = setup()
    _assert_kept(machine, paths, result, new=["rpool/crypt"], old=["rpool/data"])
    assert not os.path.exists(paths["config"])
    assert f"write {paths['config']} with:" in result.err
    assert 'datasets = ["rpool/crypt", "rpool/data"]' in result.err


def test_a_change_key_that_happened_but_timed_out_counts_as_changed(setup, machine, paths):
    machine.fail["changed:rpool/data"] = _raise(CommandTimeout("zfs change-key: too slow"))
    result = setup()
    _assert_kept(machine, paths, result, new=["rpool/crypt", "rpool/data"], old=[])


def test_an_unknown_outcome_is_said_so(setup, machine, paths):
    def broken_pool() -> None:
        machine.fail["sync_pool"] = _raise(UnlockError("zpool sync hangs"))
        raise CommandTimeout("zfs change-key: too slow")

    machine.fail["change_key:rpool/data"] = broken_pool
    result = setup()
    assert result.code == 1
    assert "rpool/volumes/bootsecrets" in machine.ds
    assert "rpool/data: unknown whether it uses its old key or the key file" in result.err


@pytest.mark.parametrize("point", ["config", "open_ro", "mount_ro", "verify_key", "initrd"])
def test_a_failure_after_the_key_changes_keeps_the_keystore(setup, machine, paths, point):
    if point == "verify_key":
        count = {"n": 0}

        def third() -> None:  # the two after the changes pass; the end-to-end check fails
            count["n"] += 1
            if count["n"] == 3:
                raise KeyRejectedError("zfs rejected the key for rpool/crypt: wrong key")

        machine.fail[point] = third
    else:
        machine.fail[point] = _raise(CommandError(f"fake {point}", 1, "it broke"))
    result = setup("--rebuild-initrd")
    _assert_kept(machine, paths, result, new=["rpool/crypt", "rpool/data"], old=[])
    assert os.path.exists(paths["config"]) == (point != "config")


def test_sigterm_between_two_roots(setup, machine, paths):
    """A real SIGTERM right after the first change: the handler raises, the
    message says which key each dataset uses."""
    machine.fail["changed:rpool/crypt"] = lambda: os.kill(os.getpid(), signal.SIGTERM)
    old = signal.getsignal(signal.SIGTERM)
    result = setup()
    assert signal.getsignal(signal.SIGTERM) is old  # handlers restored
    assert "received SIGTERM: stopped" in result.err
    assert "change_key:rpool/data" not in machine.calls
    _assert_kept(machine, paths, result, new=["rpool/crypt"], old=["rpool/data"])


def test_sigint_before_any_change_rolls_back(setup, machine, paths):
    machine.fail["mkfs"] = lambda: os.kill(os.getpid(), signal.SIGINT)
    result = setup()
    assert_rolled_back(machine, paths, result)
    assert "received SIGINT" in result.err


# --- the helpers on real files ------------------------------------------------


def test_write_key_file_is_new_private_and_refuses_symlinks(tmp_path):
    root = tmp_path / "ks"
    root.mkdir()
    ops_setup.write_key_file(str(root), "rpool/a/b.key", bytearray(b"x" * 65))
    path = root / "rpool" / "a" / "b.key"
    assert path.read_bytes() == b"x" * 65
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert stat.S_IMODE((root / "rpool").stat().st_mode) == 0o700
    with pytest.raises(FileExistsError):
        ops_setup.write_key_file(str(root), "rpool/a/b.key", bytearray(b"y"))
    (root / "evil").symlink_to(tmp_path)
    with pytest.raises(OSError):
        ops_setup.write_key_file(str(root), "evil/c.key", bytearray(b"y"))
    assert not (tmp_path / "c.key").exists()


def test_write_new_file_never_replaces(tmp_path):
    path = tmp_path / "a.toml"
    ops_setup.write_new_file(str(path), b"one\n", 0o644)
    assert path.read_bytes() == b"one\n"
    with pytest.raises(OpsError, match="not replacing it"):
        ops_setup.write_new_file(str(path), b"two\n", 0o644)
    assert path.read_bytes() == b"one\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.toml"]


def test_toml_text_is_what_config_parses(tmp_path):
    settings = {"pool": "rpool", "datasets": ["rpool/a b", "rpool/c:d"],
                "keystore": {"volume": "rpool/ks", "partition": 1,
                             "mountpoint": "/bootsecrets", "unlock": ["passphrase"]}}  # fmt: skip
    path = tmp_path / "c.toml"
    path.write_text(ops_setup.toml_text(settings, str(path)))
    cfg = config.load(str(path))
    assert cfg.datasets == ("rpool/a b", "rpool/c:d")
    assert cfg.keystore.volume == "rpool/ks"


def test_main_is_the_cli_entry(monkeypatch, capsys):
    from lczfs_unlockd import cli

    assert cli.OPERATIONS["setup"] == ("ops_setup", "main")
    with pytest.raises(SystemExit) as exit_info:
        ops_setup.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "RECOVERY KEY: <key>" in text and "PCR 15" in text and "Example:" in text


# --- review findings ----------------------------------------------------------


def _late_change(machine: FakeMachine, *, reaped: bool) -> list[tuple[str, str, bytes]]:
    """zfs change-key killed at its deadline while inside its ioctl: its sync
    task lands in a later txg, i.e. at the next zpool sync -- or, when the
    process was not even reaped, maybe only after it (at the next sync task:
    a zfs destroy)."""
    pending: list[tuple[str, str, bytes]] = []

    def change(dataset: str, keylocation: str) -> None:
        machine.hit(f"change_key:{dataset}")
        text = Path(machine._real(keylocation[len("file://") :])).read_bytes()
        pending.append((dataset, keylocation, text))
        fate = "killed" if reaped else (
            "killed, but it did not exit within 5 s (pid 4242, state D: stuck in the kernel)"
        )  # fmt: skip
        raise CommandTimeout(
            f'"zfs change-key ..." did not finish within 120.0 s: {fate}', reaped=reaped
        )

    def land() -> None:
        for dataset, keylocation, text in pending:
            machine.ds[dataset].update(
                keyformat="hex", keylocation=keylocation, key=bytes.fromhex(text[:64].decode())
            )
        pending.clear()

    real_destroy = machine.destroy

    def destroy(name: str) -> None:
        land()
        real_destroy(name)

    machine.change_key = change  # type: ignore[method-assign]
    machine.destroy = destroy  # type: ignore[method-assign]
    if reaped:
        machine.fail["sync_pool"] = land
    return pending


def test_a_killed_change_key_that_lands_at_the_next_txg_counts_as_new(setup, machine, paths):
    _late_change(machine, reaped=True)
    result = setup("--roots", "rpool/crypt")
    assert result.code == 1
    assert "destroy" not in machine.calls
    assert machine.calls.index("sync_pool") < machine.calls.index("probe")
    mp = paths["mountpoint"]
    assert f"rpool/crypt: now uses the key file {mp}/rpool/crypt.key" in result.err
    assert machine.ds["rpool/crypt"]["keylocation"] == f"file://{mp}/rpool/crypt.key"
    assert key_files(machine)  # the keystore with the live key is still there


def test_an_unreaped_change_key_is_unknown_and_never_rolled_back(setup, machine, paths):
    _late_change(machine, reaped=False)
    result = setup("--roots", "rpool/crypt")
    assert result.code == 1
    assert "destroy" not in machine.calls
    assert "rpool/volumes/bootsecrets" in machine.ds
    assert "rpool/crypt: unknown whether it uses its old key or the key file" in result.err
    assert "rolled back" not in result.err


def test_a_change_key_that_failed_cleanly_is_probed_old_and_rolled_back(setup, machine, paths):
    machine.fail["change_key:rpool/crypt"] = _raise(CommandError("zfs change-key", 1, "EBUSY"))
    result = setup("--roots", "rpool/crypt")
    assert "probe" in machine.calls
    assert_rolled_back(machine, paths, result)


def test_sigint_during_change_key_waits_for_it(setup, machine, paths):
    machine.fail["change_key:rpool/crypt"] = lambda: os.kill(os.getpid(), signal.SIGINT)
    result = setup()
    mp = paths["mountpoint"]
    assert "received SIGINT: stopped" in result.err
    assert machine.ds["rpool/crypt"]["keylocation"] == f"file://{mp}/rpool/crypt.key"
    assert "change_key:rpool/data" not in machine.calls
    _assert_kept(machine, paths, result, new=["rpool/crypt"], old=["rpool/data"])


def test_sighup_is_taken_like_sigterm(setup, machine, paths):
    def hup(signum: int, frame: Any) -> None:
        raise Fail("SIGHUP was not handled by setup")

    machine.fail["changed:rpool/crypt"] = lambda: os.kill(os.getpid(), signal.SIGHUP)
    old = signal.signal(signal.SIGHUP, hup)
    try:
        result = setup()
        assert signal.getsignal(signal.SIGHUP) is hup  # restored
    finally:
        signal.signal(signal.SIGHUP, old)
    assert "received SIGHUP: stopped" in result.err
    _assert_kept(machine, paths, result, new=["rpool/crypt"], old=["rpool/data"])


def test_finish_commands_sync_the_key_file_before_change_key(setup, machine, paths):
    machine.fail["change_key:rpool/data"] = _raise(CommandError("zfs change-key", 1, "no"))
    result = setup()
    finish = result.err.split("To finish by hand:")[1].split("Or to undo")[0].splitlines()
    path = f"{paths['mountpoint']}/rpool/data.key"
    write = next(i for i, line in enumerate(finish) if f"> {path}" in line)
    sync = finish.index(f"  sync -f {path}")
    change = next(i for i, line in enumerate(finish) if "zfs change-key" in line)
    assert write < sync < change


def test_a_rerun_over_a_live_keystore_says_do_not_destroy_it(setup, machine, paths):
    machine.fail["change_key:rpool/data"] = _raise(CommandError("zfs change-key", 1, "no"))
    assert setup().code == 1
    machine.fail.clear()
    machine.calls.clear()
    again = setup()
    assert again.code == 1
    mp = paths["mountpoint"]
    assert (
        "rpool/volumes/bootsecrets already exists: do not destroy it: it holds the key of "
        f"rpool/crypt (keylocation=file://{mp}/rpool/crypt.key)"
    ) in again.err
    assert "zfs destroy" not in again.err
    assert not MUTATING & set(machine.calls)


def test_a_root_whose_key_is_already_under_the_mountpoint_is_refused(setup, machine, paths):
    mp = paths["mountpoint"]
    machine.ds["rpool/crypt"].update(keylocation=f"file://{mp}/rpool/crypt.key", keyformat="hex")
    result = setup("--roots", "rpool/crypt")
    assert result.code == 1
    assert f"rpool/crypt already has keylocation=file://{mp}/rpool/crypt.key" in result.err
    assert "cannot tell its old key from its new one" in result.err
    assert not MUTATING & set(machine.calls)


@pytest.mark.parametrize("kind", ["not-empty", "file", "symlink"])
def test_a_mountpoint_that_is_not_missing_or_empty_is_refused(setup, machine, paths, kind):
    mp = Path(paths["mountpoint"])
    if kind == "not-empty":
        mp.mkdir()
        (mp / "something-else").write_text("precious")
    elif kind == "file":
        mp.write_text("x")
    else:
        (machine.tmp / "elsewhere").mkdir()
        mp.symlink_to(machine.tmp / "elsewhere")
    result = setup()
    assert result.code == 1
    assert f"--mountpoint {mp} is" in result.err
    assert not MUTATING & set(machine.calls)


def test_an_empty_mountpoint_directory_is_used_and_kept(setup, machine, paths):
    mp = Path(paths["mountpoint"])
    mp.mkdir()
    result = setup()
    assert result.code == 0, result.err
    assert mp.is_dir() and not list(mp.iterdir())  # not made by setup: not removed either
    # The private namespace before anything is made or mounted.
    assert machine.calls.index("unshare") < machine.calls.index("create_parent")


def test_colliding_and_over_long_key_paths_are_refused_in_the_plan(setup, machine, paths):
    machine.ds["rpool/a"] = machine._root("prompt", "passphrase")
    machine.ds["rpool/a.key"] = {"encryption": "off"}
    machine.ds["rpool/a.key/b"] = machine._root("prompt", "passphrase")
    long = "rpool/" + "x" * 252
    machine.ds[long] = machine._root("prompt", "passphrase")
    mp = paths["mountpoint"]
    result = setup("--roots", "rpool/a,rpool/a.key/b")
    assert result.code == 1
    assert (
        f"the key file {mp}/rpool/a.key of rpool/a would be a directory of "
        f"{mp}/rpool/a.key/b.key, the key file of rpool/a.key/b"
    ) in result.err
    result = setup("--roots", long)
    assert result.code == 1
    assert f"has a component longer than 255 bytes ({'x' * 40}...)" in result.err
    assert not MUTATING & set(machine.calls)


def test_undo_restores_each_datasets_own_key_format_and_location(setup, machine, paths):
    machine.fail["config"] = _raise(CommandError("x", 1, "broke"))
    result = setup()
    undo = result.err.split("Or to undo")[1]
    assert "-o keyformat=raw -o keylocation=file:///etc/zfs/data.key rpool/data" in undo
    assert "-o keyformat=passphrase -o keylocation=prompt rpool/crypt" in undo
    assert "keylocation=prompt rpool/data" not in undo


def test_a_pool_missing_from_its_own_listing_is_an_error(machine, paths, monkeypatch):
    real = machine.datasets

    def without_pool(names: Sequence[str], *, recursive: bool) -> list[DatasetInfo]:
        return [d for d in real(names, recursive=recursive) if d.name != "rpool"]

    def boom(*_: object) -> None:
        raise TimeoutError("prepare() looped")

    monkeypatch.setattr(machine, "datasets", without_pool)
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(3)
    try:
        err = io.StringIO()
        argv = ["--pool", "rpool", "--config", paths["config"], "--mountpoint", paths["mountpoint"]]
        code = ops_setup.run(argv, machine, out=io.StringIO(), error=err)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert code == 1
    assert "did not list the pool's own dataset rpool" in err.getvalue()


def test_an_empty_roots_list_is_refused(setup, machine):
    result = setup("--roots", ",")
    assert result.code == 1
    assert "--roots: no dataset named" in result.err


def test_keys_are_not_made_with_token_bytes(setup, machine, monkeypatch):
    import secrets

    from lczfs_unlockd import luksadmin

    def refused(n: int | None = None) -> bytes:
        raise Fail("secrets.token_bytes returns an immutable bytes copy")

    monkeypatch.setattr(secrets, "token_bytes", refused)
    result = setup()
    assert result.code == 0, result.err
    key = luksadmin.recovery_key()
    assert re.fullmatch(rb"([cbdefghijklnrtuv]{8}-){7}[cbdefghijklnrtuv]{8}", key)
    assert len(key) == luksadmin.RECOVERY_KEY_LENGTH
    assert luksadmin.recovery_key() != key


def test_the_recovery_key_goes_to_fd_1_not_through_a_python_buffer(
    machine, paths, tmp_path, monkeypatch
):
    seen: list[bytes] = []

    class Spy(io.BufferedWriter):
        def write(self, data: Any) -> int:
            seen.append(bytes(data))
            return super().write(data)

    Path(paths["config"]).parent.mkdir(exist_ok=True)
    raw = open(tmp_path / "stdout", "wb", buffering=0)  # noqa: SIM115
    stdout = io.TextIOWrapper(Spy(raw), encoding="utf-8", write_through=True)  # type: ignore[arg-type]
    monkeypatch.setattr("sys.stdout", stdout)
    argv = ["--pool", "rpool", "--config", paths["config"], "--mountpoint", paths["mountpoint"],
            "--passphrase-file", paths["passphrase"], "--yes"]  # fmt: skip
    code = ops_setup.run(argv, machine, error=io.StringIO())
    stdout.flush()
    monkeypatch.undo()
    raw.close()
    assert code == 0
    text = (tmp_path / "stdout").read_bytes().decode()
    assert text.count(f"RECOVERY KEY: {RECOVERY_TEXT}\n") == 1
    assert text.index("RECOVERY KEY") < text.index("Write the recovery key down")
    assert seen and not any(RECOVERY in chunk for chunk in seen)


def test_a_recovery_key_that_does_not_open_the_keystore_is_not_shown(setup, machine, paths):
    real = machine.add_recovery_key

    def broken(device: str, passphrase: bytearray) -> tuple[int, bytearray]:
        slot, key = real(device, passphrase)
        machine.luks[device]["keys"].remove(bytes(RECOVERY))
        return slot, key

    machine.add_recovery_key = broken  # type: ignore[method-assign]
    result = setup()
    assert_rolled_back(machine, paths, result)
    assert "the new recovery key does not open key slot 1" in result.err
    assert "RECOVERY KEY" not in result.out


def test_the_keystore_root_is_0700(setup, machine):
    result = setup()
    assert result.code == 0, result.err
    assert stat.S_IMODE(machine.disk.stat().st_mode) == 0o700


def test_a_second_run_waits_for_the_lock(setup, machine):
    import fcntl

    fd = os.open(machine.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = setup()
    finally:
        os.close(fd)
    assert result.code == 1
    assert "another lczfs-unlockd setup is running" in result.err
    assert not MUTATING & set(machine.calls)
    assert stat.S_IMODE(os.stat(machine.lock_path).st_mode) == 0o600
    assert setup().code == 0  # released with its descriptor


def test_a_zvol_someone_else_made_meanwhile_is_not_destroyed(setup, machine, paths):
    def raced() -> None:  # another run's zvol appeared; our zfs create fails
        machine.ds["rpool/volumes/bootsecrets"] = {"encryption": "off", "run": "someone else"}
        raise CommandError("zfs create", 1, "dataset already exists")

    machine.fail["create_zvol"] = raced
    result = setup()
    assert result.code == 1
    assert "rpool/volumes/bootsecrets" in machine.ds
    assert "rpool/volumes" not in machine.ds  # ours: removed
    assert "is not marked org.lczfs:setup=" in result.err


def test_a_zvol_created_by_a_killed_zfs_create_is_destroyed(setup, machine, paths):
    real = machine.create_zvol

    def killed(volume: str, size: str, volmode: str, run_id: str = "") -> None:
        real(volume, size, volmode, run_id)
        raise CommandTimeout("zfs create: killed at its deadline")

    machine.create_zvol = killed  # type: ignore[method-assign]
    result = setup()
    assert_rolled_back(machine, paths, result)


# --- the real Machine: order of syncs and argv ---------------------------------


def test_key_file_is_synced_file_then_directories_then_file_system(setup, machine, monkeypatch):
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def syncfs(fd: int) -> None:
        events.append("syncfs " + os.readlink(f"/proc/self/fd/{fd}"))

    real_change = machine.change_key

    def change(dataset: str, keylocation: str) -> None:
        events.append(f"change-key {dataset}")
        real_change(dataset, keylocation)

    monkeypatch.setattr(ops_setup.os, "fsync", fsync)
    monkeypatch.setattr(ops_setup, "_syncfs", syncfs)
    machine.change_key = change  # type: ignore[method-assign]
    assert setup("--roots", "rpool/crypt").code == 0
    private = str(machine.tmp / "run" / "lczfs-setup.x")
    keyed = events[: events.index("change-key rpool/crypt") + 1]
    assert keyed == [
        f"fsync {private}",  # the new directory rpool, in its parent
        f"fsync {private}/rpool/crypt.key",
        f"fsync {private}/rpool",
        f"fsync {private}",
        f"syncfs {private}",
        "change-key rpool/crypt",
    ]


class Runs:
    """process.run / run_fed stand-ins that record argv and answer in turn."""

    def __init__(self, answers: Sequence[tuple[int, str]] = ()) -> None:
        self.argvs: list[list[str]] = []
        self.answers = list(answers)

    def run(self, argv: Sequence[str], **kw: Any) -> Any:
        from lczfs_unlockd.process import Result

        self.argvs.append(list(argv))
        code, stderr = self.answers.pop(0) if self.answers else (0, "")
        result = Result(tuple(argv), code, "", stderr)
        if kw.get("check", True) and code:
            raise result.error()
        return result

    def run_fed(self, argv: Sequence[str], secrets: Sequence[bytes | bytearray], **kw: Any) -> Any:
        return self.run(argv, **kw)


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> Runs:
    fake = Runs()
    monkeypatch.setattr(ops_setup.process, "run", fake.run)
    monkeypatch.setattr(ops_setup.process, "run_fed", fake.run_fed)
    return fake


def _no_pyzfs(monkeypatch: pytest.MonkeyPatch) -> None:
    from lczfs_unlockd import zfskeys

    def missing(self: Any) -> Any:
        raise ImportError("no pyzfs")

    monkeypatch.setattr(zfskeys.PyzfsKeyLoader, "_module", missing)


def test_machine_change_key_and_rollback_commands_run_detached(runs):
    from lczfs_unlockd import paths as p

    m = ops_setup.Machine()
    m.change_key("rpool/crypt", "file:///bootsecrets/rpool/crypt.key")
    m.destroy("rpool/volumes/bootsecrets")
    m.unmount("/bootsecrets")
    m.create_zvol("rpool/ks", "64M", "full", "abc")
    assert runs.argvs == [
        ["setsid", "--wait", p.ZFS, "change-key", "-o", "keyformat=hex",
         "-o", "keylocation=file:///bootsecrets/rpool/crypt.key", "rpool/crypt"],
        ["setsid", "--wait", p.ZFS, "destroy", "rpool/volumes/bootsecrets"],
        ["setsid", "--wait", "umount", "/bootsecrets"],
        [p.ZFS, "create", "-V", "64M", "-o", "encryption=off", "-o", "volmode=full",
         "-o", "com.sun:auto-snapshot=false", "-o", "org.lczfs:setup=abc", "rpool/ks"],
    ]  # fmt: skip


def test_machine_partition_waits_for_udev_before_the_link_is_trusted(runs):
    """udev re-reads the table when sfdisk closes the zvol: -part1 may vanish for a moment."""
    ops_setup.Machine().partition("/dev/zvol/rpool/ks")
    assert [a[:3] for a in runs.argvs] == [
        ["sh", "-c", 'exec sfdisk --quiet --wipe always "$1" < "$2"'],
        ["udevadm", "settle", "--timeout=30"],
    ]


def test_machine_destroy_retries_while_busy(runs, monkeypatch):
    monkeypatch.setattr(ops_setup, "DESTROY_RETRY", 0.0)
    runs.answers = [(1, "cannot destroy 'rpool/ks': dataset is busy"), (0, "")]
    ops_setup.Machine().destroy("rpool/ks")
    assert len(runs.argvs) == 2
    runs.argvs.clear()
    runs.answers = [(1, "cannot destroy 'rpool/ks': permission denied")]
    with pytest.raises(CommandError, match="permission denied"):
        ops_setup.Machine().destroy("rpool/ks")
    assert len(runs.argvs) == 1


def test_machine_verify_and_probe_without_pyzfs_use_the_cli(runs, monkeypatch):
    from lczfs_unlockd import paths as p

    _no_pyzfs(monkeypatch)
    m = ops_setup.Machine()
    m.verify_key("rpool/crypt", bytearray(32), "/run/x/rpool/crypt.key")
    assert runs.argvs[-1] == [p.ZFS, "load-key", "-n", "-L", "file:///run/x/rpool/crypt.key",
                              "rpool/crypt"]  # fmt: skip
    runs.answers = [(0, ""), (255, "Key load error: Incorrect key provided for 'rpool/crypt'."),
                    (1, "cannot open 'rpool/crypt': I/O error")]  # fmt: skip
    material = bytearray(b"00" * 32 + b"\n")
    assert m.key_is("rpool/crypt", bytearray(32), material) is True
    assert m.key_is("rpool/crypt", bytearray(32), material) is False
    assert m.key_is("rpool/crypt", bytearray(32), material) is None
    assert runs.argvs[-1] == [p.ZFS, "load-key", "-n", "-L", "file://{fd0}", "rpool/crypt"]


def test_machine_run_id_of_reads_the_local_property(runs):
    runs.answers = [(0, "")]
    assert ops_setup.Machine().run_id_of("rpool/ks") is None
    assert runs.argvs[-1][-2:] == ["org.lczfs:setup", "rpool/ks"]
    assert "local" in runs.argvs[-1]
