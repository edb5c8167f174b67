"""The task table's concept tasks: declared as the binding task, their examples grouped by episode, and the eval's
episodic selection drawing a query's demos from its own episode with both labels."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from data_modules.downstream import DownstreamDataModule
from mmict.eval.loop import chance_rate
from mmict.eval.postprocess import first_word
from mmict.eval.selection import make_selector
from mmict.eval.tasks import TASKS, get_task
from mmict.toy.language import CONCEPT_PROMPT, CONCEPT_TASK, CONCEPT_TUNING_TASK, concept_text
from mmict.toy.world import write_toy_world


@pytest.mark.parametrize(("name", "folder"), [(CONCEPT_TASK, "concept"), (CONCEPT_TUNING_TASK, "concept_tuning")])
def test_concept_tasks_are_declared_as_the_binding_task(name, folder):
    task, binding = get_task(name), TASKS["toy_binding"]
    assert task.folder == folder and task.episodic and task.postprocess is first_word
    assert (task.max_new_tokens, task.style, task.metric, task.kind) == (2, "toy", "accuracy", "generate")
    assert task.score is binding.score  # exact match of the first word
    assert task.score("yes", ["yes"]) == 1.0 and task.score("no", ["yes"]) == 0.0


@pytest.fixture(scope="module")
def concept_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("concept_task")
    write_toy_world(root, num_docs=2, val_docs=1, vqa_train=2, vqa_test=2, binding_episodes=1, concept_episodes=3,
                    concept_pool_per_class=4, concept_queries_per_episode=4, concept_tuning_episodes=1,
                    concept_tuning_val_episodes=1, concept_tuning_per_class=1, image_size=16)
    task = get_task(CONCEPT_TASK)
    data = DownstreamDataModule(root, folder=task.folder, task=task.name, image_transform=lambda im: im.size)
    data.setup()
    return task, data


def test_concept_examples_have_episodes_and_the_task_formats(concept_data):
    task, data = concept_data
    assert len(data.pool) == 3 * 2 * 4 and len(data.queries) == 3 * 4
    assert all(ex.group is not None and ex.question == CONCEPT_PROMPT for ex in [*data.pool, *data.queries])
    query, demo = data.queries[0], data.pool[0]
    assert task.query_prompt(query) == CONCEPT_PROMPT
    assert task.demo_text(demo) == concept_text(demo.answers[0]) == f"does it fit ? {demo.answers[0]}"


def test_episodic_selection_draws_both_labels_from_the_query_episode(concept_data):
    task, data = concept_data
    selector = make_selector("random", data.pool, episodic=task.episodic)
    assert selector.episodic
    rng = random.Random(0)
    for query in data.queries:
        for _ in range(10):
            demos = selector.select(rng, query, 2)
            assert all(d.group == query.group for d in demos)
            assert Counter(d.answers[0] for d in demos) == {"yes": 1, "no": 1}
        four = selector.select(rng, query, 4)
        assert Counter(d.answers[0] for d in four) == {"yes": 2, "no": 2}
    assert chance_rate(data.queries, selector) == pytest.approx(0.5)  # the tables' chance line: 1/2


def test_concept_task_evaluates_end_to_end(concept_data, tiny_backbone_dir):
    from helpers import tiny_aim_cfg

    from mmict.eval.loop import evaluate
    from mmict.methods.aim.module import AIMModule

    task, data = concept_data
    module = AIMModule(tiny_aim_cfg(tiny_backbone_dir))
    dm = DownstreamDataModule(data.root, folder=task.folder, task=task.name,
                              image_transform=module.backbone.image_transform, num_queries=6)
    dm.setup()
    results = evaluate(module, dm.queries, dm.pool, shots=[0, 2], seeds=[0], demo_modes=["images", "text"],
                       task=task.name, progress=False)
    assert {(r.shots, r.method) for r in results} >= {(2, "images"), (2, "text")}
    assert all(0.0 <= r.accuracy <= 1.0 for r in results)
