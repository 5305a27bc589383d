"""Local rank 0's side of a run: its emissions source, started, read and stopped once per run.

A source that fails to start leaves the run *unmeasured* (never a measured zero); one that
fails to read or stop keeps the figures last recorded. Each failure is logged once and never
raised into training. Where measured figures meet the estimate of a late-starting tracker
(:attr:`~carbonoffset.core.sources.Measurement.estimated_kg`) is the source's business; the run
only stores how late it started (:meth:`RunTracker.details`).
"""

from __future__ import annotations

from typing import Any

from carbonoffset.core.meter import MeterSource
from carbonoffset.core.sources import EmissionsSource, Measurement
from carbonoffset.core.workers import Warn


class RunTracker:
    """The emissions source of one session, one run at a time.

    Args:
        source: the source; ``None`` builds a :class:`MeterSource` for ``country_iso_code``
            at the first :meth:`start`.
        country_iso_code: see :class:`~carbonoffset.core.config.OffsetConfig`.
        warn: the session's warn-once (see :data:`~carbonoffset.core.workers.Warn`).
    """

    def __init__(self, source: EmissionsSource | None, *, country_iso_code: str | None, warn: Warn) -> None:
        self.source = source
        self._country_iso_code = country_iso_code
        self._warn = warn
        self.failed = False  # the source did not start: the run is not measured
        self.final: Measurement | None = None  # the figures when the source stopped

    def reset(self) -> None:
        """A new run on a process that does not measure: nothing started, nothing failed."""
        self.failed = False
        self.final = None

    def start(self) -> None:
        """Start the source for a new run (logs once, and marks the run unmeasured, if it fails)."""
        self.reset()
        try:
            if self.source is None:
                self.source = MeterSource(country_iso_code=self._country_iso_code)
            self.source.start()
        except Exception as exc:  # noqa: BLE001
            self.failed = True  # not read or stopped in this run: one warning
            self._warn(
                "source",
                "emissions tracking failed to start (%s); training continues, this run is not "
                "measured (recorded as 'unmeasured')",
                exc,
            )

    def read(self, base: Measurement, fallback: Measurement) -> Measurement:
        """``base`` plus what the source measured so far; ``fallback`` when it cannot be read."""
        if self.source is None or self.failed:
            return fallback
        try:
            return base + self.source.read()
        except Exception as exc:  # noqa: BLE001
            self._warn("source", "reading emissions failed (%s); training continues", exc)
            return fallback

    def stop(self, base: Measurement, fallback: Measurement, *, measuring: bool) -> Measurement:
        """Stop the source (when ``measuring``: this process runs it) and return ``base`` plus its
        final figures, or ``fallback``. Idempotent: later calls return the first result."""
        if self.final is None:
            node = fallback
            if measuring and self.source is not None and not self.failed:
                try:
                    node = base + self.source.stop()
                except Exception as exc:  # noqa: BLE001
                    self._warn("source", "stopping the tracker failed (%s)", exc)
            self.final = node
        return self.final

    def details(self) -> dict[str, Any]:
        """What this run was measured on and where, for the ledger (see :meth:`Ledger.set_run_details`):
        the source's final :attr:`Measurement.details`, the carbonoffset version and, when the tracker
        started late, the seconds (``late_start_s``) and kg CO2eq (``late_start_kg``) estimated for it."""
        from carbonoffset import __version__

        final = self.final
        details: dict[str, Any] = {**(final.details if final is not None else {})}
        details["carbonoffset_version"] = __version__
        late_s = getattr(self.source, "late_start_s", 0.0)
        if isinstance(late_s, (int, float)) and late_s > 0:
            details["late_start_s"] = float(late_s)
            estimate = getattr(self.source, "late_start_estimate", None)
            details["late_start_kg"] = float(getattr(estimate, "emissions_kg", 0.0))
        return details
