"""Simulated annotators: real Label Studio users who label with the world's judge.

Each annotator is a Label Studio user; annotations are submitted through the API
exactly as the UI would (same result format, ``completed_by`` = the user), so the
loop downstream cannot tell them from people. Their judgement is the synthetic
world's judge with controlled imperfection:

- ``flip_rate``: probability of giving the opposite answer (binary good↔bad,
  pairwise left↔right; ties stay ties);
- ``bias``: probability of answering "good" / "left" without looking;
- ``coverage``: annotators per task.

Pairwise choices compare how many attributes each image gets right (graded), so
most pairs are informative even when few images are fully aligned. The critique is
the judge's reason ("expected three, found two blobs").
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np

from components.annotation.labeling import IMAGE_KEYS, RoundKind, choices_for, make_result
from components.project import Project
from components.world.judge import Verdict, judge

ANNOTATOR_DOMAIN = "simulated.aligndiff.local"


@dataclass(frozen=True)
class AnnotatorConfig:
    annotators: int = 3
    coverage: int = 3
    flip_rate: float = 0.1
    bias: float = 0.0
    seed: int = 0

    def __post_init__(self):
        from components.errors import UserError

        if self.annotators < 1 or self.coverage < 1:
            raise UserError(f"annotators and coverage must be at least 1, got {self.annotators} and {self.coverage}")
        if self.coverage > self.annotators:
            raise UserError(f"coverage {self.coverage} is more than the {self.annotators} annotators: each task gets "
                            "at most one vote from each")
        for name in ("flip_rate", "bias"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name.replace('_', '-')} must be between 0 and 1, got {getattr(self, name)}")


def ensure_annotators(client, n: int) -> list[int]:
    """Label Studio user ids of annotator-1…n (created on first use)."""
    existing = {u.email: u.id for u in client.users.list()}
    ids = []
    for i in range(1, n + 1):
        email = f"annotator-{i}@{ANNOTATOR_DOMAIN}"
        if email not in existing:
            existing[email] = client.users.create(email=email, username=f"annotator-{i}",
                                                  first_name="Simulated", last_name=f"annotator {i}").id
        ids.append(existing[email])
    return ids


def _rng(seed: int, *parts) -> np.random.Generator:
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def decide(kind: RoundKind, verdicts: list[Verdict], rng: np.random.Generator, config: AnnotatorConfig
           ) -> tuple[str, str]:
    """(choice, critique) of one simulated annotator, from the judge's verdicts on the task's images."""
    if kind == "binary":
        truth = "good" if verdicts[0].aligned else "bad"
        critique = verdicts[0].reason
    elif kind == "pairwise":
        left, right = verdicts[0].score, verdicts[1].score
        truth = "tie" if left == right else ("left" if left > right else "right")
        critique = f"left: {verdicts[0].reason}; right: {verdicts[1].reason}"
    else:
        scores = [v.score for v in verdicts]
        truth = f"image {int(np.argmax(scores)) + 1}"
        critique = "; ".join(f"image {i + 1}: {v.reason}" for i, v in enumerate(verdicts))
    if rng.random() < config.bias and kind != "best_of_k":
        return ("good" if kind == "binary" else "left"), critique
    if rng.random() < config.flip_rate:
        if kind == "binary":
            truth = "bad" if truth == "good" else "good"
        elif kind == "pairwise" and truth != "tie":
            truth = "right" if truth == "left" else "left"
        elif kind == "best_of_k":
            others = [c for c in choices_for(kind, len(verdicts)) if c != truth]
            truth = str(rng.choice(others))
    return truth, critique


def simulate(project: Project, ls_project_id: int, kind: RoundKind, config: AnnotatorConfig, k: int = 2,
             client=None, on_progress=None, workers: int = 4) -> dict:
    """Give every task up to ``coverage`` annotations from distinct simulated annotators.

    ``workers`` tasks are labelled at once: each vote is an HTTP round trip that mostly
    waits on Label Studio. Every annotator's draw is seeded by (seed, task, annotator),
    so the votes do not depend on the order the tasks finish in.
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from components.annotation.studio import client_for

    client = client or client_for(project)
    users = ensure_annotators(client, config.annotators)
    coverage = min(config.coverage, len(users))
    store = project.object_store()
    prefix = f"s3://{project.params.services.s3.bucket}/"

    def label(task) -> int:
        # a task the listing counts no annotation on, not even a skipped one, needs no request to ask who did it
        untouched = getattr(task, "total_annotations", None) == 0 and getattr(task, "cancelled_annotations", None) == 0
        done_by = set() if untouched else {a.completed_by for a in client.annotations.list(id=task.id)}
        order = list(_rng(config.seed, "order", task.id).permutation(users))
        wanted = [u for u in order[:coverage] if u not in done_by]
        if not wanted:
            return 0
        images = [np.array(Image.open(io.BytesIO(store.get_bytes(task.data[key].removeprefix(prefix)))).convert("RGB"))
                  for key in IMAGE_KEYS if key in task.data]
        verdicts = [judge(image, task.data["prompt"]) for image in images]
        for user in wanted:
            choice, critique = decide(kind, verdicts, _rng(config.seed, task.id, user), config)
            client.annotations.create(id=task.id, result=make_result(kind, choice, critique, k), completed_by=int(user))
        if on_progress:
            on_progress(1)
        return len(wanted)

    tasks = client.tasks.list(project=ls_project_id, fields="all", page_size=500, resolve_uri=False)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        submitted = sum(pool.map(label, tasks))
    return {"submitted": submitted, "annotators": len(users)}
