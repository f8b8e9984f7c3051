"""Configuration: the file, the kernel command line, check-config."""

from __future__ import annotations

import math
import os
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
     (12, 12), (1.5, 1.5), ("infinity", math.inf), (" infinity ", math.inf),
     (math.inf, math.inf), ("3", 3)],
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
        ({"pool": "mirror", "keystore": {"volume": "mirror/v"}}, "not a valid pool name: the name is reserved"),
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
    "pool_guid",
    "max_pbkdf2iters",
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


# --- infinity: no limit, whatever the key --------------------------------------------


@pytest.mark.parametrize(
    ("key", "read"),
    [
        ("online_grace", lambda c: c.online_grace),
        ("timeout", lambda c: c.timeout),
        ("keystore.prompt_timeout", lambda c: c.keystore.prompt_timeout),
        ("keystore.token_timeout", lambda c: c.keystore.token_timeout),
    ],
)
@pytest.mark.parametrize("spelling", ['"infinity"', "inf", '" infinity"'])
def test_infinity_is_no_limit_for_every_duration(tmp_path, key, read, spelling):
    """It used to parse to 0: online_grace accepted DEGRADED at once, a token was not waited for."""
    path = tmp_path / "c.toml"
    name = key.split(".")[-1]
    top = f"{name} = {spelling}\n" if "." not in key else ""
    ks = f"{name} = {spelling}\n" if "." in key else ""
    path.write_text(f'pool = "rpool"\n{top}[keystore]\nvolume = "rpool/volumes/bootsecrets"\n{ks}')
    assert read(config.load(str(path))) == math.inf


def test_infinite_grace_is_a_choice_a_longer_finite_one_a_mistake():
    cfg = config.parse({**MINIMAL, "online_grace": "infinity", "timeout": "5min"})
    assert cfg.online_grace == math.inf and cfg.timeout == 300
    assert "degraded never accepted" in config.summary(cfg)[0]
    with pytest.raises(
        ConfigError, match='online_grace = 10min is longer than timeout = 5min.*"infinity"'
    ):
        config.parse({**MINIMAL, "online_grace": "10min", "timeout": "5min"})
    # No deadline (0 or infinity): any grace is fine.
    for timeout in ("0", "infinity"):
        assert (
            config.parse({**MINIMAL, "online_grace": "1h", "timeout": timeout}).online_grace == 3600
        )


def test_format_duration_round_trips_and_says_infinity():
    assert config.format_duration(math.inf) == "infinity"
    assert config.format_duration(0) == "0s"  # not "no limit": online_grace = 0 means at once
    assert config.format_duration(300) == "5min"
    assert config.format_duration(1.5) == "1.5s"


@given(st.one_of(st.just(math.inf), st.floats(min_value=0, max_value=10 * 365 * 86400)))
def test_format_then_parse_gives_the_same_duration(seconds):
    assert parse_duration(config.format_duration(seconds), "k") == pytest.approx(
        seconds, rel=1e-9, abs=1e-6
    )


def test_cmdline_infinity():
    cfg, warnings = config.apply_cmdline(
        base(),
        "rd.lczfs.online_grace=infinity rd.lczfs.token_timeout=infinity rd.lczfs.timeout=infinity",
    )
    assert warnings == []
    assert cfg.online_grace == cfg.timeout == cfg.keystore.token_timeout == math.inf
    # An infinite grace with a finite deadline is no warning either: it means "ONLINE only".
    cfg, warnings = config.apply_cmdline(base(), "rd.lczfs.online_grace=infinity")
    assert warnings == [] and cfg.timeout == 300
    _, warnings = config.apply_cmdline(base(), "rd.lczfs.online_grace=10min")
    assert warnings and "longer than timeout" in warnings[0]


def test_summary_says_what_zero_and_infinity_mean():
    cfg = config.parse(
        {"pool": "rpool", "online_grace": 0, "timeout": 0,
         "keystore": {"volume": "rpool/v", "prompt_timeout": "infinity", "token_timeout": 0}}
    )  # fmt: skip
    pool_line, ks_line, *_ = config.summary(cfg)
    assert "degraded accepted at once" in pool_line and "deadline no limit" in pool_line
    assert "prompt time limit no limit" in ks_line and "token wait none" in ks_line
    cfg = config.parse(
        {
            **MINIMAL,
            "timeout": "infinity",
            "keystore": {"volume": "rpool/v", "token_timeout": "infinity"},
        }
    )
    pool_line, ks_line, *_ = config.summary(cfg)
    assert "deadline no limit" in pool_line and "token wait no limit" in ks_line
    assert "inf" not in " ".join(config.summary(cfg)).replace("infinity", "")


# --- pool names: OpenZFS's zpool_name_valid(isopen=B_FALSE) ---------------------------

# From pool_namecheck() (module/zcommon/zfs_namecheck.c) and zpool_name_valid()
# (lib/libzfs/libzfs_pool.c): a letter first; [A-Za-z0-9_.: -]; fewer than 240
# bytes; exact "mirror"/"raidz"/"draid"; with isopen = B_FALSE (create,
# import) also every name beginning with "mirror", "raidz", "draid", "spare"
# (strncmp) and exactly "log".
VALID_POOL_NAMES = [
    "rpool", "tank", "logs", "log1", "LOG", "Log", "cachepool", "cache", "dedup", "dedup1",
    "special", "specialpool", "sparse", "spar", "mirro", "raid", "draidz"[:4], "Mirror",
    "RAIDZ", "c0t0d0", "c1", "my pool", "a", "A.b:c-d_e", "a" * 239, "z9",
]  # fmt: skip
INVALID_POOL_NAMES = [
    ("mirror", "reserved"), ("mirrored", "reserved"), ("mirror-0", "reserved"),
    ("raidz", "reserved"), ("raidz2pool", "reserved"), ("raidz1", "reserved"),
    ("draid", "reserved"), ("draidpool", "reserved"), ("spare", "reserved"),
    ("spares", "reserved"), ("sparepool", "reserved"), ("log", "reserved"),
    ("1pool", "begin with a letter"), ("_x", "begin with a letter"), ("-x", "begin with a letter"),
    (" a", "begin with a letter"), (".a", "begin with a letter"),
    ("a/b", 'invalid character "/"'), ("a@b", 'invalid character "@"'),
    ("a#b", 'invalid character "#"'), ("a%b", 'invalid character "%"'),
    ("pool\u00e9", 'invalid character "\u00e9"'), ("a\nb", 'invalid character "\\n"'),
    ("a" * 240, "too long"),
]  # fmt: skip


@pytest.mark.parametrize("name", VALID_POOL_NAMES)
def test_valid_pool_names_are_accepted(name):
    cfg = config.parse({"pool": name, "keystore": {"volume": f"{name}/v"}})
    assert cfg.pool == name
    assert config.pool_name_problem(name) is None


@pytest.mark.parametrize(("name", "why"), INVALID_POOL_NAMES)
def test_invalid_pool_names_say_why(name, why):
    with pytest.raises(ConfigError) as info:
        config.parse({"pool": name, "keystore": {"volume": "rpool/v"}})
    message = str(info.value)
    assert message.startswith("pool = ") and "not a valid pool name" in message
    assert why in message
    assert "\n" not in message


@given(st.text(max_size=12))
def test_pool_names_follow_upstream_rules(name):
    """An independent transcription of upstream's C, character by character."""

    def valid_char(c):
        return c.isascii() and (c.isalnum() or c in "-_.: ")

    upstream_ok = (
        len(name.encode()) < 256 - 2 - 2 * len("$ORIGIN")
        and all(valid_char(c) for c in name)
        and name[:1].isascii() and name[:1].isalpha()
        and name not in ("mirror", "raidz", "draid")
        and not any(name.startswith(p) for p in ("mirror", "raidz", "draid", "spare"))
        and name != "log"
    )  # fmt: skip
    assert (config.pool_name_problem(name) is None) == upstream_ok


# --- unknown keys come first, with the key that was meant ---------------------------


def test_misspelt_required_key_is_named_before_it_is_missing(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('poool = "rpool"\n[keystore]\nvolume = "rpool/volumes/bootsecrets"\n')
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: poool: unknown key (did you mean pool?)")
    assert "is missing" not in message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pool": "rpool", "keystore": {"volumne": "rpool/v"}},
         "keystore.volumne: unknown key (did you mean keystore.volume?)"),
        ({"pool": "rpool", "timeuot": "5s", "keystore": {"volume": "rpool/v"}},
         "timeuot: unknown key (did you mean timeout?)"),
        ({"pool": "rpool", "volume": "rpool/v", "keystore": {"volume": "rpool/v"}},
         "volume: unknown key (did you mean keystore.volume, under [keystore]?)"),
        # TOML: a key written after [keystore] belongs to the keystore table.
        ({"keystore": {"volume": "rpool/v", "pool": "rpool"}},
         "keystore.pool: unknown key (pool belongs at the top of the file, before [keystore]"),
        ({**MINIMAL, "a\nb": 1}, 'unknown key; see'),
        ({**MINIMAL, "zz": 1, "poool": 2}, "poool: unknown key (did you mean pool?); zz: unknown key;"),
    ],
)  # fmt: skip
def test_unknown_keys_suggest_the_closest_valid_key(data, message):
    with pytest.raises(ConfigError) as info:
        config.parse(data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# --- keystore.volume is a dataset, not a device ---------------------------------------


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        ("/dev/zvol/rpool/volumes/bootsecrets",
         'keystore.volume = "/dev/zvol/rpool/volumes/bootsecrets": give the dataset name, not the '
         'device: keystore.volume = "rpool/volumes/bootsecrets"'),
        ("/dev/zvol/rpool/volumes/bootsecrets-part1",
         'keystore.volume = "rpool/volumes/bootsecrets" and keystore.partition = 1'),
        ("/dev/sda2", "give the dataset name of the zvol, e.g. rpool/volumes/bootsecrets"),
    ],
)  # fmt: skip
def test_keystore_volume_given_as_a_device(volume, message):
    with pytest.raises(ConfigError) as info:
        config.parse(keystore(volume=volume))
    assert message in str(info.value)


# --- a mount point must be its own realpath -------------------------------------------


@pytest.fixture
def var_run(tmp_path):
    """tmp/run and tmp/var/run -> ../run, as dracut lays them out."""
    root = os.path.realpath(tmp_path)
    os.mkdir(f"{root}/run")
    os.mkdir(f"{root}/var")
    os.symlink("../run", f"{root}/var/run")
    return root


def test_mountpoint_under_a_symlinked_parent_is_refused_at_load(var_run, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        f'pool = "rpool"\n[keystore]\nvolume = "rpool/volumes/bootsecrets"\n'
        f'mountpoint = "{var_run}/var/run/bootsecrets"\n'
    )
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    message = str(info.value)
    assert f'keystore.mountpoint = "{var_run}/var/run/bootsecrets"' in message
    assert f'is really "{var_run}/run/bootsecrets"; use {var_run}/run/bootsecrets' in message
    # The resolved path itself is fine.
    cfg = config.parse(keystore(mountpoint=f"{var_run}/run/bootsecrets"))
    assert cfg.keystore.mountpoint == f"{var_run}/run/bootsecrets"


def test_check_real_path_helper_for_the_run_time_check(var_run):
    config.check_real_path(f"{var_run}/run/bootsecrets", "keystore.mountpoint")  # absent: fine
    config.check_real_path(f"{var_run}/run", "keystore.mountpoint")
    with pytest.raises(ConfigError, match=r"^keystore.mountpoint = .*/var/run/bootsecrets"):
        config.check_real_path(f"{var_run}/var/run/bootsecrets", "keystore.mountpoint")
    # The leaf itself a symlink (to a directory someone else controls):
    os.mkdir(f"{var_run}/elsewhere")
    os.symlink(f"{var_run}/elsewhere", f"{var_run}/run/bootsecrets")
    with pytest.raises(ConfigError, match=f"use {var_run}/elsewhere$"):
        config.check_real_path(f"{var_run}/run/bootsecrets", "keystore.mountpoint")


# --- pool_guid and max_pbkdf2iters ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "guid"),
    [("pool_guid = 1234567890123456789", 1234567890123456789),
     ('pool_guid = "17868331473627374523"', 17868331473627374523),
     ('pool_guid = "18446744073709551615"', 2**64 - 1),
     ("pool_guid = 9223372036854775807", 2**63 - 1)],
)  # fmt: skip
def test_pool_guid_as_integer_or_decimal_string(tmp_path, text, guid):
    path = tmp_path / "c.toml"
    path.write_text(f'pool = "rpool"\n{text}\n[keystore]\nvolume = "rpool/v"\n')
    cfg = config.load(str(path))
    assert cfg.pool_guid == guid
    assert f"pool rpool (GUID {guid})" in config.summary(cfg)[0]


def test_pool_guid_default_is_none():
    assert config.parse(MINIMAL).pool_guid is None


@pytest.mark.parametrize(
    ("value", "message"),
    [(0, "pool_guid = 0: a pool GUID is between 1 and 18446744073709551615"),
     (-5, "pool_guid = -5"), (2**64, "pool_guid = 18446744073709551616"),
     ("0x1234", "expected the pool's GUID"), ("12 34", "expected the pool's GUID"),
     ("", "expected the pool's GUID"), (True, "expected the pool's GUID"),
     (1.5, "expected the pool's GUID"), ("\u0661\u0662", "expected the pool's GUID")],
)  # fmt: skip
def test_bad_pool_guid(value, message):
    with pytest.raises(ConfigError) as info:
        config.parse({**MINIMAL, "pool_guid": value})
    assert str(info.value).startswith("pool_guid")
    assert message in str(info.value)


def test_max_pbkdf2iters():
    assert config.parse(MINIMAL).max_pbkdf2iters == 100_000_000
    cfg = config.parse({**MINIMAL, "max_pbkdf2iters": 2_000_000})
    assert cfg.max_pbkdf2iters == 2_000_000
    assert "pbkdf2iters up to 2,000,000" in config.summary(cfg)[2]
    for bad, message in [
        (99_999, "max_pbkdf2iters = 99999: must be between 100000 and 2147483647"),
        (2**31, "max_pbkdf2iters = 2147483648: must be between"),
        ("1e8", "max_pbkdf2iters = '1e8': expected an integer"),
    ]:
        with pytest.raises(ConfigError, match=f"^{message}"):
            config.parse({**MINIMAL, "max_pbkdf2iters": bad})


# --- measurement and the root check ----------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [(15, 15), (0, 0), (23, 23), (False, False), (True, 15)]
)
def test_measure_pcr(value: object, expected: object) -> None:
    cfg = config.parse({**MINIMAL, "keystore": {"volume": "rpool/v", "measure_pcr": value}})
    assert cfg.keystore.measure_pcr == expected


@pytest.mark.parametrize("value", [24, -1, "15", 1.5])
def test_bad_measure_pcr_names_the_key(value: object) -> None:
    with pytest.raises(
        ConfigError, match=r"keystore\.measure_pcr = .*: expected a PCR number 0-23"
    ):
        config.parse({**MINIMAL, "keystore": {"volume": "rpool/v", "measure_pcr": value}})


def test_measure_pcr_defaults_to_auto() -> None:
    assert config.parse(MINIMAL).keystore.measure_pcr is None


def test_tpm2_policy_files_must_be_absolute_and_need_the_token_method() -> None:
    ks = {"volume": "rpool/v", "tpm2_signature": "/etc/s.json", "tpm2_pcrlock": "/etc/p.json"}
    cfg = config.parse({**MINIMAL, "keystore": ks})
    assert (cfg.keystore.tpm2_signature, cfg.keystore.tpm2_pcrlock) == (
        "/etc/s.json",
        "/etc/p.json",
    )
    with pytest.raises(ConfigError, match="keystore.tpm2_signature = .*absolute"):
        config.parse({**MINIMAL, "keystore": {**ks, "tpm2_signature": "s.json"}})
    with pytest.raises(ConfigError, match='"token" is not in keystore.unlock'):
        config.parse({**MINIMAL, "keystore": {**ks, "unlock": ["passphrase"]}})


def test_root_check_keys() -> None:
    cfg = config.parse(
        {**MINIMAL, "root_dataset": "rpool/ROOT/a", "verify_datasets": ["rpool/home"],
         "trusted_roots": ["rpool/ROOT"]}
    )  # fmt: skip
    assert cfg.root_dataset == "rpool/ROOT/a"
    assert cfg.verify_datasets == ("rpool/home",)
    assert cfg.trusted_roots == ("rpool/ROOT",)
    assert "root check before READY=1: root_dataset rpool/ROOT/a and rpool/home" in " ".join(
        config.summary(cfg)
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"root_dataset": "tank/root"}, 'root_dataset = "tank/root": the dataset is not in pool'),
        ({"verify_datasets": ["rpool/a", "x/b"]}, r"verify_datasets\[1\]"),
        ({"trusted_roots": []}, "trusted_roots = \\[\\]: no dataset could pass"),
        ({"trusted_roots": "rpool/a"}, "expected a list of strings"),
        ({"root_dataset": "rpool/volumes/bootsecrets"}, "is the keystore volume"),
    ],
)
def test_bad_root_check_keys_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.parse({**MINIMAL, **data})
