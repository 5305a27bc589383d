"""Pictures of a ledger: cumulative emissions against offsets (``carbonoffset report --plot``).

One panel per account (environment + key fingerprint), each in one colour family: the
account's cumulative emissions as a solid step line, its confirmed offsets as a dashed step
line with a marker at each purchase, both carried to the time of the plot; the gap between
them is shaded (pending where emissions lead, credit where a rounded-up offset leads). The
mass axis is in SI-prefixed units (µg ... t); it turns logarithmic when the figures of a panel
span more than three decades (a run of micrograms next to a 1 lb offset), so both stay
visible. ``run_id`` draws one run instead: its cumulative emissions against the time since it
started, with the offsets it triggered.

Needs matplotlib (``pip install "carbonoffset[plot]"``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from carbonoffset.core.ledger import OPEN_STATES, Ledger, OffsetRecord, OffsetState, RunRecord
from carbonoffset.core.units import KG_PER_LB

#: (emissions, offsets, shading) colours of each account's family, in the order of
#: ``Ledger.accounts()`` (ColorBrewer's Blues, Oranges, Greens, Purples).
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("#08519c", "#4292c6", "#c6dbef"),
    ("#a63603", "#f16913", "#fdd0a2"),
    ("#006d2c", "#41ab5d", "#c7e9c0"),
    ("#54278f", "#807dba", "#dadaeb"),
)

_UNITS: tuple[tuple[float, str], ...] = ((1e3, "t"), (1.0, "kg"), (1e-3, "g"), (1e-6, "mg"), (1e-9, "µg"))
_LOG_DECADES = 3.0
_LINEAR_RATIO = 20.0


def mass_label(kg: float, digits: int = 3) -> str:
    """``kg`` with the SI prefix that keeps it readable: ``mass_label(2.5e-6) == '2.5 mg'``."""
    if kg == 0 or not math.isfinite(kg):
        return f"{kg:g} kg"
    for scale, unit in _UNITS:
        if abs(kg) >= scale * 0.9995:
            return f"{kg / scale:.{digits}g} {unit}"
    return f"{kg / 1e-9:.{digits}g} µg"


def _unit_for(kg: float) -> tuple[float, str]:
    for scale, unit in _UNITS:
        if kg >= scale:
            return scale, unit
    return _UNITS[-1]


def short_account(account: str) -> str:
    """``"sandbox:4f1d9c2a51e0b7aa"`` -> ``"sandbox · 4f1d9c2a"`` (the fingerprint's first 8 digits)."""
    environment, _, fingerprint = account.partition(":")
    return f"{environment} · {fingerprint[:8]}" if fingerprint != "no-key" else f"{environment} · no key"


def _when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.rstrip("Z")).replace(tzinfo=dt.timezone.utc)


@dataclasses.dataclass
class _Series:
    emitted: list[tuple[dt.datetime, float]]
    offsets: list[tuple[dt.datetime, float]]  # cumulative confirmed kg after each purchase
    in_flight: list[OffsetRecord]
    run_starts: list[dt.datetime] = dataclasses.field(default_factory=list)


def _offset_time(offset: OffsetRecord) -> dt.datetime:
    return _when(offset.time_utc or offset.created_utc)


def _account_series(book: Ledger, account: str) -> _Series:
    emitted = [(_when(t), kg) for t, kg in book.history(account)]
    total, offsets = 0.0, []
    for offset in sorted(book.offsets(account, states=(OffsetState.CONFIRMED,)), key=_offset_time):
        total += offset.amount_kg
        offsets.append((_offset_time(offset), total))
    in_flight = book.offsets(account, states=OPEN_STATES)
    starts = [_when(r.started_utc) for r in book.runs(account)]
    return _Series(emitted, offsets, in_flight, starts)


def _run_series(book: Ledger, run: RunRecord) -> tuple[_Series, bool]:
    """The run's cumulative emissions (exact when no other run of the account overlaps it;
    otherwise only its start and its total) and the offsets it triggered."""
    start = _when(run.started_utc)
    end = _when(run.ended_utc) if run.ended_utc else None
    others = [
        r
        for r in book.runs(run.account)
        if r.run_id != run.run_id
        and _when(r.started_utc) <= (end or dt.datetime.max.replace(tzinfo=dt.timezone.utc))
        and (r.ended_utc is None or _when(r.ended_utc) >= start)
    ]
    exact = not others and run.segments == 1
    emitted: list[tuple[dt.datetime, float]] = [(start, 0.0)]
    if exact:
        before = 0.0
        for when, kg in ((_when(t), kg) for t, kg in book.history(run.account)):
            if when < start:
                before = kg
            elif end is None or when <= end:
                emitted.append((when, kg - before))
    else:
        emitted.append((end or start, run.emissions_kg))
    total, offsets = 0.0, []
    for offset in sorted(book.offsets(run_id=run.run_id, states=(OffsetState.CONFIRMED,)), key=_offset_time):
        total += offset.amount_kg
        offsets.append((_offset_time(offset), total))
    in_flight = book.offsets(run_id=run.run_id, states=OPEN_STATES)
    return _Series(emitted, offsets, in_flight), exact


def _steps(points: Sequence[tuple[dt.datetime, float]], until: dt.datetime) -> tuple[list[Any], list[float]]:
    xs = [p[0] for p in points] + [until]
    ys = [p[1] for p in points] + [points[-1][1]]
    return xs, ys


def _identity(value: Any) -> Any:
    return value


def _value_at(points: Sequence[tuple[dt.datetime, float]], when: dt.datetime) -> float:
    value = 0.0
    for t, kg in points:
        if t > when:
            break
        value = kg
    return value


def _draw_panel(
    ax: Any,
    series: _Series,
    family: tuple[str, str, str],
    *,
    until: dt.datetime,
    title: str,
    subtitle: str,
    x: Any = None,
) -> None:
    """Draw one panel; ``x`` maps a time to the plotted abscissa (default: the time itself)."""
    import numpy as np

    if x is None:
        x = _identity
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    dark, medium, light = family
    values = [kg for _, kg in series.emitted + series.offsets if kg > 0]
    top = max(values, default=0.0)
    bottom = min(values, default=0.0)
    finals = [points[-1][1] for points in (series.emitted, series.offsets) if points and points[-1][1] > 0]
    # logarithmic when the figures span more than three decades, or when one line would sit
    # in the bottom twentieth of a linear axis (micrograms emitted against a 1 lb offset)
    log = bool(values) and (
        top / bottom > 10**_LOG_DECADES or (len(finals) == 2 and max(finals) / min(finals) > _LINEAR_RATIO)
    )
    scale, unit = (1.0, "kg") if log else _unit_for(top or 1.0)

    def y(kg: float) -> float:
        return kg / scale

    if series.emitted:
        xs, ys = _steps(series.emitted, until)
        ax.step(
            [x(t) for t in xs],
            [y(v) for v in ys],
            where="post",
            color=dark,
            linewidth=2.0,
            label="emitted (cumulative)",
        )
    if series.offsets:
        start = series.emitted[0][0] if series.emitted else series.offsets[0][0]
        points = [(min(start, series.offsets[0][0]), 0.0), *series.offsets]
        xs, ys = _steps(points, until)
        ax.step(
            [x(t) for t in xs],
            [y(v) for v in ys],
            where="post",
            color=medium,
            linewidth=1.8,
            linestyle=(0, (5, 2)),
            label="offset, confirmed (cumulative)",
        )
        ax.plot(
            [x(t) for t, _ in series.offsets],
            [y(v) for _, v in series.offsets],
            linestyle="none",
            marker="o",
            markersize=6,
            markerfacecolor=medium,
            markeredgecolor=dark,
            label="purchase",
        )
    # shade the gap: pending where emissions lead, credit where offsets lead
    if series.emitted:
        grid = sorted({t for t, _ in series.emitted} | {t for t, _ in series.offsets} | {until})
        emitted = np.array([y(_value_at(series.emitted, t)) for t in grid])
        offset = np.array([y(_value_at(series.offsets, t)) for t in grid])
        floor = y(bottom) / 3 if log else 0.0
        lower = np.maximum(offset, floor)
        pending = np.maximum(emitted, lower)  # zero height where nothing is pending
        xs_grid = [x(t) for t in grid]
        if (pending > lower).any():
            ax.fill_between(
                xs_grid,
                lower,
                pending,
                step="post",
                color=light,
                linewidth=0,
                label="pending (not offset yet)",
            )
        upper = np.maximum(emitted, floor)
        credit = np.maximum(offset, upper)
        if (credit > upper).any():
            ax.fill_between(
                xs_grid,
                upper,
                credit,
                step="post",
                facecolor="none",
                edgecolor=light,
                hatch="///",
                linewidth=0,
                label="credit (offset ahead)",
            )
    if series.run_starts:
        ax.plot(
            [x(t) for t in series.run_starts],
            [0.0] * len(series.run_starts),
            linestyle="none",
            marker="^",
            markersize=5,
            color="#888888",
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            label="run start",
        )
    if series.in_flight:
        ax.plot(
            [x(_when(o.created_utc)) for o in series.in_flight],
            [
                y(max(bottom, _value_at(series.offsets, _when(o.created_utc)) + o.amount_kg))
                for o in series.in_flight
            ],
            linestyle="none",
            marker="o",
            markersize=6,
            markerfacecolor="white",
            markeredgecolor=dark,
            label="offset not confirmed yet",
        )

    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom / 3, top * 3)
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: mass_label(v)))
        ax.set_ylabel("CO2eq (log scale)")
    else:
        ax.set_ylim(0, (y(top) or 1.0) * 1.12)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.set_ylabel(f"CO2eq ({unit})")
    ax.grid(True, which="major", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    # the title, and under it the figures, both left-aligned above the data (a right-aligned
    # subtitle would run into a long title)
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold", color=dark, pad=17)
    ax.text(0.0, 1.02, subtitle, transform=ax.transAxes, ha="left", va="bottom", fontsize=9, color="#444444")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)


def _account_subtitle(book: Ledger, account: str) -> str:
    balance = book.balance(account)
    runs = book.runs(account)
    bought_lb = sum(o.amount_lb for o in book.offsets(account, states=(OffsetState.CONFIRMED,)))
    parts = [
        f"{len(runs)} run{'' if len(runs) == 1 else 's'}",
        f"emitted {mass_label(balance.recorded_kg)}",
        f"offset {bought_lb} lb ({mass_label(bought_lb * KG_PER_LB)})",
    ]
    in_flight_lb = sum(o.amount_lb for o in book.offsets(account, states=OPEN_STATES))
    if in_flight_lb:
        parts.append(f"{in_flight_lb} lb in flight")
    if balance.pending_kg > 0:
        parts.append(f"pending {mass_label(balance.pending_kg)}")
    if balance.credit_kg > 0:
        parts.append(f"credit {mass_label(balance.credit_kg)}")
    return " · ".join(parts)


def plot_ledger(
    book: Ledger, target: Path, *, run_id: str | None = None, now: dt.datetime | None = None
) -> int:
    """Write a PNG of ``book`` to ``target`` (see the module docstring).

    Args:
        book: an open ledger.
        target: the PNG to write (``.png``; another suffix matplotlib knows, e.g. ``.svg``,
            writes that format).
        run_id: draw this run only (a run id, a unique prefix of one, or ``"latest"``, as ``carbonoffset
            report --json`` shows it).
        now: the time the lines are carried to (default: now, UTC).

    Returns:
        The number of panels drawn (0: nothing recorded yet, no file written).

    Raises:
        ImportError: matplotlib is not installed.
        KeyError: no run (or more than one) matches ``run_id``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    now = now or dt.datetime.now(dt.timezone.utc)
    panels: list[tuple[_Series, str, str, tuple[str, str, str]]] = []
    accounts = book.accounts()
    elapsed: Callable[[dt.datetime], float] | None = None
    if run_id is not None:
        from carbonoffset.core.card import resolve_run_id

        resolved = book.run(resolve_run_id(book, run_id))
        if resolved is None:  # resolve_run_id names only runs the ledger holds
            raise KeyError(f"no run {run_id!r} in the ledger {book.location}")
        run = resolved
        series, exact = _run_series(book, run)
        until = _when(run.ended_utc) if run.ended_utc else now
        family = (
            FAMILIES[accounts.index(run.account) % len(FAMILIES)] if run.account in accounts else FAMILIES[0]
        )
        bought_lb = sum(o.amount_lb for o in book.offsets(run_id=run.run_id, states=(OffsetState.CONFIRMED,)))
        subtitle = (
            f"{run.status} · {run.epochs} epoch{'' if run.epochs == 1 else 's'} · emitted "
            f"{mass_label(run.emissions_kg)} ({run.energy_kwh:.3g} kWh) · offset {bought_lb} lb"
        )
        if not exact:
            subtitle += " · start and total only (other runs overlapped)"
        title = f"run {run.run_id[:8]}" + (f" · {run.label}" if run.label else "")
        heading_extra = f" · {short_account(run.account)}"
        started = _when(run.started_utc)
        seconds = max((until - started).total_seconds(), 1e-3)
        step_s, time_unit = next(
            (u for u in ((3600.0, "h"), (60.0, "min")) if seconds >= 3 * u[0]), (1.0, "s")
        )

        def since_start(when: dt.datetime) -> float:
            return (when - started).total_seconds() / step_s

        elapsed = since_start

        panels.append((series, title, subtitle, family))
    else:
        until = now
        heading_extra, time_unit = "", ""
        for index, account in enumerate(accounts):
            series = _account_series(book, account)
            if not series.emitted and not series.offsets:
                continue
            panels.append(
                (
                    series,
                    short_account(account),
                    _account_subtitle(book, account),
                    FAMILIES[index % len(FAMILIES)],
                )
            )
    if not panels:
        return 0
    # The lines are carried to now. When nothing happened for a long while (plotted days after
    # training), the axis ends shortly after the last entry instead, so the data keeps its width,
    # and the right edge says that nothing changed from there to now.
    events = [t for series, *_ in panels for t, _ in series.emitted + series.offsets]
    first, last = min(events), max(events)
    quiet = until - last
    idle_note = None
    if quiet > max((last - first) * 0.25, dt.timedelta(seconds=30)):
        until = last + max((last - first) * 0.06, dt.timedelta(seconds=1))
        idle_note = f"the lines are flat from {last:%H:%M:%S} on; the axis stops there"

    fig, axes = plt.subplots(
        len(panels), 1, figsize=(10, 1.2 + 2.9 * len(panels)), sharex=True, squeeze=False
    )
    for ax, (series, title, subtitle, family) in zip(axes[:, 0], panels, strict=True):
        _draw_panel(ax, series, family, until=until, title=title, subtitle=subtitle, x=elapsed)
    bottom_ax = axes[-1, 0]
    if elapsed is None:
        # minticks=3: with matplotlib's intervals, every span from seconds to decades then gets
        # 3 to 9 ticks (with 5, a span of 3-5 h found no interval and warned)
        locator = mdates.AutoDateLocator(minticks=3, maxticks=9)  # type: ignore[no-untyped-call]
        bottom_ax.xaxis.set_major_locator(locator)
        bottom_ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=dt.timezone.utc))  # type: ignore[no-untyped-call]
        bottom_ax.set_xlabel("time (UTC)")
    else:
        bottom_ax.set_xlim(left=0)
        bottom_ax.set_xlabel(
            f"time since the run started ({time_unit}; it started {_when(run.started_utc):%Y-%m-%d %H:%M:%S} UTC)"
        )
    heading = "Cumulative emissions and offsets" + (" of one run" if run_id else "")
    top_in = 0.5  # room for the two heading lines, in inches
    height = fig.get_figheight()
    fig.suptitle(
        # a team ledger: its URL, password masked
        f"{heading} · {book.path.name if book.path is not None else book.location}{heading_extra}",
        x=0.01,
        y=1 - 0.12 / height,
        ha="left",
        va="top",
        fontsize=12,
    )
    fig.text(
        0.01,
        1 - 0.42 / height,
        f"drawn {now:%Y-%m-%d %H:%M} UTC; lines carried to "
        + (
            "the run's end"
            if run_id is not None
            else f"{until:%H:%M:%S} UTC (nothing changed after {last:%H:%M:%S})"
            if idle_note
            else "now"
        ),
        ha="left",
        va="top",
        fontsize=9,
        color="#444444",
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - top_in / height))
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return len(panels)
