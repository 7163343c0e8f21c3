"""The bundled offline suite: reproducible data, no leak into fine-tuning, and it separates the real family."""

from __future__ import annotations

import json
import math

import pytest

from evaluation.behavior import BehaviorSettings, evaluate, tidy
from evaluation.build_offline_suite import build, render
from evaluation.suites import OFFLINE_DIR, get_suite, task_manager
from merging.checkpoints import LoadOptions, load_model
from merging.family import ADAPTER_ROOT, CHILDREN
from merging.family_data import examples, split_of

DATA = OFFLINE_DIR / "data"
DOMAIN_GROUPS = {f"offline_{d}" for d in CHILDREN}


def committed() -> dict[str, list[dict]]:
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(DATA.glob("*.jsonl"))}


def test_committed_data_is_what_the_script_generates():
    generated = build()
    assert sorted(generated) == sorted(p.stem for p in DATA.glob("*.jsonl"))
    for name, items in generated.items():
        assert (DATA / f"{name}.jsonl").read_text() == render(items), name


def test_suite_has_six_tasks_in_three_groups_that_cover_every_child():
    manager = task_manager([get_suite("offline")])
    top = manager._entry("merge_eval_offline").cfg["task"]
    assert set(top) == DOMAIN_GROUPS  # general language: the minimal-pair suite (config `minimal_pairs`)
    leaves = {group: manager._entry(group).cfg["task"] for group in top}
    assert sum(map(len, leaves.values())) == 6 and all(len(v) >= 2 for v in leaves.values())
    on_disk = {f"offline_{stem}" for stem in committed()}
    assert {t for v in leaves.values() for t in v} == on_disk


def test_items_are_held_out_from_every_childs_fine_tuning_data():
    data = committed()
    contexts = {item["context"] for items in data.values() for item in items}
    for child in CHILDREN:
        recipe = json.loads((ADAPTER_ROOT / child / "training.json").read_text())
        trained = {ex.prompt for ex in examples(child, "train", recipe["n_examples"], seed=recipe["recipe"]["seed"])}
        assert not contexts & trained, child
        own = [item["context"] for name, items in data.items() if name.startswith(child) for item in items]
        assert len(own) >= 60 and all(split_of(c) == "heldout" for c in own), child
    for items in data.values():  # every choice item is well formed: distinct choices, one gold
        for item in items:
            if "choices" in item:
                assert len(set(item["choices"])) == len(item["choices"]) >= 2
                assert 0 <= item["gold"] < len(item["choices"])


@pytest.mark.slow
def test_each_child_beats_base_on_its_own_domain_by_two_stderr(real_family):
    """The family is separable: child - base > 2 * stderr(difference) on the child's greedy-answer task."""
    settings = BehaviorSettings(batch_size=16, limit=20)
    own_task = {child: f"offline_{child}_greedy" for child in CHILDREN}

    def score(member: str, tasks: list[str]) -> dict[str, tuple[float, float]]:
        model, tokenizer = load_model(real_family[member], LoadOptions())
        rows = tidy(evaluate(model, tokenizer, settings, tasks=tasks), member)
        return {r["task"]: (r["value"], r["stderr"]) for r in rows.iter_rows(named=True)}

    base = score("base", list(own_task.values()))
    for child, task in own_task.items():
        (child_acc, child_se), (base_acc, base_se) = score(child, [task])[task], base[task]
        margin = 2 * math.hypot(child_se, base_se)
        assert child_acc - base_acc > margin, f"{child}: {child_acc:.3f} vs base {base_acc:.3f} (2 se = {margin:.3f})"
