"""The CodeCarbon drop-in: change one import to offset what CodeCarbon measures.

::

    from carbonoffset import EmissionsTracker, OfflineEmissionsTracker, track_emissions

:class:`EmissionsTracker` and :class:`OfflineEmissionsTracker` are CodeCarbon's
own trackers (subclasses), and :func:`track_emissions` its decorator, with the
offset settings added as keyword-only arguments (:data:`OFFSET_ARGUMENTS`:
``offset_api_key``, ``offset_environment``, ``offset_threshold``,
``auto_offset``, ...; each one is the
:class:`~carbonoffset.core.config.OffsetConfig` field of that name, documented
there). When a key is configured, a :class:`OneClickImpactOutput` output
handler is added: it translates CodeCarbon's events into the calls of the
core's run object, :class:`~carbonoffset.core.session.OffsetSession` (the
ledger and its exactly-once protocol), as the framework callbacks do. Without a
key the trackers are plain CodeCarbon.

This module imports CodeCarbon; ``import carbonoffset`` does not (the names are
loaded on first access).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import signal
import textwrap
import threading
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, Final, ParamSpec, Protocol, TypeVar, overload

import codecarbon as _cc
from codecarbon.emissions_tracker import BaseEmissionsTracker as _BaseTracker
from codecarbon.output_methods.base_output import BaseOutput

from carbonoffset.core.client import import_sdk
from carbonoffset.core.config import OffsetConfig, read_external_settings
from carbonoffset.core.errors import ConfigurationError
from carbonoffset.core.ledger import OffsetState
from carbonoffset.core.session import OffsetSession, RunReport
from carbonoffset.core.sources import Measurement, codecarbon_details
from carbonoffset.core.units import KG_PER_LB, whole_lb_floor

__all__ = ["EmissionsTracker", "OfflineEmissionsTracker", "OneClickImpactOutput", "track_emissions"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")


# ------------------------------------------------------------------ the offset arguments
def _offset_arguments(
    *args: Any,
    offset_api_key: str | None = None,
    offset_environment: str | None = None,
    offset_threshold: float | None = None,
    auto_offset: bool | None = None,
    offset_ledger: str | os.PathLike[str] | None = None,
    offset_timeout: float | None = None,
    offset_request_timeout: float | None = None,
    offset_round_up: bool | None = None,
    offset_api_url: str | None = None,
    **kwargs: Any,
) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
    """The one declaration of the drop-in's arguments: CodeCarbon's, plus the offset settings.

    Each offset setting is the :class:`~carbonoffset.core.config.OffsetConfig`
    field of the same name (its type, unit, valid range and default are
    documented there, and in the table of ``docs/codecarbon.md``); ``None``
    means "not given": its ``CODECARBON_<NAME>`` variable or
    ``.codecarbon.config`` decides. The trackers and :func:`track_emissions`
    take their signature from this function (static typing, ``help()``) and
    split their arguments with it.

    Returns:
        ``(args, settings, kwargs)``: CodeCarbon's positional and keyword arguments,
        and the offset settings given (those not ``None``).
    """
    given = {name: value for name, value in locals().items() if name in OFFSET_ARGUMENTS and value is not None}
    return args, given, kwargs


#: Offset settings the trackers and the decorator accept on top of CodeCarbon's arguments
#: (keyword-only), in their order: the fields of :class:`~carbonoffset.core.config.OffsetConfig`
#: but ``country_iso_code`` (which is CodeCarbon's own argument).
OFFSET_ARGUMENTS: Final[tuple[str, ...]] = tuple(
    name
    for name, parameter in inspect.signature(_offset_arguments).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)


def _offset_parameters() -> list[inspect.Parameter]:
    return [inspect.signature(_offset_arguments).parameters[name] for name in OFFSET_ARGUMENTS]


def _method_taking(
    template: Callable[P, Any],
) -> Callable[[Callable[..., None]], Callable[Concatenate[Any, P], None]]:
    """Type a method (``__init__``) as taking ``template``'s parameters after ``self``; ``help()`` and
    :func:`inspect.signature` show them too."""

    def decorate(method: Callable[..., None]) -> Callable[Concatenate[Any, P], None]:
        parameters = list(inspect.signature(method).parameters.values())[:1]
        parameters += inspect.signature(template).parameters.values()
        setattr(method, "__signature__", inspect.Signature(parameters))  # noqa: B010
        return method

    return decorate


class _Decorator(Protocol):
    def __call__(self, fn: F, /) -> F: ...


def _decorator_factory_taking(template: Callable[P, Any]) -> Callable[[Callable[..., Any]], Callable[P, _Decorator]]:
    """Type a decorator factory (``@track_emissions(...)``) as taking ``template``'s parameters."""

    def decorate(factory: Callable[..., Any]) -> Callable[P, _Decorator]:
        return factory

    return decorate


#: CodeCarbon's arguments, in the positional order of its trackers' constructor.
_TRACKER_ARGUMENTS: tuple[str, ...] = tuple(inspect.signature(_BaseTracker.__init__).parameters)[1:]

#: Arguments only :class:`codecarbon.OfflineEmissionsTracker` accepts.
_OFFLINE_ARGUMENTS: tuple[str, ...] = (
    "country_iso_code",
    "region",
    "cloud_provider",
    "cloud_region",
    "country_2letter_iso_code",
)


# --------------------------------------------------------------------------- handler
class _PushedTotals:
    """An emissions source fed by CodeCarbon: it holds the largest cumulative total pushed to it.

    :class:`OffsetSession` pulls from a source; CodeCarbon pushes totals to its
    output handlers. This adapter lets the session read what CodeCarbon pushed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = Measurement()

    def push(self, total: Measurement) -> Measurement:
        with self._lock:
            self._last = Measurement(
                max(self._last.emissions_kg, total.emissions_kg),
                max(self._last.energy_kwh, total.energy_kwh),
                details=total.details or self._last.details,  # what CodeCarbon measured on, where
            )
            return self._last

    def start(self) -> None:
        with self._lock:
            self._last = Measurement()

    def read(self) -> Measurement:
        with self._lock:
            return self._last

    def stop(self) -> Measurement:
        return self.read()


class OneClickImpactOutput(BaseOutput):
    """CodeCarbon output handler that offsets the emissions CodeCarbon reports, exactly once.

    It translates CodeCarbon's output-handler events into the calls of the
    core's run object (:class:`~carbonoffset.core.session.OffsetSession`, its
    public methods only), as the framework callbacks do; it holds no
    accounting of its own. A tracker run begins a session run (:meth:`begin`);
    every cumulative total CodeCarbon passes to :meth:`out` / :meth:`live_out`
    is recorded in the ledger (keeping the largest total of the run, so the
    same total given twice is never counted twice); when the account's
    pending emissions reach ``offset_threshold`` (and ``auto_offset`` is on),
    whole pounds are bought in the background and the remainder stays pending.
    :meth:`exit` (the end of ``tracker.stop()``) ends the run (:meth:`finish`):
    the final total, the final offset, a wait of at most ``offset_timeout`` seconds.

    The trackers of this module add one automatically when a key is configured
    (``tracker.offset_handler``); a plain CodeCarbon tracker can use one too::

        import codecarbon
        handler = OneClickImpactOutput(offset_api_key="test_...", offset_environment="sandbox")
        tracker = codecarbon.OfflineEmissionsTracker(country_iso_code="FRA", output_handlers=[handler])

    No method CodeCarbon calls ever raises: CodeCarbon would swallow the error
    and ``stop()`` would return ``None``.

    Args:
        config: ready settings; when omitted they are resolved from
            ``**settings``, ``CODECARBON_*`` variables and ``.codecarbon.config``
            (:meth:`OffsetConfig.resolve <carbonoffset.core.config.OffsetConfig.resolve>`).
        label: stored with each ledger run (default ``"codecarbon"``).
        offsetter_options: passed to :class:`~carbonoffset.core.offsetter.Offsetter`
            (``max_attempts``, ``wait_initial_s``, ``wait_max_s``).
        **settings: any :class:`~carbonoffset.core.config.OffsetConfig` field
            (types, units and valid ranges are documented there), over ``config``.

    Raises:
        ValueError: (:class:`~carbonoffset.ConfigurationError`) invalid settings,
            or no ``offset_api_key`` configured.
        ImportError: the ``makeimpact`` SDK is not installed (the message gives
            the install command).
        LedgerError: the ledger file is unusable.
    """

    def __init__(
        self,
        config: OffsetConfig | None = None,
        *,
        label: str | None = "codecarbon",
        offsetter_options: dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        config = OffsetConfig.resolve(config, **settings)
        if not config.can_offset:
            raise ConfigurationError(
                "OneClickImpactOutput needs offset_api_key: set it as an argument, in "
                "CODECARBON_OFFSET_API_KEY or in .codecarbon.config"
            )
        import_sdk()  # fail now, with the install command, rather than at the first offset
        self._source = _PushedTotals()
        self._session = OffsetSession(
            config, source=self._source, label=label, offsetter_options=offsetter_options
        )
        self._lock = threading.RLock()
        # CodeCarbon's run ids: the run of the session now, and those ended (late totals are ignored)
        self._run_ref: str | None = None
        self._finished: set[str] = set()
        self._warned: set[str] = set()
        self._failed_as: str | None = None  # the measured code raised: the run's end status (see failed())

    def __repr__(self) -> str:
        c = self.config
        return (
            f"OneClickImpactOutput(environment={c.offset_environment!r}, threshold={c.offset_threshold:g} kg, "
            f"auto_offset={c.auto_offset}, ledger={c.ledger_display!r})"
        )

    # ------------------------------------------------------------------ helpers
    @property
    def session(self) -> OffsetSession:
        """The core :class:`~carbonoffset.core.session.OffsetSession` doing the accounting."""
        return self._session

    @property
    def config(self) -> OffsetConfig:
        """The settings in force (the session's)."""
        return self._session.config

    @property
    def label(self) -> str | None:
        """Text stored with each ledger run."""
        return self._session.label

    @label.setter
    def label(self, value: str | None) -> None:
        self._session.label = value

    def _warn_once(self, cause: str, message: str, *args: Any, exc_info: bool = False) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            logger.warning(message, *args, exc_info=exc_info)

    # ------------------------------------------------------------- run control
    def begin(self, run_ref: str | None = None) -> None:
        """Start a session run for one CodeCarbon tracker run (idempotent).

        Called by the trackers' ``start()``; with a plain CodeCarbon tracker the
        run starts at the first :meth:`out`. A run of another ``run_ref`` still
        going is finished first. Never raises.

        Args:
            run_ref: CodeCarbon's ``run_id`` of the tracker run; totals that
                arrive for an already finished ``run_ref`` are ignored.
        """
        try:
            with self._lock:
                ref = run_ref or ""
                if ref in self._finished:
                    self._warn_once(
                        "reused",
                        "this CodeCarbon tracker was already stopped; trackers are single-use, build a new one "
                        "for each run. Nothing more is recorded for it",
                    )
                    return
                if self._session.running:
                    if ref == self._run_ref:
                        return
                    self._finished.add(self._run_ref or "")  # session.start() finishes it first
                self._run_ref = ref
                self._failed_as = None
                self._session.start()
        except Exception:  # noqa: BLE001 -- never raise into CodeCarbon or the user's training
            self._warn_once(
                "begin", "carbonoffset could not start its run; tracking continues", exc_info=True
            )

    def finish(self) -> RunReport | None:
        """End the run: record the final total, offset (if ``auto_offset``), wait at most ``offset_timeout`` s.

        Idempotent and never raises. Called by :meth:`exit` and by the trackers' ``stop()``.

        Returns:
            The run's :class:`~carbonoffset.core.session.RunReport`, or ``None`` if it could not be read.
        """
        if self._failed_as is not None:
            return self._end(final_offset=False, status=self._failed_as)
        return self._end(final_offset=True, status="finished")

    def failed(self, status: str = "failed") -> None:
        """The code the tracker measures raised: its run's end (:meth:`finish`, at CodeCarbon's
        ``stop()``, with CodeCarbon's final figures) is stored as ``status`` (``failed``, or
        ``interrupted`` for Ctrl-C) without a final offset, as the framework callbacks end a failed
        fit: what it measured stays pending for the next run. Called by the trackers'
        ``with`` block and :func:`track_emissions`. Never raises."""
        with self._lock:
            self._failed_as = status

    def abort(self, status: str = "failed") -> RunReport | None:
        """End the run without a final offset (what it measured stays pending), stored as ``status``.

        Idempotent and never raises. The trackers call it when CodeCarbon refuses to start
        (``status="unmeasured"``).

        Returns:
            The run's :class:`~carbonoffset.core.session.RunReport`, or ``None`` if it could not be read.
        """
        return self._end(final_offset=False, status=status)

    def _end(self, *, final_offset: bool, status: str) -> RunReport | None:
        try:
            with self._lock:
                if self._session.running:
                    # late totals of this run (CodeCarbon's timer thread is not joined) are ignored from now on
                    self._finished.add(self._run_ref or "")
            # (outside the lock: the session's stop waits for its background threads)
            return self._session.stop(final_offset=final_offset, status=status)
        except Exception:  # noqa: BLE001
            self._warn_once(
                "finish", "carbonoffset could not finish its run; tracking continues", exc_info=True
            )
            return None

    # -------------------------------------------------------- CodeCarbon hooks
    def out(self, total: Any, delta: Any) -> None:
        """Record CodeCarbon's cumulative ``total`` (``flush()`` and ``stop()``); may trigger a background offset.

        Only ``total.emissions`` (kg CO2eq, cumulative for the run) and
        ``total.energy_consumed`` (kWh) are used; ``delta`` is ignored (its
        cursor is shared by every caller in CodeCarbon). Never raises.
        """
        try:
            self._record(total)
        except Exception:  # noqa: BLE001
            self._warn_once(
                "out", "carbonoffset could not record CodeCarbon's totals; tracking continues", exc_info=True
            )

    def live_out(self, total: Any, delta: Any) -> None:
        """Same as :meth:`out`, for CodeCarbon's periodic reports (its timer thread; never blocks on the network)."""
        self.out(total, delta)

    def task_out(self, data: Any, experiment_name: Any) -> None:
        """Task figures are part of the run's total already: nothing to do."""

    def exit(self) -> None:
        """CodeCarbon's end of ``stop()``: :meth:`finish` the run."""
        self.finish()

    def _record(self, total: Any) -> None:
        emissions_kg = float(getattr(total, "emissions", 0.0) or 0.0)
        energy_kwh = float(getattr(total, "energy_consumed", 0.0) or 0.0)
        if (
            not (math.isfinite(emissions_kg) and math.isfinite(energy_kwh))
            or emissions_kg < 0
            or energy_kwh < 0
        ):
            self._warn_once(
                "bad-total",
                "ignoring a CodeCarbon total that is negative or not finite (%r kg)",
                emissions_kg,
            )
            return
        ref = str(getattr(total, "run_id", "") or "")
        with self._lock:
            if not self._session.running:
                if ref in self._finished or (not ref and self._run_ref is not None):
                    logger.debug("ignoring a CodeCarbon total that arrived after its run ended")
                    return
                self.begin(ref)
                if not self._session.running:
                    return
            measured = self._source.push(Measurement(emissions_kg, energy_kwh, details=codecarbon_details(total)))
            self._session.record(measured)

    # ------------------------------------------------------------ manual control
    def get_accumulated_emissions(self) -> float:
        """Emissions not offset yet, in kg CO2eq (>= 0).

        Read from the ledger for this account (environment + key): it includes
        the remainder below one pound carried from earlier offsets and runs,
        and excludes offsets in flight.
        """
        return (
            float(self._session.ledger.balance(self.config.account).pending_kg)
            if self._session.ledger
            else 0.0
        )

    def manual_offset(self, *, round_up: bool = False, timeout: float | None = None) -> bool:
        """Offset what is pending now, whatever ``offset_threshold`` and ``auto_offset`` say.

        Buys the whole pounds the pending emissions cover (1 lb = 0.45359237 kg);
        the remainder stays pending. With ``round_up`` it buys the next whole
        pound instead and keeps the overshoot as a credit. Never raises for
        service failures: they are logged and ``False`` is returned.

        Args:
            round_up: buy ``ceil(pending / 0.45359237)`` pounds (at least 1 lb
                when anything is pending).
            timeout: seconds to wait for the purchase (> 0; default
                ``offset_timeout``). An offset still unconfirmed by then stays
                in the ledger and is settled later, never bought twice.

        Returns:
            ``True`` when an offset was bought (confirmed by the API) during
            the call, ``False`` otherwise (the reason is logged).
        """
        try:
            pending_kg = self.get_accumulated_emissions()
            if pending_kg <= 0:
                logger.warning("manual_offset: nothing to offset, no emissions are pending")
                return False
            if not round_up and whole_lb_floor(pending_kg) < 1:
                logger.warning(
                    "manual_offset: %.6g kg CO2eq pending is less than one whole pound (%.8g kg), the smallest "
                    "offset; nothing was bought and it stays pending. Use manual_offset(round_up=True) to buy 1 lb now",
                    pending_kg,
                    KG_PER_LB,
                )
                return False
            wait_s = self.config.offset_timeout if timeout is None else float(timeout)
            before = len(self._session.outcomes)
            self._session.offset_now(round_up=round_up, respect_threshold=False)
            finished = self._session.wait(wait_s)
            new = self._session.outcomes[before:]
            if any(outcome.state == OffsetState.CONFIRMED for outcome in new):
                return True
            if not finished:
                logger.warning(
                    "manual_offset: the offset did not finish within %g s; it continues in the background and "
                    "stays in the ledger until settled (it is never bought twice)",
                    wait_s,
                )
            elif new:
                logger.warning(
                    "manual_offset: nothing was bought (%s); the emissions stay pending",
                    "; ".join(f"{o.amount_lb} lb {o.state}: {o.error}" for o in new),
                )
            else:
                logger.warning(
                    "manual_offset: nothing was bought; the emissions stay pending. See the earlier log messages "
                    "(offset_api_key refused, or another process is offsetting this account)"
                )
            return False
        except Exception as exc:  # noqa: BLE001
            logger.warning("manual_offset: nothing was bought (%s: %s)", type(exc).__name__, exc)
            return False

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for background offsets, at most ``timeout`` s (default ``offset_timeout``).

        Returns:
            ``True`` when none is left in flight.
        """
        return self._session.wait(timeout)

    def report(self) -> RunReport:
        """The current run's :class:`~carbonoffset.core.session.RunReport` (emissions, pounds bought, pending)."""
        return self._session.report()

    def close(self) -> None:
        """Finish the run if needed and close the ledger (after any offset still in flight). Never raises."""
        self.finish()
        try:
            self._session.close()
        except Exception:  # noqa: BLE001
            self._warn_once("close", "carbonoffset could not close its ledger", exc_info=True)



# ------------------------------------------------------------------------ trackers
@contextlib.contextmanager
def _keeping_signal_handlers() -> Iterator[None]:
    """Keep the process's SIGINT/SIGTERM handlers: with ``allow_multiple_runs = false`` CodeCarbon's
    lock replaces them (on the main thread) with one that raises ``SystemExit(1)``, so the user's
    handler never ran and Ctrl-C stopped raising ``KeyboardInterrupt``. CodeCarbon still removes its
    lock file at ``stop()`` and at exit (``atexit``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None and signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)


def _positional_to_keywords(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    if len(args) > len(_TRACKER_ARGUMENTS):
        raise TypeError(f"CodeCarbon's tracker takes at most {len(_TRACKER_ARGUMENTS)} positional arguments")
    merged = dict(kwargs)
    for name, value in zip(_TRACKER_ARGUMENTS, args, strict=False):
        if name in merged:
            raise TypeError(f"got multiple values for argument {name!r}")
        merged[name] = value
    return merged


class _OffsetMixin:
    """The trackers' part: adds the offset handler and brackets CodeCarbon's ``start()``/``stop()``
    with its run; no accounting here."""

    offset_handler: OneClickImpactOutput | None
    offset_config: OffsetConfig

    @_method_taking(_offset_arguments)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        args, explicit, kwargs = _offset_arguments(*args, **kwargs)
        kwargs = _positional_to_keywords(args, kwargs)
        origins: dict[str, str] = {}
        self.offset_config = OffsetConfig.resolve(**explicit, origins=origins)
        self.offset_handler = None
        user_handlers = kwargs.get("output_handlers")
        if self.offset_config.can_offset:
            self.offset_handler = OneClickImpactOutput(self.offset_config)
        elif explicit or any(key.startswith(("offset_", "auto_offset")) for key in origins):
            logger.warning(
                "offset settings were given but offset_api_key is not set: this tracker measures like plain "
                "CodeCarbon and offsets nothing. Set offset_api_key (argument, CODECARBON_OFFSET_API_KEY or "
                ".codecarbon.config) to offset"
            )
        # CodeCarbon appends its own handlers to the list it is given: always hand it a fresh one.
        if user_handlers is not None or self.offset_handler is not None:
            handlers = list(user_handlers or [])
            if self.offset_handler is not None:
                handlers.append(self.offset_handler)
            kwargs["output_handlers"] = handlers
        with _keeping_signal_handlers():
            super().__init__(**kwargs)
        if self.offset_handler is not None:
            project = getattr(self, "_project_name", None)
            self.offset_handler.label = f"codecarbon:{project}" if project else "codecarbon"

    def _refused_by_lock(self) -> bool:
        """CodeCarbon refused this tracker (``allow_multiple_runs = false`` and its lock file exists:
        another CodeCarbon run, or one killed before it removed the file). Warned once, naming the file."""
        if not getattr(self, "_another_instance_already_running", False):
            return False
        lock = getattr(getattr(self, "_lock", None), "lockfile_path", None) or "CodeCarbon's lock file"
        logger.warning(
            "CodeCarbon refused to start: lock file %s exists (allow_multiple_runs = false; another "
            "CodeCarbon run holds it, or a killed one left it). This run is not measured; it is recorded as "
            "'unmeasured', never as zero. Delete the file if no other CodeCarbon run is going on, or set "
            "allow_multiple_runs = true",
            lock,
        )
        return True

    # The tracker's own start() and stop() (next in the MRO), with the offset run around them.
    def start(self) -> None:
        handler = self.offset_handler
        if handler is not None:
            handler.begin(str(getattr(self, "run_id", "") or ""))
            if self._refused_by_lock():
                handler.abort("unmeasured")  # CodeCarbon's own start() below measures nothing
        super().start()  # type: ignore[misc]

    def stop(self) -> float | None:
        emissions_kg: float | None = super().stop()  # type: ignore[misc]
        if self.offset_handler is not None:
            self.offset_handler.finish()  # a no-op when CodeCarbon already called exit()
        return emissions_kg

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        # a block that raised is a failed (or, for Ctrl-C, interrupted) run, as a failed fit is
        if exc_type is not None and self.offset_handler is not None:
            self.offset_handler.failed(_failure_status(exc_type))
        super().__exit__(exc_type, exc, tb)  # type: ignore[misc]


def _failure_status(exc_type: type[BaseException]) -> str:
    """The ledger status of a run whose measured code raised ``exc_type``."""
    return "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=80, initial_indent=" " * 8, subsequent_indent=" " * 12)


_TRACKER_DOC_ARGS = f"""
    Args:
        *args, **kwargs: every argument of CodeCarbon's tracker, unchanged
            (``project_name``, ``measure_power_secs``, ``output_dir``,
            ``output_handlers``, ...). A list given as ``output_handlers`` is
            copied, never modified.
{_wrap(', '.join(OFFSET_ARGUMENTS) + ':')} the offset settings (keyword-only;
            ``None``: not given), each the
            :class:`~carbonoffset.core.config.OffsetConfig` field of that name:
            its type, unit, valid range and default are documented there, and in
            the Parameters table of ``docs/codecarbon.md``. Without a key
            (argument, ``CODECARBON_OFFSET_API_KEY`` or ``.codecarbon.config``)
            the tracker is plain CodeCarbon; with ``auto_offset=False``, call
            ``tracker.offset_handler.manual_offset()``.

    Each offset setting may also come from a ``CODECARBON_<NAME>`` environment
    variable or the ``[codecarbon]`` section of ``./.codecarbon.config`` /
    ``~/.codecarbon.config``; arguments win.

    Attributes:
        offset_handler: the :class:`OneClickImpactOutput` added to the
            tracker's output handlers, or ``None`` without a key.
        offset_config: the resolved :class:`~carbonoffset.core.config.OffsetConfig`.

    Raises:
        ValueError: invalid offset settings (e.g. ``offset_threshold < 0.5`` or
            an ``offset_environment`` other than "production"/"sandbox").
        ImportError: a key is configured but ``makeimpact`` is not installed.
"""


class EmissionsTracker(_OffsetMixin, _cc.EmissionsTracker):
    __doc__ = (
        """CodeCarbon's ``EmissionsTracker`` (online location look-up) that also offsets what it measures.

    ``start()``, ``flush()`` and ``stop()`` behave and return exactly as in
    CodeCarbon (``stop()`` returns the run's emissions in kg CO2eq); with a key
    configured, ``stop()`` also makes the final offset and waits for it at most
    ``offset_timeout`` seconds.
"""
        + _TRACKER_DOC_ARGS
        + """
    Example::

        tracker = EmissionsTracker(offset_api_key="test_...", offset_environment="sandbox")
        tracker.start()
        train()
        emissions_kg = tracker.stop()
"""
    )


class OfflineEmissionsTracker(_OffsetMixin, _cc.OfflineEmissionsTracker):
    __doc__ = (
        """CodeCarbon's ``OfflineEmissionsTracker`` (no network for the carbon intensity) that also offsets.

    Takes CodeCarbon's offline arguments (``country_iso_code`` such as
    ``"FRA"``, ``region``, ``cloud_provider``, ``cloud_region``) and behaves
    like :class:`EmissionsTracker` otherwise.
"""
        + _TRACKER_DOC_ARGS
        + """
    Example::

        tracker = OfflineEmissionsTracker(country_iso_code="FRA", offset_environment="sandbox")
        with tracker:
            train()
"""
    )


# ----------------------------------------------------------------------- decorator
#: CodeCarbon's decorator's parameters after ``fn``, in its positional order (3.3.2: ``project_name``,
#: ``measure_power_secs``, ..., ``offline``, ``country_iso_code``, ...), read from CodeCarbon itself.
_DECORATOR_ARGUMENTS: tuple[str, ...] = tuple(inspect.signature(_cc.track_emissions).parameters)[1:]

#: Arguments CodeCarbon's decorator passes to the online tracker only (it drops them for the offline one).
_ONLINE_ONLY_ARGUMENTS: tuple[str, ...] = (
    "api_call_interval",
    "api_endpoint",
    "api_key",
    "save_to_api",
    "emissions_endpoint",
    "experiment_id",
    "experiment_name",
)


def _decorator_keywords(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """CodeCarbon's positional decorator arguments (after ``fn``) as keywords, checked like Python would."""
    if len(args) > len(_DECORATOR_ARGUMENTS):
        raise TypeError(
            f"track_emissions takes at most {len(_DECORATOR_ARGUMENTS) + 1} positional arguments "
            f"(fn and CodeCarbon's {len(_DECORATOR_ARGUMENTS)}), got {len(args) + 1}"
        )
    merged = dict(kwargs)
    for name, value in zip(_DECORATOR_ARGUMENTS, args, strict=False):
        if name in merged:
            raise TypeError(f"track_emissions got multiple values for argument {name!r}")
        merged[name] = value
    unknown = sorted(set(merged) - set(_DECORATOR_ARGUMENTS))
    if unknown:
        raise TypeError(f"track_emissions got unexpected keyword argument(s) {unknown}")
    return merged


def _choose_tracker(codecarbon_kwargs: dict[str, Any]) -> tuple[type[_OffsetMixin], dict[str, Any]]:
    """CodeCarbon 3.3.2's choice for one call of a decorated function.

    Offline exactly when ``offline`` is true, and then only with a location
    (``country_iso_code`` or ``cloud_provider``, given to the decorator or
    configured); else the online tracker, to which CodeCarbon passes no
    location argument.

    Raises:
        ValueError: ``offline=True`` without a location (CodeCarbon raises ``Exception``
            at the same moment: when the function is called).
    """
    kwargs = dict(codecarbon_kwargs)
    offline = kwargs.pop("offline", None)
    if offline:
        configured = read_external_settings()  # CodeCarbon's location setting, not an offset setting
        located = any(
            kwargs.get(name) is not None or configured.get(name)
            for name in ("country_iso_code", "cloud_provider")
        )
        if not located:
            raise ValueError(
                "track_emissions(offline=True) needs the location: pass country_iso_code (e.g. 'FRA'), set "
                "CODECARBON_COUNTRY_ISO_CODE, or pass cloud_provider and cloud_region"
            )
        return OfflineEmissionsTracker, {k: v for k, v in kwargs.items() if k not in _ONLINE_ONLY_ARGUMENTS}
    return EmissionsTracker, {k: v for k, v in kwargs.items() if k not in _OFFLINE_ARGUMENTS}


@overload
def track_emissions(fn: F) -> F: ...


@overload
@_decorator_factory_taking(_offset_arguments)
def track_emissions(*args: Any, **kwargs: Any) -> _Decorator: ...


def track_emissions(fn: Callable[..., Any] | None = None, *args: Any, **kwargs: Any) -> Any:
    """CodeCarbon's ``track_emissions`` decorator, offsetting what it measures.

    It behaves as CodeCarbon 3.3.2's: the same parameters in the same
    positional order (``track_emissions(fn=None, project_name=...,
    measure_power_secs=..., ..., offline=..., country_iso_code=..., ...)``),
    the same calling forms (``@track_emissions``, ``@track_emissions(...)``,
    ``track_emissions(None, "project")``), the same tracker choice and the
    same timing of errors; the offset settings are added as keyword-only
    arguments. Each call of the decorated function builds a new tracker,
    starts it, runs the function and stops the tracker in ``finally`` (final
    offset, bounded by ``offset_timeout``); the return value is unchanged. A
    call that raises is recorded as ``failed`` (``interrupted`` for Ctrl-C)
    with CodeCarbon's final figures and no final offset (see
    :meth:`OneClickImpactOutput.failed`), as is a tracker's ``with`` block.

    Tracker: :class:`OfflineEmissionsTracker` when ``offline=True``, else the
    online :class:`EmissionsTracker` (as in CodeCarbon, a ``country_iso_code``
    alone does not make it offline, and the online tracker ignores it and the
    other location arguments). For the offline tracker without a network
    look-up, pass ``offline=True, country_iso_code="FRA"``.

    Args:
        fn: the function (bare ``@track_emissions`` form), or ``None``.
        *args: CodeCarbon's decorator arguments after ``fn``, in its order.
        **kwargs: CodeCarbon's decorator arguments by name (``project_name``,
            ``measure_power_secs``, ``output_dir``, ``offline``,
            ``country_iso_code``, ...) and the offset settings
            (:data:`OFFSET_ARGUMENTS`, keyword-only), as for :class:`EmissionsTracker`.

    Returns:
        The decorated function, or a decorator.

    Raises:
        TypeError: at decoration, as Python raises for CodeCarbon's decorator: an
            argument name CodeCarbon's decorator does not have, too many
            positional arguments, or one given twice.
        ValueError: when the decorated function is called (where CodeCarbon raises
            too): ``offline=True`` without ``country_iso_code`` / ``cloud_provider``
            (given or configured), or an invalid offset setting
            (:class:`~carbonoffset.core.ConfigurationError`, naming the setting).

    Example::

        @track_emissions(project_name="train", offline=True, country_iso_code="FRA",
                         offset_environment="sandbox")
        def train():
            ...
    """
    if fn is not None and not callable(fn):
        raise TypeError(
            f"track_emissions: the first argument is the function to decorate or None (got {fn!r}); "
            "CodeCarbon's signature is track_emissions(fn=None, project_name=..., ...)"
        )
    _, settings, codecarbon_kwargs = _offset_arguments(**kwargs)
    kwargs = _decorator_keywords(args, codecarbon_kwargs)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapped(*call_args: Any, **call_kwargs: Any) -> Any:
            tracker_cls, tracker_kwargs = _choose_tracker(kwargs)
            tracker = tracker_cls(**tracker_kwargs, **settings)
            tracker.start()
            try:
                return func(*call_args, **call_kwargs)
            except BaseException as exc:
                if tracker.offset_handler is not None:  # recorded as failed, as a failed fit is
                    tracker.offset_handler.failed(_failure_status(type(exc)))
                raise
            finally:
                tracker.stop()
                if tracker.offset_handler is not None:
                    tracker.offset_handler.close()  # this tracker is not reachable afterwards

        return wrapped

    if fn is None:
        return decorate
    return decorate(fn)


def _signature() -> inspect.Signature:
    """CodeCarbon's decorator signature (its own defaults: "unset, read the configuration") plus the
    offset settings, so ``help()`` and ``inspect.signature`` show what the decorator accepts."""
    return inspect.Signature([*inspect.signature(_cc.track_emissions).parameters.values(), *_offset_parameters()])


track_emissions.__signature__ = _signature()  # type: ignore[attr-defined]
