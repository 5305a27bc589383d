"""The distributed policy of the run object (``OffsetSession.begin``/``epoch_end``/``end``/``abort``,
driven through ``CallbackCore`` as the callbacks do), framework-free: two "ranks" as threads of this process.

The collective is an in-process stand-in for a framework's ``reduce(sum)`` and
``broadcast`` (a barrier between the two threads). Both ranks are local rank 0
of their own node, as in a two-node job with one process per node.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from carbonoffset.core import CallbackCore, Collective
from carbonoffset.core.ledger import Ledger
from carbonoffset.core.sources import Measurement
from carbonoffset.testing import BrokenEmissions, ScriptedEmissions


class ThreadCollective:
    """Sum and broadcast between ``world_size`` threads; a missing thread fails after ``timeout_s``."""

    def __init__(self, world_size: int, timeout_s: float = 10.0) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout_s)
        self.slots: list[Any] = [None] * world_size
        self.calls = 0

    def for_rank(self, rank: int) -> Collective:
        def sum_across(values: Sequence[float]) -> list[float]:
            self.slots[rank] = list(values)
            self.barrier.wait()
            result = [sum(column) for column in zip(*self.slots)]
            self.barrier.wait()
            if rank == 0:
                self.calls += 1
            return result

        def broadcast(obj: Any) -> Any:
            if rank == 0:
                self.slots[0] = obj
            self.barrier.wait()
            result = self.slots[0]
            self.barrier.wait()
            return result

        return Collective(world_size=self.world_size, sum=sum_across, broadcast=broadcast)


def _on_ranks(*jobs: Callable[[], Any]) -> list[Any]:
    """Run one job per rank on its own thread; return their results (re-raising the first error)."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as exc:  # noqa: BLE001 -- re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    return results


def _one_epoch_on_two_nodes(cores: Sequence[CallbackCore], *, end: bool) -> list[tuple[Any, Any]]:
    """``cores[r]`` as global rank ``r``, local rank 0 of its own node: begin, one epoch, then
    :meth:`end` when ``end``; per rank ``(epoch report, final report or None)``."""
    collective = ThreadCollective(2)

    def rank(r: int) -> Callable[[], Any]:
        def job() -> Any:
            core = cores[r]
            core.begin(global_rank=r, local_rank=0, nodes=1, world_size=2, collective=collective.for_rank(r))
            return core.epoch_end(0), core.end() if end else None

        return job

    return _on_ranks(rank(0), rank(1))


def _settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "auto_offset": False}


def test_two_nodes_sum_once_share_rank_zero_figures_and_continue_a_resumed_run(
    settings: dict[str, Any], ledger_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="carbonoffset")
    # the part of the run before a checkpoint: 1.0 kg recorded for run X
    first = CallbackCore(source=ScriptedEmissions([1.0]), **_settings(settings))
    first.begin()
    first.epoch_end(0)
    first.abort("interrupted")
    state = first.state_dict()
    assert state["emissions_kg"] == pytest.approx(1.0)

    # resumed on two nodes: both ranks load the same checkpoint state
    collective = ThreadCollective(2)
    cores = [
        CallbackCore(source=ScriptedEmissions(script), max_emissions_kg=1.5, **_settings(settings))
        for script in ([0.1, 0.2], [0.3, 0.5])
    ]

    def rank(r: int) -> Callable[[], Any]:
        def job() -> Any:
            core = cores[r]
            core.load_state_dict(state)
            core.begin(global_rank=r, local_rank=0, nodes=1, world_size=2, collective=collective.for_rank(r))
            reports = [core.epoch_end(0, max_epochs=10), core.epoch_end(1, max_epochs=10)]
            return reports, core.stop_requested, core.end()

        return job

    (reports0, stop0, final0), (reports1, stop1, final1) = _on_ranks(rank(0), rank(1))
    # the checkpoint's 1.0 kg is added once (by global rank 0), the two nodes' figures are summed
    assert [r.emissions_kg for r in reports0] == pytest.approx([1.4, 1.7])
    # every rank has rank 0's figures (pending from the ledger) and its budget decision
    assert reports0 == reports1 and final0 == final1
    assert reports0[0].pending_kg == pytest.approx(1.4) and reports1[1].over_budget
    assert stop0 is stop1 is True
    assert final0 is not None and final0.run_id == state["run_id"]
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
    assert (run.run_id, run.nodes, run.status) == (state["run_id"], 2, "finished")
    assert run.emissions_kg == pytest.approx(1.7)
    # begin (node count), two epochs and the end: four sums
    assert collective.calls == 4
    # warnings come from global rank 0 only (the followers have no budget of their own)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("passed max_emissions_kg" in m for m in messages) == 1, messages
    assert sum("projected emissions" in m for m in messages) == 1, messages


def test_abort_uses_no_collective_and_keeps_the_job_total_plus_rank_zero_node(
    settings: dict[str, Any], ledger_path: Path
) -> None:
    collective = ThreadCollective(2, timeout_s=5.0)
    scripts = ([0.1, 0.2, 0.25], [0.3, 0.4])
    cores = [
        CallbackCore(source=ScriptedEmissions(s, advance_on_stop=True), **_settings(settings))
        for s in scripts
    ]

    def rank(r: int) -> Callable[[], Any]:
        def job() -> Any:
            cores[r].begin(global_rank=r, local_rank=0, world_size=2, collective=collective.for_rank(r))
            return cores[r].epoch_end(0)

        return job

    first0, first1 = _on_ranks(rank(0), rank(1))
    assert first0 == first1 and first0.emissions_kg == pytest.approx(0.4)
    # training fails: each process aborts on its own (rank 1 may be gone); no collective is called
    calls = collective.calls
    final = cores[0].abort("failed")
    assert collective.calls == calls
    # the last job total plus what rank 0's node measured since (0.2 - 0.1 kg); rank 1's since is lost
    assert final is not None and final.emissions_kg == pytest.approx(0.5)
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
    assert (run.status, run.nodes) == ("failed", 2)
    assert run.emissions_kg == pytest.approx(0.5)
    cores[1].abort("failed")


def test_world_size_one_uses_no_collective(settings: dict[str, Any], ledger_path: Path) -> None:
    collective = ThreadCollective(2, timeout_s=0.5)  # would fail (timeout) if it were called by one thread
    core = CallbackCore(source=ScriptedEmissions([0.1, 0.2]), **_settings(settings))
    core.begin(world_size=1, collective=collective.for_rank(0))
    assert not core.distributed
    assert core.epoch_end(0) is not None
    assert core.end() is not None
    assert collective.calls == 0


def test_docs_page_shows_the_tested_commands_and_real_code() -> None:
    """docs/distributed.md: its Python compiles and imports real names; it shows the commands the tests run."""
    import ast
    import importlib
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "distributed.md").read_text(encoding="utf-8")
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                assert all(hasattr(module, alias.name) for alias in node.names), node.module
    for shown in (
        'strategy="ddp_fork"',
        "timeout=timedelta(seconds=5)",
        "--standalone --nproc_per_node=2",
        "--nnodes=2 --node_rank=0 --nproc_per_node=1",
        "--nnodes=2 --node_rank=1 --nproc_per_node=1",
        "--master_addr=127.0.0.1",
        "TrainingArguments(use_cpu=True)",
    ):
        assert shown in text, shown


class _LateStarted:
    """A source whose figures include an estimate (a tracker that started late): 0.1 kg of each."""

    def __init__(self, kg: float) -> None:
        self.kg = kg

    def start(self) -> None:
        pass

    def read(self) -> Measurement:
        return Measurement(self.kg, self.kg * 10, 0.1, 1.0)

    def stop(self) -> Measurement:
        return self.read()


def test_the_final_report_of_a_two_node_run_keeps_the_estimated_part(
    settings: dict[str, Any], ledger_path: Path
) -> None:
    """Both nodes' late-start estimates are labelled in the job's final figures, as in its epochs."""
    cores = [CallbackCore(source=_LateStarted(kg), **_settings(settings)) for kg in (0.4, 0.6)]
    (epoch0, final0), (_, final1) = _one_epoch_on_two_nodes(cores, end=True)
    assert epoch0.estimated_kg == pytest.approx(0.2)
    assert final0 == final1 and final0.emissions_kg == pytest.approx(1.0)
    assert final0.estimated_kg == pytest.approx(0.2)  # 0.1 kg estimated on each node


def test_an_aborted_two_node_run_keeps_the_estimated_part(settings: dict[str, Any], ledger_path: Path) -> None:
    """Ctrl-C after an epoch: the job total global rank 0 records keeps both nodes' estimates labelled."""
    cores = [CallbackCore(source=_LateStarted(kg), **_settings(settings)) for kg in (0.4, 0.6)]
    _one_epoch_on_two_nodes(cores, end=False)
    final = cores[0].abort("interrupted")
    cores[1].abort("interrupted")
    assert final is not None and final.emissions_kg == pytest.approx(1.0)
    assert final.estimated_kg == pytest.approx(0.2)  # rank 1's of the last epoch, rank 0's own final one
    assert final.measured


def test_a_node_whose_tracker_did_not_start_makes_the_job_unmeasured_on_every_rank(
    settings: dict[str, Any], ledger_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Global rank 0 measured, the other node did not: the job's figures are not recorded as the whole job's."""
    caplog.set_level(logging.WARNING, logger="carbonoffset")
    sources: list[Any] = [ScriptedEmissions([0.1, 0.2]), BrokenEmissions(RuntimeError, "tracker refused to start")]
    cores = [CallbackCore(source=source, **_settings(settings)) for source in sources]
    (epoch0, final0), (epoch1, final1) = _one_epoch_on_two_nodes(cores, end=True)
    assert epoch0 == epoch1 and not epoch0.measured
    assert "carbon/emissions_kg" not in epoch0.metrics()  # unknown for the job, not rank 0's part as the whole
    assert final0 == final1 and final0 is not None and not final0.measured
    with Ledger(ledger_path) as ledger:
        (run,) = ledger.runs()
    assert run.status == "unmeasured"
    assert run.emissions_kg == pytest.approx(0.1)  # what the measuring node measured is kept
    messages = [r.getMessage() for r in caplog.records if "node(s) of this job did not start" in r.getMessage()]
    assert len(messages) == 1 and "1 node(s)" in messages[0], messages
