"""Configuration: the file, the kernel command line, check-config."""

from __future__ import annotations

import string
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lczfs_unlockd import cli, config
from lczfs_unlockd.config import UnlockMethod, parse_duration
from lczfs_unlockd.errors import ConfigError

EXAMPLE = """
pool = "rpool"
devices = ["/dev/disk/by-id/nvme-EXAMPLE-part2"]
dev_nodes = "/dev/disk/by-id"
force_import = false
online_grace = "10s"
timeout = "5min"
datasets = "auto"
mask = []

[keystore]
volume = "rpool/volumes/bootsecrets"
partition = 1
name = "secretsroot"
mountpoint = "/bootsecrets"
unlock = ["token", "keyfile", "passphrase"]
keyfile = "/etc/lczfs-unlockd/keystore.key"
tries = 3
prompt_timeout = "0"
token_timeout = "30s"
"""

MINIMAL = {"pool": "rpool", "keystore": {"volume": "rpool/volumes/bootsecrets"}}


def test_readme_example_parses(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(EXAMPLE)
    cfg = config.load(str(path))
    assert cfg.pool == "rpool"
    assert cfg.devices == ("/dev/disk/by-id/nvme-EXAMPLE-part2",)
    assert cfg.online_grace == 10.0 and cfg.timeout == 300.0
    assert cfg.datasets is None
    ks = cfg.keystore
    assert ks.device == "/dev/zvol/rpool/volumes/bootsecrets-part1"
    assert ks.mapper_path == "/dev/mapper/secretsroot"
    assert ks.unlock == (UnlockMethod.TOKEN, UnlockMethod.KEYFILE, UnlockMethod.PASSPHRASE)
    assert ks.prompt_timeout == 0.0 and ks.token_timeout == 30.0


def test_defaults():
    cfg = config.parse(MINIMAL)
    assert cfg.dev_nodes == "/dev/disk/by-id"
    assert cfg.keystore.name == "lczfs-keystore"
    assert cfg.keystore.mountpoint == "/bootsecrets"
    assert cfg.keystore.partition == 1
    assert cfg.keystore.tries == 3
    assert not cfg.force_import and not cfg.dry_run and cfg.enabled


def test_whole_zvol_has_no_partition_suffix():
    cfg = config.parse({"pool": "rpool", "keystore": {"volume": "rpool/keystore", "partition": 0}})
    assert cfg.keystore.device == "/dev/zvol/rpool/keystore"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("5min", 300), ("1min 30s", 90), ("500ms", 0.5), ("0", 0), ("2h", 7200),
     (12, 12), (1.5, 1.5), ("infinity", 0), ("3", 3)],
)  # fmt: skip
def test_durations(text, seconds):
    assert parse_duration(text, "k") == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "10 parsecs", "-1s", "s", "1.2.3s", True, [], -3])
def test_bad_durations_name_the_key(bad):
    with pytest.raises(ConfigError, match="^timeout"):
        parse_duration(bad, "timeout")


def keystore(**kw):
    return {"pool": "rpool", "keystore": {"volume": "rpool/volumes/bootsecrets", **kw}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"keystore": {"volume": "rpool/v"}}, "pool is missing"),
        ({"pool": "rpool"}, "[keystore] is missing"),
        ({"pool": "", "keystore": {}}, "pool = ''"),
        ({"pool": "1pool", "keystore": {"volume": "1pool/v"}}, 'pool = "1pool": not a valid pool name'),
        ({"pool": "mirror", "keystore": {"volume": "mirror/v"}}, "not a valid pool name"),
        ({**MINIMAL, "colour": "red"}, "colour: unknown key"),
        (keystore(colour=1), "keystore.colour: unknown key"),
        (keystore(mountpoint="bootsecrets"), 'keystore.mountpoint = "bootsecrets": must be an absolute path'),
        (keystore(mountpoint="/"), "cannot be mounted on /"),
        (keystore(mountpoint="/a/../b"), "keystore.mountpoint"),
        (keystore(tries=-1), "keystore.tries = -1: must be between 0 and 1000"),
        (keystore(tries=True), "keystore.tries = True: expected an integer"),
        (keystore(tries="3"), "keystore.tries = '3': expected an integer"),
        (keystore(partition=200), "keystore.partition = 200"),
        (keystore(unlock=[]), "keystore.unlock"),
        (keystore(unlock=["fingerprint"]), "keystore.unlock: unknown unlock method 'fingerprint'"),
        (keystore(unlock=["token", "token"]), "listed twice"),
        (keystore(keyfile="rel/key"), "keystore.keyfile"),
        (keystore(keyfile="/k", unlock=["passphrase"]), '"keyfile" is not in keystore.unlock'),
        (keystore(keyfile="/bootsecrets/k"), "cannot live inside the keystore"),
        (keystore(name="a/b"), 'keystore.name = "a/b"'),
        (keystore(prompt_timeout="soon"), 'keystore.prompt_timeout = "soon"'),
        ({"pool": "rpool", "keystore": {"volume": "tank/v"}}, 'keystore.volume = "tank/v": the dataset is not in pool "rpool"'),
        ({"pool": "rpool", "keystore": {"volume": "rpool"}}, "name the zvol, not the pool"),
        ({**MINIMAL, "datasets": "all"}, "datasets = 'all'"),
        ({**MINIMAL, "datasets": []}, "datasets = []"),
        ({**MINIMAL, "datasets": ["tank/crypt"]}, 'datasets[0] = "tank/crypt": the dataset is not in pool'),
        ({**MINIMAL, "datasets": ["rpool/a", "rpool/a"]}, "listed twice"),
        ({**MINIMAL, "datasets": ["rpool/volumes/bootsecrets"]}, "is the keystore volume"),
        ({**MINIMAL, "devices": ["sda"]}, 'devices[0] = "sda": must be an absolute path'),
        ({**MINIMAL, "devices": "/dev/sda"}, "devices = '/dev/sda': expected a list of strings"),
        ({**MINIMAL, "dev_nodes": "disk/by-id"}, "dev_nodes"),
        ({**MINIMAL, "force_import": "yes"}, "force_import = 'yes': expected true or false"),
        ({**MINIMAL, "mask": ["bootsecrets"]}, 'mask[0] = "bootsecrets": not a unit name'),
        ({**MINIMAL, "online_grace": "10min", "timeout": "1min"}, "online_grace = 10min is longer than timeout"),
        ({**MINIMAL, "keystore": "rpool/v"}, "keystore = 'rpool/v': expected a table"),
    ],
)  # fmt: skip
def test_config_errors_name_key_and_value(data, message):
    with pytest.raises(ConfigError) as info:
        config.parse(data)
    assert message in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "none.toml"
    with pytest.raises(ConfigError, match=f"{missing} does not exist"):
        config.load(str(missing))
    bad = tmp_path / "bad.toml"
    bad.write_text("pool = \n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid TOML"):
        config.load(str(bad))
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(str(binary))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('pool = "rpool"\n[keystore]\nvolume = "rpool/v"\ntries = -2\n')
    with pytest.raises(ConfigError, match=rf"^{wrong}: keystore.tries = -2"):
        config.load(str(wrong))


# --- property tests: bad input never gives a traceback, always a key name -------

KEYS = [
    "pool",
    "devices",
    "dev_nodes",
    "force_import",
    "online_grace",
    "timeout",
    "datasets",
    "mask",
]
KEYSTORE_KEYS = ["volume", "partition", "name", "mountpoint", "unlock", "keyfile", "tries",
                 "prompt_timeout", "token_timeout"]  # fmt: skip
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
toml_values = st.one_of(
    toml_scalars,
    st.lists(toml_scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), toml_scalars, max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(
    top=st.dictionaries(st.sampled_from([*KEYS, "bogus"]), toml_values, max_size=4),
    ks=st.dictionaries(st.sampled_from([*KEYSTORE_KEYS, "bogus"]), toml_values, max_size=4),
)
def test_generated_bad_values_give_a_message_naming_the_key(top, ks):
    data = {"pool": "rpool", **top, "keystore": {"volume": "rpool/v", **ks}}
    try:
        config.parse(data)
    except ConfigError as exc:
        message = str(exc)
        named = [k for k in [*KEYS, "bogus", "keystore"] if k in message]
        assert named, message
        assert "\n" not in message


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.printable, max_size=200))
def test_generated_toml_text_never_tracebacks(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("c") / "c.toml"
    path.write_text(text)
    try:
        config.load(str(path))
    except ConfigError as exc:
        assert str(path) in str(exc)


@settings(max_examples=200, deadline=None)
@given(
    key=st.sampled_from(KEYS + [f"keystore.{k}" for k in KEYSTORE_KEYS]),
    value=toml_values,
)
def test_generated_single_key_files(tmp_path_factory, key, value):
    """A real TOML file with one generated value: error names exactly that key."""
    data = {"pool": "rpool", "keystore": {"volume": "rpool/volumes/bootsecrets"}}
    if key.startswith("keystore."):
        data["keystore"][key.split(".", 1)[1]] = value
    else:
        data[key] = value
    try:
        cfg = config.parse(data)
    except ConfigError as exc:
        assert key.split(".")[-1] in str(exc) or "online_grace" in str(exc), (key, str(exc))
    else:
        assert cfg.pool  # accepted values build a usable config
    tomllib  # noqa: B018 - the module parses the same types


# --- kernel command line --------------------------------------------------------------


def base():
    return config.parse(MINIMAL)


def test_cmdline_knobs():
    cfg, warnings = config.apply_cmdline(
        base(),
        "BOOT_IMAGE=/vmlinuz root=zfs rd.lczfs.dry_run rd.lczfs.debug=1 rd.lczfs.timeout=30s "
        "rd.lczfs.online_grace=5s rd.lczfs.prompt_timeout=2min rd.lczfs.token_timeout=0 quiet",
    )
    assert warnings == []
    assert cfg.dry_run and cfg.debug and cfg.enabled
    assert cfg.timeout == 30 and cfg.online_grace == 5
    assert cfg.keystore.prompt_timeout == 120 and cfg.keystore.token_timeout == 0


def test_cmdline_disable():
    cfg, _ = config.apply_cmdline(base(), "rd.lczfs=0")
    assert not cfg.enabled


def test_cmdline_cannot_change_paths_or_keys():
    cfg, warnings = config.apply_cmdline(
        base(), "rd.lczfs.mountpoint=/tmp rd.lczfs.keyfile=/evil rd.lczfs.pool=tank"
    )
    assert cfg == base()
    assert len(warnings) == 3
    assert all("not allowed on the kernel command line" in w for w in warnings)


def test_cmdline_bad_values_warn_and_keep_config():
    cfg, warnings = config.apply_cmdline(
        base(), "rd.lczfs.timeout=soon rd.lczfs.dry_run=maybe rd.lczfs=x"
    )
    assert cfg == base()
    assert any('rd.lczfs.timeout = "soon": not a duration' in w for w in warnings)
    assert any("rd.lczfs.dry_run=maybe: ignored" in w for w in warnings)
    assert any("rd.lczfs=x: ignored" in w for w in warnings)


def test_cmdline_quotes():
    assert config.split_cmdline('a "b c" d="e f" g') == ["a", "b c", "d=e f", "g"]


# --- check-config ------------------------------------------------------------------------


def test_check_config_ok(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(EXAMPLE)
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: ok" in out
    assert "keystore /dev/zvol/rpool/volumes/bootsecrets-part1 -> /dev/mapper/secretsroot" in out


def test_check_config_bad(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(EXAMPLE.replace("tries = 3", "tries = -1"))
    assert cli.main(["check-config", str(path)]) == cli.EXIT_NOTCONFIGURED
    assert "keystore.tries = -1: must be between 0 and 1000" in capsys.readouterr().err
