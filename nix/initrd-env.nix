# A self-contained Python tree for the initrd.
#
# make-initrd-ng (pkgs/build-support/kernel/make-initrd-ng) copies each
# store path it is given to the same path in the initrd: a file with its ELF
# NEEDED libraries (found through RUNPATH), a directory recursively, a
# symlink together with its target.  It knows nothing of Python's module
# path, and handing it the whole interpreter would copy the complete
# standard library (tens of MiB).  So this derivation builds one directory
# that holds everything the daemon imports, and the module gives make-initrd-ng
# just this directory:
#
#   $out/bin/python3            a copy (not a symlink) of the interpreter: Python
#                               finds its prefix by searching upwards from the
#                               executable for lib/python3.X/os.py, so it uses
#                               $out as prefix and never the full ${python}
#   $out/bin/lczfs-unlockd      the entry point, run with -I (isolated mode)
#   $out/lib/python3.X/         the standard library minus what a boot daemon
#                               never needs, lib-dynload likewise
#   $out/lib/python3.X/site-packages/
#                               lczfs-unlockd and its Python dependencies
#                               (pyzfs, cffi, pycparser, pystemd, sdnotify, ...)
#
# The ELF pieces (interpreter, extension modules) keep their RUNPATHs, so
# make-initrd-ng pulls in libpython, libffi, libcrypto, libsystemd, ... by
# itself.  The build ends with a smoke test that imports the daemon from
# this tree alone and fails if anything came from elsewhere.
#
# Call with the interpreter the package was built with:
#   callPackage ./initrd-env.nix { python = python3; lczfs-unlockd = ...; }
{
  lib,
  runCommand,
  python,
  lczfs-unlockd,
}:

let
  pyVer = python.pythonVersion;
  stdlib = "lib/python${pyVer}";
  # buildPythonApplication is not a "Python module" to requiredPythonModules,
  # so start from what it propagates and add the application itself.
  deps = [ lczfs-unlockd ] ++ lib.filter (d: d != python) (
    python.pkgs.requiredPythonModules (lczfs-unlockd.propagatedBuildInputs or [ ])
  );

  # Large parts of the standard library that a boot-time daemon does not
  # import.  The smoke test below proves the daemon's import graph does not
  # need them.
  excludedStdlib = [
    "site-packages"
    "test"
    "idlelib"
    "tkinter"
    "turtledemo"
    "turtle.py"
    "ensurepip"
    "lib2to3"
    "pydoc_data"
    "pydoc.py"
    "distutils"
    "venv"
    "sqlite3"
    "curses"
    "dbm"
    "xmlrpc"
    "wsgiref"
    "config-${pyVer}-*"
  ];
  excludedDynload = [
    "_tkinter*"
    "_curses*"
    "_sqlite3*"
    "readline*"
    "_dbm*"
    "_gdbm*"
    "_test*"
    "_xxtestfuzz*"
    "xxlimited*"
    "_ctypes_test*"
    "xxsubtype*"
  ];
  # Build tooling that Python packages propagate but nothing imports at run time.
  excludedSitePackages = [
    "setuptools"
    "setuptools-*"
    "_distutils_hack"
    "distutils-precedence.pth"
    "pkg_resources"
    "pip"
    "pip-*"
    "wheel"
    "wheel-*"
  ];
  rmGlobs = dir: globs: lib.concatMapStringsSep "\n" (g: ''rm -rf "${dir}"/${g}'') globs;
in
runCommand "lczfs-unlockd-initrd-env-${lczfs-unlockd.version}"
  {
    passthru = {
      inherit python deps;
      mainProgram = "lczfs-unlockd";
    };
    meta.mainProgram = "lczfs-unlockd";
  }
  ''
    set -euo pipefail
    mkdir -p $out/bin $out/${stdlib}

    # Standard library: sources and the plain (non -O) bytecode.
    cp -r --no-preserve=mode ${python}/${stdlib}/. $out/${stdlib}/
    ${rmGlobs "$out/${stdlib}" excludedStdlib}
    ${rmGlobs "$out/${stdlib}/lib-dynload" excludedDynload}
    find $out/${stdlib} -name '*.opt-1.pyc' -delete -o -name '*.opt-2.pyc' -delete

    # Python dependencies, merged into one site-packages.
    mkdir -p $out/${python.sitePackages}
    for dep in ${lib.concatMapStringsSep " " toString deps}; do
      if [ -d "$dep/${python.sitePackages}" ]; then
        cp -r --no-preserve=mode --dereference "$dep/${python.sitePackages}/." $out/${python.sitePackages}/
      fi
    done
    ${rmGlobs "$out/${python.sitePackages}" excludedSitePackages}

    # Extension modules must stay executable for the dynamic loader.
    find $out -name '*.so' -exec chmod 0555 {} +

    # The interpreter, copied so that Python derives its prefix from $out.
    cp ${python}/bin/python${pyVer} $out/bin/python3
    chmod 0555 $out/bin/python3

    # As the dracut module does (dracut/90lczfs-unlockd/python-closure.py):
    # pyzfs's C declarations parsed now, not at every boot
    # (lczfs_unlockd/pyzfs_ffi.py, cffi's out-of-line ABI mode), so the
    # initrd needs only cffi's C backend -- not the cffi Python package, not
    # pycparser; and the daemon talks to PID 1 through pystemd.dbuslib
    # without pystemd's introspection layer, so lxml goes too.
    $out/bin/python3 -I -m lczfs_unlockd.pyzfs_ffi \
      $out/${python.sitePackages}/lczfs_unlockd/_pyzfs_ffi.py
    rm -rf $out/${python.sitePackages}/{cffi,pycparser,lxml}
    rm -rf $out/${python.sitePackages}/{cffi,pycparser,lxml}-*.dist-info

    cat > $out/bin/lczfs-unlockd <<EOF
    #!$out/bin/python3 -I
    import sys

    from lczfs_unlockd.cli import main

    sys.exit(main())
    EOF
    chmod 0555 $out/bin/lczfs-unlockd

    # Smoke test: every lczfs_unlockd module and the bindings import from
    # $out alone.  Without the prefix check a wrong prefix would silently
    # fall back to the full ${python} and prove nothing.
    $out/bin/python3 -I - <<EOF
    import importlib, pkgutil, sys

    import lczfs_unlockd

    for info in pkgutil.walk_packages(lczfs_unlockd.__path__, "lczfs_unlockd."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    import _cffi_backend, sdnotify  # noqa: F401
    import lczfs_unlockd.paths as paths
    from lczfs_unlockd import pyzfs_ffi, units

    assert pyzfs_ffi.preload({"libnvpair": "libnvpair.so.3", "libzfs_core": "libzfs_core.so.3"})
    import libzfs_core  # noqa: F401  (with the pre-parsed declarations)
    units._dbuslib()
    dropped = sorted(m for m in ("cffi", "pycparser", "lxml") if m in sys.modules)
    assert not dropped, f"imported at run time although dropped: {dropped}"

    assert sys.prefix == "$out", f"prefix is {sys.prefix}, not $out"
    foreign = sorted(
        f"{name}: {mod.__file__}"
        for name, mod in list(sys.modules.items())
        if getattr(mod, "__file__", None) and not mod.__file__.startswith("$out/")
    )
    assert not foreign, "imported from outside the initrd tree:\n" + "\n".join(foreign)
    assert paths.ZPOOL.startswith("/"), paths.ZPOOL
    print(f"initrd python tree ok: {len(sys.modules)} modules, paths from {paths.__file__}")
    EOF
    $out/bin/lczfs-unlockd --version
    du -sh $out
  ''
