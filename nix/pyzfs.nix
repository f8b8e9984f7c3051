# OpenZFS's own Python bindings (contrib/pyzfs, module `libzfs_core`), built
# from the source of the ZFS package that runs the system, so that the
# bindings match the libzfs_core they load.  nixpkgs does not package them,
# and the PyPI project called "pyzfs" is an unrelated 2016 fork without
# lzc_load_key: never use that one.
#
# Call with the system's ZFS userland:
#   python3Packages.callPackage ./pyzfs.nix { zfs = config.boot.zfs.package; }
{
  lib,
  buildPythonPackage,
  setuptools,
  cffi,
  zfs,
}:

let
  lczfsLib = import ./lib.nix;
  libdir = "${lib.getLib zfs}/lib";
in
buildPythonPackage {
  pname = "pyzfs";
  inherit (zfs) version src;
  pyproject = true;

  # Only the Python bindings; the rest of the ZFS tree is not built here.
  sourceRoot = "${zfs.src.name}/contrib/pyzfs";

  # ZFS's configure templates the metadata (@VERSION@, and since 2.2
  # @abs_top_srcdir@); we do not run configure, so nix/pyzfs-patch.sh fills
  # them in and pins the shared libraries by absolute soname path.  The
  # same script is rehearsed by tests/nix on the real contrib/pyzfs.
  postPatch = ''
    bash ${./pyzfs-patch.sh} ${lczfsLib.pep440Version zfs.version} ${libdir}
  '';

  build-system = [ setuptools ];
  dependencies = [ cffi ];

  # The upstream tests create pools and need the zfs kernel module.
  doCheck = false;
  # Importing does not dlopen anything yet (LazyLibrary), so this works in
  # the build sandbox.
  pythonImportsCheck = [ "libzfs_core" ];

  passthru = {
    inherit zfs;
  };

  meta = {
    description = "OpenZFS libzfs_core Python bindings (contrib/pyzfs) for ZFS ${zfs.version}";
    homepage = "https://github.com/openzfs/zfs/tree/master/contrib/pyzfs";
    license = lib.licenses.asl20;
    platforms = lib.platforms.linux;
  };
}
