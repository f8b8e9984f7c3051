# Installs units/lczfs-unlockd.service (run from the source root) as
# $1/lib/systemd/system/lczfs-unlockd.service, with ExecStart pointing at
# $2.  Run by nix/package.nix's postInstall and by the build rehearsal in
# tests/nix.  The NixOS module uses this file through
# boot.initrd.systemd.packages and replaces ExecStart in a drop-in.
set -euo pipefail
out=$1 exe=$2
unit=units/lczfs-unlockd.service
dest=$out/lib/systemd/system/lczfs-unlockd.service
old="ExecStart=/usr/bin/lczfs-unlockd"
if [ "$(grep -c "^$old\$" "$unit")" != 1 ]; then
    echo "$unit: expected exactly one line '$old'" >&2
    exit 1
fi
mkdir -p "$(dirname "$dest")"
while IFS= read -r line || [ -n "$line" ]; do
    if [ "$line" = "$old" ]; then
        printf 'ExecStart=%s\n' "$exe"
    else
        printf '%s\n' "$line"
    fi
done < "$unit" > "$dest"
chmod 0444 "$dest"
