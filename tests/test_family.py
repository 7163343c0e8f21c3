"""The embedded family: real SmolLM2 base, children that measurably learned their domain, content-keyed cache."""

from __future__ import annotations

import json

import pytest
import torch

from merging.family import CHILDREN, adapter_dir, build_family, load_state_dict
from merging.family_data import DOMAINS, examples, split_of
from merging.train_family import Recipe, data_digest, heldout_scores, train_child

# Each child must beat the base on its own domain's held-out answers: at least this much lower loss per token
# (measured at training time: see the closing note of the family issue for the figures).
MIN_LOSS_REDUCTION = 0.3


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_never_overlap(domain):
    train = {e.prompt for e in examples(domain, "train", 300)}
    heldout = {e.prompt for e in examples(domain, "heldout", 100)}
    assert not train & heldout
    assert all(split_of(p) == "heldout" for p in heldout)
    assert examples(domain, "heldout", 20, seed=5) == examples(domain, "heldout", 20, seed=5)


@pytest.mark.parametrize("child", CHILDREN)
def test_shipped_adapter_matches_current_data_and_recipe(child):
    """The adapter in the repo was trained on exactly what the current generator and recipe produce."""
    record = json.loads((adapter_dir(child) / "training.json").read_text())
    recipe = Recipe(**record["recipe"])
    assert record["data_digest"] == data_digest(examples(child, "train", recipe.steps * recipe.batch_size,
                                                         seed=recipe.seed))
    assert record["losses"][-1] < record["losses"][0]


def test_training_code_learns_on_a_tiny_model(tiny_family, tmp_path):
    from merging.family import apply_adapter

    record = train_child("math", tiny_family["base"], tmp_path / "adapter",
                         Recipe(steps=8, batch_size=4, learning_rate=5e-2, rank=4, alpha=8))
    assert record["losses"][-1] < record["losses"][0]
    apply_adapter(tiny_family["base"], tmp_path / "adapter", tmp_path / "child")
    base, child = load_state_dict(tiny_family["base"]), load_state_dict(tmp_path / "child")
    changed = [k for k in base if not torch.equal(base[k], child[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    assert all("norm" not in k for k in changed)  # LoRA touches only the targeted linear layers


@pytest.fixture(scope="module")
def family(real_family):
    return real_family


def test_family_is_real_smollm2(family):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(family["base"])
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == \
        ("llama", 30, 576, 49152)
    assert set(family) == {"base", *CHILDREN}


def test_warm_build_reuses_the_cache(family):
    stamps = {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in family.items()}
    again = build_family()
    assert again == family
    assert {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in again.items()} == stamps


@pytest.mark.parametrize("child", CHILDREN)
def test_child_beats_base_on_its_heldout_domain(family, child):
    base_loss, base_exact = heldout_scores(family["base"], child, n=32)
    child_loss, child_exact = heldout_scores(family[child], child, n=32)
    assert child_loss < (1 - MIN_LOSS_REDUCTION) * base_loss, (child, base_loss, child_loss)
    assert child_exact > base_exact
