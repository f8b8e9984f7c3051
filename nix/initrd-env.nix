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
#                               (pyzfs, cffi, pycparser, pystemd, ...)
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
in
runCommand "lczfs-unlockd-initrd-env-${lczfs-unlockd.version}"
  {
    passthru = {
      inherit python deps;
      # For the size rehearsal in tests/nix (nix/initrd-env.sh on the host).
      excluded = {
        stdlib = excludedStdlib;
        dynload = excludedDynload;
        sitePackages = excludedSitePackages;
      };
      mainProgram = "lczfs-unlockd";
    };
    meta.mainProgram = "lczfs-unlockd";
  }
  ''
    PYTHON=${python} \
    PY_VER=${pyVer} \
    SITE_PACKAGES=${python.sitePackages} \
    DEPS=${lib.escapeShellArg (lib.concatMapStringsSep " " toString deps)} \
    EXCLUDED_STDLIB=${lib.escapeShellArg (toString excludedStdlib)} \
    EXCLUDED_DYNLOAD=${lib.escapeShellArg (toString excludedDynload)} \
    EXCLUDED_SITE=${lib.escapeShellArg (toString excludedSitePackages)} \
      bash ${./initrd-env.sh}
  ''
