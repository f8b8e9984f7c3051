"""The NixOS configurations tests/nix evaluates (see system.nix for the host around them)."""

from __future__ import annotations

from typing import Any

KEYFILE = "/etc/lczfs-unlockd/keystore.key"
# Files of the build (Nix paths, see system.nix), and a path a test puts
# into the initrd itself.
SIGNATURE = {"_nixPath": "fixtures/tpm2-pcr-signature.json"}
PCRLOCK = {"_nixPath": "fixtures/pcrlock.json"}
OWN_PCRLOCK = "/etc/lczfs-test/pcrlock.json"


def lczfs(**settings: Any) -> dict[str, Any]:
    """A configuration in the new form: settings with pool and keystore volume."""
    extra = settings.pop("_module", {})
    keystore = {"volume": "rpool/volumes/bootsecrets", **settings.pop("keystore", {})}
    return {
        "boot": {
            "initrd": {
                "lczfs-unlockd": {
                    "enable": True,
                    "settings": {"pool": "rpool", "keystore": keystore, **settings},
                    **extra,
                }
            }
        }
    }


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


WORKING: dict[str, dict[str, Any]] = {
    "default": {"full": True, "config": lczfs()},
    # Imported on a host that does not use it: evaluates, adds nothing.
    "disabled": {"config": {}},
    "flake": {"full": True, "via": "flake", "config": lczfs()},
    # The option names before `settings`: still accepted, with a warning each.
    "legacy": {
        "config": {
            "boot": {
                "initrd": {
                    "lczfs-unlockd": {
                        "enable": True,
                        "pool": "rpool",
                        "devNodes": "/dev/disk/by-partuuid",
                        "onlineGrace": "15s",
                        "forceImport": True,
                        "keystore": {
                            "volume": "rpool/volumes/bootsecrets",
                            "promptTimeout": "2min",
                            "tokenTimeout": 20,
                            "tokenPlugins": ["fido2"],
                        },
                        "settings": {"keystore": {"tries": 5}},
                    }
                }
            }
        }
    },
    "tokens": {
        "full": True,
        "config": lczfs(
            keystore={"unlock": ["token", "passphrase"]},
            _module={"tokenPlugins": ["tpm2", "fido2", "pkcs11"]},
        ),
    },
    "passphrase-only": {"config": lczfs(keystore={"unlock": ["passphrase"]})},
    "keyfile": {
        "full": True,
        "config": merge(
            lczfs(keystore={"unlock": ["keyfile"], "keyfile": KEYFILE}),
            {"boot": {"initrd": {"secrets": {KEYFILE: "/etc/secrets/keystore.key"}}}},
        ),
    },
    "datasets": {
        "config": lczfs(
            datasets=["rpool/crypt", "rpool/crypt/local"],
            devices=["/dev/disk/by-id/nvme-A-part2", "/dev/disk/by-id/nvme-B-part2"],
            mask=["systemd-cryptsetup@secretsroot.service"],
        )
    },
    "dry-run": {
        "full": True,
        "config": lczfs(_module={"dryRun": True, "debug": True}),
    },
    # Keys the module does not declare (new daemon keys) pass through.
    "freeform": {
        "config": lczfs(
            pool_guid="1234567890123456789",
            max_pbkdf2iters=1000000,
            keystore={"some_future_key": True},
        )
    },
    # NixOS >= 24.11 has boot.initrd.systemd.tpm2.enable; it wins over the
    # old enableTpm2 (still true here) when it exists.
    "tpm2-new-off": {"newTpm2": False, "config": lczfs()},
    "tpm2-new-on": {"newTpm2": True, "config": lczfs()},
    "tpm2-old-off": {
        "config": merge(lczfs(), {"boot": {"initrd": {"systemd": {"enableTpm2": False}}}})
    },
    # The root check and the measured unlock, every key given.
    "root-check": {
        "full": True,
        "config": merge(
            lczfs(
                verify_datasets=["rpool/safe/persist"],
                trusted_roots=["rpool/crypt", "rpool/safe"],
                keystore={
                    "measure_pcr": 15,
                    "tpm2_signature": SIGNATURE,
                    "tpm2_pcrlock": OWN_PCRLOCK,
                },
            ),
            {"boot": {"initrd": {"systemd": {"contents": {OWN_PCRLOCK: {"source": PCRLOCK}}}}}},
        ),
    },
    "measure-off": {
        "config": lczfs(
            keystore={"measure_pcr": False, "tpm2_signature": "/.extra/tpm2-pcr-signature.json"}
        )
    },
    "pcrlock-copied": {"config": lczfs(keystore={"tpm2_pcrlock": PCRLOCK})},
    # Impermanence: / on tmpfs, the pool's datasets needed for boot
    # (/nix by NixOS's list, /persist by neededForBoot) checked instead;
    # /home is mounted in stage 2 and not checked.
    "root-tmpfs": {
        "config": merge(
            lczfs(),
            {
                "fileSystems": {
                    "/": {"_mkForce": {"device": "none", "fsType": "tmpfs"}},
                    "/persist": {
                        "device": "rpool/safe/persist",
                        "fsType": "zfs",
                        "neededForBoot": True,
                    },
                    "/home": {"device": "rpool/safe/home", "fsType": "zfs"},
                }
            },
        )
    },
    # / on another pool: not this pool's to check.
    "root-other-pool": {
        "config": merge(
            lczfs(),
            {"fileSystems": {"/": {"_mkForce": {"device": "tank/root", "fsType": "zfs"}}}},
        )
    },
    "root-check-off": {"config": lczfs(root_dataset=None, verify_datasets=[])},
}

# Configurations that cannot work, and a piece of the assertion message.
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "scripted-initrd": (
        merge(lczfs(), {"boot": {"initrd": {"systemd": {"enable": False}}}}),
        "boot.initrd.systemd.enable = true",
    ),
    "not-a-pool": (lczfs(pool="rpool/crypt"), "is not a pool name"),
    "volume-outside": (
        lczfs(keystore={"volume": "tank/bootsecrets"}),
        'settings.keystore.volume = "tank/bootsecrets" must be a zvol inside the pool',
    ),
    "mountpoint-relative": (
        lczfs(keystore={"mountpoint": "bootsecrets"}),
        "cannot work as the\ndirectory of a ZFS keylocation",
    ),
    "mountpoint-sysroot": (
        lczfs(keystore={"mountpoint": "/sysroot/bootsecrets"}),
        "is inside /sysroot",
    ),
    "datasets-outside": (
        lczfs(datasets=["rpool/crypt", "tank/crypt"]),
        '"tank/crypt", which is not a dataset',
    ),
    "datasets-empty": (lczfs(datasets=[]), "datasets is an empty list"),
    "unlock-empty": (lczfs(keystore={"unlock": []}), "keystore.unlock is empty"),
    "keyfile-unset": (
        lczfs(keystore={"unlock": ["keyfile"]}),
        "keystore.keyfile is not\nset",
    ),
    "keyfile-not-in-initrd": (
        lczfs(keystore={"keyfile": KEYFILE}),
        f'boot.initrd.secrets."{KEYFILE}" = /path/on/the/build/host',
    ),
    "keyfile-in-keystore": (
        merge(
            lczfs(keystore={"keyfile": "/bootsecrets/k"}),
            {"boot": {"initrd": {"secrets": {"/bootsecrets/k": "/etc/k"}}}},
        ),
        "which is empty until the keystore is open",
    ),
    "root-outside-pool": (
        lczfs(root_dataset="tank/root"),
        'settings.root_dataset = "tank/root" is not a dataset of the pool',
    ),
    "verify-outside-pool": (
        lczfs(verify_datasets=["rpool/crypt/a", "tank/data"]),
        'settings.verify_datasets contains "tank/data", which is not a dataset',
    ),
    "trusted-roots-outside-pool": (
        lczfs(trusted_roots=["tank/crypt"]),
        'settings.trusted_roots contains "tank/crypt", which is not a dataset',
    ),
    "trusted-roots-empty": (lczfs(trusted_roots=[]), "trusted_roots is an empty list"),
    "measure-without-tpm2": (
        merge(
            lczfs(keystore={"measure_pcr": 7}),
            {"boot": {"initrd": {"systemd": {"enableTpm2": False}}}},
        ),
        "keystore.measure_pcr = 7 but boot.initrd.systemd.enableTpm2\nis false",
    ),
    "signature-not-in-initrd": (
        lczfs(keystore={"tpm2_signature": "/etc/sig.json"}),
        'keystore.tpm2_signature = "/etc/sig.json" is not put into the initrd',
    ),
    "signature-without-token": (
        lczfs(keystore={"unlock": ["passphrase"], "tpm2_signature": SIGNATURE}),
        'keystore.tpm2_signature is set but "token" is not in keystore.unlock',
    ),
    "tpm2-plugin-without-tpm2": (
        merge(
            lczfs(_module={"tokenPlugins": ["tpm2"]}),
            {"boot": {"initrd": {"systemd": {"enableTpm2": False}}}},
        ),
        'contains "tpm2" but boot.initrd.systemd.enableTpm2\nis false',
    ),
}
