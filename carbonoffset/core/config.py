"""Settings shared by every front end (callbacks, CodeCarbon drop-in, CLI).

Every setting is resolved in this order, first match wins:

1. an explicit argument (``OffsetConfig.resolve(offset_threshold=1.0)``);
2. a ``CODECARBON_<KEY>`` environment variable (``CODECARBON_OFFSET_THRESHOLD=1.0``);
3. ``./.codecarbon.config`` (section ``[codecarbon]``);
4. ``~/.codecarbon.config`` (section ``[codecarbon]``).

Steps 2-4 are CodeCarbon's own hierarchical configuration, so one file
configures both tools. The API key is held in a :class:`SecretKey` that never
shows its value in ``repr``/``str``, logs, exceptions or files.
"""

from __future__ import annotations

import configparser
import dataclasses
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from carbonoffset.core.errors import ConfigurationError
from carbonoffset.core.units import KG_PER_LB, MIN_THRESHOLD_KG

Environment = Literal["production", "sandbox"]
ENVIRONMENTS: Final[tuple[str, ...]] = ("production", "sandbox")

DEFAULT_THRESHOLD_KG: Final[float] = MIN_THRESHOLD_KG
DEFAULT_OFFSET_TIMEOUT_S: Final[float] = 30.0
DEFAULT_REQUEST_TIMEOUT_S: Final[float] = 10.0
MAX_TIMEOUT_S: Final[float] = 86_400.0
LEDGER_FILE_NAME: Final[str] = "ledger.sqlite3"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SecretKey:
    """An API key that does not reveal itself.

    ``repr``/``str`` print ``SecretKey('********')``; pickling keeps the value
    (needed by spawned training workers) but no file written by carbonoffset
    ever contains it. Use :meth:`reveal` only to hand the key to the SDK.

    Args:
        value: the raw key, non-empty.

    Raises:
        ConfigurationError: the key is empty or only whitespace.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        value = value.strip()
        if not value:
            raise ConfigurationError(
                "offset_api_key is empty; set it to your 1ClickImpact key or leave it unset"
            )
        if not (value.isascii() and value.isprintable()) or any(ch.isspace() for ch in value):
            # such a key cannot be sent in an HTTP header, and the HTTP library would quote it
            # in its error message: refuse it here, without showing it
            raise ConfigurationError(
                "offset_api_key contains spaces, line breaks or non-ASCII characters; a 1ClickImpact "
                "key is one token such as test_... or live_...: copy it again"
            )
        if '"' in value or "'" in value:
            # e.g. `export CODECARBON_OFFSET_API_KEY="test_..."` copied into .codecarbon.config, where
            # configparser keeps the quotes: the service would refuse the key, and it is never shown
            raise ConfigurationError(
                "offset_api_key contains quotes; .codecarbon.config and CODECARBON_* values are taken as "
                "written and a 1ClickImpact key is one token such as test_... or live_...: remove the quotes"
            )
        self._value = value

    def reveal(self) -> str:
        """Return the raw key (only for the SDK's ``OneClickImpact(api_key=...)``)."""
        return self._value

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of SHA-256 of the key: identifies the account, cannot be reversed."""
        return hashlib.sha256(self._value.encode("utf-8")).hexdigest()[:16]

    def __repr__(self) -> str:
        return "SecretKey('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretKey) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __getstate__(self) -> str:
        return self._value

    def __setstate__(self, state: str) -> None:
        self._value = state


#: Key prefix of each environment, as 1ClickImpact documents its keys.
KEY_PREFIXES: Final[dict[str, str]] = {"sandbox": "test_", "production": "live_"}


def _check_key_matches_environment(key: Any, environment: str) -> None:
    """Refuse a ``test_`` key with production and a ``live_`` key with sandbox (never shows the key).

    A key with neither prefix is left to the service to judge (the start-of-run check reports it).
    """
    if not isinstance(key, SecretKey):
        return
    value = key.reveal()
    for other, prefix in KEY_PREFIXES.items():
        if other != environment and value.startswith(prefix):
            raise ConfigurationError(
                f"offset_api_key starts with {prefix!r}, a {other} key, but offset_environment is "
                f"{environment!r}: set offset_environment = {other} (CODECARBON_OFFSET_ENVIRONMENT={other}) "
                f"or use your {KEY_PREFIXES[environment]}... key for {environment}"
            )


def default_ledger_path() -> Path:
    """The ledger used when ``offset_ledger`` is not set.

    ``<user data dir>/carbonoffset/ledger.sqlite3`` as given by
    :func:`platformdirs.user_data_path` (``~/.local/share/carbonoffset`` on Linux).
    """
    import platformdirs

    return platformdirs.user_data_path("carbonoffset", appauthor=False) / LEDGER_FILE_NAME


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigurationError(f"{name} must be true or false (got {value!r}); fix it where it is set")


def _parse_float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name} must be a number (got {value!r}); fix it where it is set") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigurationError(f"{name} must be a finite number (got {value!r})")
    return number


@dataclasses.dataclass(frozen=True)
class OffsetConfig:
    """Typed, validated settings for tracking and offsetting.

    Args:
        offset_api_key: 1ClickImpact API key (``test_...`` for sandbox,
            ``live_...`` for production). ``None`` records emissions in the
            ledger without offsetting them; they stay pending until a key is set.
        offset_environment: ``"production"`` (default) or ``"sandbox"``; any
            other value raises (the SDK itself would silently use production).
        offset_threshold: pending emissions in kg CO2eq that trigger an
            automatic offset; at least 0.5 (one pound is 0.4536 kg). Default 0.5.
        auto_offset: offset automatically when pending >= threshold. Default True.
        offset_ledger: where the ledger is: a SQLite file path (default
            :func:`default_ledger_path`) or a PostgreSQL URL for a team ledger
            (``postgresql://user:password@host:5432/dbname``; needs
            ``carbonoffset[postgresql]``). The password never appears in a repr or log line.
        offset_timeout: seconds a run waits at its end for offsets in flight
            (> 0, default 30). What is not done by then stays in the ledger
            and is finished by a later run or ``carbonoffset reconcile``.
        offset_request_timeout: deadline in seconds for one call to the
            1ClickImpact API (> 0, default 10); the SDK itself has none.
        offset_round_up: at the end of a run, buy the next whole pound even
            below the threshold; the overshoot is kept as a credit. Default False.
        offset_api_url: base URL of the API, only to point the SDK at a
            compatible server (e.g. :class:`carbonoffset.testing.FakeOneClickImpact`).
        country_iso_code: ISO 3166-1 alpha-3 code (e.g. ``"FRA"``); when set,
            CodeCarbon's offline tracker is used (no network look-up).

    Raises:
        ValueError: (:class:`ConfigurationError`) for any invalid value; the
            message names the setting and the fix (and, from :meth:`resolve`, the
            file or variable it was read from). A ``test_`` key with
            ``offset_environment="production"`` or a ``live_`` key with ``"sandbox"``
            is such an error.
    """

    offset_api_key: SecretKey | None = None
    offset_environment: Environment = "production"
    offset_threshold: float = DEFAULT_THRESHOLD_KG
    auto_offset: bool = True
    offset_ledger: Path | str | None = None
    offset_timeout: float = DEFAULT_OFFSET_TIMEOUT_S
    offset_request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    offset_round_up: bool = False
    offset_api_url: str | None = None
    country_iso_code: str | None = None

    def __post_init__(self) -> None:
        key = self.offset_api_key
        if isinstance(key, str):
            object.__setattr__(self, "offset_api_key", SecretKey(key) if key.strip() else None)
        elif key is not None and not isinstance(key, SecretKey):
            raise ConfigurationError("offset_api_key must be a string")
        env = self.offset_environment
        if env not in ENVIRONMENTS:
            raise ConfigurationError(
                f"offset_environment must be 'production' or 'sandbox' (got {env!r}); "
                "values are case-sensitive and nothing else is accepted"
            )
        _check_key_matches_environment(self.offset_api_key, env)
        threshold = _parse_float("offset_threshold", self.offset_threshold)
        if threshold < MIN_THRESHOLD_KG:
            raise ConfigurationError(
                f"offset_threshold must be at least {MIN_THRESHOLD_KG} kg (got {threshold:g} kg): "
                f"the smallest offset is 1 lb = {KG_PER_LB} kg. Set offset_threshold >= {MIN_THRESHOLD_KG}"
            )
        object.__setattr__(self, "offset_threshold", threshold)
        object.__setattr__(self, "auto_offset", _parse_bool("auto_offset", self.auto_offset))
        object.__setattr__(self, "offset_round_up", _parse_bool("offset_round_up", self.offset_round_up))
        for name in ("offset_timeout", "offset_request_timeout"):
            value = _parse_float(name, getattr(self, name))
            if not 0 < value <= MAX_TIMEOUT_S:
                raise ConfigurationError(
                    f"{name} must be > 0 and at most {MAX_TIMEOUT_S:g} seconds (one day); got {value:g}"
                )
            object.__setattr__(self, name, value)
        if self.offset_ledger is not None:
            from carbonoffset.core.ledger.urls import normalize_location

            if isinstance(self.offset_ledger, str) and not self.offset_ledger.strip():
                raise ConfigurationError("offset_ledger is empty; give a file path or a PostgreSQL URL, or unset it")
            object.__setattr__(self, "offset_ledger", normalize_location(self.offset_ledger))
        if self.offset_api_url is not None:
            url = str(self.offset_api_url).strip().rstrip("/")
            if not url.startswith(("http://", "https://")):
                raise ConfigurationError(f"offset_api_url must start with http:// or https:// (got {url!r})")
            object.__setattr__(self, "offset_api_url", url)
        if self.country_iso_code is not None:
            code = str(self.country_iso_code).strip().upper()
            if len(code) != 3 or not code.isalpha():
                raise ConfigurationError(
                    f"country_iso_code must be an ISO 3166-1 alpha-3 code such as 'FRA' (got {code!r})"
                )
            object.__setattr__(self, "country_iso_code", code)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={self._shown(f.name)}"
            for f in dataclasses.fields(self)
        )
        return f"OffsetConfig({fields})"

    def _shown(self, name: str) -> str:
        if name == "offset_api_key" and self.offset_api_key:
            return "'********'"
        if name == "offset_ledger" and isinstance(self.offset_ledger, str):
            return repr(self.ledger_display)
        return repr(getattr(self, name))

    # ------------------------------------------------------------------ derived
    @property
    def ledger_path(self) -> Path | str:
        """The ledger in use: ``offset_ledger`` or :func:`default_ledger_path`: a file path, or a
        database URL (password included: show :attr:`ledger_display` instead)."""
        return self.offset_ledger if self.offset_ledger is not None else default_ledger_path()

    @property
    def ledger_display(self) -> str:
        """The ledger in use as text for people: the path, or the URL with its password as ``***``."""
        from carbonoffset.core.ledger.urls import mask_password

        return mask_password(str(self.ledger_path))

    @property
    def account(self) -> str:
        """Ledger account: ``"<environment>:<key fingerprint>"`` (``"<environment>:no-key"`` without a key).

        Sandbox and production never share an account, and neither do two keys.
        """
        fingerprint = self.offset_api_key.fingerprint if self.offset_api_key else "no-key"
        return f"{self.offset_environment}:{fingerprint}"

    @property
    def can_offset(self) -> bool:
        """``True`` when a key is configured, i.e. offsets can be bought."""
        return self.offset_api_key is not None

    def replace(self, **changes: Any) -> OffsetConfig:
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- resolution
    @classmethod
    def resolve(
        cls, base: OffsetConfig | None = None, /, *, origins: dict[str, str] | None = None, **explicit: Any
    ) -> OffsetConfig:
        """The settings in force: from arguments, environment and config files, or over ready ones.

        Every front end resolves its settings here, once: the callbacks, :class:`OffsetSession`
        and the CodeCarbon drop-in pass on what they were given (a ready ``base``, or settings).

        Args:
            base: ready settings: the result is ``base`` with the ``explicit`` settings that are
                not ``None`` applied (``base.replace(...)``, validated again); the environment and
                files are not read. ``None`` (default): resolve from arguments, environment and files.
            origins: when given (and ``base`` is not), filled with ``{key: where it was read}``
                for every key set in the environment or a file, whether an argument overrides
                it or not (see :func:`read_external_settings`).
            **explicit: any field of :class:`OffsetConfig`; ``None`` means
                "not given" and falls through to the environment and files.

        Returns:
            A validated :class:`OffsetConfig`.

        Raises:
            ValueError: (:class:`ConfigurationError`) for an unknown argument,
                an invalid value, or an unreadable ``.codecarbon.config``.
            TypeError: with ``base``, an argument that is not a field.
        """
        if base is not None:
            return base.replace(**{k: v for k, v in explicit.items() if v is not None}) if explicit else base
        unknown = set(explicit) - set(CONFIG_KEYS)
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) {sorted(unknown)}; valid settings are {sorted(CONFIG_KEYS)}"
            )
        origins = {} if origins is None else origins
        values: dict[str, Any] = {
            key: value
            for key, value in read_external_settings(origins=origins).items()
            if value not in (None, "")
        }
        given = {key: value for key, value in explicit.items() if value is not None}
        values.update(given)
        try:
            return cls(**values)
        except ConfigurationError as exc:
            # name where the offending value came from (a file, a variable), never the value of a key
            named = sorted(
                {key for key in values if key not in given and key in origins and key in str(exc)},
                key=str(exc).find,
            )
            if not named:
                raise
            where = "; ".join(f"{key} is read from {origins[key]}" for key in named)
            raise ConfigurationError(f"{exc} ({where})") from None


#: Keys read from environment variables / ``.codecarbon.config``, in the
#: ``[codecarbon]`` section (environment variable: ``CODECARBON_`` + upper case): the fields of
#: :class:`OffsetConfig`, in their order.
CONFIG_KEYS: Final[tuple[str, ...]] = tuple(field.name for field in dataclasses.fields(OffsetConfig))


def read_external_settings(
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    home: Path | None = None,
    *,
    origins: dict[str, str] | None = None,
) -> dict[str, str]:
    """Read carbonoffset's keys from env vars and ``.codecarbon.config`` files.

    Precedence: ``CODECARBON_*`` environment variables > ``./.codecarbon.config``
    > ``~/.codecarbon.config`` (the same order CodeCarbon uses).

    Args:
        origins: when given, filled with ``{key: where it was read}`` (the file's path with
            its section, or the environment variable's name), for error messages.

    Returns:
        ``{key: raw string}`` for the keys in :data:`CONFIG_KEYS` that are set.

    Raises:
        ConfigurationError: a config file exists but cannot be parsed.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, str] = {}
    for path in (
        (home or Path.home()) / ".codecarbon.config",
        (cwd or Path.cwd()) / ".codecarbon.config",
    ):
        values = read_codecarbon_section(path)
        _warn_unknown_offset_keys(values, where=str(path))
        for key, value in values.items():
            if key in CONFIG_KEYS:
                merged[key] = value
                if origins is not None:
                    origins[key] = f"{path}, section [codecarbon]"
    _warn_unknown_offset_keys(
        (name[len("CODECARBON_") :].lower() for name in environ if name.startswith("CODECARBON_")),
        where="the environment (CODECARBON_*)",
    )
    for key in CONFIG_KEYS:
        env_value = environ.get(f"CODECARBON_{key.upper()}")
        if env_value is not None:
            merged[key] = env_value
            if origins is not None:
                origins[key] = f"the environment variable CODECARBON_{key.upper()}"
    return {key: merged[key] for key in CONFIG_KEYS if key in merged}


def read_codecarbon_section(path: Path) -> dict[str, str]:
    """Every option of the ``[codecarbon]`` section of a ``.codecarbon.config`` file, read as
    CodeCarbon reads it (``configparser``, ``%`` interpolation included).

    Returns:
        ``{option: raw string}``; ``{}`` when the file does not exist or has no such section.

    Raises:
        ConfigurationError: the file cannot be parsed (the message never quotes its lines: they
            may hold the API key).
    """
    if not path.is_file():
        return {}
    # the same reader CodeCarbon uses (``%`` interpolation included), so both tools see the same values
    parser = configparser.ConfigParser()
    problem: str | None = None
    values: dict[str, str] = {}
    try:
        parser.read(path, encoding="utf-8")
        if parser.has_section("codecarbon"):
            values = dict(parser.items("codecarbon"))
    except configparser.InterpolationError as exc:
        problem = (
            f"{type(exc).__name__} in option {exc.option!r}: a '%' must be written '%%' "
            "(CodeCarbon reads this file with interpolation too)"
        )
    except (configparser.Error, UnicodeDecodeError) as exc:
        problem = type(exc).__name__
    if problem is not None:
        # raised outside the ``except`` block: the parser's error quotes the offending
        # line (possibly the API key) and must not survive as ``__context__``
        raise ConfigurationError(
            f"{path} is not a valid INI file ({problem}); fix or remove it. "
            "carbonoffset reads its [codecarbon] section"
        )
    return values


#: CodeCarbon's own settings (its trackers' constructor arguments, codecarbon 3.3.2, and the keys
#: ``codecarbon config`` writes): never warned about, even where one is close to a name of ours
#: (``country_2letter_iso_code`` is at ratio 0.8 from ``country_iso_code``).
_CODECARBON_KEYS: Final[frozenset[str]] = frozenset(
    {
        "allow_multiple_runs", "api_call_interval", "api_endpoint", "api_key", "cloud_provider",
        "cloud_region", "co2_signal_api_token", "country_2letter_iso_code", "electricitymaps_api_token",
        "emissions_endpoint", "experiment_id", "experiment_name", "force_carbon_intensity_g_co2e_kwh",
        "force_cpu_power", "force_mode_cpu_load", "force_ram_power", "gpu_ids", "log_level",
        "logger_preamble", "logging_logger", "measure_power_secs", "metadata", "on_csv_write",
        "organization_id", "output_dir", "output_file", "output_handlers", "output_methods",
        "project_id", "project_name", "prometheus_url", "pue", "rapl_include_dram", "rapl_prefer_psys",
        "region", "save_to_api", "save_to_file", "save_to_logfire", "save_to_logger",
        "save_to_prometheus", "tracking_mode", "wue",
    }
)


def _warn_unknown_offset_keys(keys: Any, *, where: str) -> None:
    """Warn about keys that look like carbonoffset's but are not (likely typos such as
    ``offset_treshold`` or ``auto_ofset``): a key with ``offset`` in it, or one close to a setting's
    name (:func:`difflib.get_close_matches`, ratio >= 0.8). CodeCarbon's own settings
    (``_CODECARBON_KEYS``) are never warned about."""
    import difflib
    import logging

    for key in keys:
        if key in CONFIG_KEYS or key in _CODECARBON_KEYS:
            continue
        close = difflib.get_close_matches(key, CONFIG_KEYS, n=1, cutoff=0.8)
        if "offset" in key or close:
            logging.getLogger(__name__).warning(
                "unknown setting %r in %s is ignored%s; carbonoffset's settings are %s",
                key,
                where,
                f" (did you mean {close[0]!r}?)" if close else "",
                ", ".join(CONFIG_KEYS),
            )
