"""Whole NixOS systems with the module, evaluated against a real nixpkgs.

Each variant is a realistic host (systemd initrd, ZFS root on
rpool/crypt/local/root, networking.hostId; tests/nix/system.nix) plus the
module's options.  All variants are evaluated by two nix-instantiate calls
run side by side (working configurations, and the ones that must be refused);
"full" variants have their initrd and toplevel instantiated (.drv files
written).  The module comes by path and, for one variant, through the
flake's nixosModules.default with nixpkgs overridden by the same tree.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .nixtools import ROOT, SYSTEM_NIX, Nixpkgs, nix_env, run_nix
from .variants import KEYFILE, OWN_PCRLOCK, REFUSED, WORKING, lczfs

VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


def effective_unit(*texts: str) -> dict[str, dict[str, list[str]]]:
    """systemd's reading of a unit plus drop-ins: repeated keys add up, an empty value resets."""
    unit: dict[str, dict[str, list[str]]] = {}
    for text in texts:
        section = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            values = unit.setdefault(section, {}).setdefault(key, [])
            if value == "":
                values.clear()
            elif key in ("Before", "After", "Wants", "Requires", "Conflicts", "WantedBy"):
                values.extend(value.split())
            else:
                values.append(value)
    return unit


@pytest.fixture(scope="session")
def shipped_unit(workdir: Path) -> Iterator[Path]:
    """units/lczfs-unlockd.service as the package installs it (nix/install-unit.sh)."""
    out = workdir / "unit-out"
    subprocess.run(
        ["bash", str(ROOT / "nix" / "install-unit.sh"), str(out), "/EXE"],
        cwd=ROOT,
        check=True,
    )
    yield out / "lib" / "systemd" / "system" / "lczfs-unlockd.service"


def toml_of(result: dict[str, Any], tmp: Path) -> Path:
    """pkgs.formats.toml's build step (json2toml of remarshal, as nixpkgs pins it) on its input."""
    src = tmp / "value.json"
    dst = tmp / "lczfs-unlockd.toml"
    src.write_text(result["configJSON"])
    assert result["configBuilder"].strip() == 'json2toml "$valuePath" "$out"'
    assert result["configNativeInputs"] == ["remarshal"]
    json2toml = VENV_BIN / "json2toml"
    if not json2toml.exists():
        pytest.fail("json2toml missing: remarshal belongs in requirements-dev.txt")
    subprocess.run([str(json2toml), str(src), str(dst)], check=True)
    return dst


# --- the working systems ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(WORKING))
def test_system_evaluates_without_failed_assertions(systems: dict[str, Any], name: str) -> None:
    result = systems[name]
    assert result["failed"] == []
    if name == "disabled":
        assert result["lczfsInInitrd"] is False
        assert Path(result["toplevel"]).is_file()
        return
    if WORKING[name].get("full"):
        assert result["initrd"].endswith(".drv") and Path(result["initrd"]).is_file()
        assert result["toplevel"].endswith(".drv") and Path(result["toplevel"]).is_file()
    own = [w for w in result["warnings"] if "lczfs" in w]
    if name == "legacy":
        assert len(own) == 8, own
        assert all("has been renamed to `boot.initrd.lczfs-unlockd." in w for w in own), own
    else:
        assert own == []


def test_flake_module_is_the_repositorys_module_file(flake_eval: dict[str, Any]) -> None:
    for path in flake_eval["modules"].values():
        assert path.startswith("/nix/store/") and path.endswith("/nix/module.nix")
        assert Path(path).read_text() == (ROOT / "nix" / "module.nix").read_text()


def test_flake_and_path_module_give_the_same_initrd_settings(systems: dict[str, Any]) -> None:
    assert systems["flake"]["settings"] == systems["default"]["settings"]
    assert systems["flake"]["configJSON"] == systems["default"]["configJSON"]


def test_flake_package_uses_systemd_itself_not_its_python_bindings(
    flake_eval: dict[str, Any],
) -> None:
    """Issue 8, failure 4: python3Packages.callPackage filled in python3.11-systemd."""
    pkgs = flake_eval["packages"]
    assert pkgs["systemd"].startswith("systemd-"), pkgs["systemd"]
    assert (
        f"SYSTEMD_ASK_PASSWORD={pkgs['systemdPath']}/bin/systemd-ask-password"
        in (pkgs["postPatch"])
    )
    assert pkgs["zfs"].startswith("zfs-user-"), pkgs["zfs"]
    for key in ("drv", "pyzfs", "initrdEnv"):
        assert pkgs[key].endswith(".drv")


def test_package_refuses_the_python_bindings_of_systemd(nixpkgs: Nixpkgs) -> None:
    expr = (
        f"let pkgs = import {nixpkgs.tree} {{ }}; in "
        f"(pkgs.python3Packages.callPackage {ROOT}/nix/package.nix {{"
        " pyzfs = null; inherit (pkgs) zfs cryptsetup; }).drvPath"
    )
    proc = run_nix(["nix-instantiate", "--eval", "--expr", expr])
    assert proc.returncode != 0
    assert "`systemd` is the Python package python3.11-systemd" in proc.stderr, proc.stderr


def test_unit_is_the_packages_with_a_drop_in(systems: dict[str, Any], shipped_unit: Path) -> None:
    result = systems["default"]
    package = result["packageUnit"].removesuffix("/lib/systemd/system/lczfs-unlockd.service")
    assert package in result["initrdPackages"]
    assert result["unitOverrideStrategy"] == "asDropinIfExists"
    # The drop-in only adds what NixOS needs; everything else is the file's.
    dropin = effective_unit(result["dropin"])
    assert set(dropin) == {"Unit", "Service", "Install"}
    assert dropin["Unit"] == {"Before": ["zfs-import-rpool.service"]}
    assert set(dropin["Service"]) == {"Environment", "ExecStart"}
    assert sorted(result["unitWantedBy"]) == ["initrd.target", "zfs-import-rpool.service"]

    unit = effective_unit(shipped_unit.read_text(), result["dropin"])
    service = unit["Service"]
    env = next(p for p in result["storePaths"] if p.endswith("-lczfs-unlockd-initrd-env-0.1.0"))
    assert service["ExecStart"] == [f"{env}/bin/lczfs-unlockd"]
    assert service["Type"] == ["notify"]
    assert service["RemainAfterExit"] == ["yes"]
    assert service["KeyringMode"] == ["shared"]
    assert unit["Unit"]["DefaultDependencies"] == ["no"]
    before = unit["Unit"]["Before"]
    for needed in ("zfs-import-rpool.service", "sysroot.mount", "initrd-root-fs.target"):
        assert needed in before
    # NixOS's own import of the root pool exists and is ordered after us by
    # our Before=; it wants us through the WantedBy above.
    assert result["importUnit"] is not None
    assert "lczfs" not in result["importUnit"]


def test_initrd_config_file_is_read_back_by_the_daemon(
    systems: dict[str, Any], tmp_path: Path
) -> None:
    from lczfs_unlockd import config

    loaded = config.load(str(toml_of(systems["default"], tmp_path)))
    assert loaded.pool == "rpool"
    assert loaded.keystore.device == "/dev/zvol/rpool/volumes/bootsecrets-part1"
    assert loaded.keystore.mountpoint == "/bootsecrets"
    assert loaded.keystore.keyfile is None
    assert loaded.datasets is None  # "auto"
    assert loaded.dev_nodes == "/dev/disk/by-id"
    assert loaded.force_import is False  # boot.zfs.forceImportRoot = false in system.nix
    assert loaded.timeout == 300.0
    assert [m.value for m in loaded.keystore.unlock] == ["token", "keyfile", "passphrase"]
    # The root check, from system.nix's fileSystems: / and /nix are
    # datasets of rpool (/boot is vfat).
    assert loaded.root_dataset == "rpool/crypt/local/root"
    assert loaded.verify_datasets == ("rpool/crypt/local/nix",)
    assert loaded.trusted_roots is None
    assert loaded.keystore.measure_pcr is None  # TPM2 is on: the daemon decides
    assert loaded.keystore.tpm2_signature is None
    assert loaded.keystore.tpm2_pcrlock is None


def test_keyfile_through_initrd_secrets(systems: dict[str, Any], tmp_path: Path) -> None:
    from lczfs_unlockd import config

    loaded = config.load(str(toml_of(systems["keyfile"], tmp_path)))
    assert loaded.keystore.keyfile == KEYFILE
    assert [m.value for m in loaded.keystore.unlock] == ["keyfile"]


def test_datasets_devices_and_mask(systems: dict[str, Any], tmp_path: Path) -> None:
    from lczfs_unlockd import config

    loaded = config.load(str(toml_of(systems["datasets"], tmp_path)))
    assert loaded.datasets == ("rpool/crypt", "rpool/crypt/local")
    assert loaded.devices == ("/dev/disk/by-id/nvme-A-part2", "/dev/disk/by-id/nvme-B-part2")
    assert loaded.mask == ("systemd-cryptsetup@secretsroot.service",)


def test_legacy_option_names_give_the_same_file(systems: dict[str, Any], tmp_path: Path) -> None:
    from lczfs_unlockd import config

    result = systems["legacy"]
    assert result["tokenPlugins"] == ["fido2"]
    loaded = config.load(str(toml_of(result, tmp_path)))
    assert loaded.dev_nodes == "/dev/disk/by-partuuid"
    assert loaded.online_grace == 15.0
    assert loaded.force_import is True
    assert loaded.keystore.prompt_timeout == 120.0
    assert loaded.keystore.token_timeout == 20.0
    assert loaded.keystore.tries == 5


def test_freeform_keys_reach_the_file(systems: dict[str, Any], tmp_path: Path) -> None:
    parsed = tomllib.loads(toml_of(systems["freeform"], tmp_path).read_text())
    assert parsed["pool_guid"] == "1234567890123456789"
    assert parsed["max_pbkdf2iters"] == 1000000
    assert parsed["keystore"]["some_future_key"] is True
    assert parsed["keystore"]["volume"] == "rpool/volumes/bootsecrets"


def test_unset_keys_are_left_out_of_the_file(systems: dict[str, Any]) -> None:
    written = json.loads(systems["default"]["configJSON"])
    assert "keyfile" not in written["keystore"]
    assert systems["default"]["settings"]["keystore"]["keyfile"] is None
    # Module-only options never reach the daemon's file.
    for key in ("tokenPlugins", "dryRun", "debug", "enable", "package"):
        assert key not in written


def test_package_dependencies_are_pyprojects_plus_pyzfs(systems: dict[str, Any]) -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in declared}
    propagated = set(systems["default"]["package"]["dependencies"]) - {"python3"}
    assert propagated == names | {"pyzfs"}


def test_store_paths_and_kernel_modules(systems: dict[str, Any]) -> None:
    result = systems["default"]
    paths = result["storePaths"]
    systemd, zfs = result["initrdSystemd"], result["zfs"]
    assert result["package"]["systemd"] == systemd
    assert result["package"]["zfs"] == zfs
    assert result["package"]["pyzfs"] == f"python{result['python']}-pyzfs-{result['zfsVersion']}"
    for path in (
        f"{zfs}/bin/zpool",
        f"{zfs}/bin/zfs",
        f"{systemd}/bin/systemd-ask-password",
        f"{systemd}/lib/cryptsetup/libcryptsetup-token-systemd-tpm2.so",
    ):
        assert path in paths
    # The paths pinned in _build_paths.py are the ones put in the initrd.
    post_patch = result["package"]["postPatch"]
    libdir = next(v for v in post_patch.split() if v.startswith("CRYPTSETUP_LIBDIR="))
    assert libdir.removeprefix("CRYPTSETUP_LIBDIR=") in paths
    assert f"ZPOOL={zfs}/bin/zpool" in post_patch
    assert f"CRYPTSETUP_TOKEN_PATH={systemd}/lib/cryptsetup" in post_patch
    for module in ("dm_mod", "dm_crypt", "cryptd", "ext4", "aes", "xts", "sha256"):
        assert module in result["availableKernelModules"]
    assert "dm_mod" in result["kernelModules"]
    assert "zfs" in result["kernelModules"]
    assert result["kernelParams"] == [p for p in result["kernelParams"] if "lczfs" not in p]


def test_token_plugins(systems: dict[str, Any]) -> None:
    result = systems["tokens"]
    systemd = result["initrdSystemd"]
    paths = result["storePaths"]
    for plugin in ("tpm2", "fido2", "pkcs11"):
        assert f"{systemd}/lib/cryptsetup/libcryptsetup-token-systemd-{plugin}.so" in paths
    assert any(p.endswith("/lib/libfido2.so.1") for p in paths)
    assert any(p.endswith("/lib/libp11-kit.so.0") for p in paths)
    # Without "token" as unlock method no plugin of ours is added (systemd's
    # initrd module adds tpm2 and fido2 itself when cryptsetup is enabled).
    ours = systems["passphrase-only"]["storePaths"]
    assert not any(p.endswith("libcryptsetup-token-systemd-pkcs11.so") for p in ours)
    assert not any(p.endswith("/lib/libp11-kit.so.0") for p in ours)


@pytest.mark.parametrize(
    ("name", "plugins"),
    [
        ("default", ["tpm2"]),
        ("tpm2-new-on", ["tpm2"]),
        ("tpm2-new-off", []),
        ("tpm2-old-off", []),
    ],
)
def test_tpm2_default_follows_either_option_name(
    systems: dict[str, Any], name: str, plugins: list[str]
) -> None:
    """Issue 8, failure 5: boot.initrd.systemd.tpm2 does not exist on 24.05."""
    assert systems[name]["tokenPlugins"] == plugins


def test_dry_run_and_debug_reach_the_kernel_command_line(systems: dict[str, Any]) -> None:
    params = systems["dry-run"]["kernelParams"]
    assert "rd.lczfs.dry_run=1" in params
    assert "rd.lczfs.debug" in params
    assert systems["dry-run"]["configJSON"] == systems["default"]["configJSON"]


# --- the refused ones ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_configuration_that_cannot_work_is_refused(systems: dict[str, Any], name: str) -> None:
    _, needle = REFUSED[name]
    failed = systems[name]["failed"]
    assert any(needle in message for message in failed), failed
    assert "initrd" not in systems[name]


# --- the root check and the measured unlock --------------------------------

SIGNATURE_IN_INITRD = "/etc/lczfs-unlockd/tpm2-pcr-signature.json"
PCRLOCK_IN_INITRD = "/etc/lczfs-unlockd/tpm2-pcrlock.json"
FIXTURES = Path(__file__).with_name("fixtures")
TSS2 = (
    "libtss2-esys.so.0",
    "libtss2-tctildr.so.0",
    "libtss2-tcti-device.so.0",
    "libtss2-mu.so.0",
    "libtss2-rc.so.0",
)


def written(result: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """The initrd's /etc/lczfs-unlockd.toml as TOML reads it (types included)."""
    return tomllib.loads(toml_of(result, tmp).read_text())


@pytest.mark.parametrize(
    ("name", "root", "verify"),
    [
        ("default", "rpool/crypt/local/root", ["rpool/crypt/local/nix"]),
        # / is no dataset: nothing to say about it; /nix (NixOS's list) and
        # /persist (neededForBoot) are checked, /home (stage 2) is not.
        ("root-tmpfs", None, ["rpool/crypt/local/nix", "rpool/safe/persist"]),
        # / is on another pool, which this run does not unlock.
        ("root-other-pool", None, ["rpool/crypt/local/nix"]),
        ("root-check-off", None, []),
        ("root-check", "rpool/crypt/local/root", ["rpool/safe/persist"]),
    ],
)
def test_root_dataset_and_verify_datasets_follow_file_systems(
    systems: dict[str, Any], tmp_path: Path, name: str, root: str | None, verify: list[str]
) -> None:
    from lczfs_unlockd import config

    parsed = written(systems[name], tmp_path)
    assert parsed.get("root_dataset") == root
    assert "root_dataset" in parsed or root is None
    assert parsed["verify_datasets"] == verify
    loaded = config.load(str(tmp_path / "lczfs-unlockd.toml"))
    assert loaded.root_dataset == root
    assert loaded.verify_datasets == tuple(verify)


def test_root_check_and_measurement_keys_keep_their_toml_types(
    systems: dict[str, Any], tmp_path: Path
) -> None:
    from lczfs_unlockd import config

    parsed = written(systems["root-check"], tmp_path)
    assert parsed["verify_datasets"] == ["rpool/safe/persist"]
    assert parsed["trusted_roots"] == ["rpool/crypt", "rpool/safe"]
    keystore = parsed["keystore"]
    assert keystore["measure_pcr"] == 15 and type(keystore["measure_pcr"]) is int
    # A file of the build is copied to a fixed place; a path inside the
    # initrd is written as given.
    assert keystore["tpm2_signature"] == SIGNATURE_IN_INITRD
    assert keystore["tpm2_pcrlock"] == OWN_PCRLOCK
    loaded = config.load(str(tmp_path / "lczfs-unlockd.toml"))
    assert loaded.trusted_roots == ("rpool/crypt", "rpool/safe")
    assert loaded.keystore.measure_pcr == 15
    assert loaded.keystore.tpm2_signature == SIGNATURE_IN_INITRD
    assert loaded.keystore.tpm2_pcrlock == OWN_PCRLOCK


@pytest.mark.parametrize(
    ("name", "measure"),
    [
        ("measure-off", False),
        # TPM2 off in the initrd (either option name): no TSS libraries, so
        # the module says false rather than leave it to the daemon.
        ("tpm2-old-off", False),
        ("tpm2-new-off", False),
        ("tpm2-new-on", None),
        ("default", None),
    ],
)
def test_measure_pcr_false_stays_a_boolean(
    systems: dict[str, Any], tmp_path: Path, name: str, measure: bool | None
) -> None:
    from lczfs_unlockd import config

    keystore = written(systems[name], tmp_path)["keystore"]
    if measure is None:
        assert "measure_pcr" not in keystore
    else:
        assert keystore["measure_pcr"] is measure
    assert config.load(str(tmp_path / "lczfs-unlockd.toml")).keystore.measure_pcr is measure


def test_unset_root_check_keys_are_left_out(systems: dict[str, Any]) -> None:
    file = json.loads(systems["default"]["configJSON"])
    assert "trusted_roots" not in file
    for key in ("tpm2_signature", "tpm2_pcrlock", "measure_pcr"):
        assert key not in file["keystore"]
    assert systems["default"]["settings"]["trusted_roots"] is None


def test_policy_files_of_the_build_are_copied_into_the_initrd(systems: dict[str, Any]) -> None:
    contents = systems["root-check"]["lczfsContents"]
    assert contents[SIGNATURE_IN_INITRD] == str(FIXTURES / "tpm2-pcr-signature.json")
    # Put there by the configuration itself, not by the module.
    assert contents[OWN_PCRLOCK] == str(FIXTURES / "pcrlock.json")
    assert PCRLOCK_IN_INITRD not in contents
    copied = systems["pcrlock-copied"]["lczfsContents"]
    assert copied[PCRLOCK_IN_INITRD] == str(FIXTURES / "pcrlock.json")
    assert json.loads(systems["pcrlock-copied"]["configJSON"])["keystore"]["tpm2_pcrlock"] == (
        PCRLOCK_IN_INITRD
    )
    # systemd-stub's /.extra file: nothing to copy.
    off = systems["measure-off"]
    assert set(off["lczfsContents"]) == {"/etc/lczfs-unlockd.toml"}
    assert json.loads(off["configJSON"])["keystore"]["tpm2_signature"] == (
        "/.extra/tpm2-pcr-signature.json"
    )


def test_policy_files_reach_the_initrd_derivation(systems: dict[str, Any]) -> None:
    """make-initrd-ng's input pairs each store file with its place in the initrd."""
    drv = Path(systems["root-check"]["initrd"]).read_text()
    for name, target in (
        ("tpm2-pcr-signature.json", SIGNATURE_IN_INITRD),
        ("pcrlock.json", OWN_PCRLOCK),
    ):
        # The drv's string escapes the newlines between object and symlink.
        pair = re.search(
            rf"(/nix/store/[0-9a-z]{{32}}-{re.escape(name)})\\n{re.escape(target)}\\n", drv
        )
        assert pair, f"{target} is not in the initrd's contents"
        # Evaluation copied the file to the store; it is the fixture.
        assert Path(pair[1]).read_bytes() == (FIXTURES / name).read_bytes()


@pytest.mark.parametrize(
    ("name", "present"),
    [
        ("default", True),
        ("root-check", True),
        ("tpm2-new-on", True),
        ("measure-off", False),
        ("tpm2-old-off", False),
        ("tpm2-new-off", False),
    ],
)
def test_tss_libraries_are_in_the_initrd_when_measuring(
    systems: dict[str, Any], name: str, present: bool
) -> None:
    result = systems[name]
    tss = result["package"]["tpm2Tss"]
    assert tss == result["tpm2Tss"]  # the package's tpm2-tss is nixpkgs' (systemd's)
    paths = result["storePaths"]
    for lib in TSS2:
        assert (f"{tss}/lib/{lib}" in paths) == present, (lib, paths)


def test_build_paths_get_the_tss_libraries(systems: dict[str, Any]) -> None:
    package = systems["default"]["package"]
    tss = package["tpm2Tss"]
    post_patch = package["postPatch"]
    assert f"TSS2_LIBDIR={tss}/lib\n" in post_patch
    assert package["tss2BuildPaths"] in post_patch
    # After nix/build-paths.sh, which writes the file anew.
    assert post_patch.index("bash nix/build-paths.sh") < post_patch.index(package["tss2BuildPaths"])
    for name in ("LIBTSS2_ESYS", "LIBTSS2_TCTILDR", "TPM2_TCTI"):
        assert f"\n{name} = " in package["tss2BuildPaths"]


@pytest.mark.parametrize(
    ("name", "mounts"),
    [
        ("default", ["sysroot.mount", "sysroot-nix.mount"]),
        ("root-tmpfs", ["sysroot-nix.mount", "sysroot-persist.mount"]),
        ("root-other-pool", ["sysroot-nix.mount"]),
        ("root-check-off", ["sysroot.mount", "sysroot-nix.mount"]),
    ],
)
def test_the_pools_stage_1_mounts_require_the_unlock(
    systems: dict[str, Any], name: str, mounts: list[str]
) -> None:
    """A failed run (a refused root) leaves them undone, as a failed zfs-import-rpool does."""
    result = systems[name]
    assert sorted(result["unitRequiredBy"]) == sorted(mounts)
    # NixOS's own import is required by the same mounts (and by the pool's
    # stage-2 ones, which do not exist in the initrd).
    assert set(mounts) <= set(result["importRequiredBy"])
    # Ordered before them already, by the package's unit (Before=sysroot.mount)
    # and the mounts' own After= on sysroot.mount.
    assert "sysroot.mount" in (ROOT / "units" / "lczfs-unlockd.service").read_text()


@pytest.mark.parametrize("name", ["default", "root-tmpfs", "root-check-off", "flake"])
def test_sysroot_mount_asserts_the_daemons_verdict(systems: dict[str, Any], name: str) -> None:
    """The dracut module's drop-in, as a NixOS drop-in: mounted only once the root was vouched for."""
    dropin = systems[name]["sysrootDropin"]
    # sysroot.mount is the fstab generator's: a drop-in, never a unit of its own.
    assert dropin["overrideStrategy"] == "asDropin"
    shipped = (ROOT / "units" / "sysroot.mount.d-lczfs-unlockd.conf").read_text()
    assert dropin["text"] == shipped
    from lczfs_unlockd import paths

    assert effective_unit(dropin["text"]) == {
        "Unit": {"AssertPathExists": [paths.ROOT_CHECKED_FLAG, f"!{paths.ROOT_REFUSED_FLAG}"]}
    }
    # Imported but not enabled: sysroot.mount is left alone.
    assert systems["disabled"]["sysrootDropin"] is False


@pytest.mark.parametrize("value", [24, -1, "15"])
def test_measure_pcr_outside_0_to_23_fails_evaluation(nixpkgs: Nixpkgs, value: Any) -> None:
    config = lczfs(keystore={"measure_pcr": value})
    proc = subprocess.run(
        [
            "nix-instantiate",
            "--eval",
            "--strict",
            "--json",
            str(SYSTEM_NIX),
            "-A",
            "results",
            "--arg",
            "nixpkgs",
            str(nixpkgs.tree),
            "--argstr",
            "variants",
            json.dumps({"bad": {"config": config}}),
        ],
        capture_output=True,
        text=True,
        check=False,
        env=nix_env(),
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert proc.returncode != 0
    assert (
        "boot.initrd.lczfs-unlockd.settings.keystore.measure_pcr' is not of type"
        " `null, a boolean or a TPM2 PCR index between 0 and 23'"
    ) in proc.stderr, proc.stderr[-3000:]
    assert f"system.nix': {json.dumps(value)}" in proc.stderr
