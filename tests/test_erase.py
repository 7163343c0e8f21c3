"""The number_erased child: LEACE erasers fitted writer by writer remove linear number up to the chosen layer,
the shipped factors rebuild exactly the fitted model, and the output head keeps the original embedding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from merging.erase import (ERASER_ROOT, LAST_LAYER, apply_erasers, fit_erasers, hidden_at_numbers,
                           number_probe_accuracy, token_batches)
from merging.family import ERASED, build_family
from merging.family_data import number_sentences


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def _probes(model, tokenizer, layers, n_train: int = 400, n_test: int = 200) -> np.ndarray:
    train = token_batches(tokenizer, number_sentences("train", 4000)[-n_train:])  # not the fitted sentences
    test = token_batches(tokenizer, number_sentences("heldout", n_test))
    return np.array(number_probe_accuracy(hidden_at_numbers(model, train, layers),
                                          hidden_at_numbers(model, test, layers)))


@torch.no_grad()
def _plant_number(model, tokenizer, sentences, strength: float = 1.0) -> None:
    """A known positive for a random model: each token that mostly sits in plural words gets +u, singular -u."""
    counts = torch.zeros(model.config.vocab_size, 2)
    for inputs, labels in token_batches(tokenizer, sentences):
        counts.index_put_((inputs["input_ids"][labels >= 0], labels[labels >= 0]), torch.ones(1), accumulate=True)
    sign = torch.sign(counts[:, 1] - counts[:, 0])
    direction = torch.nn.functional.normalize(torch.randn(model.config.hidden_size,
                                                          generator=torch.Generator().manual_seed(0)), dim=0)
    model.get_input_embeddings().weight += strength * sign[:, None] * direction


@pytest.fixture(scope="module")
def tiny_number_model():
    """A random 3-layer Llama on SmolLM2's tokenizer (whole words are tokens there), number planted in."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(build_family(("base",))["base"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    _plant_number(model, tokenizer, number_sentences("train", 600))
    return model, tokenizer


def _copy(model):
    twin = type(model)(model.config.__class__.from_dict(model.config.to_dict())).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def test_erasure_removes_linear_number_up_to_the_last_erased_layer(tiny_number_model):
    base, tokenizer = tiny_number_model
    model = _copy(base)
    embedding = model.get_input_embeddings().weight.detach().clone()
    erasers = fit_erasers(model, tokenizer, number_sentences("train", 600), last_layer=2)
    layers = range(3)  # hidden states 0..2: the embeddings and the writers of decoder layers 0 and 1
    before, after = _probes(base, tokenizer, layers), _probes(model, tokenizer, layers)
    assert before.min() > 0.8, before
    assert after.max() < 0.62 and (before - after).min() > 0.2, (before, after)
    # the head is untied and keeps the original matrix; the input embedding lost the number direction
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, embedding)
    assert not torch.equal(model.get_input_embeddings().weight, embedding)
    # layer 2's writers are untouched: only 1 + 2 * last_layer writers are erased
    assert {key.rsplit(".", 1)[0] for key in erasers} == {
        "model.embed_tokens", *(f"model.layers.{i}.{w}" for i in (0, 1) for w in ("self_attn.o_proj", "mlp.down_proj"))}
    # the shipped path: the stored factors folded into a fresh base give the fitted weights exactly
    rebuilt = _copy(base)
    apply_erasers(rebuilt, erasers)
    fitted = model.state_dict()
    assert all(torch.equal(value, fitted[name]) for name, value in rebuilt.state_dict().items())


def test_apply_erasers_refuses_factors_for_writers_the_model_lacks(tiny_number_model):
    model = _copy(tiny_number_model[0])
    with pytest.raises(ValueError, match="name no writer"):
        apply_erasers(model, {"model.layers.9.mlp.down_proj.left": torch.zeros(32, 1),
                              "model.layers.9.mlp.down_proj.right": torch.zeros(1, 32)})


def test_shipped_erasers_are_what_the_record_says():
    """The erasers in the repo were fitted for the shipped last layer; their record holds the held-out probes."""
    member = ERASED[0]
    erasers = safetensors.torch.load_file(ERASER_ROOT / member / "erasers.safetensors")
    record = json.loads((ERASER_ROOT / member / "erasure.json").read_text())
    assert record["last_layer"] == LAST_LAYER
    assert len(erasers) == 3 * (1 + 2 * LAST_LAYER)  # left, right and mean of the embeddings and of 2 writers a layer
    assert all(v.shape in ((576, 1), (1, 576), (576,)) for v in erasers.values())


@pytest.mark.slow
def test_real_number_erased_child_loses_number_where_declared(real_family):
    """On the embedded base: held-out number probes fall at the erased layers and come back after them
    (merging/erasers/number_erased/erasure.json has every layer: 0.95-1.00 -> 0.51-0.66 up to layer 10, 0.98 at
    11)."""
    layers = (6, LAST_LAYER, LAST_LAYER + 1)
    base, tokenizer = _load(real_family["base"])
    erased, _ = _load(real_family["number_erased"])
    before, after = _probes(base, tokenizer, layers), _probes(erased, tokenizer, layers)
    assert before.min() > 0.9, before
    assert after[:2].max() < 0.7 and after[2] > 0.85, after
    assert torch.equal(erased.lm_head.weight, base.lm_head.weight)
