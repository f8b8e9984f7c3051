# Prepares OpenZFS's contrib/pyzfs (run from that directory) for a build
# without ZFS's configure: fills in the templated metadata and pins the
# shared libraries.  Run by nix/pyzfs.nix's postPatch and by the build
# rehearsal in tests/nix on the real contrib/pyzfs of the OpenZFS releases
# nixpkgs ships, so the two cannot drift.  Plain bash, no stdenv functions.
#
#   bash pyzfs-patch.sh VERSION LIBDIR
#     VERSION  PEP 440 version for the metadata (@VERSION@)
#     LIBDIR   directory holding libzfs_core.so.N and libnvpair.so.N
set -euo pipefail
version=$1 libdir=$2

# Replace every occurrence of $2 by $3 in file $1; fail if there is none.
replace() {
    local file=$1 old=$2 new=$3 text
    text=$(cat "$file"; echo x)
    text=${text%x}
    if [[ "$text" != *"$old"* ]]; then
        echo "$file: '$old' not found" >&2
        return 1
    fi
    printf '%s' "${text//"$old"/"$new"}" > "$file"
}

# configure substitutes @VERSION@ (all releases) and, since 2.2,
# @abs_top_srcdir@ (setup.py's srcdir; find_packages and package_dir are
# computed from it).  Older releases ship setup.py.in, newer ones may ship
# pyproject.toml.in.
if [ -e pyproject.toml.in ]; then
    template=pyproject.toml.in target=pyproject.toml
elif [ -e setup.py.in ]; then
    template=setup.py.in target=setup.py
else
    echo "contrib/pyzfs has neither pyproject.toml.in nor setup.py.in" >&2
    exit 1
fi
cp "$template" "$target"
replace "$target" @VERSION@ "$version"
if grep -q @abs_top_srcdir@ "$target"; then
    replace "$target" @abs_top_srcdir@/contrib/pyzfs "$PWD"
fi
# Any other @name@ left is a configure variable this script does not know:
# fail now instead of with a setuptools error about a path like "@foo@".
left=$(grep -o '@[A-Za-z_][A-Za-z0-9_]*@' "$target" | sort -u) || true
if [ -n "$left" ]; then
    echo "$target still has configure variables: $left" >&2
    exit 1
fi

# libfoo.so.N (the soname), not the linker name or the full version.
# pyzfs hands cffi the short names "zfs_core"/"nvpair", and cffi resolves
# short names through ctypes.util.find_library, which runs ldconfig and
# gcc; the initrd has neither.  Write the absolute path instead.
soname() {
    local f
    for f in "$libdir/$1".so.*; do
        if [[ "${f#"$libdir/$1".so.}" =~ ^[0-9]+$ ]]; then
            echo "$f"
            return 0
        fi
    done
    echo "no $1.so.N in $libdir" >&2
    return 1
}
libzfs_core=$(soname libzfs_core)
libnvpair=$(soname libnvpair)

found=0
while IFS= read -r -d "" f; do
    replace "$f" 'LIBRARY = "zfs_core"' "LIBRARY = \"$libzfs_core\""
    found=$((found + 1))
done < <(find . -path '*/bindings/libzfs_core.py' -print0)
while IFS= read -r -d "" f; do
    replace "$f" 'LIBRARY = "nvpair"' "LIBRARY = \"$libnvpair\""
    found=$((found + 1))
done < <(find . -path '*/bindings/libnvpair.py' -print0)
if [ "$found" -lt 2 ]; then
    echo "pyzfs bindings not found where expected; cannot pin libzfs_core/libnvpair" >&2
    exit 1
fi
