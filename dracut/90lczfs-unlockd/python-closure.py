#!/usr/bin/python3
"""Install the Python runtime lczfs-unlockd needs into a dracut initrd, and nothing else.

Called by module-setup.sh with the interpreter that goes into the initrd:

    python3 -I python-closure.py --package-dir DIR --initdir INITDIR --elf-list FILE

What goes in is computed here, at build time, from the daemon's real
imports — no hand-kept module list:

1. The daemon package is staged with ``_pyzfs_ffi.py`` generated from the
   installed pyzfs's C declarations (``python3 -m lczfs_unlockd.pyzfs_ffi``):
   at run time neither pycparser nor the ``cffi`` Python package is needed,
   only the ``_cffi_backend`` extension.
2. A *rehearsal* runs in a fresh ``python3 -I -S`` (the launcher's flags,
   see --launcher; the site directories appended to sys.path by hand):
   it imports every module of the staged package and drives each adapter
   through its start-up path with harmless inputs (argument parsing and help,
   logging with a traceback, config load and kernel command line, sd_notify
   to a private socket, pyzfs import with the pre-parsed declarations and a
   no-op ``lzc_load_key`` of a dataset that does not exist, libcryptsetup on
   a missing device, pystemd's bus module on a missing socket, subprocesses,
   key derivation).  Whatever ``sys.modules`` holds afterwards is the
   closure.
3. Pure-Python modules of the closure (standard library and third party)
   are installed as *sourceless* bytecode (``os.pyc`` where ``os.py`` was):
   nothing is compiled at boot and no source is carried.  Frozen and
   built-in modules need no file.  Extension modules are listed in
   ``--elf-list`` for dracut's ``inst_multiple``, which adds the shared
   libraries they link (libffi, libcrypto, libsystemd...).  The daemon's own
   package keeps its sources next to unchecked-hash bytecode, so its
   tracebacks stay readable.
4. A static scan of the daemon's sources lists every import the rehearsal
   did not load (e.g. ``cffi``, used only at build time) on stderr, so a new
   lazy import that the rehearsal misses shows up in the build log.

Runs on the interpreter that goes into the initrd (Python >= 3.11).

``python-closure.py --config-files CONFIG`` is module-setup.sh's reader of
the daemon's config instead: one ``KEY<TAB>VALUE`` line for each file the
initrd must carry (``keyfile``, ``tpm2_signature``, ``tpm2_pcrlock``, from
the ``[keystore]`` table) and ``token<TAB>yes|no``, whether the keystore may
be opened with a token (``unlock``, the daemon's default includes it).
"""

from __future__ import annotations

# Only os and sys at module level: the rehearsal runs this file, and whatever
# it imports for itself would count as the daemon's.
import os
import sys

PACKAGE = "lczfs_unlockd"
# Directories the daemon package is installed into inside the initrd.
DEST_PACKAGE_DIR = "/usr/lib/python3/dist-packages/lczfs_unlockd"
# getpath's landmarks: without them python3 warns on every start and guesses
# its prefix.  os is frozen (no file needed to import it) but os.py[c] marks
# the standard library, lib-dynload the platform library directory.
LANDMARK_MODULES = ("os",)
# The launcher's interpreter flags; the rehearsal runs with the same.
LAUNCHER_FLAGS = ("-I", "-S")


# --- rehearsal (runs in a child interpreter) --------------------------------


def _rehearse(stage: str, tmp: str, site_dirs: list[str]) -> None:
    # Each of these is imported by the daemon anyway (logging, notify, config).
    import contextlib
    import io
    import json
    import socket
    import traceback

    # What the launcher does (python3 -IS: no site module, explicit path).
    sys.path.insert(0, stage)
    sys.path.extend(site_dirs)
    sink = io.StringIO()

    def attempt(what: str, fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except Exception:  # the rehearsal exercises failure paths on purpose
            sink.write(f"{what}: " + traceback.format_exc())

    # Every module of the package (except __main__, which runs the daemon).
    for name in sorted(os.listdir(os.path.join(stage, PACKAGE))):
        if name.endswith(".py") and name != "__main__.py":
            __import__(f"{PACKAGE}.{name[:-3]}")

    from lczfs_unlockd import cli, config, cryptsetup, filesystem, keyformat, process, units, zfskeys
    from lczfs_unlockd import log as logsetup
    from lczfs_unlockd import notify as notifymod

    logsetup.setup(debug=True, stream=sink)
    log = logsetup.log
    with contextlib.suppress(RuntimeError), logsetup.step("rehearsal"):
        log.debug("debug %s", 1)
        raise RuntimeError("rehearsal")
    try:
        raise OSError(2, "rehearsal")
    except OSError:
        log.exception("rehearsal")
        traceback.print_exc(file=sink)

    # The initrd's launcher passes no arguments: help and usage text (which
    # would pull in shutil, bz2 and lzma) are for the host.
    cli._parser().parse_args([])

    conf = os.path.join(tmp, "lczfs-unlockd.toml")
    with open(conf, "w") as f:
        f.write(
            'pool = "rpool"\ndevices = ["/dev/disk/by-id/x"]\ntimeout = "1min 30s"\n'
            'datasets = "auto"\n[keystore]\nvolume = "rpool/volumes/bootsecrets"\n'
            'unlock = ["token", "keyfile", "passphrase"]\nkeyfile = "/etc/k"\n'
        )
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        cli.check_config([conf])
        cli.check_config([os.path.join(tmp, "missing.toml")])
    cfg = config.load(conf)
    cmdline = os.path.join(tmp, "cmdline")
    with open(cmdline, "w") as f:
        f.write('rd.lczfs.debug rd.lczfs.timeout=bad rd.lczfs.dry_run=1 x="a b"\n')
    cfg, _warnings = config.apply_cmdline(cfg, config.read_cmdline(cmdline))
    list(config.summary(cfg))

    notify_socket = os.path.join(tmp, "notify")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(notify_socket)
    os.environ["NOTIFY_SOCKET"] = notify_socket
    notifier = notifymod.SystemdNotifier()
    notifier.notify("STATUS=rehearsal\nEXTEND_TIMEOUT_USEC=1")
    server.close()

    ports = cli.real_ports(notifier)
    # pyzfs through the declarations parsed at build time; a no-op load of a
    # dataset that does not exist changes nothing anywhere.
    attempt(
        "lzc",
        lambda: ports.keys.load_key("lczfs-closure-none/none", bytearray(32), noop=True),
    )
    attempt("crypt", lambda: cryptsetup.set_debug(False))
    attempt("crypt", lambda: ports.crypt.open(os.path.join(tmp, "no-such-device")))
    missing_bus = "unix:path=" + os.path.join(tmp, "no-such-bus")
    attempt("units", lambda: units.SystemdUnits(missing_bus).unit_file_state("x.service"))
    attempt("filesystem", lambda: filesystem.LibcMounts().is_mounted(tmp))
    # mount() without a type lists /proc/filesystems (encoding "ascii": the
    # VM test caught the closure missing encodings.ascii).
    attempt("filesystem", lambda: filesystem._kernel_fstypes())
    attempt("fs", lambda: ports.fs.exists(tmp))
    attempt("run", lambda: process.run(["true"]))
    attempt("run", lambda: process.run(["false"]))
    attempt("run", lambda: process.run(["lczfs-closure-no-such-program"]))
    attempt("run", lambda: process.run(["sleep", "1"], timeout=0.01))
    attempt("secret", lambda: process.run_secret(["echo", "x"]))

    keydir = os.path.join(tmp, "keys")
    os.mkdir(keydir)
    with open(os.path.join(keydir, "k.key"), "w") as f:
        f.write("00" * 32 + "\n")
    material = zfskeys.read_key_file(keydir, os.path.join(keydir, "k.key"), dataset="p/d")
    for fmt in ("hex", "passphrase"):
        keyformat.derive_wrapping_key(fmt, material, salt=1, iters=1, dataset="p/d", path="k")
    attempt("raw", lambda: keyformat.derive_wrapping_key("raw", material, salt=0, iters=0,
                                                       dataset="p/d", path="k"))  # fmt: skip
    attempt("keyfile", lambda: zfskeys.read_key_file(keydir, "/etc/passwd", dataset="p/d"))
    out = []
    for name, module in sorted(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None) if spec is not None else None
        locations = list(getattr(spec, "submodule_search_locations", None) or [])
        out.append({"name": name, "origin": origin, "locations": locations})
    json.dump(out, sys.stdout)


# --- the build side ------------------------------------------------------------


def _stage(package_dir: str, stage: str) -> None:
    import shutil
    import subprocess

    dest = os.path.join(stage, PACKAGE)
    os.makedirs(dest)
    for name in sorted(os.listdir(package_dir)):
        if name.endswith(".py") and name != "_pyzfs_ffi.py":
            shutil.copy2(os.path.join(package_dir, name), dest)
    env = dict(os.environ, PYTHONPATH=stage)
    subprocess.run(
        [sys.executable, "-m", f"{PACKAGE}.pyzfs_ffi", os.path.join(dest, "_pyzfs_ffi.py")],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,  # cffi prints "generating ..."
    )


def _site_dirs() -> list[str]:
    """Where site.py would look for third-party modules (Debian: dist-packages)."""
    import site

    return [d for d in site.getsitepackages() if os.path.isdir(d)]


def _closure(stage: str, tmp: str, site_dirs: list[str]) -> list[dict[str, object]]:
    """sys.modules after the rehearsal, under the locales an initrd may have."""
    import json
    import subprocess

    seen: dict[str, dict[str, object]] = {}
    for i, lang in enumerate((None, "C.UTF-8")):
        scratch = os.path.join(tmp, f"rehearsal{i}")
        os.mkdir(scratch, 0o700)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        if lang:
            env["LANG"] = lang
        script = os.path.abspath(__file__)
        r = subprocess.run(
            [sys.executable, *LAUNCHER_FLAGS, script, "--rehearse", stage, scratch, *site_dirs],
            env=env,
            capture_output=True,
            check=False,
        )
        if r.returncode != 0:
            sys.stderr.write(r.stderr.decode(errors="replace"))
            raise SystemExit(f"python-closure: rehearsal failed ({r.returncode})")
        for entry in json.loads(r.stdout):
            seen[str(entry["name"])] = entry
    return [seen[k] for k in sorted(seen)]


def _static_imports(package_dir: str) -> set[str]:
    import ast

    names: set[str] = set()
    for name in os.listdir(package_dir):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(package_dir, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return names


def _compile(src: str, dest: str, display: str) -> None:
    import py_compile

    os.makedirs(os.path.dirname(dest), exist_ok=True)
    py_compile.compile(
        src,
        cfile=dest,
        dfile=display,
        doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )


def _install_package(stage: str, initdir: str) -> list[str]:
    import shutil

    src = os.path.join(stage, PACKAGE)
    dest = initdir + DEST_PACKAGE_DIR
    os.makedirs(dest, exist_ok=True)
    files = []
    tag = sys.implementation.cache_tag
    for name in sorted(os.listdir(src)):
        if not name.endswith(".py"):
            continue
        shutil.copyfile(os.path.join(src, name), os.path.join(dest, name))
        os.chmod(os.path.join(dest, name), 0o644)
        pyc = os.path.join(dest, "__pycache__", f"{name[:-3]}.{tag}.pyc")
        _compile(os.path.join(src, name), pyc, os.path.join(DEST_PACKAGE_DIR, name))
        files += [os.path.join(DEST_PACKAGE_DIR, name), pyc[len(initdir) :]]
    return files


def _launcher(path: str, site_dirs: list[str]) -> None:
    """/usr/bin/lczfs-unlockd: python3 -IS, the module path spelled out.

    -I: nothing in the environment or the working directory changes what
    runs.  -S: no site module -- it only adds the directories below, reads
    .pth files and tries sitecustomize, and costs about as much as the rest
    of the interpreter's start-up together.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(
            # One shebang argument: the flags grouped ("-IS").
            f"#!/usr/bin/python3 -{''.join(f[1:] for f in LAUNCHER_FLAGS)}\n"
            "import sys\n\n"
            f"sys.path += {site_dirs!r}\n"
            "from lczfs_unlockd.cli import main  # noqa: E402\n\n"
            "raise SystemExit(main())\n"
        )
    os.chmod(path, 0o755)  # noqa: S103 - a program, like /usr/bin/python3


def install(
    package_dir: str,
    initdir: str,
    elf_list: str,
    manifest: str | None,
    sysroot: str = "",
    launcher: str | None = None,
) -> None:
    import importlib.machinery
    import json
    import shutil
    import sysconfig
    import tempfile

    tmp = tempfile.mkdtemp(prefix="lczfs-closure-")
    stage = os.path.join(tmp, "stage")
    try:
        _stage(package_dir, stage)
        site_dirs = _site_dirs()
        modules = _closure(stage, tmp, site_dirs)
        stdlib = sysconfig.get_path("stdlib")
        elf: list[str] = []
        parts: dict[str, list[str]] = {}
        missing_landmarks = set(LANDMARK_MODULES)
        for entry in modules:
            name = str(entry["name"])
            origin = entry["origin"]
            if name.split(".")[0] == PACKAGE:
                continue
            if not isinstance(origin, str) or not os.path.isabs(origin):
                continue  # built-in, frozen or namespace package: no file
            # Paths inside the initrd are those of the (cross-built) root.
            target = origin[len(sysroot) :] if sysroot and origin.startswith(sysroot) else origin
            if name in LANDMARK_MODULES:
                missing_landmarks.discard(name)
            part = "stdlib" if origin.startswith(stdlib + os.sep) else name.split(".")[0]
            if origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
                elf.append(target)
                parts.setdefault(part, []).append(target)
            elif origin.endswith(".py"):
                pyc = target + "c"  # sourceless: os.py -> os.pyc in the same directory
                _compile(origin, initdir + pyc, target)
                parts.setdefault(part, []).append(pyc)
            elif origin.endswith(".pyc"):  # already sourceless in the build root
                os.makedirs(os.path.dirname(initdir + target), exist_ok=True)
                shutil.copyfile(origin, initdir + target)
                parts.setdefault(part, []).append(target)
        for name in sorted(missing_landmarks):
            spec = importlib.machinery.PathFinder.find_spec(name, [stdlib])
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                target = spec.origin[len(sysroot) :] if sysroot else spec.origin
                _compile(spec.origin, initdir + target + "c", target)
                parts.setdefault("stdlib", []).append(target + "c")
        dynload = os.path.join(stdlib, "lib-dynload")
        os.makedirs(initdir + (dynload[len(sysroot) :] if sysroot else dynload), exist_ok=True)
        parts["daemon"] = _install_package(stage, initdir)
        if launcher:
            used = {os.path.dirname(DEST_PACKAGE_DIR)}
            for entry in modules:
                origin = entry["origin"]
                if isinstance(origin, str) and os.path.isabs(origin):
                    used.update(d for d in site_dirs if origin.startswith(d + os.sep))
            strip = len(sysroot) if sysroot else 0
            _launcher(initdir + launcher, [d[strip:] for d in site_dirs if d in used])

        for name in sorted(_static_imports(package_dir)):
            top = name.split(".")[0]
            if top in sys.builtin_module_names or name in {str(m["name"]) for m in modules}:
                continue
            print(
                f"python-closure: {name} (imported by the daemon's sources) was not loaded "
                "by the rehearsal and is not installed",
                file=sys.stderr,
            )
        with open(elf_list, "w") as f:
            f.writelines(p + "\n" for p in sorted(set(elf)))
        if manifest:
            with open(manifest, "w") as f:
                json.dump(
                    {
                        "python": sys.executable,
                        "modules": [str(m["name"]) for m in modules],
                        "parts": {k: sorted(set(v)) for k, v in sorted(parts.items())},
                    },
                    f,
                    indent=1,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the files the config names (module-setup.sh) -------------------------------

CONFIG_FILES = ("keyfile", "tpm2_signature", "tpm2_pcrlock")


def config_files(path: str) -> list[tuple[str, str]]:
    """(key, value) pairs for module-setup.sh: the files to copy, whether a token may be used.

    Only what the initrd needs to carry is read; the daemon validates the rest
    at boot (and ``lczfs-unlockd --check-config`` before).
    """
    import tomllib

    with open(path, "rb") as f:
        keystore = tomllib.load(f).get("keystore", {})
    if not isinstance(keystore, dict):
        raise SystemExit(f"python-closure: {path}: keystore is not a table")
    out = []
    for key in CONFIG_FILES:
        value = keystore.get(key)
        if isinstance(value, str) and value and "\t" not in value and "\n" not in value:
            out.append((key, value))
    unlock = keystore.get("unlock")
    token = not isinstance(unlock, list) or "token" in unlock
    out.append(("token", "yes" if token else "no"))
    return out


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--config-files":
        try:
            pairs = config_files(sys.argv[2])
        except (OSError, ValueError) as e:  # tomllib.TOMLDecodeError is a ValueError
            print(f"python-closure: {sys.argv[2]}: {e}", file=sys.stderr)
            return 1
        sys.stdout.writelines(f"{k}\t{v}\n" for k, v in pairs)
        return 0
    if len(sys.argv) >= 4 and sys.argv[1] == "--rehearse":
        _rehearse(sys.argv[2], sys.argv[3], sys.argv[4:])
        return 0
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package-dir", required=True, help="the lczfs_unlockd sources")
    p.add_argument("--initdir", required=True, help="dracut's staging root")
    p.add_argument("--elf-list", required=True, help="extension modules for inst_multiple")
    p.add_argument("--manifest", help="write what was installed, by part (JSON)")
    p.add_argument("--sysroot", default="", help="dracut's $dracutsysrootdir, if any")
    p.add_argument("--launcher", help="write the launcher at this path (inside the initrd)")
    args = p.parse_args()
    install(
        args.package_dir,
        args.initdir,
        args.elf_list,
        args.manifest,
        args.sysroot.rstrip("/"),
        args.launcher,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
