"""The feedback datasets the trainers read: label snapshot + generations, with their bytes.

- ``data/labels/tasks.parquet`` and ``preferences.parquet`` (``aligndiff annotate
  snapshot``) give binary verdicts per generation and (winner, loser) pairs;
- ``data/generations.parquet`` (the ``generate`` stage) maps generation ids to the
  content-addressed image and trajectory objects in the object store.

A missing file or column, or a label that names an unknown generation, is a one-line
:class:`UserError` naming the file and what was expected.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from components.errors import UserError
from components.files import read_parquet

GENERATIONS = Path("data/generations.parquet")
TASKS = Path("data/labels/tasks.parquet")
PREFERENCES = Path("data/labels/preferences.parquet")


def read_table(root: Path, relative: Path, columns: list[str], hint: str) -> pd.DataFrame:
    """A Parquet table of the project; errors name it by its project-relative path."""
    path = root / relative
    if not path.exists():
        raise UserError(f"{relative}: not found; {hint}")
    frame = read_parquet(path, hint)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{relative}: missing columns {missing}; expected at least {columns}")
    return frame


def generations(root: Path) -> pd.DataFrame:
    frame = read_table(root, GENERATIONS, ["generation_id", "prompt", "split", "model_version", "init_seed", "sampler",
                                            "image_key", "trajectory_key"], "run `dvc repro generate`")
    return frame.set_index("generation_id", drop=False)


def _check_known(ids: pd.Series, known: pd.DataFrame, source: Path) -> None:
    unknown = sorted(set(ids) - set(known.index))
    if unknown:
        raise UserError(f"{source}: {len(unknown)} generation ids not in {GENERATIONS} (e.g. {unknown[0]}); "
                        "labels and generations must come from the same round")


def binary_labels(root: Path, gens: pd.DataFrame) -> pd.DataFrame:
    """generation_id, prompt, label (1 good, 0 bad) from binary majorities; ties dropped."""
    tasks = read_table(root, TASKS, ["kind", "prompt", "generation_ids", "majority"],
                       "snapshot the annotations with `aligndiff annotate snapshot`")
    binary = tasks[(tasks["kind"] == "binary") & tasks["majority"].isin(["good", "bad"])]
    out = pd.DataFrame({"generation_id": [ids[0] for ids in binary["generation_ids"]],
                        "prompt": binary["prompt"].to_numpy(),
                        "label": (binary["majority"] == "good").astype(np.float32).to_numpy()})
    _check_known(out["generation_id"], gens, TASKS)
    return out.reset_index(drop=True)


def preference_pairs(root: Path, gens: pd.DataFrame) -> pd.DataFrame:
    prefs = read_table(root, PREFERENCES, ["prompt", "winner", "loser", "weight"],
                       "snapshot the annotations with `aligndiff annotate snapshot`")
    _check_known(pd.concat([prefs["winner"], prefs["loser"]]), gens, PREFERENCES)
    same = prefs[prefs["winner"] == prefs["loser"]]
    if len(same):
        raise UserError(f"{PREFERENCES}: {len(same)} pairs compare an image with itself")
    return prefs.reset_index(drop=True)


def sampler_of(gens: pd.DataFrame, ids) -> dict:
    """The sampler settings shared by the given generations (trajectory methods replay them)."""
    settings = {gens.at[g, "sampler"] for g in ids}
    if len(settings) != 1:
        raise UserError(f"{GENERATIONS}: the labelled generations mix sampler settings {sorted(settings)}")
    return json.loads(settings.pop())


class Fetcher:
    """Parallel reads of images and trajectories from the object store."""

    def __init__(self, store, workers: int = 8):
        self.store, self.workers = store, workers

    def _map(self, fn, keys: list[str]) -> list:
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(fn, keys))

    def images(self, keys: list[str]) -> np.ndarray:
        from PIL import Image

        def load(key: str) -> np.ndarray:
            return np.asarray(Image.open(io.BytesIO(self.store.get_bytes(key))).convert("RGB"))

        return np.stack(self._map(load, keys)) if keys else np.zeros((0, 1, 1, 3), np.uint8)

    def trajectories(self, keys: list[str]) -> list[dict]:
        from components.generate import load_trajectory

        return self._map(lambda k: load_trajectory(self.store.get_bytes(k)), keys)
