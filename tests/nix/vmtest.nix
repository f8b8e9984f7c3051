# nix/tests/unlock.nix as flake.nix's checks.vm-unlock builds it
# (pkgs.testers.runNixOSTest), evaluated and instantiated against a real
# nixpkgs tree; tests/nix/test_rehearsal.py type-checks and lints the script
# the driver derivation would check.
{
  nixpkgs,
  repo ? ../..,
}:
let
  pkgs = import nixpkgs {
    system = "x86_64-linux";
    # See system.nix: the tree lacks hackage-packages.nix.
    overlays = [
      (final: prev: {
        shellcheck-minimal = (prev.writeText "shellcheck-stub" "") // {
          compiler.meta.platforms = [ ];
        };
      })
    ];
  };
  test = pkgs.testers.runNixOSTest (
    import (repo + "/nix/tests/unlock.nix") { lczfsModule = repo + "/nix/module.nix"; }
  );
in
{
  driver = test.driver.drvPath;
  run = test.drvPath;
  # What the driver's build type-checks (nixos/lib/testing/driver.nix).
  testScript = test.driver.testScript;
  nodes = builtins.attrNames test.nodes;
  skipTypeCheck = test.config.skipTypeCheck;
  skipLint = test.config.skipLint;
}
