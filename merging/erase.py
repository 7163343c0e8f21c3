"""The second planted child: grammatical number erased from the base's residual stream up to a chosen layer.

Fine-tuning on corrupted agreement (the `agreement` child) moves behaviour but leaves number linearly decodable
inside, so it cannot test the probes. This child's internal loss is known by construction: LEACE (the
`concept-erasure` package) removes, from each thing that writes to the residual stream, the one direction along
which singular and plural words differ on average, so no linear probe can read number there any more.

    python -m merging.erase       # refit the erasers into merging/erasers/number_erased/ (the family build applies them)

Why writer by writer: one eraser fitted on the stream at layer k and folded into every writer does not hold,
because the layers before k read the edited stream and rebuild number along other directions. So the writers are
erased in the order the forward pass runs them (the embeddings, then each decoder layer's attention output and MLP
down-projection up to layer k), each fitted on the model as edited so far; the stream at layers 0..k is then their
sum. Decoder layers after k still read the token identities, so number can come back after k: the known loss is
"layers <= k".

Why the embeddings are untied first: SmolLM2's output head is its input embedding, and erasing number from the
head would also stop the model from *predicting* "dogs" over "dog"; the head keeps the original matrix.

Why the writers get biases: LEACE is affine, x -> x - L R (x - mean), and Llama's projections have no bias to carry
the shift L R mean. The linear part alone equalises the class means too, but it also removes the writer's mean
along the erased direction, and that mean is large: on held-out sentences, layer 1's attention output has R y =
5.1 on average against a spread of 1.1, a shift of a third of the output's norm. A first child erased that way
lost far more than number (held-out perplexity x1.45; outside, NPI scope -0.23 against base). So every projection
gets a zero bias (the config's attention_bias and mlp_bias) and each erased writer keeps its mean.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import safetensors.torch
import torch
from tqdm import tqdm

from merging.family_data import number_sentences

ERASER_ROOT = Path(__file__).parent / "erasers"
LAST_LAYER = 10  # hidden states 0..10 lose number: the report's early band of the embedded base's 31 (reports.changes)
N_FIT = 4000  # sentences (19.7k number-carrying tokens of 34.7k) for the fit; the covariance is 576 x 576
N_HELDOUT = 600
BATCH = 64


@dataclass(frozen=True)
class Writer:
    """A module whose output is added to the residual stream; `embedding`: its weight rows are the output."""

    name: str
    module: torch.nn.Module
    embedding: bool = False


def writers(model, last_layer: int) -> list[Writer]:
    """The writers of hidden states 0..last_layer, in the order the forward pass runs them (Llama layout)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens") or not hasattr(inner, "layers"):
        raise ValueError(f"{type(model).__name__}: erasure needs a Llama-style decoder (model.embed_tokens, layers)")
    found = [Writer("model.embed_tokens", inner.embed_tokens, embedding=True)]
    for i, layer in enumerate(inner.layers[:last_layer]):
        found += [Writer(f"model.layers.{i}.self_attn.o_proj", layer.self_attn.o_proj),
                  Writer(f"model.layers.{i}.mlp.down_proj", layer.mlp.down_proj)]
    return found


def untie(model) -> None:
    """Give the output head its own copy of the embedding matrix, so editing the embeddings leaves it alone."""
    if model.config.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        model.config.tie_word_embeddings = False
        if getattr(model.config, "text_config", None) is not None:
            model.config.text_config.tie_word_embeddings = False


def add_biases(model) -> None:
    """Zero biases on every attention and MLP projection (Llama's `attention_bias` and `mlp_bias`), so each writer
    can carry its eraser's affine shift; the config flags add them to all seven projections, so all get one."""
    model.config.attention_bias = model.config.mlp_bias = True
    for layer in model.model.layers:
        for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                       layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if module.bias is None:
                module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))


def prepare(model) -> None:
    """What every erased model needs before its erasers: an untied head and writers with biases."""
    untie(model)
    add_biases(model)


@torch.no_grad()
def apply_eraser(writer: Writer, factors: dict[str, torch.Tensor]) -> None:
    """Fold one eraser x -> x - L R (x - mean) into its writer: row by row into an embedding table; into a linear
    writer's weight (W - L R W) and bias (b - L R (b - mean))."""
    left, right, mean = factors["left"], factors["right"], factors["bias"]
    weight = writer.module.weight
    if writer.embedding:
        weight -= ((weight - mean) @ right.T) @ left.T
    else:
        weight -= left @ (right @ weight)
        bias = writer.module.bias
        bias -= left @ (right @ (bias - mean))


def apply_erasers(model, erasers: dict[str, torch.Tensor]) -> None:
    """Prepare the model, then fold every stored eraser in fitting order (what the family build does to the base)."""
    prepare(model)
    used = 0
    for writer in writers(model, len(model.model.layers)):
        factors = {part: erasers[key] for part in ("left", "right", "bias") if (key := f"{writer.name}.{part}") in erasers}
        if factors:
            apply_eraser(writer, factors)
            used += len(factors)
    if used != len(erasers):
        raise ValueError(f"{len(erasers) - used} stored eraser tensor(s) name no writer of this model")


def token_batches(tokenizer, sentences: list[tuple[str, tuple]]) -> list[tuple[dict, torch.Tensor]]:
    """Right-padded batches and, per token, the number of the word it belongs to (-1: a word without number)."""
    batches = []
    ordered = sorted(sentences, key=lambda item: len(item[0]))  # similar lengths per batch: little padding
    for start in range(0, len(ordered), BATCH):
        chunk = ordered[start:start + BATCH]
        encoded = tokenizer([text for text, _ in chunk], return_offsets_mapping=True, padding=True,
                            return_tensors="pt")
        labels = torch.full(encoded["input_ids"].shape, -1)
        for row, (_, spans) in enumerate(chunk):
            for col, (a, b) in enumerate(encoded["offset_mapping"][row].tolist()):
                hit = [n for s, e, n in spans if a < e and b > s] if b > a else []
                if hit:
                    labels[row, col] = hit[0]
        batches.append(({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}, labels))
    return batches


class _Stop(Exception):
    """Raised by a hook once the writer it watches has run: the rest of the forward pass is not needed."""


@torch.no_grad()
def writer_outputs(model, module: torch.nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's output at every number-carrying token ([N, d]) and those tokens' numbers ([N])."""
    xs, zs, labels = [], [], None

    def keep(_module, _inputs, output):
        mask = labels >= 0
        xs.append(output[mask].double())
        zs.append(labels[mask])
        raise _Stop

    handle = module.register_forward_hook(keep)
    try:
        for inputs, labels in batches:
            try:
                model(**inputs, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(xs), torch.cat(zs)


def fit_erasers(model, tokenizer, sentences, last_layer: int = LAST_LAYER) -> dict[str, torch.Tensor]:
    """Fit and fold one eraser per writer, in order, each on the outputs of the model as edited so far."""
    from concept_erasure import LeaceFitter

    prepare(model)
    batches = token_batches(tokenizer, sentences)
    erasers = {}
    for writer in tqdm(writers(model, last_layer), desc="fitting erasers", disable=None):
        x, z = writer_outputs(model, writer.module, batches)
        # Rank one (constrain_cov_trace off): the stored eraser is three vectors, and the trace guard's mixing is
        # for erasing the same stream repeatedly, which this never does.
        fitter = LeaceFitter(x.shape[1], 1, constrain_cov_trace=False, dtype=torch.float64)
        eraser = fitter.update(x, z.double()).eraser
        factors = {"left": eraser.proj_left, "right": eraser.proj_right, "bias": eraser.bias}
        factors = {k: v.float().contiguous() for k, v in factors.items()}
        apply_eraser(writer, factors)
        erasers.update({f"{writer.name}.{k}": v for k, v in factors.items()})
    return erasers


@torch.no_grad()
def hidden_at_numbers(model, batches, layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """[layers, N, d] hidden states at the number-carrying tokens and their numbers (for held-out probes)."""
    states, numbers = [], []
    for inputs, labels in batches:
        hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        mask = labels >= 0
        states.append(torch.stack([hidden[i][mask] for i in layers]).numpy())
        numbers.append(labels[mask].numpy())
    return np.concatenate(states, axis=1), np.concatenate(numbers)


def number_probe_accuracy(train: tuple, test: tuple) -> list[float]:
    """Per layer, held-out accuracy of a logistic probe for number (scikit-learn, standardised inputs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x_train, z_train), (x_test, z_test) = train, test
    return [float(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
                  .fit(x_train[i], z_train).score(x_test[i], z_test)) for i in range(len(x_train))]


def _mean_nll(model, batches) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, _ in batches:
            logits = model(**inputs, use_cache=False).logits[:, :-1]
            target, mask = inputs["input_ids"][:, 1:], inputs["attention_mask"][:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
            total, count = total + float(nll), count + int(mask.sum())
    return total / count


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merging.family import ERASED, build_family

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ERASER_ROOT / ERASED[0])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base_dir = build_family(("base",))["base"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    fit = number_sentences("train", N_FIT)
    start = time.perf_counter()
    erasers = fit_erasers(model, tokenizer, fit)
    seconds = time.perf_counter() - start
    # What the erasure does, measured on held-out sentences: number probes per layer and next-token loss.
    layers = range(LAST_LAYER + 6)
    probe_fit = token_batches(tokenizer, fit[:1500])
    heldout = token_batches(tokenizer, number_sentences("heldout", N_HELDOUT))
    accuracy = {name: number_probe_accuracy(hidden_at_numbers(m, probe_fit, layers),
                                            hidden_at_numbers(m, heldout, layers))
                for name, m in (("base", base), ("erased", model))}
    args.out.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(erasers, args.out / "erasers.safetensors")
    record = {"last_layer": LAST_LAYER, "n_fit_sentences": N_FIT, "fit_seconds": round(seconds, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "heldout_number_probe_accuracy": {k: [round(v, 3) for v in a] for k, a in accuracy.items()},
              "heldout_perplexity_ratio": round(float(np.exp(_mean_nll(model, heldout) - _mean_nll(base, heldout))), 3)}
    (args.out / "erasure.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
