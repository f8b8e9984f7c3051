"""The Nix side without nixpkgs: every .nix file parses, and the pure logic of
nix/lib.nix (assertions, kernel parameters, the unit's ordering) evaluates to
what the daemon expects.  Whole systems against a real nixpkgs are in
test_system.py, build rehearsals in test_rehearsal.py.

`nix-instantiate` (Debian's nix-bin) parses and evaluates expressions that
need no nixpkgs; nix/lib.nix is written to be one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .nixtools import missing

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "nix" / "lib.nix"
NIX_INSTANTIATE = shutil.which("nix-instantiate")


@pytest.fixture(autouse=True)
def _nix_instantiate() -> None:
    if NIX_INSTANTIATE is None:
        missing(
            "nix-instantiate is not installed (Debian: nix-bin; scripts/setup-host installs it)"
        )


NIX_FILES = sorted(p for p in [ROOT / "flake.nix", *(ROOT / "nix").rglob("*.nix")] if p.is_file())

# The file's content with the module's defaults (`settings`, snake_case).
DEFAULTS: dict[str, Any] = {
    "pool": "rpool",
    "devices": [],
    "dev_nodes": "/dev/disk/by-id",
    "force_import": False,
    "online_grace": "10s",
    "timeout": "5min",
    "datasets": "auto",
    "mask": [],
    "keystore": {
        "volume": "rpool/volumes/bootsecrets",
        "partition": 1,
        "name": "lczfs-keystore",
        "mountpoint": "/bootsecrets",
        "unlock": ["token", "keyfile", "passphrase"],
        "tries": 3,
        "prompt_timeout": "0",
        "token_timeout": "30s",
    },
}

ENV_OK: dict[str, Any] = {"systemdInitrd": True, "zfsInInitrd": True, "initrdFiles": []}


def cfg(**overrides: Any) -> dict[str, Any]:
    """DEFAULTS with top-level and keystore overrides (keystore={...} merges)."""
    result = json.loads(json.dumps(DEFAULTS))
    keystore = overrides.pop("keystore", {})
    result.update(overrides)
    result["keystore"].update(keystore)
    return result


def nix_eval(expr: str) -> Any:
    assert NIX_INSTANTIATE is not None
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--eval", "--strict", "--json", "--expr", expr],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def lib_call(function: str, *args: Any) -> Any:
    # JSON is valid Nix for these values except null, which is spelled the same.
    nix_args = " ".join(f"(builtins.fromJSON {json.dumps(json.dumps(a))})" for a in args)
    return nix_eval(f"(import {LIB}).{function} {nix_args}")


def problems(config: dict[str, Any], env: dict[str, Any] | None = None) -> list[str]:
    return lib_call("problems", config, env or ENV_OK)


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_nix_file_parses(path: Path) -> None:
    assert NIX_INSTANTIATE is not None
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--parse", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_the_expected_nix_files_exist() -> None:
    names = {str(p.relative_to(ROOT)) for p in NIX_FILES}
    for expected in (
        "flake.nix",
        "nix/lib.nix",
        "nix/package.nix",
        "nix/pyzfs.nix",
        "nix/module.nix",
        "nix/initrd-env.nix",
        "nix/tests/unlock.nix",
    ):
        assert expected in names


def test_defaults_have_no_problems() -> None:
    assert problems(cfg()) == []


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"systemdInitrd": False}, "boot.initrd.systemd.enable = true"),
        ({"zfsInInitrd": False}, "boot.initrd.supportedFilesystems.zfs = true"),
    ],
)
def test_missing_systemd_initrd_or_zfs_is_reported(env: dict[str, Any], needle: str) -> None:
    found = problems(cfg(), {**ENV_OK, **env})
    assert len(found) == 1
    assert needle in found[0]


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (cfg(pool="rpool/crypt"), "is not a pool name"),
        (cfg(keystore={"volume": "tank/bootsecrets"}), 'must be a zvol inside the pool\n"rpool"'),
        (cfg(keystore={"volume": "rpool"}), "must be a zvol inside the pool"),
        (cfg(keystore={"mountpoint": "bootsecrets"}), "cannot work as the\ndirectory"),
        (cfg(keystore={"mountpoint": "/"}), "cannot work"),
        (cfg(keystore={"mountpoint": "/boot/../secrets"}), "cannot work"),
        (cfg(keystore={"mountpoint": "/bootsecrets/"}), "cannot work"),
        (cfg(keystore={"mountpoint": "/boot secrets"}), "cannot work"),
        (cfg(keystore={"mountpoint": "/sysroot/bootsecrets"}), "inside /sysroot"),
        (cfg(datasets=["rpool/crypt", "tank/crypt"]), '"tank/crypt", which is not a dataset'),
        (cfg(datasets=[]), "empty list"),
        (cfg(keystore={"unlock": []}), "keystore.unlock is empty"),
        (cfg(keystore={"unlock": ["keyfile"]}), "keystore.keyfile is not\nset"),
        (cfg(keystore={"mountpoint": "/sysroot"}), "inside /sysroot"),
        (cfg(keystore={"keyfile": "keys/k"}), "must be an absolute path"),
        (
            cfg(keystore={"keyfile": "/etc/lczfs-unlockd/keystore.key"}),
            'boot.initrd.secrets."/etc/lczfs-unlockd/keystore.key"',
        ),
        (cfg(root_dataset="tank/root"), 'root_dataset = "tank/root" is not a dataset of the pool'),
        (cfg(root_dataset="rpoolx/root"), "is not a dataset of the pool"),
        (cfg(verify_datasets=["tank/nix"]), 'verify_datasets contains "tank/nix"'),
        (cfg(trusted_roots=["tank/crypt"]), 'trusted_roots contains "tank/crypt"'),
        (cfg(trusted_roots=[]), "trusted_roots is an empty list"),
        (
            cfg(keystore={"tpm2_signature": "sig.json"}),
            "must be an absolute path\ninside the initrd",
        ),
        (cfg(keystore={"tpm2_pcrlock": "/etc/pcrlock.json"}), "is not put into the initrd"),
        (
            cfg(
                keystore={
                    "unlock": ["passphrase"],
                    "tpm2_signature": "/.extra/tpm2-pcr-signature.json",
                }
            ),
            '"token" is not in keystore.unlock',
        ),
    ],
)
def test_configurations_that_cannot_work_are_reported(config: dict[str, Any], needle: str) -> None:
    found = problems(config)
    assert any(needle in message for message in found), found


def test_keyfile_shipped_in_the_initrd_is_accepted() -> None:
    keyfile = "/etc/lczfs-unlockd/keystore.key"
    env = {**ENV_OK, "initrdFiles": [keyfile]}
    assert problems(cfg(keystore={"keyfile": keyfile}), env) == []


def test_keyfile_under_the_keystore_itself_is_reported() -> None:
    keyfile = "/bootsecrets/keystore.key"
    env = {**ENV_OK, "initrdFiles": [keyfile]}
    found = problems(cfg(keystore={"keyfile": keyfile}), env)
    assert any("empty until the keystore is open" in m for m in found), found


def test_datasets_of_the_pool_are_accepted() -> None:
    assert problems(cfg(datasets=["rpool/crypt", "rpool/crypt/safe"])) == []


def test_root_check_of_the_pool_is_accepted() -> None:
    config = cfg(
        root_dataset="rpool/crypt/local/root",
        verify_datasets=["rpool/crypt/local/nix", "rpool"],
        trusted_roots=["rpool/crypt"],
    )
    assert problems(config) == []


@pytest.mark.parametrize(
    ("path", "files"),
    [
        # systemd-stub's and runtime places need not be in the image.
        ("/.extra/tpm2-pcr-signature.json", []),
        ("/run/systemd/pcrlock.json", []),
        (
            "/etc/lczfs-unlockd/tpm2-pcr-signature.json",
            ["/etc/lczfs-unlockd/tpm2-pcr-signature.json"],
        ),
    ],
)
def test_tpm2_policy_files_that_exist_at_boot_are_accepted(path: str, files: list[str]) -> None:
    env = {**ENV_OK, "initrdFiles": files}
    config = cfg(keystore={"tpm2_signature": path, "tpm2_pcrlock": path})
    assert problems(config, env) == []


@pytest.mark.parametrize(("measure", "refused"), [(15, True), (True, True), (False, False)])
def test_measure_pcr_needs_tpm2_in_the_initrd(measure: bool | int, refused: bool) -> None:
    env = {**ENV_OK, "tpm2": False, "tpm2OptionName": "boot.initrd.systemd.tpm2.enable"}
    found = problems(cfg(keystore={"measure_pcr": measure}), env)
    assert bool(found) == refused, found
    if refused:
        assert "boot.initrd.systemd.tpm2.enable\nis false" in found[0]
    # TPM2 on: any value is fine (the module's type bounds the number).
    assert problems(cfg(keystore={"measure_pcr": measure}), {**env, "tpm2": True}) == []


@pytest.mark.parametrize(
    ("dry_run", "debug", "expected"),
    [
        (False, False, []),
        (True, False, ["rd.lczfs.dry_run=1"]),
        (False, True, ["rd.lczfs.debug"]),
        (True, True, ["rd.lczfs.dry_run=1", "rd.lczfs.debug"]),
    ],
)
def test_kernel_params(dry_run: bool, debug: bool, expected: list[str]) -> None:
    assert lib_call("kernelParams", {"dryRun": dry_run, "debug": debug}) == expected


@pytest.mark.parametrize(
    ("keystore", "device"),
    [
        ({"partition": 1}, "/dev/zvol/rpool/volumes/bootsecrets-part1"),
        ({"partition": 0}, "/dev/zvol/rpool/volumes/bootsecrets"),
    ],
)
def test_keystore_device(keystore: dict[str, Any], device: str) -> None:
    assert lib_call("keystoreDevice", cfg(keystore=keystore)["keystore"]) == device


@pytest.mark.parametrize(
    ("zfs_version", "expected"),
    [
        ("2.2.7", "2.2.7"),
        ("2.3.0-rc5", "2.3.0"),
        ("2.3.0-unstable-2024-10-01", "2.3.0"),
        ("weird", "0"),
    ],
)
def test_pyzfs_gets_a_pep440_version(zfs_version: str, expected: str) -> None:
    assert lib_call("pep440Version", zfs_version) == expected


def test_module_declares_every_config_key_in_settings() -> None:
    """Every key the daemon reads is a typed, documented option inside `settings`."""
    module = (ROOT / "nix" / "module.nix").read_text()
    root_check = ("root_dataset", "verify_datasets", "trusted_roots")
    measured = ("measure_pcr", "tpm2_signature", "tpm2_pcrlock")
    for key in (*DEFAULTS, *DEFAULTS["keystore"], "keyfile", *root_check, *measured):
        assert f"        {key} = mkOption" in module or f"      {key} = mkOption" in module, key


def test_unit_ordering_is_read_from_the_unit_file() -> None:
    ordering = lib_call("unitOrdering", "tank")
    unit = (ROOT / "units" / "lczfs-unlockd.service").read_text()
    for name in ordering["before"]:
        assert name == "zfs-import-tank.service" or name in unit
    assert ordering["wantedBy"] == ["initrd.target", "zfs-import-tank.service"]
    assert lib_call("poolOrdering", "tank")["before"] == ["zfs-import-tank.service"]


def test_the_options_setup_prints_for_nixos_are_the_modules() -> None:
    """lczfs-unlockd setup --nixos prints boot.initrd.lczfs-unlockd.{enable,settings,
    tokenPlugins} with settings.keystore.* (tests/unit/test_ops_setup.py checks the text)."""
    module = (ROOT / "nix" / "module.nix").read_text()
    assert "options.boot.initrd.lczfs-unlockd" in module
    for option in ("settings = mkOption", "tokenPlugins = mkOption", "volume = mkOption",
                   "mountpoint = mkOption", "unlock = mkOption", "datasets = mkOption",
                   "partition = mkOption"):  # fmt: skip
        assert option in module, option
