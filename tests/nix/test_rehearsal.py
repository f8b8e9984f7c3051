"""Build rehearsals: what each derivation's build would run, run on the host.

Nix cannot build here (no binary cache), so the steps of every derivation
the project defines are reproduced with the same inputs where the host has
them, and with the same shell files where Nix runs shell
(nix/build-paths.sh, nix/install-unit.sh, nix/pyzfs-patch.sh):

- nix/package.nix: its check phase (pytest tests/unit) on exactly the files
  its fileset selects, as Nix copied them to the store during evaluation;
- nix/pyzfs.nix: the patch script on the real contrib/pyzfs of OpenZFS
  releases (Debian's orig tarballs), then a wheel built from the result;
- nix/tests/unlock.nix: the test script type-checked the way nixpkgs' test
  driver does it (nixos/lib/testing/driver.nix), and linted with pyflakes.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from .nixtools import CACHE, ROOT, Nixpkgs, missing, nix_ok

VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = sys.executable
HOST_LIB = Path("/usr/lib/x86_64-linux-gnu")


@pytest.fixture(scope="module")
def package_src(systems: dict[str, Any]) -> Path:
    """The package's `src` (its fileset), copied to the store by evaluation."""
    src = Path(systems["default"]["package"]["src"])
    assert src.is_dir(), f"{src}: the package source was not copied to the store"
    return src


def _host_inputs(tmp: Path) -> dict[str, str]:
    """The host's counterparts of the store paths postPatch gets; stubs where missing."""

    def program(name: str, *candidates: str) -> str:
        for c in candidates:
            if Path(c).exists():
                return c
        stub = tmp / "stub-bin" / name
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 1\n")
        stub.chmod(0o755)
        return str(stub)

    return {
        "ZPOOL": program("zpool", "/usr/sbin/zpool", "/sbin/zpool"),
        "ZFS": program("zfs", "/usr/sbin/zfs", "/sbin/zfs"),
        "SYSTEMD_ASK_PASSWORD": program("systemd-ask-password", "/usr/bin/systemd-ask-password"),
        "ZFS_LIBDIR": str(HOST_LIB),
        "CRYPTSETUP_LIBDIR": str(HOST_LIB),
        "LIBC": str(HOST_LIB / "libc.so.6"),
        "CRYPTSETUP_TOKEN_PATH": str(HOST_LIB / "cryptsetup"),
    }


def _post_patch(systems: dict[str, Any], build: Path, tmp: Path) -> str:
    """nix/package.nix's postPatch on the host: nix/build-paths.sh, then the
    tpm2-tss entries (the package's own shell, as evaluated) with the host's
    tpm2-tss."""
    out = _bash(build / "nix" / "build-paths.sh", cwd=build, env=_host_inputs(tmp))
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", systems["default"]["package"]["tss2BuildPaths"]],
        cwd=build,
        env={**os.environ, "TSS2_LIBDIR": str(HOST_LIB)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"the tpm2-tss entries failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _bash(script: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        ["bash", str(script), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# --- nix/package.nix -------------------------------------------------------


def test_package_check_phase_passes_on_exactly_its_fileset(
    systems: dict[str, Any], package_src: Path, tmp_path: Path
) -> None:
    """Issue 8, failure 1: the fileset had tests/unit but not tests/fakes.py."""
    build = tmp_path / "source"
    shutil.copytree(package_src, build, symlinks=True)
    for p in [build, *build.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)  # the store copy is read-only; the build's is not
    # postPatch, then postInstall (into a scratch $out), then pytestCheckHook
    # with the flags of nix/package.nix.
    _post_patch(systems, build, tmp_path)
    _bash(build / "nix" / "install-unit.sh", str(tmp_path / "out"), "/EXE", cwd=build)
    flags = systems["default"]["package"]["pytestFlags"]  # pytestFlagsArray, as evaluated
    assert "tests/unit" in flags
    proc = subprocess.run(
        [PYTHON, "-m", "pytest", *flags, "-p", "no:cacheprovider", "-q"],
        cwd=build,
        env={**os.environ, "HOME": "/homeless-shelter", "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    tail = "\n".join(proc.stdout.splitlines()[-40:])
    assert proc.returncode == 0, f"the package's check phase fails:\n{tail}\n{proc.stderr[-2000:]}"
    assert " passed" in tail


def test_check_phase_rehearsal_catches_a_fileset_without_fakes(
    package_src: Path, tmp_path: Path
) -> None:
    """Failure 1 as it was: the same check phase without tests/fakes.py."""
    build = tmp_path / "source"
    shutil.copytree(package_src, build, symlinks=True)
    for p in [build, *build.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    (build / "tests" / "fakes.py").unlink()
    proc = subprocess.run(
        [PYTHON, "-m", "pytest", "tests/unit", "-m", "not vm", "-p", "no:cacheprovider", "-q"],
        cwd=build,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "No module named 'tests.fakes'" in proc.stdout + proc.stderr


def test_build_paths_refuses_a_systemd_without_its_programs(tmp_path: Path) -> None:
    """Issue 8, failure 4 as the build would see it: python3.11-systemd has no bin/."""
    (tmp_path / "lczfs_unlockd").mkdir()
    python_systemd = tmp_path / "python3.11-systemd-235"
    (python_systemd / "lib" / "python3.11").mkdir(parents=True)
    env = {
        **_host_inputs(tmp_path),
        "SYSTEMD_ASK_PASSWORD": f"{python_systemd}/bin/systemd-ask-password",
        "CRYPTSETUP_TOKEN_PATH": f"{python_systemd}/lib/cryptsetup",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "nix" / "build-paths.sh")],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert f"names {python_systemd}/bin/systemd-ask-password, which does not exist" in proc.stderr


def test_build_paths_pins_sonames(tmp_path: Path) -> None:
    (tmp_path / "lczfs_unlockd").mkdir()
    _bash(ROOT / "nix" / "build-paths.sh", cwd=tmp_path, env=_host_inputs(tmp_path))
    namespace: dict[str, Any] = {}
    exec((tmp_path / "lczfs_unlockd" / "_build_paths.py").read_text(), namespace)
    assert namespace["LIBZFS_CORE"] == (str(HOST_LIB / "libzfs_core.so.3"),)
    assert namespace["LIBNVPAIR"] == (str(HOST_LIB / "libnvpair.so.3"),)
    assert namespace["LIBCRYPTSETUP"] == (str(HOST_LIB / "libcryptsetup.so.12"),)


def _host_tss2() -> None:
    for lib in ("libtss2-esys.so.0", "libtss2-tctildr.so.0", "libtss2-tcti-device.so.0"):
        if not (HOST_LIB / lib).exists():
            missing(
                f"{HOST_LIB / lib} is not installed (scripts/setup-host installs the tss2 libraries)"
            )


def test_build_paths_pin_the_tss_libraries(systems: dict[str, Any], tmp_path: Path) -> None:
    """_build_paths.py gets LIBTSS2_ESYS, LIBTSS2_TCTILDR and TPM2_TCTI, and paths.py takes them."""
    _host_tss2()
    (tmp_path / "lczfs_unlockd").mkdir()
    shutil.copy(ROOT / "lczfs_unlockd" / "paths.py", tmp_path / "lczfs_unlockd" / "paths.py")
    (tmp_path / "lczfs_unlockd" / "__init__.py").write_text("")
    (tmp_path / "nix").mkdir()
    shutil.copy(ROOT / "nix" / "build-paths.sh", tmp_path / "nix")
    _post_patch(systems, tmp_path, tmp_path)
    namespace: dict[str, Any] = {}
    exec((tmp_path / "lczfs_unlockd" / "_build_paths.py").read_text(), namespace)
    assert namespace["LIBTSS2_ESYS"] == (str(HOST_LIB / "libtss2-esys.so.0"),)
    assert namespace["LIBTSS2_TCTILDR"] == (str(HOST_LIB / "libtss2-tctildr.so.0"),)
    assert namespace["TPM2_TCTI"] == f"{HOST_LIB}/libtss2-tcti-device.so.0:/dev/tpmrm0"
    # The names paths.py defines, so its star import overrides them.
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]); from lczfs_unlockd import paths;"
        " print(paths.LIBTSS2_ESYS[0], paths.LIBTSS2_TCTILDR[0], paths.TPM2_TCTI)"
    )
    out = subprocess.run(
        [PYTHON, "-I", "-c", check, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [
        str(HOST_LIB / "libtss2-esys.so.0"),
        str(HOST_LIB / "libtss2-tctildr.so.0"),
        f"{HOST_LIB}/libtss2-tcti-device.so.0:/dev/tpmrm0",
    ]


# tctildr's answers: the TCTI library was loaded but its device did not
# open (IO_ERROR), or no library was found under that name (NOT_SUPPORTED).
TSS2_TCTI_RC_IO_ERROR = 0xA000A
TSS2_TCTI_RC_NOT_SUPPORTED = 0xA0015


def _tctildr_initialize(name_conf: str) -> int:
    """Tss2_TctiLdr_Initialize(name_conf) with the host's tctildr, in a child (it logs to stderr)."""
    code = (
        "import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]);"
        " f = lib.Tss2_TctiLdr_Initialize;"
        " f.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)];"
        " f.restype = ctypes.c_uint32; ctx = ctypes.c_void_p();"
        " print(f(sys.argv[2].encode(), ctypes.byref(ctx)))"
    )
    out = subprocess.run(
        [PYTHON, "-I", "-c", code, str(HOST_LIB / "libtss2-tctildr.so.0"), name_conf],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out)


def test_tctildr_loads_the_tcti_by_the_path_in_tpm2_tcti(tmp_path: Path) -> None:
    """TPM2_TCTI names the device TCTI by path: tctildr dlopen()s it as given.

    The device part points nowhere, so the library loads and then fails to
    open it -- a different error from a name no library answers to.
    """
    _host_tss2()
    device = tmp_path / "no-tpm"
    by_path = f"{HOST_LIB}/libtss2-tcti-device.so.0:{device}"
    assert _tctildr_initialize(by_path) == TSS2_TCTI_RC_IO_ERROR
    assert _tctildr_initialize(f"{tmp_path}/libtss2-tcti-device.so.0:{device}") == (
        TSS2_TCTI_RC_NOT_SUPPORTED
    )


def test_tss_entries_refuse_a_tpm2_tss_without_its_libraries(
    systems: dict[str, Any], tmp_path: Path
) -> None:
    (tmp_path / "lczfs_unlockd").mkdir()
    empty = tmp_path / "lib"
    empty.mkdir()
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", systems["default"]["package"]["tss2BuildPaths"]],
        cwd=tmp_path,
        env={**os.environ, "TSS2_LIBDIR": str(empty)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert f"would name {empty}/libtss2-esys.so.0, which does not exist" in proc.stderr


# --- nix/pyzfs.nix ---------------------------------------------------------


def _zfs_orig_tarballs() -> list[Path]:
    """Debian's orig tarballs of OpenZFS (upstream release tarballs), cached.

    Only the orig tarball is used; a mirror missing the .dsc or the Debian
    tarball (seen for bookworm-backports) does not matter.
    """
    cache = CACHE / "zfs-src"
    cache.mkdir(parents=True, exist_ok=True)
    releases = ("bookworm", "bookworm-backports")
    stamp = cache / "fetched"
    found = sorted(cache.glob("zfs-linux_*.orig.tar.gz"))
    if stamp.is_file() and len(found) >= len(releases):
        return found
    errors = []
    for release in releases:
        before = set(cache.glob("*.orig.tar.*"))
        proc = subprocess.run(
            ["apt-get", "source", "-q", "--download-only", f"zfs-linux/{release}"],
            cwd=cache,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 and not set(cache.glob("*.orig.tar.*")) - before:
            errors.append(f"zfs-linux/{release}: {proc.stderr.strip()[-800:]}")
    found = sorted(cache.glob("zfs-linux_*.orig.tar.gz"))
    if len(found) < len(releases):
        missing(
            "apt-get source zfs-linux failed (scripts/setup-host adds the deb-src entries):\n"
            + "\n".join(errors)
        )
    stamp.write_text("")
    return found


@pytest.fixture(scope="module")
def zfs_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """version -> an unpacked contrib/pyzfs of that OpenZFS release."""
    out: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("zfs-src")
    for tarball in _zfs_orig_tarballs():
        version = tarball.name.removeprefix("zfs-linux_").removesuffix(".orig.tar.gz")
        with tarfile.open(tarball) as tar:
            top = tar.next()
            assert top is not None
            prefix = top.name.split("/")[0] + "/contrib/pyzfs"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(base / version, members=members)
        out[version] = base / version / prefix
    assert out, "no OpenZFS source found"
    return out


def _series(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _release(version: str) -> list[int]:
    """Sort key of an OpenZFS release number."""
    return [int(x) for x in version.split(".")]


def _pip_wheel(source: Path, dest: Path) -> subprocess.CompletedProcess[str]:
    """What buildPythonPackage does with setup.py: a wheel, no isolation, no deps."""
    return subprocess.run(
        [
            PYTHON,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dest),
            ".",
        ],
        cwd=source,
        capture_output=True,
        text=True,
        check=False,
    )


def test_rehearsed_zfs_releases_bracket_the_ones_nixpkgs_ships(
    nixpkgs: Nixpkgs, zfs_sources: dict[str, Path]
) -> None:
    """Debian carries 2.1.x and 2.3.x; nixos-24.05 ships 2.1.x and 2.2.x."""
    shipped = json.loads(
        nix_ok(
            [
                "nix-instantiate",
                "--eval",
                "--strict",
                "--json",
                "--expr",
                f"let p = import {nixpkgs.tree} {{ }}; in [ p.zfs.version p.zfs_2_1.version ]",
            ]
        )
    )
    rehearsed = sorted({_series(v) for v in zfs_sources})
    for version in shipped:
        series = _series(version)
        assert rehearsed[0] <= series <= rehearsed[-1], (shipped, rehearsed)


def _patched_copy(src: Path, dest: Path, version: str, script: Path) -> Path:
    shutil.copytree(src, dest)
    _bash(script, version, str(HOST_LIB), cwd=dest)
    return dest


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_pyzfs_patch_and_wheel_on_real_openzfs(
    zfs_sources: dict[str, Path], tmp_path: Path, which: str
) -> None:
    """Issue 8, failure 2: only @VERSION@ was substituted, setup.py also has @abs_top_srcdir@."""
    versions = sorted(zfs_sources, key=_release)
    version = versions[0] if which == "oldest" else versions[-1]
    work = _patched_copy(
        zfs_sources[version], tmp_path / "pyzfs", version, ROOT / "nix" / "pyzfs-patch.sh"
    )
    setup = (work / "setup.py").read_text()
    assert "@" not in setup.replace("support@clusterhq.com", "")
    wheels = tmp_path / "wheels"
    proc = _pip_wheel(work, wheels)
    assert proc.returncode == 0, f"pyzfs {version} does not build:\n{proc.stderr[-3000:]}"
    (wheel,) = wheels.glob(f"pyzfs-{version}-*.whl")
    # pythonImportsCheck, from the wheel alone, with the pinned sonames.
    target = tmp_path / "site"
    subprocess.run(
        [PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]); import libzfs_core;"
        " from libzfs_core.bindings import libzfs_core as z, libnvpair as n;"
        " assert libzfs_core.__file__.startswith(sys.argv[1]), libzfs_core.__file__;"
        " print(z.LIBRARY, n.LIBRARY)"
    )
    out = subprocess.run(
        [PYTHON, "-c", check, str(target)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(HOST_LIB / "libzfs_core.so.3"), str(HOST_LIB / "libnvpair.so.3")]


def test_pyzfs_version_only_substitution_fails_on_newer_openzfs(
    zfs_sources: dict[str, Path], tmp_path: Path
) -> None:
    """The rehearsal does catch failure 2: the old postPatch on a release with @abs_top_srcdir@."""
    newest = max(zfs_sources, key=_release)
    work = tmp_path / "pyzfs"
    shutil.copytree(zfs_sources[newest], work)
    template = (work / "setup.py.in").read_text()
    if "@abs_top_srcdir@" not in template:
        pytest.skip(f"OpenZFS {newest} has no @abs_top_srcdir@")
    (work / "setup.py").write_text(template.replace("@VERSION@", newest))
    proc = _pip_wheel(work, tmp_path)
    assert proc.returncode != 0
    assert "@abs_top_srcdir@/contrib/pyzfs" in proc.stdout + proc.stderr


# --- nix/tests/unlock.nix --------------------------------------------------


@pytest.fixture(scope="module")
def vm_test(nixpkgs: Nixpkgs) -> dict[str, Any]:
    """flake.nix's checks.vm-unlock, evaluated and instantiated (tests/nix/vmtest.nix)."""
    out = nix_ok(
        [
            "nix-instantiate",
            "--eval",
            "--strict",
            "--json",
            "--read-write-mode",
            str(Path(__file__).with_name("vmtest.nix")),
            "--arg",
            "nixpkgs",
            str(nixpkgs.tree),
        ]
    )
    result: dict[str, Any] = json.loads(out)
    return result


def test_vm_test_evaluates_and_instantiates(vm_test: dict[str, Any]) -> None:
    for key in ("driver", "run"):
        assert Path(vm_test[key]).is_file(), vm_test[key]
    # The driver's build does both checks rehearsed below.
    assert vm_test["skipTypeCheck"] is False
    assert vm_test["skipLint"] is False


def _driver_type_check(nixpkgs: Nixpkgs, script: str, nodes: list[str], tmp: Path) -> str:
    """nixos/lib/testing/driver.nix: prepend file, machine and vlan names, script; mypy."""
    prepend = (nixpkgs.tree / "nixos" / "lib" / "test-script-prepend.py").read_text()
    # One node: also "machine" (nodeHostNames); here the node is called that.
    names = sorted(set(nodes) | ({"machine"} if len(nodes) == 1 else set()))
    typed = tmp / "testScriptWithTypes"
    typed.write_text(prepend + " ".join(f"{n}: Machine;" for n in names) + "\n" + "\n" + script)
    # The driver's build has test_driver installed (py.typed), whose own
    # imports mypy does not report there; the same here.
    config = tmp / "mypy.ini"
    config.write_text(
        "[mypy]\n"
        "[mypy-test_driver.*]\nfollow_imports = silent\n"
        "[mypy-colorama.*,ptpython.*,junit_xml.*]\nignore_missing_imports = True\n"
    )
    proc = subprocess.run(
        [
            str(VENV_BIN / "mypy"),
            "--config-file",
            str(config),
            "--no-incremental",
            "--cache-dir",
            os.devnull,
            "--no-implicit-optional",
            "--pretty",
            "--no-color-output",
            str(typed),
        ],
        cwd=tmp,
        env={**os.environ, "MYPYPATH": str(nixpkgs.tree / "nixos" / "lib" / "test-driver")},
        capture_output=True,
        text=True,
        check=False,
    )
    return ("" if proc.returncode == 0 else "failed\n") + proc.stdout + proc.stderr


def test_vm_test_script_passes_the_drivers_type_check(
    nixpkgs: Nixpkgs, vm_test: dict[str, Any], tmp_path: Path
) -> None:
    """Issue 8, failure 3: `log = journal(...)` shadowed the driver's logger."""
    vm = vm_test
    out = _driver_type_check(nixpkgs, vm["testScript"], vm["nodes"], tmp_path)
    assert not out.startswith("failed"), out


def test_driver_type_check_catches_the_shadowed_log(
    nixpkgs: Nixpkgs, vm_test: dict[str, Any], tmp_path: Path
) -> None:
    vm = vm_test
    broken = vm["testScript"].replace("journal_text", "log")
    out = _driver_type_check(nixpkgs, broken, vm["nodes"], tmp_path)
    assert out.startswith("failed")
    assert 'variable has type "AbstractLogger"' in out


def _driver_symbols(nixpkgs: Nixpkgs) -> list[str]:
    """generate-driver-symbols, read from the driver's source (Driver.test_symbols)."""
    source = (nixpkgs.tree / "nixos/lib/test-driver/test_driver/driver.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "general_symbols"
            and isinstance(node.value, ast.Call)
        ):
            return [k.arg for k in node.value.keywords if k.arg]
    raise AssertionError("general_symbols not found in the test driver")


def test_vm_test_script_passes_the_drivers_lint(
    nixpkgs: Nixpkgs, vm_test: dict[str, Any], tmp_path: Path
) -> None:
    pyflakes = VENV_BIN / "pyflakes"
    if not pyflakes.exists():
        pytest.fail("pyflakes missing: it belongs in requirements-dev.txt")
    vm = vm_test
    script = tmp_path / "test-script"
    script.write_text(vm["testScript"])
    builtins = ",".join([*vm["nodes"], *_driver_symbols(nixpkgs)])
    proc = subprocess.run(
        [str(pyflakes), str(script)],
        env={**os.environ, "PYFLAKES_BUILTINS": builtins},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- nix/initrd-env.nix ----------------------------------------------------

DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
# Debian's site module reads dist-packages below the prefix, Nix's
# site-packages; nix/initrd-env.sh takes the path as a parameter.
DEBIAN_SITE = "lib/python3/dist-packages"


def _site_dir(base: Path, name: str) -> Path:
    site = base / name / DEBIAN_SITE
    site.mkdir(parents=True)
    return base / name


def _host_dep(base: Path, name: str) -> Path:
    """A Nix dependency's site-packages, from the host's Debian package."""
    dep = _site_dir(base, name)
    module = {"python-dateutil": "dateutil"}.get(name, name)
    # Debian's pycparser uses Debian's ply instead of its vendored copy.
    modules = {module, "ply"} if name == "pycparser" else {module}
    found = [p for p in DIST_PACKAGES.iterdir() if p.name.split("-")[0].split(".")[0] in modules]
    if name == "cffi":
        found += list(DIST_PACKAGES.glob("_cffi_backend*.so"))
    assert found, f"{name}: not in {DIST_PACKAGES} (scripts/setup-host installs it)"
    for p in found:
        dest = dep / DEBIAN_SITE / p.name
        if p.is_dir():
            shutil.copytree(p, dest, symlinks=False)
        else:
            shutil.copy2(p, dest)
    return dep


def _pip_target(base: Path, name: str, what: Path) -> Path:
    dep = _site_dir(base, name)
    subprocess.run(
        [PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(dep / DEBIAN_SITE), str(what)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    # pip --target puts entry points there; a store path's site-packages has none.
    shutil.rmtree(dep / DEBIAN_SITE / "bin", ignore_errors=True)
    return dep


def _elf_libraries(tree: Path) -> dict[str, int]:
    """Shared libraries outside the tree that its ELF files need (make-initrd-ng copies them)."""
    libs: dict[str, int] = {}
    for f in tree.rglob("*"):
        if not f.is_file() or f.read_bytes()[:4] != b"\x7fELF":
            continue
        out = subprocess.run(["ldd", str(f)], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            parts = line.split("=>")
            if len(parts) == 2 and parts[1].strip().startswith("/"):
                lib = Path(parts[1].split()[0]).resolve()
                libs[str(lib)] = lib.stat().st_size
    return libs


def test_initrd_python_tree_builds_and_its_size(
    systems: dict[str, Any], package_src: Path, zfs_sources: dict[str, Path], tmp_path: Path
) -> None:
    """nix/initrd-env.sh on Debian's Python 3.11 with the deps the Nix tree gets.

    Nix cannot build the real tree here; this runs the same script (trimming,
    pyzfs declarations, smoke test) on the host's equivalents and measures
    the result, written to $LCZFS_NIX_CACHE/initrd-env-size.json.
    """
    env_info = systems["default"]["initrdEnv"]
    deps_base = tmp_path / "deps"
    deps: list[Path] = []
    for name in env_info["deps"]:
        if name == "lczfs-unlockd":
            src = tmp_path / "lczfs-src"
            shutil.copytree(package_src, src)
            for p in [src, *src.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
            _post_patch(systems, src, tmp_path)
            deps.append(_pip_target(deps_base, name, src))
        elif name == "pyzfs":
            newest = max(zfs_sources, key=_release)
            work = _patched_copy(
                zfs_sources[newest], tmp_path / "pyzfs", newest, ROOT / "nix" / "pyzfs-patch.sh"
            )
            deps.append(_pip_target(deps_base, name, work))
        else:
            deps.append(_host_dep(deps_base, name))
    excluded = env_info["excluded"]
    out = tmp_path / "initrd-env"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert version == systems["default"]["python"], "the host's Python is not nixpkgs' version"
    log = _bash(
        ROOT / "nix" / "initrd-env.sh",
        cwd=tmp_path,
        env={
            "out": str(out),
            "PYTHON": "/usr",
            "PY_VER": version,
            "SITE_PACKAGES": DEBIAN_SITE,
            "DEPS": " ".join(map(str, deps)),
            "EXCLUDED_STDLIB": " ".join(excluded["stdlib"]),
            "EXCLUDED_DYNLOAD": " ".join(excluded["dynload"]),
            "EXCLUDED_SITE": " ".join(excluded["sitePackages"]),
        },
    )
    assert "initrd python tree ok" in log

    # Not in the Nix tree (nixpkgs' pycparser vendors it).
    shutil.rmtree(out / DEBIAN_SITE / "ply")
    for info in (out / DEBIAN_SITE).glob("ply-*"):
        shutil.rmtree(info) if info.is_dir() else info.unlink()
    files = [f for f in out.rglob("*") if f.is_file() and not f.is_symlink()]
    tree_bytes = sum(f.stat().st_size for f in files)
    cpio = subprocess.run(
        ["sh", "-c", "find . | LC_ALL=C sort | cpio -o -H newc --quiet | zstd -15 -q -c | wc -c"],
        cwd=out,
        capture_output=True,
        text=True,
        check=True,
    )
    libs = _elf_libraries(out)
    report = {
        "what": "nix/initrd-env.sh on the host (Debian Python 3.11 and packages), not a Nix build",
        "files": len(files),
        "tree_bytes": tree_bytes,
        "tree_zstd15_bytes": int(cpio.stdout),
        "elf_libraries": libs,
        "elf_libraries_bytes": sum(libs.values()),
        "site_packages": sorted(p.name for p in (out / DEBIAN_SITE).iterdir()),
    }
    (CACHE / "initrd-env-size.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "elf_libraries"}, indent=2))
    for dropped in ("cffi", "pycparser", "lxml"):
        assert dropped not in report["site_packages"]
