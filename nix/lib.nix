# Pure helpers for the NixOS module: no nixpkgs, only builtins, so that
# tests/nix/test_nix.py can evaluate them with `nix-instantiate --eval`.
#
#   mkSettings  module option values -> the attrset written as /etc/lczfs-unlockd.toml
#   toTOML      that attrset -> TOML text (the daemon's config is small: strings,
#               integers, booleans, lists of scalars, tables)
#   problems    option values + facts about the rest of the system -> assertion messages
let
  inherit (builtins)
    all
    any
    attrNames
    concatLists
    concatStringsSep
    elem
    filter
    head
    isAttrs
    isBool
    isFloat
    isInt
    isList
    isString
    map
    match
    replaceStrings
    stringLength
    substring
    toJSON
    typeOf
    ;

  hasPrefix = prefix: s: substring 0 (stringLength prefix) s == prefix;

  optional = cond: x: if cond then [ x ] else [ ];

  # The first component of a dataset name is its pool.
  poolOf = dataset: head (builtins.split "/" dataset);

  # Recursive right-biased merge: `settings` wins over the typed options,
  # tables merge key by key instead of replacing each other.
  recursiveUpdate =
    lhs: rhs:
    lhs
    // builtins.mapAttrs (
      name: value: if isAttrs value && isAttrs (lhs.${name} or null) then recursiveUpdate lhs.${name} value else value
    ) rhs;

  dropNulls = attrs: builtins.removeAttrs attrs (filter (n: attrs.${n} == null) (attrNames attrs));

  # --- TOML --------------------------------------------------------------

  bareKey = k: match "[A-Za-z0-9_-]+" k != null;

  tomlString =
    s:
    let
      # JSON string escapes are valid TOML basic-string escapes for every
      # character JSON escapes (\" \\ \n \t \r \b \f \uXXXX).
      json = toJSON s;
    in
    # JSON leaves DEL unescaped; TOML forbids it in basic strings.  Nix has
    # no escape for it, so take it from a JSON string literal.
    replaceStrings [ (builtins.fromJSON "\"\\u007f\"") ] [ "\\u007F" ] json;

  tomlKey = k: if bareKey k then k else tomlString k;

  tomlScalar =
    path: v:
    if isString v then
      tomlString v
    else if isBool v then
      (if v then "true" else "false")
    else if isInt v then
      toString v
    else if isFloat v then
      throw "lczfs-unlockd: ${path}: floats are not used by the daemon's configuration; write a duration string such as \"1.5s\""
    else if isList v then
      "[" + concatStringsSep ", " (map (tomlScalar "${path}[]") v) + "]"
    else if isAttrs v then
      throw "lczfs-unlockd: ${path}: tables inside lists are not supported"
    else
      throw "lczfs-unlockd: ${path}: a ${typeOf v} cannot be written to TOML";

  # Keys whose values are plain values come first, then one [table] per
  # attrset, recursively with dotted headers.
  tomlTable =
    prefix: attrs:
    let
      names = attrNames attrs; # builtins.attrNames is sorted: stable output
      plain = filter (n: !isAttrs attrs.${n}) names;
      tables = filter (n: isAttrs attrs.${n}) names;
      qualified = n: (if prefix == "" then "" else prefix + ".") + tomlKey n;
      lines = map (n: "${tomlKey n} = ${tomlScalar (qualified n) attrs.${n}}\n") plain;
      sub = map (
        n:
        let
          t = attrs.${n};
          anyPlain = any (k: !isAttrs t.${k}) (attrNames t);
        in
        (if anyPlain || t == { } then "\n[${qualified n}]\n" else "") + tomlTable (qualified n) t
      ) tables;
    in
    concatStringsSep "" (lines ++ sub);

  toTOML = attrs: tomlTable "" attrs;

  # --- options -> config file --------------------------------------------

  # `cfg` mirrors the module's option tree (camelCase); the file uses the
  # daemon's snake_case keys.  Unset optional values (null) are left out so
  # that the daemon's own defaults apply.
  mkSettings =
    cfg:
    let
      ks = cfg.keystore;
      typed = dropNulls {
        inherit (cfg) pool devices datasets mask;
        dev_nodes = cfg.devNodes;
        force_import = cfg.forceImport;
        online_grace = cfg.onlineGrace;
        timeout = cfg.timeout;
        keystore = dropNulls {
          inherit (ks)
            volume
            partition
            name
            mountpoint
            unlock
            keyfile
            tries
            ;
          prompt_timeout = ks.promptTimeout;
          token_timeout = ks.tokenTimeout;
        };
      };
    in
    recursiveUpdate typed (cfg.settings or { });

  # --- validation --------------------------------------------------------

  isAbsolute = p: hasPrefix "/" p;

  # A path a ZFS keylocation file:// URI can name exactly: absolute, no
  # empty, "." or ".." components, no trailing slash, no whitespace.
  isCleanAbsolute =
    p:
    isAbsolute p
    && p != "/"
    && match ".*[[:space:]].*" p == null
    && match "(/[^/]+)+" p != null
    && all (c: c != "." && c != "..") (filter isString (builtins.split "/" p));

  keystoreDevice =
    ks: "/dev/zvol/${ks.volume}" + (if ks.partition == 0 then "" else "-part${toString ks.partition}");

  # `env` carries what the module reads from the rest of the configuration:
  #   systemdInitrd  boot.initrd.systemd.enable
  #   zfsInInitrd    ZFS support in the initrd
  #   initrdFiles    paths that will exist inside the initrd (secrets, contents)
  problems =
    cfg: env:
    let
      ks = cfg.keystore;
      settings = mkSettings cfg;
      datasets = settings.datasets or "auto";
      mountpoint = settings.keystore.mountpoint or "/bootsecrets";
      unlock = settings.keystore.unlock or [ ];
      keyfile = settings.keystore.keyfile or null;
    in
    filter (m: m != "") (concatLists [
      (optional (!env.systemdInitrd) ''
        lczfs-unlockd runs as a service in the systemd initrd; set
        boot.initrd.systemd.enable = true (the scripted initrd is not supported).'')
      (optional (!env.zfsInInitrd) ''
        lczfs-unlockd needs ZFS in the initrd; set boot.initrd.supportedFilesystems.zfs = true
        (it is enabled by default when a ZFS file system is needed for boot).'')
      (optional (match "[A-Za-z0-9][A-Za-z0-9_.:-]*" cfg.pool == null) ''
        boot.initrd.lczfs-unlockd.pool = "${cfg.pool}" is not a pool name (a pool name, not a
        dataset or device path, e.g. "rpool").'')
      (optional (poolOf ks.volume != cfg.pool || ks.volume == cfg.pool) ''
        boot.initrd.lczfs-unlockd.keystore.volume = "${ks.volume}" must be a zvol inside the pool
        "${cfg.pool}", e.g. "${cfg.pool}/volumes/bootsecrets": the keystore is opened after that
        pool is imported.'')
      (optional (!isCleanAbsolute mountpoint) ''
        boot.initrd.lczfs-unlockd.keystore.mountpoint = "${toString mountpoint}" cannot work as the
        directory of a ZFS keylocation (file:///...): use an absolute path without "." or ".."
        components, trailing slash or whitespace, other than "/", e.g. "/bootsecrets".'')
      (optional (isCleanAbsolute mountpoint && (mountpoint == "/sysroot" || hasPrefix "/sysroot/" mountpoint)) ''
        boot.initrd.lczfs-unlockd.keystore.mountpoint = "${mountpoint}" is inside /sysroot, where
        the root file system is mounted later in the initrd; keylocations that name it cannot
        work in stage 1 and would point into the real root in stage 2. Use e.g. "/bootsecrets".'')
      (
        if isList datasets then
          map (ds: ''
            boot.initrd.lczfs-unlockd.datasets contains "${ds}", which is not a dataset of the pool
            "${cfg.pool}"; lczfs-unlockd loads keys of that pool only.'') (
            filter (ds: !isString ds || poolOf ds != cfg.pool) datasets
          )
          ++ optional (datasets == [ ]) ''
            boot.initrd.lczfs-unlockd.datasets is an empty list, so no key would ever be loaded;
            use "auto" or name the encryption roots.''
        else
          optional (datasets != "auto") ''
            boot.initrd.lczfs-unlockd.datasets must be "auto" or a list of datasets, not "${toString datasets}".''
      )
      (optional (unlock == [ ]) ''
        boot.initrd.lczfs-unlockd.keystore.unlock is empty: the keystore could never be opened.
        Use a non-empty list of "token", "keyfile" and "passphrase".'')
      (optional (unlock != [ ] && all (m: m == "keyfile") unlock && keyfile == null) ''
        boot.initrd.lczfs-unlockd.keystore.unlock only allows "keyfile" but keystore.keyfile is not
        set, so the keystore could never be opened; set it to a path inside the initrd, e.g. with
        boot.initrd.secrets."/etc/lczfs-unlockd/keystore.key" = /path/on/the/build/host.'')
      (optional (keyfile != null && !isCleanAbsolute keyfile) ''
        boot.initrd.lczfs-unlockd.keystore.keyfile = "${toString keyfile}" must be an absolute path
        inside the initrd.'')
      (optional (keyfile != null && isCleanAbsolute keyfile && !elem keyfile env.initrdFiles) ''
        boot.initrd.lczfs-unlockd.keystore.keyfile = "${keyfile}" is not put into the initrd, so
        the keystore key cannot be read at boot. Add it with
        boot.initrd.secrets."${keyfile}" = /path/on/the/build/host; (or boot.initrd.systemd.contents).'')
      (optional (keyfile != null && isCleanAbsolute mountpoint && hasPrefix (mountpoint + "/") keyfile) ''
        boot.initrd.lczfs-unlockd.keystore.keyfile = "${keyfile}" lies under the keystore mount point
        "${mountpoint}", which is empty until the keystore is open.'')
    ]);

  # Kernel command line knobs the module sets for dryRun/debug.
  kernelParams =
    cfg: optional (cfg.dryRun or false) "rd.lczfs.dry_run=1" ++ optional (cfg.debug or false) "rd.lczfs.debug";

  # The initrd service's dependencies: units/lczfs-unlockd.service's, plus
  # NixOS's own import service of the pool (tests/nix checks they agree).
  unitOrdering = pool: {
    wants = [ "systemd-udev-trigger.service" ];
    after = [
      "systemd-udevd.service"
      "systemd-udev-trigger.service"
      "systemd-modules-load.service"
      "systemd-ask-password-console.path"
      "systemd-journald.socket"
    ];
    before = [
      "zfs-import-scan.service"
      "zfs-import-cache.service"
      "zfs-import-${pool}.service"
      "zfs-import.target"
      "zfs-load-key.service"
      "zfs-mount.service"
      "sysroot.mount"
      "initrd-root-fs.target"
      "initrd-fs.target"
      "initrd.target"
      "initrd-switch-root.target"
      "shutdown.target"
    ];
    conflicts = [ "shutdown.target" ];
    # Wanted, not required, by the import: ordering makes the import wait
    # for us; if we fail (or rd.lczfs=0), NixOS's import still runs and
    # reports its own load-key error instead of a bare dependency failure.
    wantedBy = [
      "initrd.target"
      "zfs-import-${pool}.service"
    ];
  };

  # Python package metadata wants a PEP 440 version; ZFS versions such as
  # "2.3.0-rc5" or "2.3.0-unstable-2024-10-01" are not.  Keep the release.
  pep440Version =
    v:
    let
      m = match "([0-9]+(\\.[0-9]+)*).*" v;
    in
    if m == null then "0" else head m;
in
{
  inherit
    toTOML
    mkSettings
    problems
    kernelParams
    keystoreDevice
    isCleanAbsolute
    pep440Version
    poolOf
    recursiveUpdate
    unitOrdering
    ;
}
