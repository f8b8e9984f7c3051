{
  description = "lczfs-unlockd: unlock an encrypted ZFS root from a LUKS keystore on a zvol of the same pool, in the systemd initrd";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The standalone package uses pkgs.zfs and pkgs.systemd; the NixOS
      # module builds its own against boot.zfs.package and the initrd's systemd.
      packagesFor =
        pkgs:
        let
          pyzfs = pkgs.python3Packages.callPackage ./nix/pyzfs.nix { inherit (pkgs) zfs; };
          # Named explicitly: python3Packages.callPackage would fill
          # `systemd` with the Python bindings (python3Packages.systemd).
          lczfs-unlockd = pkgs.python3Packages.callPackage ./nix/package.nix {
            inherit pyzfs;
            inherit (pkgs) zfs cryptsetup systemd;
          };
        in
        {
          inherit pyzfs lczfs-unlockd;
          initrd-env = pkgs.callPackage ./nix/initrd-env.nix {
            inherit (pkgs.python3Packages) python;
            inherit lczfs-unlockd;
          };
          default = lczfs-unlockd;
        };
    in
    {
      packages = forAllSystems packagesFor;

      nixosModules.default = ./nix/module.nix;
      nixosModules.lczfs-unlockd = ./nix/module.nix;

      # Pure helpers (assertions, the unit's ordering); evaluated by tests/nix.
      lib = import ./nix/lib.nix;

      checks = forAllSystems (
        pkgs:
        let
          packages = self.packages.${pkgs.stdenv.hostPlatform.system};
          python = pkgs.python3.withPackages (ps: [
            ps.mypy
            ps.pytest
            ps.hypothesis
          ]);
        in
        {
          # Builds the package, which runs the unit tests (pytestCheckHook).
          package = packages.default;
          initrd-env = packages.initrd-env;

          lint =
            pkgs.runCommand "lczfs-unlockd-lint"
              {
                nativeBuildInputs = [
                  pkgs.ruff
                  python
                ];
                src = packages.default.src;
              }
              ''
                cp -r --no-preserve=mode $src src && cd src
                ruff check .
                ruff format --check .
                mypy
                touch $out
              '';
        }
        // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") {
          vm-unlock = pkgs.testers.runNixOSTest (
            import ./nix/tests/unlock.nix { lczfsModule = self.nixosModules.default; }
          );
        }
      );

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);
    };
}
