# NixOS module: boot.initrd.lczfs-unlockd
#
# Replaces the hand-written stage-1 chain (early pool import, crypttab entry,
# keystore mount, mask services) with one Type=notify service in the systemd
# initrd.  The unit is the package's (units/lczfs-unlockd.service, installed
# by nix/install-unit.sh) and reaches the initrd through
# boot.initrd.systemd.packages, as zfs.nix does with ZFS's units; the module
# only adds a drop-in (ExecStart of the initrd's Python tree, the ordering
# before NixOS's zfs-import-<pool>.service).  The daemon's file is
# `settings` (RFC 42), written with pkgs.formats.toml.
#
# Evaluated as a whole NixOS system against nixos-24.05 by tests/nix; option
# names that changed later (boot.initrd.systemd.tpm2.enable) are handled.
{
  config,
  lib,
  pkgs,
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

  # Unset optional keys (null) are left out, so the daemon's defaults apply.
  fileSettings = lib.filterAttrsRecursive (_: v: v != null) cfg.settings;
  configFile = settingsFormat.generate "lczfs-unlockd.toml" fileSettings;

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
        inherit (pkgs) cryptsetup;
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
      contents."/etc/lczfs-unlockd.toml".source = configFile;

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
        );

      # The unit comes from the package; this becomes its drop-in
      # (lczfs-unlockd.service.d/overrides.conf).
      packages = [ cfg.package ];
      services.lczfs-unlockd = {
        inherit (lczfsLib.poolOrdering cfg.settings.pool) before wantedBy;
        serviceConfig.ExecStart = [
          ""
          "${initrdEnv}/bin/lczfs-unlockd"
        ];
      };
    };
  };
}
