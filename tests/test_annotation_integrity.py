"""No annotation lost or duplicated while annotators work during syncs and pushes.

Against the real Label Studio: a thread plays annotators (creates, edits — some into
results the labeling config does not allow —, skips, deletes of annotations and of whole
tasks) while this thread syncs again and again and two pushers race to create the same
tasks. After one last ordinary sync, the store must equal Label Studio exactly.
Pages are made small so that every sync reads many of them while the edits land.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from components.annotation import studio
from components.annotation import sync as sync_module
from components.annotation.labeling import make_result
from components.annotation.sync import store_for, sync, verify

TASKS = 40
OPERATIONS = 100


@pytest.fixture
def hammer_project(stack_project, tmp_path):
    from components.project import Project
    from tests.conftest import sibling_project

    return Project.load(sibling_project(stack_project, tmp_path / "hammer"))


def _specs(first: int, n: int) -> list[studio.TaskSpec]:
    return [studio.TaskSpec(prompt=f"prompt {i}", generation_ids=(f"g{i}a", f"g{i}b"),
                            image_keys=(f"images/{i}a.png", f"images/{i}b.png")) for i in range(first, first + n)]


class Annotators(threading.Thread):
    """Random edits at human-ish speed, bounded in count; records what it did."""

    def __init__(self, client, project_id: int, tasks: list[int], seed: int):
        super().__init__(daemon=True)
        self.client, self.project_id, self.rng = client, project_id, random.Random(seed)
        self.tasks = list(tasks)  # the ones they work on; never the racing pushes' tasks
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []

    def run(self) -> None:
        for _ in range(OPERATIONS):
            try:
                self._one()
            except Exception as exc:  # a target deleted by an earlier step: note it, go on
                self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            time.sleep(self.rng.uniform(0.0, 0.02))

    def _one(self) -> None:
        tasks = self.tasks
        annotations = list(self.client.annotations.list(id=self.rng.choice(tasks)))
        roll = self.rng.random()
        choice = self.rng.choice(["left", "right", "tie"])
        if roll < 0.45 or not annotations:
            op = "create"
            self.client.annotations.create(id=self.rng.choice(tasks), result=make_result("pairwise", choice, "hm"))
        elif roll < 0.75:
            op = "edit"
            self.client.annotations.update(id=self.rng.choice(annotations).id,
                                           result=make_result("pairwise", choice, f"edit {roll:.3f}"))
        elif roll < 0.82:
            op = "edit_invalid"
            self.client.annotations.update(id=self.rng.choice(annotations).id, result=[
                {"from_name": "choice", "to_name": "image_0", "type": "choices", "value": {"choices": ["both"]}}])
        elif roll < 0.87:
            op = "skip"
            self.client.annotations.create(id=self.rng.choice(tasks), result=[], was_cancelled=True)
        elif roll < 0.97:
            op = "delete"
            self.client.annotations.delete(id=self.rng.choice(annotations).id)
        else:
            op = "delete_task"
            self.client.tasks.delete(id=tasks.pop(self.rng.randrange(len(tasks))))
        self.counts[op] = self.counts.get(op, 0) + 1


def _racing_pushes(client, project, project_id: int, specs) -> list[studio.PushResult]:
    results: list = []
    pushers = [threading.Thread(target=lambda: results.append(studio.push_tasks(client, project, project_id, specs)))
               for _ in range(2)]
    for t in pushers:
        t.start()
    for t in pushers:
        t.join()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_store_equals_label_studio_after_concurrent_edits_syncs_and_pushes(hammer_project, monkeypatch, seed):
    monkeypatch.setattr(sync_module, "PAGE_SIZE", 6)
    client = studio.client_for(hammer_project)
    project_id = studio.ensure_project(client, hammer_project, "pairwise")
    first = studio.push_tasks(client, hammer_project, project_id, _specs(0, TASKS))
    store = store_for(hammer_project, project_id)

    annotators = Annotators(client, project_id, list(first.task_ids.values()), seed)
    annotators.start()
    syncs, pushed, racing = 0, TASKS, []
    while annotators.is_alive():
        sync(hammer_project, project_id, "pairwise", client=client)
        syncs += 1
        if syncs % 5 == 0:
            racing.append(_racing_pushes(client, hammer_project, project_id, _specs(pushed, 5)))
            pushed += 5
    annotators.join()
    sync(hammer_project, project_id, "pairwise", client=client)  # an ordinary, incremental one
    syncs += 1

    check = verify(client, store, project_id, "pairwise", 2)
    print(f"seed {seed}: {syncs} syncs, {sum(annotators.counts.values())} operations {annotators.counts}, "
          f"{len(racing)} racing pushes; Label Studio holds {check['label_studio']} annotations; "
          f"lost {check['missing'] + check['outdated']}, duplicated {check['duplicated']}, extra {check['extra']}")
    assert sum(annotators.counts.values()) >= OPERATIONS * 0.8, annotators.errors[:5]
    assert annotators.counts.get("edit", 0) >= 10 and annotators.counts.get("delete", 0) >= 3
    assert check["label_studio"] > 30
    assert check == {**check, "equal": True, "missing": 0, "extra": 0, "outdated": 0, "duplicated": 0}

    # Of two racing pushes, one created the tasks and the other found them: one task per external id.
    assert racing and all(sorted(r.created for r in pair) == [0, 5] for pair in racing)
    external = [(t.data or {}).get("external_id")
                for t in studio.keyset_pages(client, project_id, [], 500, fields="task_only")]
    assert len(external) == len(set(external)) == pushed - annotators.counts.get("delete_task", 0)
