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

  # The metadata is templated by ZFS's configure (@VERSION@); we do not run
  # configure, so fill it in.  Older releases ship setup.py.in, newer ones
  # pyproject.toml.in.  Then pin the shared libraries: pyzfs hands cffi the
  # short names "zfs_core"/"nvpair", and cffi resolves short names through
  # ctypes.util.find_library, which runs ldconfig and gcc; the initrd has
  # neither.  We write the absolute path of the soname file instead.
  postPatch = ''
    pyversion=${lczfsLib.pep440Version zfs.version}
    if [ -e pyproject.toml.in ]; then
      substitute pyproject.toml.in pyproject.toml --replace-fail @VERSION@ "$pyversion"
    elif [ -e setup.py.in ]; then
      substitute setup.py.in setup.py --replace-fail @VERSION@ "$pyversion"
    else
      echo "contrib/pyzfs has neither pyproject.toml.in nor setup.py.in" >&2
      exit 1
    fi

    # libfoo.so.N (the soname), not the linker name or the full version.
    soname() {
      local f
      for f in ${libdir}/"$1".so.*; do
        if [[ "''${f#${libdir}/$1.so.}" =~ ^[0-9]+$ ]]; then
          echo "$f"
          return 0
        fi
      done
      echo "no $1.so.N in ${libdir}" >&2
      return 1
    }
    libzfs_core=$(soname libzfs_core)
    libnvpair=$(soname libnvpair)

    found=0
    while IFS= read -r -d "" f; do
      substituteInPlace "$f" --replace-fail 'LIBRARY = "zfs_core"' "LIBRARY = \"$libzfs_core\""
      found=$((found + 1))
    done < <(find . -path '*/bindings/libzfs_core.py' -print0)
    while IFS= read -r -d "" f; do
      substituteInPlace "$f" --replace-fail 'LIBRARY = "nvpair"' "LIBRARY = \"$libnvpair\""
      found=$((found + 1))
    done < <(find . -path '*/bindings/libnvpair.py' -print0)
    if [ "$found" -lt 2 ]; then
      echo "pyzfs bindings not found where expected; cannot pin libzfs_core/libnvpair" >&2
      exit 1
    fi
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
