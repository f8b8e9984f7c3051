# NixOS module: boot.initrd.lczfs-unlockd
#
# Replaces the hand-written stage-1 chain (early pool import, crypttab entry,
# keystore mount, mask services) with one Type=notify service in the systemd
# initrd.  The unit is the package's (units/lczfs-unlockd.service, installed
# by nix/install-unit.sh) and reaches the initrd through
# boot.initrd.systemd.packages, as zfs.nix does with ZFS's units; the module
# only adds a drop-in (ExecStart of the initrd's Python tree, the ordering
# before NixOS's zfs-import-<pool>.service), the requirement of the pool's
# stage-1 mounts on it and sysroot.mount's assertions that the daemon vouched
# for the root (docs/nixos.md, "When the root is refused").  The
# daemon's file is `settings` (RFC 42), written with pkgs.formats.toml.
#
# Evaluated as a whole NixOS system against nixos-24.05 by tests/nix; option
# names that changed later (boot.initrd.systemd.tpm2.enable) are handled.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  inherit (lib) mkOption types;

  cfg = config.boot.initrd.lczfs-unlockd;
  lczfsLib = import ./lib.nix;
  initrdSystemd = config.boot.initrd.systemd;
  zfsPackage = config.boot.zfs.package;
  settingsFormat = pkgs.formats.toml { };

  # boot.initrd.systemd.tpm2.enable since NixOS 24.11, enableTpm2 before.
  tpm2Enabled =
    if initrdSystemd ? tpm2 then initrdSystemd.tpm2.enable else initrdSystemd.enableTpm2 or false;
  tpm2OptionName =
    if initrdSystemd ? tpm2 then "boot.initrd.systemd.tpm2.enable" else "boot.initrd.systemd.enableTpm2";

  duration = types.either types.ints.unsigned types.nonEmptyStr;
  durationText = "a systemd time span (\"10s\", \"5min\") or a number of seconds";

  # TPM2 policy files given as files of the build (a Nix path, or a string
  # with store context such as "${pkgs.foo}/x.json") are copied into the
  # initrd at a fixed place; a plain string is a path inside the initrd.
  policyFiles = {
    tpm2_signature = "/etc/lczfs-unlockd/tpm2-pcr-signature.json";
    tpm2_pcrlock = "/etc/lczfs-unlockd/tpm2-pcrlock.json";
  };
  isBuildFile = v: builtins.isPath v || (builtins.isString v && builtins.hasContext v);
  copiedPolicyFiles = lib.filterAttrs (
    key: _: isBuildFile (cfg.settings.keystore.${key} or null)
  ) policyFiles;
  keystoreSettings = cfg.settings.keystore // copiedPolicyFiles;

  # Unset optional keys (null) are left out, so the daemon's defaults apply.
  fileSettings = lib.filterAttrsRecursive (_: v: v != null) (
    cfg.settings // { keystore = keystoreSettings; }
  );
  configFile = settingsFormat.generate "lczfs-unlockd.toml" fileSettings;

  # PCR measurement (keystore.measure_pcr) talks to the TPM through
  # tpm2-tss: the libraries the package pins in _build_paths.py.  tctildr
  # dlopen()s the device TCTI by the path in TPM2_TCTI, so it is listed too;
  # libtss2-mu/-sys/-rc come with libtss2-esys as ELF dependencies, named
  # anyway so that the list says what is needed.
  tpm2Tss = lib.getLib (cfg.package.passthru.tpm2-tss or pkgs.tpm2-tss);
  measurePcr = cfg.settings.keystore.measure_pcr;
  measuring = tpm2Enabled && measurePcr != false;
  tss2Libraries = map (name: "${tpm2Tss}/lib/${name}") [
    "libtss2-esys.so.0"
    "libtss2-tctildr.so.0"
    "libtss2-tcti-device.so.0"
    "libtss2-mu.so.0"
    "libtss2-rc.so.0"
  ];

  # sysroot.mount's assertions on the daemon's verdict (root-checked
  # present, root-refused absent): the dracut module's drop-in, one file
  # for both.
  sysrootDropin = ../units/sysroot.mount.d-lczfs-unlockd.conf;

  # The same-named helpers of nixpkgs' zfs.nix: the stage-1 mounts of the
  # pool's file systems (below /sysroot), which NixOS's zfs-import-<pool>
  # is required by, and the datasets needed for boot.
  poolOf = lczfsLib.poolOf;
  bootFileSystemsOf =
    pool:
    lib.filter (
      fs:
      fs.fsType == "zfs"
      && fs.device or null != null
      && poolOf fs.device == pool
      && utils.fsNeededForBoot fs
    ) (lib.attrValues config.fileSystems);
  bootFileSystems = bootFileSystemsOf cfg.settings.pool;
  mountUnit = fs: "${utils.escapeSystemdPath ("/sysroot" + lib.removeSuffix "/" fs.mountPoint)}.mount";
  poolMounts =
    map mountUnit bootFileSystems
    ++ lib.optional (lib.any (fs: fs.mountPoint == "/usr") bootFileSystems) "sysusr-usr.mount";

  pythonPackages = pkgs.python3Packages;
  pyzfs = pythonPackages.callPackage ./pyzfs.nix { zfs = zfsPackage; };
  initrdEnv = pkgs.callPackage ./initrd-env.nix {
    inherit (pythonPackages) python;
    lczfs-unlockd = cfg.package;
  };

  unlockMethods = cfg.settings.keystore.unlock;
  tokenPluginFiles = map (
    p: "${initrdSystemd.package}/lib/cryptsetup/libcryptsetup-token-systemd-${p}.so"
  ) cfg.tokenPlugins;

  supportedFs = config.boot.initrd.supportedFilesystems;
  zfsInInitrd =
    if builtins.isList supportedFs then builtins.elem "zfs" supportedFs else supportedFs.zfs or false;

  initrdFiles =
    builtins.attrNames (config.boot.initrd.secrets or { })
    ++ builtins.attrNames (initrdSystemd.contents or { });

  prefix = [
    "boot"
    "initrd"
    "lczfs-unlockd"
  ];
  # Option names before `settings` (camelCase mirrors of the file's keys).
  renamed = {
    pool = [ "pool" ];
    devices = [ "devices" ];
    devNodes = [ "dev_nodes" ];
    forceImport = [ "force_import" ];
    onlineGrace = [ "online_grace" ];
    timeout = [ "timeout" ];
    datasets = [ "datasets" ];
    mask = [ "mask" ];
    "keystore.volume" = [ "keystore" "volume" ];
    "keystore.partition" = [ "keystore" "partition" ];
    "keystore.name" = [ "keystore" "name" ];
    "keystore.mountpoint" = [ "keystore" "mountpoint" ];
    "keystore.unlock" = [ "keystore" "unlock" ];
    "keystore.keyfile" = [ "keystore" "keyfile" ];
    "keystore.tries" = [ "keystore" "tries" ];
    "keystore.promptTimeout" = [ "keystore" "prompt_timeout" ];
    "keystore.tokenTimeout" = [ "keystore" "token_timeout" ];
  };

  keystoreOptions = {
    freeformType = settingsFormat.type;
    options = {
      volume = mkOption {
        type = types.nonEmptyStr;
        example = "rpool/volumes/bootsecrets";
        description = "The zvol that holds the LUKS keystore.";
      };
      partition = mkOption {
        type = types.ints.unsigned;
        default = 1;
        description = "Partition of the zvol with the LUKS volume (`/dev/zvol/<volume>-part<N>`); 0 for the whole zvol.";
      };
      name = mkOption {
        type = types.strMatching "[A-Za-z0-9_.+-]+";
        default = "lczfs-keystore";
        description = "Device-mapper name of the opened keystore (`/dev/mapper/<name>`).";
      };
      mountpoint = mkOption {
        type = types.str;
        default = "/bootsecrets";
        description = ''
          Where the keystore is mounted (read-only) while keys are loaded.  The
          datasets' `keylocation=file://…` must name files below it.
        '';
      };
      unlock = mkOption {
        type = types.listOf (
          types.enum [
            "token"
            "keyfile"
            "passphrase"
          ]
        );
        default = [
          "token"
          "keyfile"
          "passphrase"
        ];
        description = ''
          Unlock methods, tried in order: LUKS2 tokens (TPM2/FIDO2/PKCS#11 via
          libcryptsetup's token plugins), the key file, a passphrase asked
          through systemd's password agents.
        '';
      };
      keyfile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/etc/lczfs-unlockd/keystore.key";
        description = ''
          Key file for the keystore, as a path inside the initrd.  Put it there
          with `boot.initrd.secrets."/etc/lczfs-unlockd/keystore.key" = /path/on/host;`.
        '';
      };
      tries = mkOption {
        type = types.ints.unsigned;
        default = 3;
        description = "Passphrase attempts before giving up; 0 asks until the passphrase is right.";
      };
      prompt_timeout = mkOption {
        type = duration;
        default = "0";
        description = "How long a passphrase prompt waits; `0` waits forever; ${durationText}.";
      };
      token_timeout = mkOption {
        type = duration;
        default = "30s";
        description = "How long to wait for a token device (TPM2, FIDO2 key); ${durationText}.";
      };
      measure_pcr = mkOption {
        type =
          types.nullOr (types.either types.bool (types.ints.between 0 23))
          // {
            description = "null, a boolean or a TPM2 PCR index between 0 and 23";
          };
        default = if tpm2Enabled then null else false;
        defaultText = lib.literalMD "`null` when TPM2 is on in the initrd (`${tpm2OptionName}`), `false` otherwise";
        example = 15;
        description = ''
          The PCR the keystore's unlock is measured into (through tpm2-tss,
          as systemd-cryptsetup's `tpm2-measure-pcr=` does); a number makes
          the measurement mandatory (no TPM2 then fails the unlock), `true`
          is PCR 15, `false` never measures.  `null` leaves the key out of
          the file: PCR 15 when a TPM2 is present and a systemd-tpm2 token is
          enrolled.  Without TPM2 support in the initrd the default is
          `false`: the TSS libraries are put into the initrd only when TPM2
          is on and this is not `false`.
        '';
      };
      tpm2_signature = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = lib.literalExpression "./tpm2-pcr-signature.json";
        description = ''
          Signed PCR policy for a TPM2 token enrolled with
          `systemd-cryptenroll --tpm2-public-key=`.  A file of the build (a Nix
          path such as `./tpm2-pcr-signature.json`, or a store path) is copied
          into the initrd as `${policyFiles.tpm2_signature}`; a plain string is a
          path inside the initrd, e.g. `"/.extra/tpm2-pcr-signature.json"`, where
          systemd-stub puts the signature of a UKI.  `null`: the TPM2 token
          plugin's own default, which is that same file, so a UKI needs nothing here.
        '';
      };
      tpm2_pcrlock = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = lib.literalExpression "./pcrlock.json";
        description = ''
          systemd-pcrlock policy for a TPM2 token enrolled with
          `systemd-cryptenroll --tpm2-pcrlock=`.  A file of the build is copied
          into the initrd as `${policyFiles.tpm2_pcrlock}`; a plain string is a path
          inside the initrd.  `null`: the TPM2 token plugin's own default.
        '';
      };
    };
  };

  settingsModule =
    { config, ... }:
    {
      freeformType = settingsFormat.type;
      options = {
        pool = mkOption {
          type = types.nonEmptyStr;
          example = "rpool";
          description = "The pool to import; it holds both the keystore zvol and the encrypted datasets.";
        };
        devices = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "/dev/disk/by-id/nvme-EXAMPLE-part2" ];
          description = ''
            Device paths of the pool's vdevs.  When given, the daemon reports
            which of them are missing while it waits and, when they lie in
            `dev_nodes`, imports the pool as soon as all of them exist (list
            every vdev as `zpool status -P` shows it).  Otherwise, or while some
            are missing, the pool is found by scanning `dev_nodes`.
          '';
        };
        dev_nodes = mkOption {
          type = types.str;
          default = outer.boot.zfs.pools.${config.pool}.devNodes or outer.boot.zfs.devNodes;
          defaultText = lib.literalExpression "config.boot.zfs.pools.\${pool}.devNodes or config.boot.zfs.devNodes";
          description = "Directory scanned for the pool's devices (`zpool import -d`).";
        };
        force_import = mkOption {
          type = types.bool;
          default = outer.boot.zfs.forceImportRoot;
          defaultText = lib.literalExpression "config.boot.zfs.forceImportRoot";
          description = ''
            Import with `zpool import -f`.  Defaults to what NixOS's own
            `zfs-import-<pool>.service` would do for a root pool, so that switching
            to lczfs-unlockd does not change whether a pool last used by another
            host is imported.  Prefer `false` (and `boot.zfs.forceImportRoot = false`).
          '';
        };
        online_grace = mkOption {
          type = duration;
          default = "10s";
          description = ''
            How long to wait for all devices (pool ONLINE) before accepting a
            DEGRADED pool; ${durationText}.  Kernel command line: `rd.lczfs.online_grace=`.
          '';
        };
        timeout = mkOption {
          type = duration;
          default = "5min";
          description = ''
            Hard deadline for the pool to appear; ${durationText}.  Kernel command
            line: `rd.lczfs.timeout=`.
          '';
        };
        datasets = mkOption {
          type = types.either (types.enum [ "auto" ]) (types.listOf types.str);
          default = "auto";
          example = [ "rpool/crypt" ];
          description = ''
            Encryption roots whose keys to load.  `"auto"`: every encryption root
            of the pool whose `keylocation` is a `file://` path under
            `keystore.mountpoint`.
          '';
        };
        mask = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "systemd-cryptsetup@secretsroot.service" ];
          description = ''
            Extra units to mask (at runtime) at teardown, besides the keystore's
            cryptsetup unit and the mount unit of its mount point.
          '';
        };
        root_dataset = mkOption {
          type = types.nullOr types.nonEmptyStr;
          default =
            let
              root = outer.fileSystems."/" or null;
            in
            if
              root != null
              && root.fsType == "zfs"
              && root.device or null != null
              && poolOf root.device == config.pool
            then
              root.device
            else
              null;
          defaultText = lib.literalMD ''
            `config.fileSystems."/".device` when `/` is a ZFS dataset of `pool`, else `null`
          '';
          example = "rpool/crypt/local/root";
          description = ''
            The dataset mounted as `/`.  The daemon fails, before reporting
            ready, unless it is encrypted under an encryption root this run
            unlocked (or one of `trusted_roots`), and the pool's stage-1
            mounts require the daemon: a dataset swapped for an unencrypted
            one is not booted.  `null` leaves the key out; the daemon then takes
            the root from `root=zfs:…` on the kernel command line (for
            `root=zfs:AUTO` the pool's `bootfs`), which NixOS does not set.
          '';
        };
        verify_datasets = mkOption {
          type = types.listOf types.nonEmptyStr;
          default = lib.unique (
            map (fs: fs.device) (lib.filter (fs: fs.mountPoint != "/") (bootFileSystemsOf config.pool))
          );
          defaultText = lib.literalMD ''
            the `device` of every `fileSystems` entry other than `/` that is a
            ZFS dataset of `pool` and needed for boot (`neededForBoot`, or `/nix`,
            `/var`, ... as NixOS decides)
          '';
          example = [ "rpool/safe/persist" ];
          description = ''
            Datasets checked like `root_dataset`.  The default covers what NixOS
            mounts in the initrd from the pool; set `[ ]` if one of those is
            deliberately unencrypted (or not under a root this run unlocks).
          '';
        };
        trusted_roots = mkOption {
          type = types.nullOr (types.listOf types.nonEmptyStr);
          default = null;
          example = [ "rpool/crypt" ];
          description = ''
            Encryption roots that a checked dataset may belong to.  `null`
            leaves the key out: the roots this run unlocked.
          '';
        };
        keystore = mkOption {
          type = types.submodule keystoreOptions;
          description = "The LUKS keystore on a zvol of the pool (`[keystore]`).";
        };
      };
    };
  outer = config;
in
{
  imports =
    lib.mapAttrsToList (
      old: new:
      lib.mkRenamedOptionModule (prefix ++ lib.splitString "." old) (prefix ++ [ "settings" ] ++ new)
    ) renamed
    ++ [
      (lib.mkRenamedOptionModule (prefix ++ [
        "keystore"
        "tokenPlugins"
      ]) (prefix ++ [ "tokenPlugins" ]))
    ];

  options.boot.initrd.lczfs-unlockd = {
    enable = lib.mkEnableOption ''
      lczfs-unlockd, which imports a ZFS pool in the systemd initrd, opens a
      LUKS keystore on a zvol of that pool, loads the wrapping keys of the
      pool's encryption roots from it and closes the keystore again
    '';

    package = mkOption {
      type = types.package;
      default = pythonPackages.callPackage ./package.nix {
        inherit pyzfs;
        inherit (pkgs) cryptsetup tpm2-tss;
        zfs = zfsPackage;
        systemd = initrdSystemd.package;
      };
      defaultText = lib.literalMD "lczfs-unlockd built against `boot.zfs.package` and `boot.initrd.systemd.package`";
      description = ''
        The lczfs-unlockd package.  It must be built against the ZFS and systemd
        that run in the initrd: its tool and library paths are fixed at build
        time, and only those store paths exist in the initrd.  Its
        `lib/systemd/system/lczfs-unlockd.service` is the unit the initrd runs.
      '';
    };

    settings = mkOption {
      type = types.submodule settingsModule;
      example = lib.literalExpression ''
        {
          pool = "rpool";
          keystore.volume = "rpool/volumes/bootsecrets";
          keystore.unlock = [ "token" "passphrase" ];
        }
      '';
      description = ''
        The content of the initrd's `/etc/lczfs-unlockd.toml`, with the
        daemon's own (snake_case) keys; see the daemon's README for every key.
        Keys not declared here are written as given.
      '';
    };

    tokenPlugins = mkOption {
      type = types.listOf (
        types.enum [
          "tpm2"
          "fido2"
          "pkcs11"
        ]
      );
      default = lib.optional tpm2Enabled "tpm2";
      defaultText = lib.literalExpression ''lib.optional config.boot.initrd.systemd.tpm2.enable "tpm2"'';
      description = ''
        systemd's libcryptsetup token plugins to put into the initrd when
        `"token"` is an unlock method.  TPM2 also needs
        `boot.initrd.systemd.tpm2.enable` (`enableTpm2` before NixOS 24.11)
        for kernel modules and tpm2-tss; FIDO2 brings libfido2, PKCS#11
        p11-kit (PKCS#11 modules must be added by hand).
      '';
    };

    dryRun = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Walk the whole sequence without changing anything that outlives it
        (read-only import that is exported again, keys only checked, nothing
        masked) and report what a real run would do.  Adds
        `rd.lczfs.dry_run=1` to the kernel command line; the same knob can be
        set for one boot in the boot loader.
      '';
    };

    debug = mkOption {
      type = types.bool;
      default = false;
      description = "Verbose logging; adds `rd.lczfs.debug` to the kernel command line.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions =
      map
        (message: {
          assertion = false;
          inherit message;
        })
        (
          lczfsLib.problems fileSettings {
            systemdInitrd = initrdSystemd.enable;
            inherit zfsInInitrd initrdFiles;
            tpm2 = tpm2Enabled;
            inherit tpm2OptionName;
          }
        )
      ++ [
        {
          assertion = cfg.package.passthru.zfs or zfsPackage == zfsPackage;
          message = ''
            boot.initrd.lczfs-unlockd.package is built against a different ZFS than
            boot.zfs.package; its pinned zpool/libzfs_core paths would not exist in the initrd.'';
        }
        {
          assertion = builtins.elem "tpm2" cfg.tokenPlugins -> tpm2Enabled;
          message = ''
            boot.initrd.lczfs-unlockd.tokenPlugins contains "tpm2" but ${tpm2OptionName}
            is false, so the initrd has no TPM2 kernel modules or tpm2-tss.'';
        }
      ];

    boot.initrd.supportedFilesystems.zfs = lib.mkDefault true;

    # The keystore: dm-crypt with the usual ciphers (the list luksroot.nix
    # maintains for the kernels in nixpkgs) and ext4.  The daemon mounts
    # with mount(2), so no fsck or mount helper is needed.
    boot.initrd.availableKernelModules = [
      "dm_mod"
      "dm_crypt"
      "cryptd"
      "ext4"
    ] ++ config.boot.initrd.luks.cryptoModules;
    boot.initrd.kernelModules = [ "dm_mod" ];

    boot.kernelParams = lczfsLib.kernelParams cfg;

    boot.initrd.systemd = {
      contents = {
        "/etc/lczfs-unlockd.toml".source = configFile;
      }
      // lib.mapAttrs' (
        key: initrdPath: lib.nameValuePair initrdPath { source = cfg.settings.keystore.${key}; }
      ) copiedPolicyFiles;

      storePaths =
        [
          initrdEnv
          # Pinned in _build_paths.py; zfs.nix puts the same files in /bin,
          # listed here so that the daemon does not depend on that.
          (lib.getExe' zfsPackage "zpool")
          (lib.getExe' zfsPackage "zfs")
          (lib.getExe' initrdSystemd.package "systemd-ask-password")
          "${lib.getLib pkgs.cryptsetup}/lib"
        ]
        ++ lib.optionals (builtins.elem "token" unlockMethods) (
          tokenPluginFiles
          ++ lib.optional (builtins.elem "fido2" cfg.tokenPlugins) "${lib.getLib pkgs.libfido2}/lib/libfido2.so.1"
          ++ lib.optional (builtins.elem "pkcs11" cfg.tokenPlugins) "${lib.getLib pkgs.p11-kit}/lib/libp11-kit.so.0"
        )
        ++ lib.optionals measuring tss2Libraries;

      # The unit comes from the package; this becomes its drop-in
      # (lczfs-unlockd.service.d/overrides.conf).
      packages = [ cfg.package ];
      # sysroot.mount is written by systemd-fstab-generator at boot, so
      # this can only be a drop-in (sysroot.mount.d/overrides.conf): the
      # root is mounted only after the daemon vouched for it in this boot,
      # even if something started the mount without the requirement below
      # (a unit of the user's, / on another pool).
      units."sysroot.mount" = {
        overrideStrategy = "asDropin";
        text = builtins.readFile sysrootDropin;
      };
      services.lczfs-unlockd = {
        inherit (lczfsLib.poolOrdering cfg.settings.pool) before wantedBy;
        # The unit already orders itself before sysroot.mount; requiring it
        # as well means that a failed run -- a keystore that did not open,
        # or a root_dataset/verify_datasets entry the daemon refused --
        # leaves the pool's stage-1 mounts undone, as NixOS's own
        # zfs-import-<pool> does for its failures.  Without it an
        # unencrypted dataset put in the place of the root would be mounted
        # (it needs no key) and booted.
        requiredBy = poolMounts;
        serviceConfig.ExecStart = [
          ""
          "${initrdEnv}/bin/lczfs-unlockd"
        ];
      };
    };
  };
}
