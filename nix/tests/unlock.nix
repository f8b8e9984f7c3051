# NixOS VM test, in the style of nixpkgs' nixos/tests/zfs.nix and
# systemd-initrd-luks-password.nix:
#
#   boot 1 (plain system)   provision: pool rpool, zvol rpool/volumes/bootsecrets
#                           with a GPT partition holding LUKS2 + ext4 + a hex key
#                           file, encrypted dataset rpool/crypt whose keylocation
#                           is file:///bootsecrets/rpoolcrypt.key
#   boot 2 (lczfs-dry)      lczfs-unlockd in dry-run mode: asks the passphrase,
#                           changes nothing (pool exported again, key unloaded,
#                           no mapping, nothing masked)
#   boot 3 (lczfs)          lczfs-unlockd for real: the passphrase is answered on
#                           the console, rpool/crypt is mounted in stage 1 as a
#                           neededForBoot file system, the keystore is closed and
#                           its units are masked
#
# Used by flake.nix:
#   pkgs.testers.runNixOSTest (import ./nix/tests/unlock.nix { lczfsModule = ...; })
{ lczfsModule }:
{ lib, pkgs, ... }:
let
  passphrase = "supersecret";
  keystore = {
    enable = true;
    settings = {
      pool = "rpool";
      keystore.volume = "rpool/volumes/bootsecrets";
      keystore.partition = 1;
    };
  };
in
{
  name = "lczfs-unlockd";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [ lczfsModule ];

      virtualisation = {
        emptyDiskImages = [ 1024 ];
        memorySize = 2048;
        useBootLoader = true;
        useEFIBoot = true;
      };
      boot.loader.systemd-boot.enable = true;
      boot.loader.timeout = 0;
      boot.loader.efi.canTouchEfiVariables = true;

      networking.hostId = "deadbeef";
      boot.supportedFilesystems = [ "zfs" ];
      # /dev/disk/by-id is not populated for virtio disks in the test VMs.
      boot.zfs.devNodes = "/dev/disk/by-uuid";
      boot.zfs.forceImportRoot = false;
      boot.initrd.systemd.enable = true;

      environment.systemPackages = [
        pkgs.cryptsetup
        pkgs.parted
        pkgs.e2fsprogs
      ];

      specialisation.lczfs-dry.configuration = {
        boot.initrd.lczfs-unlockd = keystore // {
          dryRun = true;
        };
      };

      specialisation.lczfs.configuration = {
        boot.initrd.lczfs-unlockd = keystore;
        # Needed for boot, so NixOS imports rpool in stage 1
        # (zfs-import-rpool.service, ordered after lczfs-unlockd) and mounts
        # it below /sysroot; that only works if the key is already loaded.
        virtualisation.fileSystems."/secure" = {
          device = "rpool/crypt";
          fsType = "zfs";
          neededForBoot = true;
        };
      };
    };

  testScript = ''
    cryptsetup_unit = "systemd-cryptsetup@lczfs\\x2dkeystore.service"
    mount_unit = "bootsecrets.mount"


    def boot_into(specialisation: str) -> None:
        machine.succeed(
            f"bootctl set-default nixos-generation-1-specialisation-{specialisation}.conf",
            "sync",
        )
        machine.crash()
        machine.start()
        # systemd's console password agent, answering lczfs-unlockd's
        # systemd-ask-password request for the keystore.
        machine.wait_for_console_text("Starting password query on")
        machine.send_console("${passphrase}\n")
        machine.wait_for_unit("multi-user.target")


    def unit_states() -> list[str]:
        out = machine.succeed(f"systemctl is-enabled '{cryptsetup_unit}' '{mount_unit}' 2>&1 || true")
        return out.split()


    def journal(unit: str) -> str:
        return machine.succeed(f"journalctl -b -o cat --no-pager -u {unit}")


    machine.wait_for_unit("multi-user.target")

    with subtest("provision pool, keystore zvol and encrypted dataset"):
        machine.succeed(
            "zpool create -O mountpoint=none rpool /dev/vdb",
            "zfs create -p -V 32M rpool/volumes/bootsecrets",
            "udevadm settle",
            "parted --script /dev/zvol/rpool/volumes/bootsecrets -- mklabel gpt mkpart keystore 1MiB 100%",
            "udevadm settle",
            "test -b /dev/zvol/rpool/volumes/bootsecrets-part1",
            # pbkdf2 with one iteration-millisecond: argon2 under TCG is minutes.
            "echo -n ${passphrase} | cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2"
            + " --iter-time 1 /dev/zvol/rpool/volumes/bootsecrets-part1 -",
            "echo -n ${passphrase} | cryptsetup open /dev/zvol/rpool/volumes/bootsecrets-part1 provision -",
            "mkfs.ext4 -q /dev/mapper/provision",
            "mkdir -p /bootsecrets",
            "mount /dev/mapper/provision /bootsecrets",
            "od -An -tx1 -N32 /dev/urandom | tr -d ' \\n' > /bootsecrets/rpoolcrypt.key",
            "test $(stat -c %s /bootsecrets/rpoolcrypt.key) -eq 64",
            "zfs create -o encryption=aes-256-gcm -o keyformat=hex"
            + " -o keylocation=file:///bootsecrets/rpoolcrypt.key -o mountpoint=legacy rpool/crypt",
            "mkdir -p /secure",
            "mount -t zfs rpool/crypt /secure",
            "echo unlocked-by-lczfs > /secure/marker",
            "umount /secure",
            "umount /bootsecrets",
            "cryptsetup close provision",
            "rmdir /bootsecrets",
            "zpool export rpool",
        )

    with subtest("dry run asks, checks and changes nothing"):
        boot_into("lczfs-dry")
        # Not `log`: the driver's global logger has that name (and its type).
        journal_text = journal("lczfs-unlockd.service")
        print(journal_text)
        assert "dry" in journal_text.lower(), "the journal does not mention the dry run"
        # The pool was not imported before, so the dry run exported it again.
        machine.fail("zpool list rpool")
        machine.fail("cryptsetup status lczfs-keystore")
        machine.fail("test -e /dev/mapper/lczfs-keystore")
        assert not any(s.startswith("masked") for s in unit_states()), unit_states()
        machine.succeed("zpool import -N -d /dev/disk/by-uuid rpool")
        status = machine.succeed("zfs get -Ho value keystatus rpool/crypt").strip()
        assert status == "unavailable", f"dry run left the key {status}"
        machine.succeed("zpool export rpool")

    with subtest("lczfs-unlockd loads the key in stage 1 and cleans up"):
        boot_into("lczfs")
        machine.succeed("zpool list rpool")
        status = machine.succeed("zfs get -Ho value keystatus rpool/crypt").strip()
        assert status == "available", f"key of rpool/crypt is {status}"
        assert machine.succeed("cat /secure/marker").strip() == "unlocked-by-lczfs"

        # The mapping is gone and nothing is (or was left) mounted from it.
        machine.fail("cryptsetup status lczfs-keystore")
        machine.fail("test -e /dev/mapper/lczfs-keystore")
        machine.fail("findmnt /bootsecrets")
        machine.fail("grep -q lczfs-keystore /proc/self/mountinfo")

        # Runtime masks live in /run/systemd/system, and /run is carried
        # from the initrd into stage 2.
        assert unit_states() == ["masked-runtime", "masked-runtime"], unit_states()

        journal_text = journal("lczfs-unlockd.service")
        print(journal_text)
        for word in ("rpool", "rpool/volumes/bootsecrets", "rpool/crypt"):
            assert word in journal_text, f"the journal of lczfs-unlockd does not mention {word}"
        assert "dry" not in journal_text.lower()
        # NixOS's own import ran after us, found the key loaded, and succeeded.
        assert "Successfully imported rpool" in journal("zfs-import-rpool.service")
  '';
}
