# Whole NixOS systems with the lczfs-unlockd module, evaluated against a real
# nixpkgs tree with nixos/lib/eval-config.nix.  tests/nix/test_system.py
# calls this once per batch of variants and asserts on the JSON it returns.
#
#   nix-instantiate --eval --strict --json tests/nix/system.nix \
#     --arg nixpkgs /path/to/nixpkgs --argstr variants '{"name": {...}}' \
#     [--argstr flakeModule /nix/store/...-source/nix/module.nix]
#   nix-instantiate tests/nix/system.nix -A drvs ...   (writes the .drv files)
#
# A variant: { config = <NixOS options as JSON>; via = "path" | "flake";
#              full = <instantiate initrd and toplevel>;
#              newTpm2 = null | <declare boot.initrd.systemd.tpm2.enable, as NixOS >= 24.11> }
# JSON has no Nix paths or priorities: { "_nixPath": "fixtures/x.json" }
# anywhere in a config stands for the path ./fixtures/x.json (relative to
# this file), { "_mkForce": value } for lib.mkForce value.
{
  nixpkgs,
  variants,
  flakeModule ? "",
  repo ? ../..,
}:

let
  lib = import (nixpkgs + "/lib");
  byPath = repo + "/nix/module.nix";

  # nixpkgs' hackage-packages.nix is missing from the tree (see its README);
  # shellcheck-minimal is the one Haskell package a system needs, for
  # writeShellApplication's check.  A compiler for no platform turns that
  # check off.
  noShellcheck = final: prev: {
    shellcheck-minimal = (prev.writeText "shellcheck-stub" "") // {
      compiler.meta.platforms = [ ];
    };
  };

  # One package set for all variants (nixpkgs.pkgs): the packages are
  # evaluated once per batch instead of once per variant.
  pkgs = import nixpkgs {
    system = "x86_64-linux";
    overlays = [ noShellcheck ];
  };

  # A realistic host: systemd initrd, ZFS root on the encrypted dataset.
  base = {
    system.stateVersion = "24.05";
    networking.hostId = "8425e349";
    boot.initrd.systemd.enable = lib.mkDefault true;
    boot.loader.systemd-boot.enable = true;
    boot.loader.efi.canTouchEfiVariables = true;
    boot.zfs.devNodes = "/dev/disk/by-id";
    boot.zfs.forceImportRoot = false;
    fileSystems."/" = {
      device = "rpool/crypt/local/root";
      fsType = "zfs";
    };
    fileSystems."/nix" = {
      device = "rpool/crypt/local/nix";
      fsType = "zfs";
    };
    fileSystems."/boot" = {
      device = "/dev/disk/by-uuid/ABCD-1234";
      fsType = "vfat";
    };
  };

  newTpm2Module = enable: {
    options.boot.initrd.systemd.tpm2.enable = lib.mkOption {
      type = lib.types.bool;
      default = enable;
    };
  };

  evalVariant =
    name: v:
    let
      module =
        if (v.via or "path") == "flake" then
          (if flakeModule == "" then throw "variant ${name}: no flakeModule given" else /. + flakeModule)
        else
          byPath;
      sys = import (nixpkgs + "/nixos/lib/eval-config.nix") {
        system = "x86_64-linux";
        inherit pkgs;
        modules =
          [
            module
            base
            v.config
          ]
          ++ lib.optional ((v.newTpm2 or null) != null) (newTpm2Module v.newTpm2);
      };
      config = sys.config;
      cfg = config.boot.initrd.lczfs-unlockd;
      initrd = config.boot.initrd.systemd;
      failed = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
      unit = initrd.units."lczfs-unlockd.service";
      configFile = initrd.contents."/etc/lczfs-unlockd.toml".source;
      # As the module calls it (its store path is in storePaths).
      initrdEnv = pkgs.callPackage (repo + "/nix/initrd-env.nix") {
        inherit (pkgs.python3Packages) python;
        lczfs-unlockd = cfg.package;
      };
      result =
        {
          inherit failed;
          warnings = config.warnings;
        }
        // lib.optionalAttrs (failed == [ ]) {
          # The drop-in NixOS writes over the package's unit.
          dropin = unit.text;
          unitWantedBy = unit.wantedBy;
          unitRequiredBy = unit.requiredBy;
          sysrootDropin = {
            text = initrd.units."sysroot.mount".text or null;
            overrideStrategy = initrd.units."sysroot.mount".overrideStrategy or null;
          };
          # What the module puts at fixed places in the initrd besides the
          # file, and where from.
          lczfsContents = lib.mapAttrs (_: c: toString c.source) (
            lib.filterAttrs (path: _: lib.hasPrefix "/etc/lczfs-unlockd" path || lib.hasPrefix "/etc/lczfs-test" path) initrd.contents
          );
          tpm2Tss = toString (lib.getLib pkgs.tpm2-tss);
          unitOverrideStrategy = unit.overrideStrategy or "asDropinIfExists";
          packageUnit = "${cfg.package}/${cfg.package.passthru.unit}";
          initrdPackages = map toString initrd.packages;
          # pkgs.formats.toml's generator is a derivation (json2toml at build
          # time); its input is this JSON.
          configJSON = configFile.value;
          configBuilder = configFile.buildCommand;
          configNativeInputs = map (d: d.pname or d.name) configFile.nativeBuildInputs;
          storePaths = map toString initrd.storePaths;
          availableKernelModules = config.boot.initrd.availableKernelModules;
          kernelModules = config.boot.initrd.kernelModules;
          kernelParams = config.boot.kernelParams;
          tokenPlugins = cfg.tokenPlugins;
          settings = cfg.settings;
          importUnit = initrd.units."zfs-import-rpool.service".text or null;
          importRequiredBy = initrd.units."zfs-import-rpool.service".requiredBy or null;
          initrdSystemd = toString initrd.package;
          zfs = toString config.boot.zfs.package;
          zfsVersion = config.boot.zfs.package.version;
          python = pkgs.python3.pythonVersion;
          initrdEnv = {
            path = toString initrdEnv;
            deps = map (d: d.pname or d.name) initrdEnv.passthru.deps;
            inherit (initrdEnv.passthru) excluded;
            sitePackages = initrdEnv.passthru.python.sitePackages;
          };
          package = {
            drvPath = cfg.package.drvPath;
            systemd = toString cfg.package.passthru.systemd;
            zfs = toString cfg.package.passthru.zfs;
            cryptsetup = toString cfg.package.passthru.cryptsetup;
            pyzfs = cfg.package.passthru.pyzfs.name;
            src = toString cfg.package.src;
            postPatch = cfg.package.postPatch;
            tss2BuildPaths = cfg.package.passthru.tss2BuildPaths;
            tpm2Tss = toString (lib.getLib cfg.package.passthru.tpm2-tss);
            postInstall = cfg.package.postInstall;
            pytestFlags = cfg.package.pytestFlagsArray;
            dependencies = map (d: d.pname or d.name) cfg.package.propagatedBuildInputs;
          };
        }
        // lib.optionalAttrs (failed == [ ] && (v.full or false)) {
          initrd = config.system.build.initialRamdisk.drvPath;
          toplevel = config.system.build.toplevel.drvPath;
        };
    in
    {
      inherit sys;
      # Imported but not enabled (a flake's module on every host): only
      # that it evaluates and adds nothing.
      result =
        if !cfg.enable then
          {
            inherit failed;
            toplevel = config.system.build.toplevel.drvPath;
            lczfsInInitrd = initrd.services ? lczfs-unlockd;
            sysrootDropin = initrd.units ? "sysroot.mount";
          }
        else
          result;
    };

  # { _nixPath = "rel"; } -> ./rel and { _mkForce = v; } -> lib.mkForce v,
  # anywhere in a variant's config.
  withPaths =
    v:
    if builtins.isAttrs v then
      (
        if v ? _nixPath then
          ./. + "/${v._nixPath}"
        else if v ? _mkForce then
          lib.mkForce (withPaths v._mkForce)
        else
          builtins.mapAttrs (_: withPaths) v
      )
    else if builtins.isList v then
      map withPaths v
    else
      v;

  parsed = builtins.mapAttrs (_: withPaths) (builtins.fromJSON variants);
  evaluated = lib.mapAttrs evalVariant parsed;
in
{
  results = lib.mapAttrs (_: e: e.result) evaluated;
  # For a real `nix-instantiate` (not --eval), which writes the .drv files
  # of every full variant's toplevel (the initrd is part of it).
  drvs = lib.mapAttrs (_: e: e.sys.config.system.build.toplevel) (
    lib.filterAttrs (name: _: parsed.${name}.full or false) evaluated
  );
}
