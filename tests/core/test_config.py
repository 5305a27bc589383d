"""Settings: resolution order, validation, and the API key never showing itself."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from carbonoffset.core.config import CONFIG_KEYS, OffsetConfig, SecretKey, default_ledger_path
from carbonoffset.core.errors import ConfigurationError

KEY = "test_cfg_SECRET_b7e21a"


def write_config(folder: Path, **values: object) -> Path:
    lines = ["[codecarbon]"] + [f"{key} = {value}" for key, value in values.items()]
    path = folder / ".codecarbon.config"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_defaults() -> None:
    config = OffsetConfig.resolve()
    assert config.offset_api_key is None
    assert config.offset_environment == "production"
    assert config.offset_threshold == 0.5
    assert config.auto_offset is True
    assert config.offset_round_up is False
    assert config.can_offset is False
    assert config.account == "production:no-key"
    # default ledger under the user data dir (XDG_DATA_HOME is isolated by conftest)
    assert config.ledger_path == default_ledger_path()
    assert Path(os.environ["XDG_DATA_HOME"]) in config.ledger_path.parents
    assert config.ledger_path.name == "ledger.sqlite3"


def test_resolution_order_explicit_env_cwd_home(monkeypatch: pytest.MonkeyPatch) -> None:
    home, cwd = Path.home(), Path.cwd()
    assert home != cwd
    write_config(
        home,
        offset_api_key="test_from_home",
        offset_environment="sandbox",
        offset_threshold=4.0,
        auto_offset="false",
        offset_timeout=44,
    )
    config = OffsetConfig.resolve()
    assert config.offset_api_key == SecretKey("test_from_home")
    assert (config.offset_environment, config.offset_threshold, config.auto_offset) == ("sandbox", 4.0, False)
    assert config.offset_timeout == 44.0

    write_config(cwd, offset_api_key="test_from_cwd", offset_threshold=3.0, auto_offset="true")
    config = OffsetConfig.resolve()
    assert config.offset_api_key == SecretKey("test_from_cwd")
    assert config.offset_threshold == 3.0
    assert config.auto_offset is True
    assert config.offset_environment == "sandbox"  # still from ~/.codecarbon.config
    assert config.offset_timeout == 44.0

    monkeypatch.setenv("CODECARBON_OFFSET_API_KEY", "test_from_env")
    monkeypatch.setenv("CODECARBON_OFFSET_THRESHOLD", "2.0")
    config = OffsetConfig.resolve()
    assert config.offset_api_key == SecretKey("test_from_env")
    assert config.offset_threshold == 2.0
    assert config.auto_offset is True  # from ./.codecarbon.config

    config = OffsetConfig.resolve(offset_api_key="test_explicit", offset_threshold=1.0, auto_offset=False)
    assert config.offset_api_key == SecretKey("test_explicit")
    assert config.offset_threshold == 1.0
    assert config.auto_offset is False
    # None means "not given": falls through to the environment
    assert OffsetConfig.resolve(offset_threshold=None).offset_threshold == 2.0


def test_ledger_location_from_setting_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CODECARBON_OFFSET_LEDGER", str(tmp_path / "from_env.sqlite3"))
    assert OffsetConfig.resolve().ledger_path == tmp_path / "from_env.sqlite3"
    explicit = OffsetConfig.resolve(offset_ledger=tmp_path / "explicit.sqlite3")
    assert explicit.ledger_path == tmp_path / "explicit.sqlite3"
    assert OffsetConfig(offset_ledger="~/x.sqlite3").ledger_path == Path.home() / "x.sqlite3"  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0.0, 0.1, 0.45359237, 0.49999, -1.0])
def test_threshold_below_minimum_names_the_minimum(value: float) -> None:
    with pytest.raises(ValueError, match=r"offset_threshold.*0\.5"):
        OffsetConfig(offset_threshold=value)


def test_threshold_from_env_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODECARBON_OFFSET_THRESHOLD", "0.4")
    with pytest.raises(ValueError, match=r"at least 0\.5"):
        OffsetConfig.resolve()
    monkeypatch.setenv("CODECARBON_OFFSET_THRESHOLD", "half a kilo")
    with pytest.raises(ValueError, match="offset_threshold must be a number"):
        OffsetConfig.resolve()
    monkeypatch.setenv("CODECARBON_OFFSET_THRESHOLD", "nan")
    with pytest.raises(ValueError, match="offset_threshold"):
        OffsetConfig.resolve()


def test_threshold_at_minimum_and_above_is_accepted() -> None:
    assert OffsetConfig(offset_threshold=0.5).offset_threshold == 0.5
    assert OffsetConfig(offset_threshold="2.5").offset_threshold == 2.5  # type: ignore[arg-type]


@pytest.mark.parametrize("env", ["SANDBOX", "Production", "staging", "prod", "", "test"])
def test_unknown_environment_lists_the_valid_ones(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="offset_environment") as info:
        OffsetConfig(offset_environment=env)  # type: ignore[arg-type]
    assert "production" in str(info.value) and "sandbox" in str(info.value)
    if env:
        monkeypatch.setenv("CODECARBON_OFFSET_ENVIRONMENT", env)
        with pytest.raises(ValueError, match="'production' or 'sandbox'"):
            OffsetConfig.resolve()


def test_valid_environments() -> None:
    assert OffsetConfig(offset_environment="sandbox").offset_environment == "sandbox"
    assert OffsetConfig(offset_environment="production").offset_environment == "production"


@pytest.mark.parametrize(
    ("text", "expected"), [("true", True), ("False", False), ("1", True), ("off", False)]
)
def test_bool_parsing(text: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODECARBON_AUTO_OFFSET", text)
    assert OffsetConfig.resolve().auto_offset is expected


@pytest.mark.parametrize("text", ["maybe", "2", "tru"])
def test_bad_bool_is_an_error(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODECARBON_AUTO_OFFSET", text)
    with pytest.raises(ValueError, match="auto_offset must be true or false"):
        OffsetConfig.resolve()
    with pytest.raises(ValueError, match="offset_round_up must be true or false"):
        OffsetConfig(offset_round_up=text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"offset_timeout": 0}, "offset_timeout must be > 0"),
        ({"offset_request_timeout": -1}, "offset_request_timeout must be > 0"),
        ({"offset_api_url": "127.0.0.1:9"}, "offset_api_url must start with http"),
        ({"country_iso_code": "France"}, "country_iso_code must be an ISO 3166-1 alpha-3"),
    ],
)
def test_other_invalid_values(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OffsetConfig(**changes)  # type: ignore[arg-type]


def test_unknown_setting_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown setting") as info:
        OffsetConfig.resolve(offset_treshold=1.0)
    assert "offset_threshold" in str(info.value)  # lists the valid names


def test_country_code_is_normalised_and_url_trailing_slash_dropped() -> None:
    config = OffsetConfig(country_iso_code="fra", offset_api_url="http://127.0.0.1:9/")
    assert config.country_iso_code == "FRA"
    assert config.offset_api_url == "http://127.0.0.1:9"


@pytest.mark.parametrize(
    "content",
    [
        f"offset_api_key = {KEY}\n",  # no section header
        f"[codecarbon]\noffset_api_key = {KEY}\n[broken\n",
        f"[codecarbon]\noffset_api_key = {KEY}\noffset_api_key = {KEY}\n",  # duplicate option
        f"[codecarbon]\noffset_api_key = {KEY}\n  continuation\n\x00\x01",
    ],
)
@pytest.mark.parametrize("where", ["home", "cwd"])
def test_corrupt_config_file_gives_clear_error_without_key(content: str, where: str) -> None:
    folder = Path.home() if where == "home" else Path.cwd()
    path = folder / ".codecarbon.config"
    path.write_text(content, encoding="utf-8")
    try:
        OffsetConfig.resolve()
    except ValueError as exc:
        text = f"{exc!s} {exc!r} {exc.__cause__!r} {exc.__context__!r}"
        assert ".codecarbon.config" in str(exc)
        assert KEY not in text
        assert isinstance(exc, ConfigurationError)
    else:  # a file configparser accepts must at least not leak anything
        pytest.fail("a corrupt config file was accepted")


def test_config_file_with_binary_garbage() -> None:
    (Path.cwd() / ".codecarbon.config").write_bytes(b"\xff\xfe\x00garbage" + KEY.encode())
    with pytest.raises(ConfigurationError) as info:
        OffsetConfig.resolve()
    assert KEY not in str(info.value)


def test_config_file_without_codecarbon_section_is_ignored() -> None:
    (Path.cwd() / ".codecarbon.config").write_text("[other]\noffset_threshold = 0.1\n")
    assert OffsetConfig.resolve().offset_threshold == 0.5


def test_key_is_never_shown() -> None:
    config = OffsetConfig(offset_api_key=KEY, offset_environment="sandbox")
    assert isinstance(config.offset_api_key, SecretKey)
    assert config.offset_api_key.reveal() == KEY
    for text in (
        repr(config),
        str(config),
        repr(config.offset_api_key),
        str(config.offset_api_key),
        f"{config}",
    ):
        assert KEY not in text
    assert "********" in repr(config)
    # the account id is a non-reversible fingerprint
    assert config.account.startswith("sandbox:")
    assert KEY not in config.account
    assert len(config.account.split(":", 1)[1]) == 16
    # copies keep the key hidden and the account stable
    copy = config.replace(offset_threshold=2.0)
    assert copy.account == config.account and KEY not in repr(copy)
    # pickling (spawned workers) keeps the value but not in any text form
    restored = pickle.loads(pickle.dumps(config))
    assert restored.offset_api_key == config.offset_api_key
    assert KEY not in repr(restored)


def test_accounts_separate_environments_and_keys() -> None:
    unprefixed = "cfg_SECRET_without_a_prefix"  # the only kind of key both environments accept
    sandbox = OffsetConfig(offset_api_key=unprefixed, offset_environment="sandbox")
    production = OffsetConfig(offset_api_key=unprefixed, offset_environment="production")
    other_key = OffsetConfig(offset_api_key=KEY, offset_environment="sandbox")
    assert len({sandbox.account, production.account, other_key.account}) == 3


@pytest.mark.parametrize(
    ("key", "environment", "fix"),
    [
        ("test_cfg_SECRET_b7e21a", "production", "offset_environment = sandbox"),
        ("live_cfg_SECRET_c8f32b", "sandbox", "offset_environment = production"),
    ],
)
def test_a_key_of_the_other_environment_is_a_configuration_error(
    key: str, environment: str, fix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="offset_api_key starts with") as info:
        OffsetConfig(offset_api_key=key, offset_environment=environment)  # type: ignore[arg-type]
    assert fix in str(info.value) and key not in str(info.value)
    # from the environment too (the default environment is production), naming where each came from
    monkeypatch.setenv("CODECARBON_OFFSET_API_KEY", key)
    write_config(Path.cwd(), offset_environment=environment)
    with pytest.raises(ValueError, match="offset_api_key starts with") as info:
        OffsetConfig.resolve()
    message = str(info.value)
    assert "CODECARBON_OFFSET_API_KEY" in message and str(Path.cwd() / ".codecarbon.config") in message
    assert key not in message
    # the matching environment is fine
    matching = "sandbox" if key.startswith("test_") else "production"
    assert OffsetConfig.resolve(offset_environment=matching).offset_environment == matching


def test_a_bad_value_in_a_config_file_names_the_file() -> None:
    path = write_config(Path.cwd(), auto_offset="maybe")
    with pytest.raises(ValueError, match="auto_offset must be true or false") as info:
        OffsetConfig.resolve()
    assert f"{path}, section [codecarbon]" in str(info.value)
    assert OffsetConfig.resolve(auto_offset=False).auto_offset is False  # an argument overrides the file


def test_empty_key_means_no_key_and_blank_secret_is_refused() -> None:
    assert OffsetConfig(offset_api_key="   ").offset_api_key is None
    with pytest.raises(ValueError, match="offset_api_key is empty"):
        SecretKey("  ")


def test_key_from_env_is_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODECARBON_OFFSET_API_KEY", KEY)
    monkeypatch.setenv("CODECARBON_OFFSET_ENVIRONMENT", "staging")
    with pytest.raises(ValueError) as info:
        OffsetConfig.resolve()
    assert KEY not in str(info.value)


@pytest.mark.parametrize(
    "key", ["test_abc\ncontinued", "test_abc def", "test_ab\tc", "test_äbc", "test_\x00abc"]
)
def test_a_key_that_cannot_be_a_header_is_refused_without_showing_it(key: str) -> None:
    with pytest.raises(ValueError, match="offset_api_key contains") as caught:
        OffsetConfig(offset_api_key=key)
    assert "abc" not in str(caught.value)


@pytest.mark.parametrize("quoted", [f'"{KEY}"', f"'{KEY}'"])
def test_a_key_in_quotes_is_refused_naming_the_fix(quoted: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``export CODECARBON_OFFSET_API_KEY="test_..."`` (docs/codecarbon.md) copied into
    ``.codecarbon.config`` keeps its quotes: configparser takes values as written. The key then
    matches no environment's prefix, 1ClickImpact refuses it at the run's start, its emissions go to
    the account of the quoted key, and since the key is never shown nothing tells the user why."""
    path = write_config(Path.cwd(), offset_api_key=quoted, offset_environment="sandbox")
    with pytest.raises(ValueError, match="offset_api_key contains quotes") as info:
        OffsetConfig.resolve()
    message = str(info.value)
    assert "remove the quotes" in message and f"{path}, section [codecarbon]" in message
    assert "SECRET" not in message
    path.unlink()
    monkeypatch.setenv("CODECARBON_OFFSET_API_KEY", quoted)  # e.g. quotes in a CI secret or a .env file
    with pytest.raises(ValueError, match="offset_api_key contains quotes") as info:
        OffsetConfig.resolve(offset_environment="sandbox")
    assert "CODECARBON_OFFSET_API_KEY" in str(info.value) and "SECRET" not in str(info.value)


@pytest.mark.parametrize("name", ["offset_timeout", "offset_request_timeout"])
@pytest.mark.parametrize("value", [1e12, 86_401.0])
def test_huge_timeouts_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{name} must be > 0 and at most 86400 seconds"):
        OffsetConfig(**{name: value})


def test_percent_in_config_reads_like_codecarbon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CodeCarbon reads .codecarbon.config with % interpolation: so do we, so both see the same values."""
    (tmp_path / "work" / ".codecarbon.config").write_text(
        "[codecarbon]\noffset_ledger = /tmp/100%%/ledger.sqlite3\n"
    )
    assert OffsetConfig.resolve().offset_ledger == Path("/tmp/100%/ledger.sqlite3")
    (tmp_path / "work" / ".codecarbon.config").write_text(
        "[codecarbon]\noffset_api_key = test_50%SECRETVALUE\n"
    )
    with pytest.raises(ValueError, match="'%' must be written '%%'") as caught:
        OffsetConfig.resolve()
    assert "SECRETVALUE" not in str(caught.value)
    assert caught.value.__context__ is None and caught.value.__cause__ is None


def test_a_misspelt_offset_setting_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "work" / ".codecarbon.config").write_text("[codecarbon]\noffset_treshold = 2\n")
    monkeypatch.setenv("CODECARBON_OFFSET_ENVIROMENT", "sandbox")
    with caplog.at_level("WARNING", logger="carbonoffset"):
        config = OffsetConfig.resolve()
    assert config.offset_threshold == 0.5
    text = caplog.text
    assert "'offset_treshold'" in text and "'offset_enviroment'" in text
    assert "offset_threshold" in text  # the valid names are listed


def test_a_misspelt_auto_offset_is_warned_about_and_codecarbons_own_keys_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "work" / ".codecarbon.config").write_text(
        "[codecarbon]\nauto_ofset = false\nmeasure_power_secs = 5\nlog_level = error\nallow_multiple_runs = true\n"
    )
    monkeypatch.setenv("CODECARBON_AUTOOFFSET", "false")
    with caplog.at_level("WARNING", logger="carbonoffset"):
        config = OffsetConfig.resolve()
    assert config.auto_offset is True  # the misspelt key changed nothing
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned
    assert all("did you mean 'auto_offset'?" in m for m in warned)
    assert "'auto_ofset'" in warned[0] and "'autooffset'" in warned[1]
    assert not any(k in " ".join(warned) for k in ("measure_power_secs", "log_level", "allow_multiple_runs"))


def test_none_of_codecarbons_own_settings_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every setting the installed CodeCarbon's trackers take (their constructors' parameters, which
    CodeCarbon also reads from ``.codecarbon.config`` and ``CODECARBON_*``), in the file and in the
    environment: no warning. ``country_2letter_iso_code`` (OfflineEmissionsTracker) is within the
    0.8 ratio of ``country_iso_code``."""
    import inspect

    import codecarbon

    names = sorted(
        {
            name
            for cls in (codecarbon.EmissionsTracker, codecarbon.OfflineEmissionsTracker)
            for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        }
        - set(CONFIG_KEYS)  # country_iso_code is both CodeCarbon's and ours
    )
    assert "country_2letter_iso_code" in names and "measure_power_secs" in names
    write_config(tmp_path / "work", **{name: "1" for name in names})
    for name in names:
        monkeypatch.setenv(f"CODECARBON_{name.upper()}", "1")
    with caplog.at_level("WARNING", logger="carbonoffset"):
        OffsetConfig.resolve()
    assert [r.getMessage() for r in caplog.records] == []


def test_resolve_over_ready_settings_applies_only_what_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """``OffsetConfig.resolve(config, **settings)``: what every front end does with a ready config."""
    base = OffsetConfig(offset_environment="sandbox", offset_threshold=2.0)
    monkeypatch.setenv("CODECARBON_OFFSET_THRESHOLD", "3.0")  # not read over ready settings
    assert OffsetConfig.resolve(base) is base
    assert OffsetConfig.resolve(base, offset_threshold=None) == base  # None: not given
    changed = OffsetConfig.resolve(base, offset_threshold=4.0, auto_offset="false")
    assert (changed.offset_threshold, changed.auto_offset, changed.offset_environment) == (4.0, False, "sandbox")
    with pytest.raises(ConfigurationError, match="offset_threshold must be at least"):
        OffsetConfig.resolve(base, offset_threshold=0.1)  # validated again
    assert OffsetConfig.resolve().offset_threshold == 3.0  # without one, the environment is read


def test_resolve_says_where_each_setting_was_read(monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(Path.cwd(), offset_environment="sandbox", project_name="not-ours")
    monkeypatch.setenv("CODECARBON_OFFSET_THRESHOLD", "2.0")
    origins: dict[str, str] = {}
    config = OffsetConfig.resolve(offset_threshold=5.0, origins=origins)
    assert config.offset_threshold == 5.0  # the argument wins, and the variable is still named
    assert origins == {
        "offset_environment": f"{Path.cwd() / '.codecarbon.config'}, section [codecarbon]",
        "offset_threshold": "the environment variable CODECARBON_OFFSET_THRESHOLD",
    }
