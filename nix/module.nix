# NixOS module: boot.initrd.lczfs-unlockd
#
# Replaces the hand-written stage-1 chain (early pool import, crypttab entry,
# keystore mount, two mask services) with one Type=notify service in the
# systemd initrd.  Option names and their nixpkgs counterparts were checked
# against nixpkgs master of 2025 (see docs/nixos.md).
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.boot.initrd.lczfs-unlockd;
  lczfsLib = import ./lib.nix;
  initrdSystemd = config.boot.initrd.systemd;
  zfsPackage = config.boot.zfs.package;

  duration = lib.types.either lib.types.ints.unsigned lib.types.nonEmptyStr;
  durationText = "a systemd time span (\"10s\", \"5min\") or a number of seconds";

  settings = lczfsLib.mkSettings cfg;
  configFile = pkgs.writeText "lczfs-unlockd.toml" (lczfsLib.toTOML settings);

  pythonPackages = pkgs.python3Packages;
  pyzfs = pythonPackages.callPackage ./pyzfs.nix { zfs = zfsPackage; };
  initrdEnv = pkgs.callPackage ./initrd-env.nix {
    inherit (pythonPackages) python;
    lczfs-unlockd = cfg.package;
  };

  unlockMethods = settings.keystore.unlock or [ ];
  tokenPluginFiles = map (
    p: "${initrdSystemd.package}/lib/cryptsetup/libcryptsetup-token-systemd-${p}.so"
  ) cfg.keystore.tokenPlugins;

  supportedFs = config.boot.initrd.supportedFilesystems;
  zfsInInitrd =
    if builtins.isList supportedFs then builtins.elem "zfs" supportedFs else supportedFs.zfs or false;

  initrdFiles =
    builtins.attrNames (config.boot.initrd.secrets or { })
    ++ builtins.attrNames (initrdSystemd.contents or { });
in
{
  options.boot.initrd.lczfs-unlockd = {
    enable = lib.mkEnableOption ''
      lczfs-unlockd, which imports a ZFS pool in the systemd initrd, opens a
      LUKS keystore on a zvol of that pool, loads the wrapping keys of the
      pool's encryption roots from it and closes the keystore again
    '';

    package = lib.mkOption {
      type = lib.types.package;
      default = pythonPackages.callPackage ./package.nix {
        inherit pyzfs;
        zfs = zfsPackage;
        systemd = initrdSystemd.package;
      };
      defaultText = lib.literalMD "lczfs-unlockd built against `boot.zfs.package` and `boot.initrd.systemd.package`";
      description = ''
        The lczfs-unlockd package.  It must be built against the ZFS and systemd
        that run in the initrd: its tool and library paths are fixed at build
        time, and only those store paths exist in the initrd.
      '';
    };

    pool = lib.mkOption {
      type = lib.types.nonEmptyStr;
      example = "rpool";
      description = "The pool to import; it holds both the keystore zvol and the encrypted datasets.";
    };

    devices = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "/dev/disk/by-id/nvme-EXAMPLE-part2" ];
      description = ''
        Device paths of the pool's vdevs.  When given, the daemon reports
        which of them are missing while it waits and, when they lie in
        {option}`boot.initrd.lczfs-unlockd.devNodes`, imports the pool as
        soon as all of them exist (list every vdev as `zpool status -P`
        shows it).  Otherwise, or while some are missing, the pool is found
        by scanning {option}`boot.initrd.lczfs-unlockd.devNodes`.
      '';
    };

    devNodes = lib.mkOption {
      type = lib.types.str;
      default = config.boot.zfs.pools.${cfg.pool}.devNodes or config.boot.zfs.devNodes;
      defaultText = lib.literalExpression "config.boot.zfs.pools.\${pool}.devNodes or config.boot.zfs.devNodes";
      description = "Directory scanned for the pool's devices (`zpool import -d`).";
    };

    forceImport = lib.mkOption {
      type = lib.types.bool;
      default = config.boot.zfs.forceImportRoot;
      defaultText = lib.literalExpression "config.boot.zfs.forceImportRoot";
      description = ''
        Import with `zpool import -f`.  Defaults to what NixOS's own
        `zfs-import-<pool>.service` would do for a root pool, so that switching
        to lczfs-unlockd does not change whether a pool last used by another
        host is imported.  Prefer `false` (and `boot.zfs.forceImportRoot = false`).
      '';
    };

    onlineGrace = lib.mkOption {
      type = duration;
      default = "10s";
      description = ''
        How long to wait for all devices (pool ONLINE) before accepting a
        DEGRADED pool; ${durationText}.  Kernel command line: `rd.lczfs.online_grace=`.
      '';
    };

    timeout = lib.mkOption {
      type = duration;
      default = "5min";
      description = ''
        Hard deadline for the pool to appear; ${durationText}.  Kernel command
        line: `rd.lczfs.timeout=`.
      '';
    };

    datasets = lib.mkOption {
      type = lib.types.either (lib.types.enum [ "auto" ]) (lib.types.listOf lib.types.str);
      default = "auto";
      example = [ "rpool/crypt" ];
      description = ''
        Encryption roots whose keys to load.  `"auto"`: every encryption root
        of the pool whose `keylocation` is a `file://` path under
        {option}`boot.initrd.lczfs-unlockd.keystore.mountpoint`.
      '';
    };

    mask = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "systemd-cryptsetup@secretsroot.service" ];
      description = ''
        Extra units to mask (at runtime) at teardown, besides the keystore's
        cryptsetup unit and the mount unit of its mount point.
      '';
    };

    keystore = {
      volume = lib.mkOption {
        type = lib.types.nonEmptyStr;
        example = "rpool/volumes/bootsecrets";
        description = "The zvol that holds the LUKS keystore.";
      };

      partition = lib.mkOption {
        type = lib.types.ints.unsigned;
        default = 1;
        description = "Partition of the zvol with the LUKS volume (`/dev/zvol/<volume>-part<N>`); 0 for the whole zvol.";
      };

      name = lib.mkOption {
        type = lib.types.strMatching "[A-Za-z0-9_.+-]+";
        default = "lczfs-keystore";
        description = "Device-mapper name of the opened keystore (`/dev/mapper/<name>`).";
      };

      mountpoint = lib.mkOption {
        type = lib.types.str;
        default = "/bootsecrets";
        description = ''
          Where the keystore is mounted (read-only) while keys are loaded.  The
          datasets' `keylocation=file://…` must name files below it.
        '';
      };

      unlock = lib.mkOption {
        type = lib.types.listOf (
          lib.types.enum [
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

      keyfile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "/etc/lczfs-unlockd/keystore.key";
        description = ''
          Key file for the keystore, as a path inside the initrd.  Put it there
          with `boot.initrd.secrets."/etc/lczfs-unlockd/keystore.key" = /path/on/host;`.
        '';
      };

      tries = lib.mkOption {
        type = lib.types.ints.unsigned;
        default = 3;
        description = "Passphrase attempts before giving up; 0 asks until the passphrase is right.";
      };

      promptTimeout = lib.mkOption {
        type = duration;
        default = "0";
        description = "How long a passphrase prompt waits; `0` waits forever; ${durationText}.";
      };

      tokenTimeout = lib.mkOption {
        type = duration;
        default = "30s";
        description = "How long to wait for a token device (TPM2, FIDO2 key); ${durationText}.";
      };

      tokenPlugins = lib.mkOption {
        type = lib.types.listOf (
          lib.types.enum [
            "tpm2"
            "fido2"
            "pkcs11"
          ]
        );
        default = lib.optional initrdSystemd.tpm2.enable "tpm2";
        defaultText = lib.literalExpression ''lib.optional config.boot.initrd.systemd.tpm2.enable "tpm2"'';
        description = ''
          systemd's libcryptsetup token plugins to put into the initrd when
          `"token"` is an unlock method.  TPM2 also needs
          `boot.initrd.systemd.tpm2.enable` (kernel modules, tpm2-tss);
          FIDO2 brings libfido2; PKCS#11 modules must be added by hand.
        '';
      };
    };

    dryRun = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Walk the whole sequence without changing anything that outlives it
        (read-only import that is exported again, keys only checked, nothing
        masked) and report what a real run would do.  Adds
        `rd.lczfs.dry_run=1` to the kernel command line; the same knob can be
        set for one boot in the boot loader.
      '';
    };

    debug = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Verbose logging; adds `rd.lczfs.debug` to the kernel command line.";
    };

    settings = lib.mkOption {
      type = (pkgs.formats.toml { }).type;
      default = { };
      example = {
        keystore.tries = 5;
      };
      description = ''
        Raw keys for `/etc/lczfs-unlockd.toml`, merged over the options above
        (snake_case, as the daemon reads them).  For keys this module does not
        know yet.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = map (message: {
      assertion = false;
      inherit message;
    }) (lczfsLib.problems cfg {
      systemdInitrd = initrdSystemd.enable;
      inherit zfsInInitrd initrdFiles;
    })
    ++ [
      {
        assertion = cfg.package.passthru.zfs or zfsPackage == zfsPackage;
        message = ''
          boot.initrd.lczfs-unlockd.package is built against a different ZFS than
          boot.zfs.package; its pinned zpool/libzfs_core paths would not exist in the initrd.'';
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
          ++ lib.optional (builtins.elem "fido2" cfg.keystore.tokenPlugins) "${lib.getLib pkgs.libfido2}/lib/libfido2.so.1"
          ++ lib.optional (builtins.elem "pkcs11" cfg.keystore.tokenPlugins) "${lib.getLib pkgs.p11-kit}/lib/libp11-kit.so.0"
        );

      # The same unit as units/lczfs-unlockd.service, plus the NixOS import
      # service of the pool (zfs-import-<pool>.service) in the ordering.
      services.lczfs-unlockd = {
        description = "Unlock ZFS encryption roots of ${cfg.pool} from the LUKS keystore ${cfg.keystore.volume}";
        unitConfig = {
          DefaultDependencies = false;
          ConditionPathExists = "/etc/initrd-release";
        };

        inherit (lczfsLib.unitOrdering cfg.pool)
          wants
          after
          before
          conflicts
          wantedBy
          ;

        serviceConfig = {
          Type = "notify";
          NotifyAccess = "main";
          RemainAfterExit = true;
          ExecStart = "${initrdEnv}/bin/lczfs-unlockd";
          # The daemon extends this with EXTEND_TIMEOUT_USEC while it waits
          # for devices or a passphrase; this only catches a silent hang.
          TimeoutStartSec = "90s";
          StandardOutput = "journal+console";
          StandardError = "journal+console";
          KeyringMode = "shared";
        };
      };
    };
  };
}
