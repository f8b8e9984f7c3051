# Pure helpers for the NixOS module: no nixpkgs, only builtins, so that
# tests can evaluate them with a bare `nix-instantiate --eval`.
#
#   problems      settings + facts about the rest of the system -> assertion messages
#   unitOrdering  the dependencies of units/lczfs-unlockd.service, read from that
#                 file, plus NixOS's own import service of the pool
#   poolOrdering  just the NixOS additions (what the module adds as a drop-in)
#   kernelParams  dryRun/debug -> kernel command line
let
  inherit (builtins)
    all
    concatLists
    elem
    filter
    head
    isInt
    isList
    isString
    map
    match
    stringLength
    substring
    ;

  hasPrefix = prefix: s: substring 0 (stringLength prefix) s == prefix;

  optional = cond: x: if cond then [ x ] else [ ];

  # The first component of a dataset name is its pool.
  poolOf = dataset: head (builtins.split "/" dataset);

  # --- validation --------------------------------------------------------

  isAbsolute = p: hasPrefix "/" p;

  # A path a ZFS keylocation file:// URI can name exactly: absolute, no
  # empty, "." or ".." components, no trailing slash, no whitespace.
  isCleanAbsolute =
    p:
    isString p
    && isAbsolute p
    && p != "/"
    && match ".*[[:space:]].*" p == null
    && match "(/[^/]+)+" p != null
    && all (c: c != "." && c != "..") (filter isString (builtins.split "/" p));

  keystoreDevice =
    ks: "/dev/zvol/${ks.volume}" + (if ks.partition == 0 then "" else "-part${toString ks.partition}");

  opt = "boot.initrd.lczfs-unlockd.settings";

  # Where files appear at boot without being in the initrd image:
  # systemd-stub's /.extra (a UKI's PCR signature, credentials) and /run.
  isRuntimeFile = p: hasPrefix "/.extra/" p || hasPrefix "/run/" p;

  # `settings` is the file's content (snake_case, as the daemon reads it).
  # `env` carries what the module reads from the rest of the configuration:
  #   systemdInitrd   boot.initrd.systemd.enable
  #   zfsInInitrd     ZFS support in the initrd
  #   initrdFiles     paths that will exist inside the initrd (secrets, contents)
  #   tpm2            TPM2 support in the initrd (optional, default true)
  #   tpm2OptionName  the option that turns it on, for the message
  problems =
    settings: env:
    let
      pool = settings.pool;
      ks = settings.keystore;
      datasets = settings.datasets or "auto";
      mountpoint = ks.mountpoint or "/bootsecrets";
      unlock = ks.unlock or [ ];
      keyfile = ks.keyfile or null;
      rootDataset = settings.root_dataset or null;
      verifyDatasets = settings.verify_datasets or [ ];
      trustedRoots = settings.trusted_roots or null;
      measurePcr = ks.measure_pcr or null;
      outsidePool = ds: !isString ds || poolOf ds != pool;
      # A dataset this run cannot have unlocked is always refused.
      checkedOutside =
        key: what:
        let
          given = settings.${key} or [ ];
        in
        map (ds: ''
          ${opt}.${key} contains "${toString ds}", which is not a dataset of the pool
          "${pool}"; ${what}'') (filter outsidePool (if isList given then given else [ ]));
      policyFile =
        key: example:
        let
          path = ks.${key} or null;
        in
        if path == null then
          [ ]
        else if !isCleanAbsolute path then
          [
            ''
              ${opt}.keystore.${key} = "${toString path}" must be an absolute path
              inside the initrd, or a file of the build (a Nix path such as ./${example}) for the
              module to copy there.''
          ]
        else
          optional (!elem "token" unlock) ''
            ${opt}.keystore.${key} is set but "token" is not in keystore.unlock, so
            no TPM2 token is ever tried with it (the daemon refuses such a file).''
          ++ optional (!isRuntimeFile path && !elem path env.initrdFiles) ''
            ${opt}.keystore.${key} = "${path}" is not put into the initrd (and is
            not under /.extra/, where systemd-stub puts a UKI's files, or /run/). Give the file as a
            Nix path (./${example}) to have it copied, or add it with
            boot.initrd.systemd.contents."${path}".source = ...;.'';
    in
    concatLists [
      (optional (!env.systemdInitrd) ''
        lczfs-unlockd runs as a service in the systemd initrd; set
        boot.initrd.systemd.enable = true (the scripted initrd is not supported).'')
      (optional (!env.zfsInInitrd) ''
        lczfs-unlockd needs ZFS in the initrd; set boot.initrd.supportedFilesystems.zfs = true
        (it is enabled by default when a ZFS file system is needed for boot).'')
      (optional (match "[A-Za-z][A-Za-z0-9_.:-]*" pool == null) ''
        ${opt}.pool = "${pool}" is not a pool name (a pool name, not a
        dataset or device path, e.g. "rpool").'')
      (optional (poolOf ks.volume != pool || ks.volume == pool) ''
        ${opt}.keystore.volume = "${ks.volume}" must be a zvol inside the pool
        "${pool}", e.g. "${pool}/volumes/bootsecrets": the keystore is opened after that
        pool is imported.'')
      (optional (!isCleanAbsolute mountpoint) ''
        ${opt}.keystore.mountpoint = "${toString mountpoint}" cannot work as the
        directory of a ZFS keylocation (file:///...): use an absolute path without "." or ".."
        components, trailing slash or whitespace, other than "/", e.g. "/bootsecrets".'')
      (optional (isCleanAbsolute mountpoint && (mountpoint == "/sysroot" || hasPrefix "/sysroot/" mountpoint)) ''
        ${opt}.keystore.mountpoint = "${mountpoint}" is inside /sysroot, where
        the root file system is mounted later in the initrd; keylocations that name it cannot
        work in stage 1 and would point into the real root in stage 2. Use e.g. "/bootsecrets".'')
      (
        if isList datasets then
          map (ds: ''
            ${opt}.datasets contains "${toString ds}", which is not a dataset of the pool
            "${pool}"; lczfs-unlockd loads keys of that pool only.'') (
            filter (ds: !isString ds || poolOf ds != pool) datasets
          )
          ++ optional (datasets == [ ]) ''
            ${opt}.datasets is an empty list, so no key would ever be loaded;
            use "auto" or name the encryption roots.''
        else
          optional (datasets != "auto") ''
            ${opt}.datasets must be "auto" or a list of datasets, not "${toString datasets}".''
      )
      (optional (unlock == [ ]) ''
        ${opt}.keystore.unlock is empty: the keystore could never be opened.
        Use a non-empty list of "token", "keyfile" and "passphrase".'')
      (optional (unlock != [ ] && all (m: m == "keyfile") unlock && keyfile == null) ''
        ${opt}.keystore.unlock only allows "keyfile" but keystore.keyfile is not
        set, so the keystore could never be opened; set it to a path inside the initrd, e.g. with
        boot.initrd.secrets."/etc/lczfs-unlockd/keystore.key" = /path/on/the/build/host.'')
      (optional (keyfile != null && !isCleanAbsolute keyfile) ''
        ${opt}.keystore.keyfile = "${toString keyfile}" must be an absolute path
        inside the initrd.'')
      (optional (keyfile != null && isCleanAbsolute keyfile && !elem keyfile env.initrdFiles) ''
        ${opt}.keystore.keyfile = "${keyfile}" is not put into the initrd, so
        the keystore key cannot be read at boot. Add it with
        boot.initrd.secrets."${keyfile}" = /path/on/the/build/host; (or boot.initrd.systemd.contents).'')
      (optional (keyfile != null && isCleanAbsolute mountpoint && hasPrefix (mountpoint + "/") keyfile) ''
        ${opt}.keystore.keyfile = "${keyfile}" lies under the keystore mount point
        "${mountpoint}", which is empty until the keystore is open.'')
      (optional (rootDataset != null && outsidePool rootDataset) ''
        ${opt}.root_dataset = "${toString rootDataset}" is not a dataset of the pool
        "${pool}", so no run could unlock it and the daemon would refuse every boot; name the
        dataset mounted as / (fileSystems."/".device), or set it to null.'')
      (checkedOutside "verify_datasets" "no run could unlock it, so the daemon would refuse every boot.")
      (checkedOutside "trusted_roots" "the encryption root of a dataset of the pool is in the pool.")
      (optional (trustedRoots == [ ]) ''
        ${opt}.trusted_roots is an empty list, so every checked dataset would be
        refused; use null (the encryption roots this run unlocked) or name the roots.'')
      (optional ((isInt measurePcr || measurePcr == true) && !(env.tpm2 or true)) ''
        ${opt}.keystore.measure_pcr = ${builtins.toJSON measurePcr} but ${env.tpm2OptionName or "TPM2 support"}
        is false, so the initrd has no TPM2 kernel modules or tpm2-tss to measure with; turn TPM2
        on, or set measure_pcr = false.'')
      (policyFile "tpm2_signature" "tpm2-pcr-signature.json")
      (policyFile "tpm2_pcrlock" "pcrlock.json")
    ];

  # Kernel command line knobs the module sets for dryRun/debug.
  kernelParams =
    cfg: optional (cfg.dryRun or false) "rd.lczfs.dry_run=1" ++ optional (cfg.debug or false) "rd.lczfs.debug";

  # --- the unit ------------------------------------------------------------

  # units/lczfs-unlockd.service is the one source of truth: the package ships
  # it, the module only adds a drop-in.  This reads its dependency lines so
  # that what the module adds can be checked against it (tests/integration,
  # tests/nix) without a second copy.
  unitFile = ../units/lczfs-unlockd.service;

  words = s: filter (w: isString w && w != "") (builtins.split "[[:space:]]+" s);

  unitSetting =
    key:
    concatLists (
      map (
        line:
        let
          m = match "${key}=(.*)" line;
        in
        if m == null then [ ] else words (head m)
      ) (filter isString (builtins.split "\n" (builtins.readFile unitFile)))
    );

  # What NixOS needs on top of the shipped unit: its own import service of
  # the pool must wait for us, and wants us -- wanted, not required: if we
  # fail (or rd.lczfs=0), NixOS's import still runs and reports its own
  # load-key error instead of a bare dependency failure.
  poolOrdering = pool: {
    before = [ "zfs-import-${pool}.service" ];
    wantedBy = [
      "initrd.target"
      "zfs-import-${pool}.service"
    ];
  };

  unitOrdering =
    pool:
    let
      extra = poolOrdering pool;
    in
    {
      wants = unitSetting "Wants";
      after = unitSetting "After";
      before = unitSetting "Before" ++ extra.before;
      conflicts = unitSetting "Conflicts";
      # [Install] WantedBy is not applied by NixOS (nothing runs systemctl
      # enable), so the module states initrd.target itself.
      wantedBy = extra.wantedBy;
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
    problems
    kernelParams
    keystoreDevice
    isCleanAbsolute
    pep440Version
    poolOf
    unitOrdering
    poolOrdering
    ;
}
