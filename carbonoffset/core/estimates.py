"""The power and carbon intensity live figures are estimated at, before CodeCarbon's first reading.

A :class:`~carbonoffset.core.meter.MeterSource` extrapolates the time its
measuring process has not measured yet (its first seconds, and the time since
its last reading) at a power and a carbon intensity (see :func:`prior`):

1. **measured** in this run, once the measuring process sent its first reading
   (CodeCarbon's power, CPU + GPU + RAM, and the run's intensity so far);
2. else **remembered**: the average power and intensity of the last run
   measured on this machine with the same settings (the measuring process
   writes them to :data:`POWER_CACHE` at the end of every run, like the CPU
   model, see :mod:`carbonoffset.core.user_cache`). When CodeCarbon computed
   the CPU's power from the machine's CPU load (its ``cpu_load`` mode, used
   without RAPL), the load is kept with it and the CPU part is moved to the
   load of this run so far (:meth:`PowerEstimate.at_load`);
3. else CodeCarbon's own **defaults**, computed here without importing it:
   :data:`DEFAULT_W_PER_THREAD` per CPU thread (CodeCarbon's
   ``DEFAULT_POWER_PER_CORE``, used for a CPU it does not know),
   :data:`RAM_W_PER_DIMM` per memory module estimated from the memory size
   (CodeCarbon 3's RAM model, x86), and the carbon intensity of the configured
   country from CodeCarbon's ``global_energy_mix.json`` (its world average
   without a country).

This module never imports CodeCarbon (the training process must not pay for it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from carbonoffset.core.units import BYTES_PER_GIB, G_PER_KG, J_PER_KWH
from carbonoffset.core.user_cache import JsonCacheFile, machine_key

logger = logging.getLogger(__name__)

#: File (in the user cache folder) where the power last measured on this machine is kept.
POWER_CACHE = "power.json"
#: CodeCarbon's default CPU power per thread for a CPU it does not know, W (``DEFAULT_POWER_PER_CORE``).
DEFAULT_W_PER_THREAD = 4.0
#: CodeCarbon 3's power per memory module on x86, W (``RAM_SLOT_POWER_X86``).
RAM_W_PER_DIMM = 5.0
#: CodeCarbon's world-average carbon intensity, kg CO2eq/kWh (``carbon_intensity_per_source.json``,
#: ``world_average`` 475 g/kWh); used when its data file cannot be read.
WORLD_KG_PER_KWH = 0.475
#: Settings that change the power CodeCarbon measures or the intensity it applies.
_KEYED_ARGS = (
    "tracking_mode",
    "gpu_ids",
    "force_cpu_power",
    "force_ram_power",
    "force_mode_cpu_load",
    "force_carbon_intensity_g_co2e_kwh",
    "region",
    "cloud_provider",
    "cloud_region",
)


@dataclasses.dataclass(frozen=True)
class PowerEstimate:
    """A power and an intensity to estimate unmeasured time at.

    Attributes:
        power_w: CPU + GPU + RAM power, W (> 0).
        kg_per_kwh: carbon intensity, kg CO2eq per kWh (> 0).
        origin: ``"measured"``, ``"remembered"`` or ``"default"`` (see the module notes).
    """

    power_w: float
    kg_per_kwh: float
    origin: str
    #: The CPU's part of :attr:`power_w`, W, and the machine's mean CPU load (0..1) it was measured
    #: at, when CodeCarbon computed the CPU power from the load (its ``cpu_load`` mode); else ``None``.
    cpu_w: float | None = None
    cpu_load: float | None = None

    def energy_kwh(self, seconds: float) -> float:
        """Energy of ``seconds`` at :attr:`power_w`, kWh."""
        return self.power_w * max(0.0, seconds) / J_PER_KWH

    def at_load(self, cpu_load: float | None) -> float:
        """:attr:`power_w` moved to the machine's CPU load now (0..1), W.

        For a power remembered from a run in CodeCarbon's ``cpu_load`` mode, the CPU part is
        scaled along CodeCarbon's own load curve, ``TDP * (0.1 + 0.9 * load**3)``
        (``codecarbon.external.hardware.CPU._get_power_from_cpu_load``, machine mode): a run
        remembered under a busy machine no longer over-estimates a quiet one. Otherwise (or with
        ``cpu_load`` ``None``) :attr:`power_w` as it is.
        """
        if self.cpu_w is None or self.cpu_load is None or cpu_load is None:
            return self.power_w
        tdp_w = self.cpu_w / load_curve(self.cpu_load)
        return max(0.0, self.power_w - self.cpu_w) + tdp_w * load_curve(cpu_load)


def load_curve(cpu_load: float) -> float:
    """CodeCarbon's share of a CPU's TDP drawn at ``cpu_load`` (0..1, clamped) in its ``cpu_load``
    mode: ``0.1 + 0.9 * load**3`` (0.1 .. 1.0)."""
    load = min(1.0, max(0.0, cpu_load))
    return 0.1 + 0.9 * load**3


def busy_times() -> tuple[float, float] | None:
    """The machine's ``(busy, total)`` CPU time so far, s (Linux ``/proc/stat``, every core summed;
    busy leaves out idle and iowait, like psutil's ``cpu_percent``), or ``None`` elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as file:
            fields = [int(v) for v in file.readline().split()[1:]]
        total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
        tick = float(os.sysconf("SC_CLK_TCK"))
        return (total - fields[3] - fields[4]) / tick, total / tick
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def load_between(start: tuple[float, float] | None, end: tuple[float, float] | None) -> float | None:
    """The machine's mean CPU load (0..1) between two :func:`busy_times` readings, or ``None``."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return min(1.0, max(0.0, (end[0] - start[0]) / (end[1] - start[1])))


#: What unmeasured time is estimated at when nothing better is known yet (the few milliseconds
#: before :func:`prior` answers, or when it fails): the defaults of :func:`default` for a machine
#: with two memory modules.
FIRST_GUESS = PowerEstimate(
    DEFAULT_W_PER_THREAD * (os.cpu_count() or 1) + 2 * RAM_W_PER_DIMM, WORLD_KG_PER_KWH, "default"
)

_powers = JsonCacheFile(POWER_CACHE)


@functools.lru_cache(maxsize=1)
def _machine() -> str:
    return machine_key()


def settings_key(country_iso_code: str | None, tracker_kwargs: dict[str, Any]) -> str:
    """The cache key of a machine and the settings that change its figures."""
    keyed = {k: tracker_kwargs[k] for k in _KEYED_ARGS if k in tracker_kwargs}
    env = {k: v for k, v in os.environ.items() if k.startswith("CODECARBON_")}
    return json.dumps([_machine(), country_iso_code, keyed, sorted(env.items())], default=str)


def remembered(key: str) -> PowerEstimate | None:
    """The power and intensity last measured on this machine with these settings, or ``None``."""
    try:
        entry = _powers.read()[key]
        power_w, kg_per_kwh = float(entry["power_w"]), float(entry["kg_per_kwh"])
        cpu_w, cpu_load = entry.get("cpu_w"), entry.get("cpu_load")
    except Exception:  # noqa: BLE001 -- no cache yet, or unreadable: the defaults apply
        return None
    if not (0 < power_w < 1e6 and 0 < kg_per_kwh < 10):
        return None
    if not (isinstance(cpu_w, (int, float)) and 0 < cpu_w <= power_w and isinstance(cpu_load, (int, float))
            and 0 <= cpu_load <= 1):
        cpu_w = cpu_load = None  # an older entry, or not in CodeCarbon's cpu_load mode: not scaled
    return PowerEstimate(power_w, kg_per_kwh, "remembered", cpu_w, cpu_load)


_write_lock = threading.Lock()


def remember(
    key: str, *, power_w: float, kg_per_kwh: float, cpu_w: float | None = None, cpu_load: float | None = None
) -> None:
    """Keep a run's average power (W) and intensity (kg/kWh) for the next runs on this machine,
    with the CPU's part of that power (W) and the machine's mean CPU load (0..1) when CodeCarbon
    computed the CPU power from the load (see :meth:`PowerEstimate.at_load`).

    Called by the measuring process at the end of each run; never raises.
    """
    if not (0 < power_w < 1e6 and 0 < kg_per_kwh < 10):
        return
    try:
        with _write_lock:
            known = _powers.read()
            entry: dict[str, float] = {"power_w": power_w, "kg_per_kwh": kg_per_kwh, "at": time.time()}
            if cpu_w is not None and cpu_load is not None:
                entry.update(cpu_w=cpu_w, cpu_load=cpu_load)
            known[key] = entry
            if len(known) > 64:  # keep the newest
                known = dict(sorted(known.items(), key=lambda kv: -float(kv[1].get("at", 0)))[:64])
            _powers.write(known)
    except Exception:  # noqa: BLE001 -- a cache only
        logger.debug("could not remember the measured power", exc_info=True)


def _dimms(total_gb: float) -> int:
    """CodeCarbon 3's estimate of the memory modules of a machine with ``total_gb`` GB."""
    if total_gb <= 2:
        return 1
    if total_gb <= 16:
        return 2
    if total_gb <= 64:
        return 4
    if total_gb <= 128:
        return 8
    for size in (128, 64, 32, 16, 8, 4):
        if size <= total_gb / 8:
            return min(32, -(-int(total_gb) // size))
    return 8


def ram_w(total_gb: float) -> float:
    """CodeCarbon 3's RAM power for ``total_gb`` GB of memory, W (:data:`RAM_W_PER_DIMM` per
    estimated module, less per module beyond 4, 8 and 16; at least two modules' worth)."""
    n = _dimms(total_gb)
    w = RAM_W_PER_DIMM
    parts = [min(n, 4) * w, max(0, min(n, 8) - 4) * w * 0.9, max(0, min(n, 16) - 8) * w * 0.8]
    parts.append(max(0, n - 16) * w * 0.7)
    return max(2 * w, sum(parts))


def memory_gb() -> float:
    """This machine's memory size, GiB (16 where the system cannot tell, not POSIX)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / BYTES_PER_GIB
    except (AttributeError, ValueError, OSError):  # not POSIX
        return 16.0


@functools.lru_cache(maxsize=32)
def _country_kg_per_kwh(country_iso_code: str | None) -> float:
    """The carbon intensity CodeCarbon's offline data gives a country (its world average for
    ``None`` or a country it lacks), read from its data files without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("codecarbon")  # finds the package, runs none of it
        assert spec is not None and spec.submodule_search_locations
        data = Path(next(iter(spec.submodule_search_locations))) / "data" / "private_infra"
        if country_iso_code:
            mix = json.loads((data / "global_energy_mix.json").read_text(encoding="utf-8"))
            entry = mix.get(country_iso_code.upper())
            if entry and float(entry.get("carbon_intensity", 0)) > 0:
                return float(entry["carbon_intensity"]) / G_PER_KG  # g/kWh in the file
        sources = json.loads((data / "carbon_intensity_per_source.json").read_text(encoding="utf-8"))
        return float(sources["world_average"]) / G_PER_KG
    except Exception:  # noqa: BLE001 -- another CodeCarbon layout
        return WORLD_KG_PER_KWH


def default(country_iso_code: str | None, tracker_kwargs: dict[str, Any]) -> PowerEstimate:
    """CodeCarbon's defaults for this machine (see the module notes; a few ms the first time)."""
    forced_cpu = tracker_kwargs.get("force_cpu_power")
    forced_ram = tracker_kwargs.get("force_ram_power")
    cpu_w = float(forced_cpu) if forced_cpu else DEFAULT_W_PER_THREAD * (os.cpu_count() or 1)
    ram_power_w = float(forced_ram) if forced_ram else ram_w(memory_gb())
    forced_intensity = tracker_kwargs.get("force_carbon_intensity_g_co2e_kwh")
    kg_per_kwh = (
        float(forced_intensity) / G_PER_KG if forced_intensity else _country_kg_per_kwh(country_iso_code)
    )
    return PowerEstimate(cpu_w + ram_power_w, kg_per_kwh, "default")


def prior(country_iso_code: str | None, tracker_kwargs: dict[str, Any]) -> PowerEstimate:
    """What to estimate at before this run's first reading: remembered, else the defaults."""
    try:
        return remembered(settings_key(country_iso_code, tracker_kwargs)) or default(
            country_iso_code, tracker_kwargs
        )
    except Exception:  # noqa: BLE001 -- never let an estimate disturb tracking
        logger.debug("no power estimate", exc_info=True)
        return FIRST_GUESS
