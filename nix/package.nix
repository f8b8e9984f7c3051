# lczfs-unlockd with every program and library it uses pinned to a store
# path at build time: nothing is looked up through PATH or ldconfig at run
# time, because the initrd has neither a useful PATH nor an ld.so.cache.
#
#   python3Packages.callPackage ./package.nix {
#     zfs = config.boot.zfs.package;               # the ZFS that runs the system
#     systemd = config.boot.initrd.systemd.package; # the systemd of the initrd
#     pyzfs = python3Packages.callPackage ./pyzfs.nix { zfs = ...; };
#   }
{
  lib,
  stdenv,
  buildPythonApplication,
  setuptools,
  pystemd,
  sdnotify,
  pyzfs,
  pytestCheckHook,
  hypothesis,
  zfs,
  cryptsetup,
  systemd,
}:

let
  root = ../.;
  fs = lib.fileset;
  pyproject = builtins.fromTOML (builtins.readFile ../pyproject.toml);
  libc = lib.getLib stdenv.cc.libc;
in
buildPythonApplication {
  pname = "lczfs-unlockd";
  inherit (pyproject.project) version;
  pyproject = true;

  src = fs.toSource {
    inherit root;
    fileset = fs.unions [
      ../pyproject.toml
      ../lczfs_unlockd
      ../tests/unit
      (fs.maybeMissing ../README.md)
      (fs.maybeMissing ../LICENSE)
      (fs.maybeMissing ../tests/__init__.py)
      (fs.maybeMissing ../tests/conftest.py)
    ];
  };

  # lczfs_unlockd/paths.py imports these names over its defaults.  The
  # libraries are given by soname file (libfoo.so.N), as the daemon would
  # dlopen them; the shell below finds N so a soname bump fails the build
  # here, not the boot.
  postPatch = ''
    soname() {
      local dir=$1 name=$2 f
      for f in "$dir/$name".so.*; do
        if [[ "''${f#"$dir/$name".so.}" =~ ^[0-9]+$ ]]; then
          echo "$f"
          return 0
        fi
      done
      echo "no $name.so.N in $dir" >&2
      return 1
    }
    zfslib=${lib.getLib zfs}/lib
    cat > lczfs_unlockd/_build_paths.py <<EOF
    """Absolute store paths, written by nix/package.nix at build time."""

    ZPOOL = "${lib.getExe' zfs "zpool"}"
    ZFS = "${lib.getExe' zfs "zfs"}"
    SYSTEMD_ASK_PASSWORD = "${lib.getExe' systemd "systemd-ask-password"}"
    LIBCRYPTSETUP = ("$(soname ${lib.getLib cryptsetup}/lib libcryptsetup)",)
    LIBZFS_CORE = ("$(soname "$zfslib" libzfs_core)",)
    LIBNVPAIR = ("$(soname "$zfslib" libnvpair)",)
    LIBC = ("${libc}/lib/libc.so.6",)
    # Where libcryptsetup should look for LUKS2 token plugins (TPM2, FIDO2,
    # PKCS#11): systemd builds them, cryptsetup's compiled-in default is its
    # own, empty, lib/cryptsetup.  See crypt_token_set_external_path(3).
    CRYPTSETUP_TOKEN_PATH = "${systemd}/lib/cryptsetup"
    EOF

    # Fail here, not at boot, if a path above does not exist.
    for p in $(grep -o '"${builtins.storeDir}/[^"]*"' lczfs_unlockd/_build_paths.py | tr -d '"'); do
      if [ ! -e "$p" ]; then
        echo "_build_paths.py names $p, which does not exist" >&2
        exit 1
      fi
    done
    cat lczfs_unlockd/_build_paths.py
  '';

  build-system = [ setuptools ];

  dependencies = [
    pystemd
    sdnotify
    # Not in pyproject.toml on purpose (the PyPI "pyzfs" is a wrong fork);
    # brings cffi with it.
    pyzfs
  ];

  nativeCheckInputs = [
    pytestCheckHook
    hypothesis
  ];
  # The unit tests run against fakes; the VM tests need QEMU and are run by
  # the NixOS test in nix/tests/unlock.nix instead.
  pytestFlagsArray = [
    "tests/unit"
    "-m"
    "not vm"
  ];

  pythonImportsCheck = [
    "lczfs_unlockd"
    "lczfs_unlockd.paths"
  ];

  passthru = {
    inherit zfs systemd cryptsetup pyzfs;
  };

  meta = {
    description = "Unlock an encrypted ZFS root from a LUKS keystore on a zvol of the same pool, in a systemd initrd";
    mainProgram = "lczfs-unlockd";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
  };
}
