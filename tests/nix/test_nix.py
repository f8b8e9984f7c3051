"""The Nix side: every .nix file parses, and the pure logic of nix/lib.nix
(options -> /etc/lczfs-unlockd.toml, assertions, kernel parameters) evaluates
to what the daemon expects.

Nix cannot build here, but `nix-instantiate` (Debian's nix-bin) can parse and
evaluate expressions that need no nixpkgs; nix/lib.nix is written to be one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "nix" / "lib.nix"
NIX_INSTANTIATE = shutil.which("nix-instantiate")

pytestmark = pytest.mark.skipif(NIX_INSTANTIATE is None, reason="nix-instantiate is not installed")

NIX_FILES = sorted(p for p in [ROOT / "flake.nix", *(ROOT / "nix").rglob("*.nix")] if p.is_file())

# The module's defaults, as the option tree the module hands to lib.nix.
DEFAULTS: dict[str, Any] = {
    "pool": "rpool",
    "devices": [],
    "devNodes": "/dev/disk/by-id",
    "forceImport": False,
    "onlineGrace": "10s",
    "timeout": "5min",
    "datasets": "auto",
    "mask": [],
    "keystore": {
        "volume": "rpool/volumes/bootsecrets",
        "partition": 1,
        "name": "lczfs-keystore",
        "mountpoint": "/bootsecrets",
        "unlock": ["token", "keyfile", "passphrase"],
        "keyfile": None,
        "tries": 3,
        "promptTimeout": "0",
        "tokenTimeout": "30s",
        "tokenPlugins": ["tpm2"],
    },
    "dryRun": False,
    "debug": False,
    "settings": {},
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


def nix_eval_error(expr: str) -> str:
    assert NIX_INSTANTIATE is not None
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--eval", "--strict", "--json", "--expr", expr],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0, f"expected an evaluation error, got {proc.stdout}"
    return proc.stderr


def lib_call(function: str, *args: Any) -> Any:
    # JSON is valid Nix for these values except null, which is spelled the same.
    nix_args = " ".join(f"(builtins.fromJSON {json.dumps(json.dumps(a))})" for a in args)
    return nix_eval(f"(import {LIB}).{function} {nix_args}")


def rendered(config: dict[str, Any]) -> str:
    return nix_eval(
        f"let l = import {LIB}; in "
        f"l.toTOML (l.mkSettings (builtins.fromJSON {json.dumps(json.dumps(config))}))"
    )


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


def test_defaults_render_to_the_daemons_keys() -> None:
    text = rendered(cfg())
    assert tomllib.loads(text) == {
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
    # Module-only options never reach the daemon's file.
    for key in ("tokenPlugins", "token_plugins", "dryRun", "dry_run", "debug", "settings"):
        assert key not in text


def test_unset_keyfile_is_left_out_and_a_set_one_is_written() -> None:
    assert "keyfile" not in tomllib.loads(rendered(cfg()))["keystore"]
    keyfile = "/etc/lczfs-unlockd/keystore.key"
    assert tomllib.loads(rendered(cfg(keystore={"keyfile": keyfile})))["keystore"]["keyfile"] == (
        keyfile
    )


def test_numbers_lists_and_dataset_lists_keep_their_types() -> None:
    parsed = tomllib.loads(
        rendered(
            cfg(
                onlineGrace=15,
                timeout=300,
                datasets=["rpool/crypt", "rpool/other"],
                devices=["/dev/disk/by-id/a-part2", "/dev/disk/by-id/b-part2"],
                forceImport=True,
                keystore={"partition": 0, "promptTimeout": 0},
            )
        )
    )
    assert parsed["online_grace"] == 15
    assert parsed["timeout"] == 300
    assert parsed["datasets"] == ["rpool/crypt", "rpool/other"]
    assert parsed["devices"] == ["/dev/disk/by-id/a-part2", "/dev/disk/by-id/b-part2"]
    assert parsed["force_import"] is True
    assert parsed["keystore"]["partition"] == 0
    assert parsed["keystore"]["prompt_timeout"] == 0


def test_settings_merge_over_options_table_by_table() -> None:
    parsed = tomllib.loads(
        rendered(cfg(settings={"timeout": "10min", "keystore": {"tries": 5}, "future_key": True}))
    )
    assert parsed["timeout"] == "10min"
    assert parsed["future_key"] is True
    # Merged, not replaced: the other keystore keys survive.
    assert parsed["keystore"]["tries"] == 5
    assert parsed["keystore"]["volume"] == "rpool/volumes/bootsecrets"


@pytest.mark.parametrize(
    "value",
    [
        'quote " and backslash \\',
        "new\nline\ttab",
        "unicode ✓ ümlaut",
        "control \x01 and del \x7f",
        "",
    ],
)
def test_strings_round_trip_through_toml(value: str) -> None:
    parsed = tomllib.loads(rendered(cfg(settings={"weird": value, "nested": {"k y": value}})))
    assert parsed["weird"] == value
    assert parsed["nested"]["k y"] == value


def test_nested_tables_get_dotted_headers() -> None:
    text = nix_eval(f'(import {LIB}).toTOML {{ a.b.c = 1; a.d = "x"; top = true; }}')
    assert tomllib.loads(text) == {"top": True, "a": {"d": "x", "b": {"c": 1}}}
    assert "[a.b]" in text


def test_floats_are_refused_with_the_key_named() -> None:
    err = nix_eval_error(f"(import {LIB}).toTOML {{ keystore.tries = 1.5; }}")
    assert "keystore.tries" in err


def test_rendered_file_is_accepted_by_the_daemon(tmp_path: Path) -> None:
    """What the module writes, the daemon's own loader reads back as meant."""
    config = pytest.importorskip("lczfs_unlockd.config")
    path = tmp_path / "lczfs-unlockd.toml"
    path.write_text(
        rendered(
            cfg(
                datasets=["rpool/crypt"],
                onlineGrace=15,
                keystore={"keyfile": "/etc/lczfs-unlockd/keystore.key", "tries": 0},
            )
        )
    )
    loaded = config.load(str(path))
    assert loaded.pool == "rpool"
    assert loaded.datasets == ("rpool/crypt",)
    assert loaded.online_grace == 15.0
    assert loaded.timeout == 300.0
    assert loaded.dev_nodes == "/dev/disk/by-id"
    assert loaded.keystore.device == "/dev/zvol/rpool/volumes/bootsecrets-part1"
    assert loaded.keystore.keyfile == "/etc/lczfs-unlockd/keystore.key"
    assert loaded.keystore.tries == 0
    assert loaded.keystore.token_timeout == 30.0
    assert [m.value for m in loaded.keystore.unlock] == ["token", "keyfile", "passphrase"]

    path.write_text(rendered(cfg()))
    assert config.load(str(path)).datasets is None  # "auto"


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
        (cfg(keystore={"keyfile": "keys/k"}), "must be an absolute path"),
        (
            cfg(keystore={"keyfile": "/etc/lczfs-unlockd/keystore.key"}),
            'boot.initrd.secrets."/etc/lczfs-unlockd/keystore.key"',
        ),
        (cfg(settings={"keystore": {"mountpoint": "relative"}}), "cannot work"),
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
    assert lib_call("kernelParams", cfg(dryRun=dry_run, debug=debug)) == expected


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


def test_module_option_names_cover_every_config_key() -> None:
    """Every key the daemon reads has an option in nix/module.nix."""
    module = (ROOT / "nix" / "module.nix").read_text()
    for option in (
        "pool",
        "devices",
        "devNodes",
        "forceImport",
        "onlineGrace",
        "timeout",
        "datasets",
        "mask",
        "volume",
        "partition",
        "name",
        "mountpoint",
        "unlock",
        "keyfile",
        "tries",
        "promptTimeout",
        "tokenTimeout",
        "settings",
        "dryRun",
        "debug",
    ):
        assert f"    {option} = lib.mkOption" in module, option
