"""Import time: ``import carbonoffset`` and each integration on top of its framework.

Each measurement is a fresh process (nothing imported or cached in memory), and
the targets alternate within a round, so machine noise hits all of them alike.

* ``carbonoffset``: ``import carbonoffset`` (target <= 100 ms), and which ML
  frameworks it pulled in (target: none).
* ``integrations.<framework>``: the framework's modules that the integration
  needs are imported first (not counted, reported separately), then
  ``import carbonoffset.integrations.<framework>`` is timed: what the
  integration adds to a script that already uses the framework.

Usage::

    python benchmarks/import_time.py --json results/import_time.json
"""

from __future__ import annotations

import argparse
import os
import sys

from _common import child_env, median, run_child, table, write_json

# what a script using the framework has imported already (the integration is imported after it);
# "huggingface (callback API only)" stops at transformers.trainer_callback, the module the callback
# class derives from, without the Trainer itself
FRAMEWORK_MODULES = {
    "lightning": ("lightning", ["lightning.pytorch", "pytorch_lightning"]),
    "huggingface": ("huggingface", ["transformers", "transformers.trainer"]),
    "huggingface (callback API only)": ("huggingface", ["transformers", "transformers.trainer_callback"]),
    "keras": ("keras", ["keras"]),
}
HEAVY = (
    "torch",
    "lightning",
    "pytorch_lightning",
    "transformers",
    "keras",
    "tensorflow",
    "jax",
    "codecarbon",
)

_SNIPPET = """
import json, sys, time
started = time.perf_counter()
for name in {pre!r}:
    __import__(name)
framework_s = time.perf_counter() - started
loaded = set(sys.modules)
started = time.perf_counter()
__import__({target!r})
target_s = time.perf_counter() - started
heavy = sorted(m for m in {heavy!r} if m in sys.modules and m not in loaded)
print(json.dumps({{"framework_s": framework_s, "target_s": target_s, "heavy": heavy}}))
"""


def measure(target: str, pre: list[str]) -> dict[str, float]:
    code = _SNIPPET.format(pre=pre, target=target, heavy=HEAVY)
    return run_child(["-c", code], env=child_env())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    targets = {"carbonoffset": ("carbonoffset", [])}
    for name, (module, modules) in FRAMEWORK_MODULES.items():
        targets[f"integrations.{name}"] = (f"carbonoffset.integrations.{module}", modules)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    names = list(targets)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            target, pre = targets[name]
            runs[name].append(measure(target, pre))
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)

    rows, summary = [], {}
    for name in names:
        result = runs[name]
        summary[name] = {
            "median_ms": median([r["target_s"] for r in result]) * 1e3,
            "framework_median_ms": median([r["framework_s"] for r in result]) * 1e3,
            "target_ms": [r["target_s"] * 1e3 for r in result],
            "heavy_modules_loaded_by_target": sorted({m for r in result for m in r["heavy"]}),
        }
        s = summary[name]
        rows.append(
            [
                name,
                s["median_ms"],
                s["framework_median_ms"] if name != "carbonoffset" else "",
                ", ".join(s["heavy_modules_loaded_by_target"]) or "none",
            ]
        )
    print(
        table(
            f"Import time (median of {args.rounds} fresh processes, interleaved)",
            ["import", "median ms", "framework first (not counted) ms", "ML modules loaded afterwards"],
            rows,
        )
    )
    write_json(args.json, {"benchmark": "import_time", "rounds": args.rounds, "imports": summary})


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
