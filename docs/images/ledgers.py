"""Build the example ledgers behind the pictures in docs/cli.md (nothing real is bought).

    python docs/images/ledgers.py OUT_DIR

writes ``OUT_DIR/many-runs.sqlite3`` (one sandbox account, 12 runs, offsets bought at the
0.5 kg threshold) and ``OUT_DIR/two-accounts.sqlite3`` (a sandbox account whose runs emit
grams, with a final offset rounded up to 1 lb, and a production account whose runs emit
kilograms). Every run goes through :class:`OffsetSession` and the real ``makeimpact`` SDK
against the loopback :class:`FakeOneClickImpact`; the emissions are scripted
(:class:`ScriptedEmissions`), the times are the real ones (runs a fraction of a second apart).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from carbonoffset.core.session import OffsetSession
from carbonoffset.testing import FakeOneClickImpact, ScriptedEmissions

FAST = {"wait_initial_s": 0.01, "wait_max_s": 0.05}


def run(settings: dict[str, object], per_epoch_kg: list[float], *, label: str, round_up: bool = False) -> None:
    cumulative = [sum(per_epoch_kg[: n + 1]) for n in range(len(per_epoch_kg))]
    session = OffsetSession(
        source=ScriptedEmissions(cumulative),
        offsetter_options=FAST,
        label=label,
        offset_round_up=round_up,
        **settings,  # type: ignore[arg-type]
    )
    session.start()
    for epoch in range(len(cumulative)):
        time.sleep(0.05)
        session.record_epoch(epoch)
    session.stop()
    session.close()


def main(out: Path) -> None:
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("many-runs", "two-accounts"):
        for suffix in ("", "-wal", "-shm"):
            (out / f"{name}.sqlite3{suffix}").unlink(missing_ok=True)
    with FakeOneClickImpact(environment="sandbox") as sandbox, FakeOneClickImpact(
        environment="production"
    ) as production:
        many = {
            "offset_api_key": "test_docs_plot_key_1",
            "offset_environment": "sandbox",
            "offset_api_url": sandbox.url,
            "offset_ledger": out / "many-runs.sqlite3",
        }
        sizes = [0.08, 0.35, 0.12, 0.6, 0.05, 0.22, 0.9, 0.15, 0.4, 0.07, 0.3, 0.18]
        for index, kg in enumerate(sizes):
            run(many, [kg / 4] * 4, label=f"sweep-{index:02d}")
            time.sleep(0.25)

        grams = {**many, "offset_api_key": "test_docs_plot_key_2", "offset_ledger": out / "two-accounts.sqlite3"}
        kilos = {
            "offset_api_key": "live_docs_plot_key_3",
            "offset_environment": "production",
            "offset_api_url": production.url,
            "offset_ledger": out / "two-accounts.sqlite3",
        }
        for index in range(4):
            run(grams, [0.0006, 0.0009, 0.0007], label="notebook", round_up=index == 0)
            time.sleep(0.2)
            run(kilos, [0.4, 0.5, 0.45], label="pretraining")
            time.sleep(0.2)
    print(f"wrote {out / 'many-runs.sqlite3'} and {out / 'two-accounts.sqlite3'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
