"""Merge preflight: one test per mismatch kind (clear error naming the models, nothing written), and warnings."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, save_tiny, tiny_config
from safetensors.torch import load_file, save_file

from flows.cli import main
from merging.family import load_state_dict
from merging.preflight import PreflightError, cached_preflight, preflight
from runstore.cache import read_ledger


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def _resaved(base: Path, target: Path, transform) -> Path:
    """A copy of `base` whose weights went through `transform(name, tensor)`."""
    folder = _copy(base, target)
    for shard in folder.glob("*.safetensors"):
        tensors = {name: transform(name, t) for name, t in load_file(shard).items()}
        save_file(tensors, str(shard), metadata={"format": "pt"})
    return folder


def _saved_with(folder: Path, base: Path, tokenizer, **config_changes) -> Path:
    """A tiny model with a changed config: the base weights where the shapes still fit, fresh ones elsewhere."""
    config = tiny_config(config_changes.pop("vocab_size", len(tokenizer)))
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    state = {k: v for k, v in load_state_dict(base).items()}
    from transformers import LlamaForCausalLM

    fresh = LlamaForCausalLM(config).state_dict()
    return save_tiny(folder, {k: state[k] if k in state and state[k].shape == v.shape else v
                              for k, v in fresh.items()}, tokenizer, config)


@pytest.fixture(scope="module")
def variants(tiny_family, tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("preflight")
    base = tiny_family["base"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    out = {"base": base, "a": tiny_family["a"]}
    out["arch"] = _copy(base, root / "arch")
    _edit_config(out["arch"], architectures=["MistralForCausalLM"], model_type="mistral")
    out["shape"] = _saved_with(root / "shape", base, tokenizer, intermediate_size=48)
    out["untied"] = _saved_with(root / "untied", base, tokenizer, tie_word_embeddings=False)
    out["short_vocab"] = _saved_with(root / "short_vocab", base, tokenizer, vocab_size=len(tokenizer) - 8)
    out["padded"] = _saved_with(root / "padded", base, tokenizer, vocab_size=len(tokenizer) + 64)
    out["bf16"] = _resaved(base, root / "bf16", lambda name, t: t.to(torch.bfloat16))
    out["nan"] = _resaved(base, root / "nan", lambda name, t: t.index_fill(0, torch.tensor([1]), float("nan"))
                          if name == "model.layers.1.mlp.up_proj.weight" else t)
    out["tokenizer"] = _copy(base, root / "tokenizer")
    other = make_tokenizer(root / "other-tokenizer")  # same training text, different normaliser
    from tokenizers import normalizers

    other.backend_tokenizer.normalizer = normalizers.Lowercase()
    other.save_pretrained(out["tokenizer"])
    return out


def _files(folders) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for folder in folders for p in Path(folder).rglob("*")}


@pytest.mark.parametrize("odd, pattern", [
    ("arch", r"config: 'arch' has architectures=\['MistralForCausalLM'\] but 'base' has \['LlamaForCausalLM'\]"),
    ("shape", r"shapes: 'shape' differs from 'base' in 9 tensor\(s\): model.layers.0.mlp.down_proj.weight \[32, 48\]"),
    ("untied", r"embeddings: 'base' ties its output head .* but 'untied' has its own lm_head.weight"),
    ("tokenizer", r"tokenizer: 'tokenizer' and 'base' encode the probe text differently"),
    ("nan", r"values: 'nan' has 32 NaN/inf weight\(s\) in 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"),
])
def test_mismatch_fails_fast_naming_models(variants, odd, pattern):
    models = {"base": variants["base"], "a": variants["a"], odd: variants[odd]}
    before = _files(models.values())
    with pytest.raises(PreflightError) as caught:
        preflight(models, base="base")
    assert any(re.search(pattern, line) for line in caught.value.problems), caught.value.problems
    assert not any("'a'" in line for line in caught.value.problems)  # the compatible child is not blamed
    assert _files(models.values()) == before  # nothing written


def test_embedding_rows_below_tokenizer_size(variants):
    with pytest.raises(PreflightError, match=r"vocabulary: 'short_vocab' has \d+ embedding rows for a \d+-token"):
        preflight({"short_vocab": variants["short_vocab"]})


def test_warnings_where_mergekit_copes(variants):
    assert preflight({"base": variants["base"], "a": variants["a"]}, base="base", merge_dtype="float32") == []
    padded = preflight({"p": variants["padded"], "q": variants["padded"]})
    assert padded and all("64 padding rows" in w for w in padded)
    mixed = preflight({"base": variants["base"], "bf16": variants["bf16"]}, base="base", merge_dtype="bfloat16")
    assert any("differ in precision (base=F32, bf16=BF16)" in w for w in mixed)
    assert any("merging in bfloat16 rounds the weights of 'base'" in w for w in mixed)


def test_cli_reports_preflight_problems_as_user_errors(variants, tmp_path, monkeypatch, capsys):
    """`merge-eval run` prints each mismatch on one line and exits 2 (the flow itself needs a Prefect server)."""
    import flows.pipeline

    models = {n: variants[n] for n in ("base", "a", "arch", "untied")}
    monkeypatch.setattr(flows.pipeline, "merge_eval", lambda config_path, run_dir: preflight(models, base="base"))
    config = tmp_path / "ok.yaml"
    config.write_text(json.dumps({"name": "ok", "base": "base", "models": [{"name": "base",
                                                                            "source": str(variants["base"])}]}))
    assert main(["run", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("error: config: 'arch' has architectures=['MistralForCausalLM']")
    assert any(line.startswith("error: embeddings: 'base' ties its output head") for line in lines)
    assert not any("Traceback" in line for line in lines)


def test_a_passing_preflight_is_remembered_by_content(variants, tmp_path, monkeypatch):
    """The same parents are not scanned again; changed content is, and a failing check is never remembered."""
    import merging.preflight

    scans = []
    scan = merging.preflight.check_values
    monkeypatch.setattr(merging.preflight, "check_values", lambda checkpoints: scans.append(1) or scan(checkpoints))
    models = {"base": _copy(variants["base"], tmp_path / "base"), "a": variants["a"]}
    assert cached_preflight(models, "base", "float32", tmp_path / "cache") == []
    assert cached_preflight(models, "base", "float32", tmp_path / "cache") == []
    assert len(scans) == 1
    _edit_config(models["base"], architectures=["MistralForCausalLM"])
    with pytest.raises(PreflightError, match="MistralForCausalLM"):
        cached_preflight(models, "base", "float32", tmp_path / "cache")
    assert read_ledger(tmp_path / "cache").select("hit").to_series().to_list() == [False, True]


def test_weight_features_compare_the_tensors_the_base_stores(variants, tmp_path):
    """A model that stores more than a tied base (the number_erased child: its own head, projection biases) is not
    a merge problem for weight features: they compare the base's tensors. Here every one equals the base's, so the
    pairs are at distance 0 although the untied head is a fresh matrix; merging either is still refused."""
    import polars as pl

    from probing.similarity.weights import weight_features

    biased = _copy(variants["base"], tmp_path / "biased")
    tensors = load_file(biased / "model.safetensors")
    save_file(tensors | {"model.layers.0.mlp.down_proj.bias": torch.ones(tensors["model.norm.weight"].shape)},
              str(biased / "model.safetensors"), metadata={"format": "pt"})
    models = {"base": variants["base"], "untied": variants["untied"], "biased": biased}
    frame = weight_features(models, "base")
    for other in ("untied", "biased"):
        pair = pl.col("model_a").is_in(["base", other]) & pl.col("model_b").is_in(["base", other])
        rows = frame.filter(pair & (pl.col("feature") == "l2_distance") & (pl.col("scope") == "global"))
        assert rows.height == 1 and rows["value"][0] == 0
    with pytest.raises(PreflightError, match=r"'biased' has 1 tensor\(s\) 'base' lacks: model.layers.0.mlp.down_proj"):
        preflight({"base": variants["base"], "biased": biased}, base="base")
