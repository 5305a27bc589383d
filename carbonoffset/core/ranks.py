"""The rank policy of a run, and the collective through which node figures meet.

Once for every front end (HF ``CodeCarbonCallback`` scope, accelerate's ``on_main_process``):

* local rank 0 of each node measures its node (:attr:`Ranks.is_tracking`);
* each epoch every process sums the node figures (zeros where no tracker runs), so every
  process sees the same job total (:func:`sum_figures`);
* global rank 0 records it, offsets, decides the budget (:attr:`Ranks.is_writer`) and
  broadcasts its report, so every process logs the same figures and takes the same decision.

A framework only lends a :class:`Collective` (its own "sum across processes" and "broadcast
from global rank 0"). The ranks are given to the run when it begins and read at each call
(:meth:`~carbonoffset.core.session.OffsetSession.begin`), never frozen when it is built.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from carbonoffset.core.sources import Measurement

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Collective:
    """The two collective operations a framework lends a run in a distributed job.

    Every process of the job must call each operation at the same point, in
    the same order (they are collective). They use the framework's own process
    group, so its timeout applies when a process never arrives (a dead rank):
    the operation then raises in the survivors instead of blocking forever.

    Attributes:
        world_size: number of processes in the job (>= 2).
        sum: element-wise sum over every process of a list of floats (same
            length on every process); returns the sums, identical on every
            process.
        broadcast: returns, on every process, the (picklable) object passed by
            global rank 0.
    """

    world_size: int
    sum: Callable[[Sequence[float]], Sequence[float]]
    broadcast: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Where this process sits in the job.

    Attributes:
        global_rank: rank of this process in the job (>= 0); only rank 0 writes the ledger
            and offsets.
        local_rank: rank of this process on its node (>= 0); only local rank 0 runs a tracker.
    """

    global_rank: int = 0
    local_rank: int = 0

    @property
    def is_tracking(self) -> bool:
        """This process runs a tracker (local rank 0)."""
        return self.local_rank == 0

    @property
    def is_writer(self) -> bool:
        """This process writes the ledger and offsets (global rank 0)."""
        return self.global_rank == 0


def local_rank_hint() -> int:
    """This process's local rank as the launcher announced it (``LOCAL_RANK``, default 0).

    Only a hint, read before a framework hands the run its ranks (e.g. to start the measuring
    process early on the processes that will measure); the policy uses the ranks given to
    :meth:`~carbonoffset.core.session.OffsetSession.begin`.
    """
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def sum_figures(collective: Collective, node: Measurement, *, unmeasured: bool = False) -> tuple[Measurement, int]:
    """The job's figures: ``node``'s summed over every process (collective; the estimated part
    stays labelled), and how many processes said their node is ``unmeasured`` (its tracker did
    not start: the job's figures leave that node out). The run's details are this process's own."""
    kg, kwh, estimated_kg, estimated_kwh, missing = collective.sum(
        [node.emissions_kg, node.energy_kwh, node.estimated_kg, node.estimated_kwh, 1.0 if unmeasured else 0.0]
    )
    return Measurement(kg, kwh, estimated_kg, estimated_kwh), round(missing)


def count_nodes(collective: Collective, ranks: Ranks) -> int:
    """The nodes measuring the job: its trackers (local rank 0 of each node), counted through
    ``collective`` (collective; at least 1)."""
    return max(1, round(collective.sum([1.0 if ranks.is_tracking else 0.0])[0]))


def warn_without_group(global_rank: int, world_size: int) -> None:
    """Log that a job of ``world_size`` processes lent no collective (figures stay per process)."""
    logger.warning(
        "carbonoffset: process %d of %d, but no torch.distributed process group is initialised: "
        "node figures are not summed across processes. Each process decides on its own figures "
        "(only local rank 0 of each node measures) and global rank 0 records and offsets only "
        "what its own node measured",
        global_rank,
        world_size,
    )
