"""Benchmark: wall time of `aligndiff --help` (target: under 2 s).

    .venv/bin/python bench/cli_startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    exe = Path(sys.executable).parent / "aligndiff"
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        subprocess.run([str(exe), "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"runs": args.runs, "median_s": round(statistics.median(times), 3),
                      "max_s": round(max(times), 3)}))


if __name__ == "__main__":
    main()
