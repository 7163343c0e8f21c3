"""The merge stage: mergekit in-process, exact arithmetic for the linear methods, every method loadable."""

from __future__ import annotations

import json

import pytest
import torch

from merging.family import load_state_dict
from merging.merge import MANIFEST, MergeError, MergeLineage, merge
from merging.methods import METHODS

PARAMS = {"linear": {"weight": 0.5}, "slerp": {"t": 0.3}, "task_arithmetic": {"weight": 0.7},
          "ties": {"weight": 1.0, "density": 0.5}, "dare_ties": {"weight": 1.0, "density": 0.5},
          "dare_linear": {"weight": 1.0, "density": 0.5}, "breadcrumbs": {"weight": 1.0, "density": 0.8},
          "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}, "model_stock": {}}


def lineage(method: str, **params) -> MergeLineage:
    return MergeLineage(model=f"a+b/{method}", method=method, parents=("a", "b"), base="base",
                        parameters=params or PARAMS[method])


@pytest.fixture(scope="module")
def states(tiny_family):
    return {name: load_state_dict(path) for name, path in tiny_family.items()}


def test_linear_is_the_weighted_mean(tiny_family, states, tmp_path):
    merge(lineage("linear", weight=0.5), tiny_family, tmp_path / "m")
    merged = load_state_dict(tmp_path / "m")
    assert merged.keys() == states["a"].keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, (states["a"][name] + states["b"][name]) / 2, atol=1e-6, rtol=0)


def test_task_arithmetic_adds_scaled_task_vectors(tiny_family, states, tmp_path):
    merge(lineage("task_arithmetic", weight=0.7), tiny_family, tmp_path / "m")
    merged = load_state_dict(tmp_path / "m")
    for name, tensor in merged.items():
        base = states["base"][name]
        expected = base + 0.7 * (states["a"][name] - base) + 0.7 * (states["b"][name] - base)
        torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=0)


def test_slerp_endpoints_are_the_parents(tiny_family, states, tmp_path):
    for t, parent in [(0.0, "a"), (1.0, "b")]:
        merge(lineage("slerp", t=t), tiny_family, tmp_path / f"s{t}")
        merged = load_state_dict(tmp_path / f"s{t}")
        for name, tensor in merged.items():
            torch.testing.assert_close(tensor, states[parent][name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_loads_and_generates(method, tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    manifest = merge(lineage(method), tiny_family, out, seed=7)
    assert manifest["method"] == method and manifest["parents"] == ["a", "b"]
    assert manifest["seed"] == 7 and manifest["peak_rss_mb"] > 0 and manifest["wall_seconds"] > 0
    assert manifest["mergekit_version"]
    assert json.loads((out / MANIFEST).read_text()) == manifest
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("the cat sat", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    assert all(torch.isfinite(t).all() for t in load_state_dict(out).values())


def test_random_methods_are_reproducible_by_seed(tiny_family, tmp_path):
    for folder, seed in [("1", 3), ("2", 3), ("3", 4)]:
        merge(lineage("dare_ties"), tiny_family, tmp_path / folder, seed=seed)
    first, second, other = (load_state_dict(tmp_path / folder) for folder in ("1", "2", "3"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_matching_merge_is_reused_and_changed_one_is_redone(tiny_family, tmp_path):
    out = tmp_path / "m"
    first = merge(lineage("linear", weight=0.5), tiny_family, out)
    again = merge(lineage("linear", weight=0.5), tiny_family, out)
    assert again == first  # same manifest, wall time included: nothing was recomputed
    changed = merge(lineage("linear", weight=0.25), tiny_family, out)
    assert changed["input_key"] != first["input_key"]


def test_failed_merge_leaves_nothing(tiny_family, tmp_path):
    broken = dict(tiny_family, b=tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="a\\+b/linear"):
        merge(lineage("linear"), broken, tmp_path / "out" / "m")
    assert not (tmp_path / "out" / "m").exists()
    assert list((tmp_path / "out").iterdir()) == []
