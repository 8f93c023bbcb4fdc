"""Benchmark: Great Expectations validation of a 10,000-row label snapshot.

    .venv/bin/python bench/validate_speed.py [--rows 10000]

Builds a synthetic snapshot (binary and pairwise tasks with 3 votes each, the
preferences they imply, the generations they name) in memory and times the labels
suite end to end — derived columns, agreement, GX run, Data Docs — excluding the
library import. The target is under 15 s on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import Params  # noqa: E402


def snapshot(rows: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    gens = pd.DataFrame({"generation_id": [f"g{i:06d}" for i in range(2 * rows)]}).set_index("generation_id", drop=False)
    tasks, prefs = [], []
    for t in range(rows):
        if t % 2:
            ids, choices = [f"g{2 * t:06d}"], ["good", "bad"]
        else:
            ids, choices = [f"g{2 * t:06d}", f"g{2 * t + 1:06d}"], ["left", "right"]
        truth = choices[rng.integers(2)]
        votes = [truth if rng.random() > 0.1 else choices[1 - choices.index(truth)] for _ in range(3)]
        counts = {c: votes.count(c) for c in set(votes)}
        majority = max(counts, key=counts.get)
        tasks.append({"task_id": t, "kind": "binary" if len(ids) == 1 else "pairwise", "prompt": f"p{t % 500}",
                      "generation_ids": ids, "votes": json.dumps(counts), "majority": majority,
                      "majority_share": counts[majority] / 3, "annotators": 3})
        if len(ids) == 2:
            w = 0 if majority == "left" else 1
            prefs.append({"prompt": f"p{t % 500}", "winner": ids[w], "loser": ids[1 - w],
                          "weight": counts[majority] / 3, "source_task": t})
    return pd.DataFrame(tasks), pd.DataFrame(prefs), gens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    args = ap.parse_args()
    tasks, prefs, gens = snapshot(args.rows)
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import importlib

    importlib.import_module("great_expectations")  # the import is excluded from the timing
    from components import validate

    start = time.perf_counter()
    suite = validate.labels_suite(tasks, prefs, gens, Params())
    summary = validate.run_suites([suite], Path(tempfile.mkdtemp()))
    seconds = time.perf_counter() - start
    print(json.dumps({"tasks": len(tasks), "preferences": len(prefs), "seconds": round(seconds, 2),
                      "success": summary["success"], "failures": validate.failure_lines(summary)[:-1]}))


if __name__ == "__main__":
    main()
