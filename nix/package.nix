# lczfs-unlockd with every program and library it uses pinned to a store
# path at build time: nothing is looked up through PATH or ldconfig at run
# time, because the initrd has neither a useful PATH nor an ld.so.cache.
#
#   python3Packages.callPackage ./package.nix {
#     zfs = config.boot.zfs.package;               # the ZFS that runs the system
#     systemd = config.boot.initrd.systemd.package; # the systemd of the initrd
#     inherit (pkgs) cryptsetup;
#     pyzfs = python3Packages.callPackage ./pyzfs.nix { zfs = ...; };
#   }
#
# Always pass zfs, systemd and cryptsetup: python3Packages.callPackage fills
# `systemd` with the Python bindings (python3Packages.systemd) otherwise.
# tpm2-tss (PCR measurements) defaults to pkgs.tpm2-tss, the one systemd's
# TPM2 support in the initrd uses.
{
  lib,
  stdenv,
  buildPythonApplication,
  setuptools,
  pystemd,
  pyzfs,
  pytestCheckHook,
  hypothesis,
  groff,
  zfs,
  cryptsetup,
  systemd,
  tpm2-tss,
}:

let
  root = ../.;
  fs = lib.fileset;
  pyproject = builtins.fromTOML (builtins.readFile ../pyproject.toml);
  libc = lib.getLib stdenv.cc.libc;
  tss2Libdir = "${lib.getLib tpm2-tss}/lib";

  # The tpm2-tss entries of _build_paths.py (lczfs_unlockd/paths.py:
  # LIBTSS2_ESYS, LIBTSS2_TCTILDR, TPM2_TCTI), appended after
  # nix/build-paths.sh; reads TSS2_LIBDIR.  passthru.tss2BuildPaths is this
  # text, for the build rehearsal in tests/nix.  tctildr dlopen()s the
  # name part of TPM2_TCTI as given before trying libtss2-tcti-<name>.so.0,
  # so a full path needs no LD_LIBRARY_PATH (nixpkgs' tpm2-tss would also
  # find "device" in its own lib/, but the path does not depend on that
  # patch).  Fixed sonames, checked here: a soname bump fails the build.
  tss2BuildPaths = ''
    for lib in libtss2-esys.so.0 libtss2-tctildr.so.0 libtss2-tcti-device.so.0; do
      if [ ! -e "$TSS2_LIBDIR/$lib" ]; then
        echo "_build_paths.py would name $TSS2_LIBDIR/$lib, which does not exist" >&2
        exit 1
      fi
    done
    cat >> lczfs_unlockd/_build_paths.py <<PY
    # tpm2-tss, for PCR measurements (the package's postPatch): the TCTI
    # loader and the device TCTI it loads, by path.
    LIBTSS2_ESYS = ("$TSS2_LIBDIR/libtss2-esys.so.0",)
    LIBTSS2_TCTILDR = ("$TSS2_LIBDIR/libtss2-tctildr.so.0",)
    TPM2_TCTI = "$TSS2_LIBDIR/libtss2-tcti-device.so.0:/dev/tpmrm0"
    PY
  '';
  notPython =
    name: drv:
    lib.assertMsg (!(drv ? pythonModule)) ''
      lczfs-unlockd: `${name}` is the Python package ${drv.name or "?"}, not the ${name} whose
      programs and libraries the daemon runs; pass it explicitly, e.g.
      python3Packages.callPackage ./nix/package.nix { inherit (pkgs) ${name}; ... }'';
in
assert notPython "systemd" systemd;
assert notPython "zfs" zfs;
assert notPython "cryptsetup" cryptsetup;
assert notPython "tpm2-tss" tpm2-tss;
buildPythonApplication {
  pname = "lczfs-unlockd";
  inherit (pyproject.project) version;
  pyproject = true;

  # Exactly what the build and its check phase read; tests/nix copies the
  # same selection (evaluated from this expression) and runs the check
  # phase on it.
  src = fs.toSource {
    inherit root;
    fileset = fs.unions [
      ../pyproject.toml
      ../lczfs_unlockd
      ../units/lczfs-unlockd.service
      ../nix/build-paths.sh
      ../nix/install-unit.sh
      # Installed (share/man), and tests/unit/test_manpages.py reads them.
      ../docs/man
      ../tests/__init__.py
      # tests/unit/conftest.py imports it.
      ../tests/fakes.py
      ../tests/unit
      (fs.maybeMissing ../README.md)
      (fs.maybeMissing ../LICENSE)
      (fs.maybeMissing ../tests/conftest.py)
    ];
  };

  # lczfs_unlockd/paths.py imports these names over its defaults; the
  # script fails the build if one of them does not exist.
  postPatch = ''
    ZPOOL=${lib.getExe' zfs "zpool"} \
    ZFS=${lib.getExe' zfs "zfs"} \
    SYSTEMD_ASK_PASSWORD=${lib.getExe' systemd "systemd-ask-password"} \
    ZFS_LIBDIR=${lib.getLib zfs}/lib \
    CRYPTSETUP_LIBDIR=${lib.getLib cryptsetup}/lib \
    LIBC=${libc}/lib/libc.so.6 \
    CRYPTSETUP_TOKEN_PATH=${systemd}/lib/cryptsetup \
      bash nix/build-paths.sh
    TSS2_LIBDIR=${tss2Libdir}
    ${tss2BuildPaths}
  '';

  # The unit, for boot.initrd.systemd.packages (and any other systemd):
  # units/lczfs-unlockd.service with ExecStart pointing here.
  postInstall = ''
    bash nix/install-unit.sh $out $out/bin/lczfs-unlockd
    install -Dm444 docs/man/lczfs-unlockd.8 $out/share/man/man8/lczfs-unlockd.8
    install -Dm444 docs/man/lczfs-unlockd.toml.5 $out/share/man/man5/lczfs-unlockd.toml.5
  '';

  build-system = [ setuptools ];

  # pyproject.toml's dependencies (tests/nix checks they agree), plus pyzfs.
  dependencies = [
    pystemd
    # Not in pyproject.toml on purpose (the PyPI "pyzfs" is a wrong fork);
    # brings cffi with it.
    pyzfs
  ];

  nativeCheckInputs = [
    pytestCheckHook
    hypothesis
    # tests/unit/test_manpages.py renders the man pages with groff -ww.
    groff
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
    inherit
      zfs
      systemd
      cryptsetup
      pyzfs
      tpm2-tss
      tss2BuildPaths
      ;
    unit = "lib/systemd/system/lczfs-unlockd.service";
  };

  meta = {
    description = "Unlock an encrypted ZFS root from a LUKS keystore on a zvol of the same pool, in a systemd initrd";
    mainProgram = "lczfs-unlockd";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
  };
}
