"""The docs' efficacy table, from bench/results/efficacy.jsonl: one row per run on one base.

    python bench/efficacy_table.py [--base VERSION_PREFIX ...]

Without --base: the base of the file's last run; with several (versions of the same
weights), a column says which. Columns: the method and what its run
changed from params.yaml, the simulated votes it used, its rounds (one round: with its
fine-tuning steps), wall minutes on the
machine that ran it, and the points gained over the base (seen / held-out compositions)
in judge alignment and per attribute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "efficacy.jsonl"
ATTRIBUTES = ("count", "colour", "shape", "background")
# overrides every run of the method carries (the bench's own defaults), not worth a column
IMPLIED = ("finetune.method=", "generate.images_per_prompt=8")


def votes_and_rounds(run: dict) -> tuple[str, str]:
    if run["method"] == "continued_pretraining":
        return "—", f"{run['steps']} steps"
    if "rounds" in run and isinstance(run["rounds"], list):
        return f"{sum(r['labels']['votes'] for r in run['rounds']):,}", str(len(run["rounds"]))
    labels = run.get("labels") or {}
    steps = (run.get("finetune") or {}).get("steps")
    return (f"{labels['votes']:,}" if "votes" in labels else "—"), "1" + (f" ({steps} steps)" if steps else "")


def row(run: dict, with_base: bool) -> str:
    changed = [o for o in run.get("overrides", []) if not o.startswith(IMPLIED)]
    labels = run.get("labels") or {}
    if "fraction" in labels:  # --label-fraction: how the labelled share was chosen
        changed.append(f"{labels['fraction']:.0%} of the tasks labelled, the second half by {labels['select']}")
    if run.get("note"):
        changed.append(run["note"])
    name = run["method"] + (f" ({', '.join(changed)})" if changed else "")
    votes, rounds = votes_and_rounds(run)
    gain, attrs = run["gain_points"], run["attribute_gain_points"]

    def pair(seen: float, unseen: float) -> str:
        return f"{seen:+.1f} / {unseen:+.1f}"

    cells = [name, *([run["base_version"][:8]] if with_base else []), votes, rounds, f"{run['wall_minutes']:.1f}", pair(gain["seen"], gain["unseen"]),
             *(pair(attrs["seen"][a], attrs["unseen"][a]) for a in ATTRIBUTES)]
    return "| " + " | ".join(cells) + " |"


def table(runs: list[dict], with_base: bool) -> str:
    header = ["run", *(["base"] if with_base else []), "votes", "rounds", "wall min", "aligned", *ATTRIBUTES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + [row(r, with_base) for r in runs])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", nargs="+", help="base versions (prefixes are enough); default: the last run's")
    args = ap.parse_args()
    runs = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    bases = args.base or [runs[-1]["base_version"]]
    # the first runs predate recorded base versions
    mine = [r for r in runs if any(r.get("base_version", "").startswith(b) for b in bases)]
    if not mine:
        raise SystemExit(f"{RESULTS}: no run on a base version starting {' or '.join(bases)}")
    for version in dict.fromkeys(r["base_version"] for r in mine):
        first = next(r["base"] for r in mine if r["base_version"] == version)
        print(f"base {version}: aligned {first['seen']['aligned']:.1%} seen / {first['unseen']['aligned']:.1%} "
              f"held-out ({first['seen']['images']} / {first['unseen']['images']} images)")
    print()
    print(table(mine, with_base=len(bases) > 1))


if __name__ == "__main__":
    main()
