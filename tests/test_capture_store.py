"""Hook requests and the capture store: patterns equal HF output_attentions, top-k equals HF log-softmax, the
torch-hooks fallback stores what the transformer-lens bridge stores, float16 storage is refused, packed entries
hold exactly the values of unpacked ones (and the probe and similarity tables read from them are equal)."""

from __future__ import annotations

from dataclasses import asdict

import polars as pl
import pytest
import safetensors.torch
import torch

from evaluation.minimal_pairs import PairSelection
from merging.checkpoints import LoadOptions, load_model
from probing.capture import CaptureError, HookRequest, PackedPattern, Tokens, TopK, run_capture
from probing.hooks import LOGITS_HOOK, PATTERN_HOOK, HookError, HookRunner
from probing.similarity.functional import functional_jobs
from probing.similarity.unlabeled import TokenWindows
from probing.minimal_pair_tasks import BUNDLED_DIR
from probing.stage import load_tasks, probe_jobs
from probing.store import CaptureJob, CaptureKey, CaptureStore, ModelRef, capture_model, model_ref

WINDOWS = TokenWindows(tokens=96, window=24)


def hf_eager(folder):
    """A separate eager instance: once the bridge wraps a model it stops returning output_attentions."""
    return load_model(folder, LoadOptions(), attn_implementation="eager")


@pytest.mark.parametrize("backend", ["transformer-lens", "torch-hooks"])
def test_pattern_and_topk_equal_hf_outputs(tiny_family, backend):
    runner = HookRunner(*load_model(tiny_family["a"], LoadOptions()), backend=backend)
    requests = [HookRequest(PATTERN_HOOK.format(i), PackedPattern("float32")) for i in range(3)]
    requests.append(HookRequest(LOGITS_HOOK, TopK(k=50)))
    out = run_capture(runner, WINDOWS, requests, batch_tokens=72)
    model, tokenizer = hf_eager(tiny_family["a"])
    ids = WINDOWS.token_ids(tokenizer)
    with torch.no_grad():
        reference = model(input_ids=ids, output_attentions=True)
    query, key = torch.tril_indices(24, 24)
    for block, request in enumerate(requests[:3]):
        expected = reference.attentions[block]
        assert torch.equal(expected.triu(1), torch.zeros_like(expected))  # causal: the dropped triangle is zero
        torch.testing.assert_close(out[request]["value"], expected[..., query, key], atol=1e-6, rtol=1e-5)
    logp = torch.log_softmax(reference.logits, -1)
    top = logp.topk(50, -1)
    torch.testing.assert_close(out[requests[3]]["logprobs"], top.values, atol=1e-5, rtol=1e-5)
    rest = 1 - top.values.exp().sum(-1)
    torch.testing.assert_close(out[requests[3]]["log_rest"].exp(), rest, atol=1e-5, rtol=1e-4)


def test_fallback_backend_gives_the_same_store(tiny_family, tmp_path):
    model = model_ref("a", tiny_family["a"])
    paradigm = PairSelection("suite", str(BUNDLED_DIR), ("subject_verb_agreement",), 20)
    jobs = probe_jobs(load_tasks(None, minimal_pairs=(paradigm,)), model.n_blocks) + \
        functional_jobs(WINDOWS, model.n_blocks, top_k=32)
    stores = {}
    for backend in ("transformer-lens", "torch-hooks"):
        stores[backend] = CaptureStore(tmp_path / backend)
        runner = HookRunner(*load_model(tiny_family["a"], LoadOptions()), backend=backend)
        capture_model(runner, model, jobs, stores[backend], "float32", log=lambda _: None)
    bridge, fallback = stores.values()
    keys = [job.key(r, model.digest, "float32") for job in jobs for r in job.requests]
    assert len(keys) == 4 + 1 + 4 + 3 + 1  # probe layers + sentence log-likelihoods; similarity
    assert all(bridge.has(k) and fallback.has(k) for k in keys)
    for key in keys:
        a, b = bridge.load(key), fallback.load(key)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
            if a[name].dtype == torch.bfloat16:  # a last-bit difference may round to neighbouring bf16 values
                torch.testing.assert_close(a[name].float(), b[name].float(), atol=1e-2, rtol=1e-2)
            else:
                torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)
    tokens = bridge.load(next(k for k in keys if k.reducer == Tokens().name and k.hook == "hook_embed"))["value"]
    assert tokens.dtype == torch.bfloat16 and tokens.shape == (4, 24, 32)


def test_missing_opens_an_entry_until_its_size_is_recorded(tmp_path, monkeypatch):
    """Every warm run asks the store what each model misses: an entry found whole is recorded with its size and
    then counted whole by that size without opening it; one cut short since is opened, removed and missing."""
    import probing.store as store_module

    store, model = CaptureStore(tmp_path / "captures"), ModelRef("m", tmp_path, "d" * 32, 2, 64)
    jobs = functional_jobs(WINDOWS, model.n_blocks, top_k=8) + functional_jobs(TokenWindows(48, 24), 2, 8)
    keys = [job.key(r, model.digest, "float32") for job in jobs for r in job.requests]
    for i, key in enumerate(keys):
        store.save(key, {"value": torch.zeros(4, i + 1)}, {"model": "m"})
    opened, check_header = [], store_module._check_header
    monkeypatch.setattr(store_module, "_check_header", lambda path: opened.append(path) or check_header(path))
    assert store.missing(jobs, model, "float32") == [] and len(opened) == len(keys) == 2 * 6
    opened.clear()
    assert store.missing(jobs, model, "float32") == [] and opened == [], "counted whole by their recorded sizes"
    cut = store.path(keys[0])
    cut.write_bytes(cut.read_bytes()[:-8])
    assert store.missing(jobs, model, "float32") == [CaptureJob(jobs[0].inputs, jobs[0].requests[:1])]
    assert opened == [cut] and not cut.exists()
    store.save(keys[0], {"value": torch.ones(4, 3)}, {"model": "m"})
    opened.clear()
    assert store.missing(jobs, model, "float32") == [] and opened == [cut], "a new entry is opened once"


def test_float16_storage_and_unknown_hooks_are_refused(tiny_family):
    runner = HookRunner(*load_model(tiny_family["base"], LoadOptions()), backend="torch-hooks")
    with pytest.raises(CaptureError, match="float16 overflows at 65,504"):
        run_capture(runner, WINDOWS, [HookRequest("hook_embed", Tokens("float16"))])
    with pytest.raises(HookError, match="blocks.7.hook_resid_post"):
        run_capture(runner, WINDOWS, [HookRequest("blocks.7.hook_resid_post", Tokens())])


def test_a_capture_key_is_the_digest_of_its_fields():
    """Stored captures are named by these digests: computing them faster (and once per key) must not rename a
    single entry (the literal is this key's digest as `cache_key("capture", asdict(key))` gave it)."""
    from probing.store import CaptureKey
    from runstore.cache import cache_key

    key = CaptureKey("a" * 32, "b" * 32, "blocks.3.hook_resid_post", "pool-float32", "float32", 128)
    assert key.digest == cache_key("capture", asdict(key)) == "fcabed8b2ee0f59dedc2b692de63bee4"
    assert key.digest is key.digest, "computed once per key"


@pytest.mark.parametrize("tensor", [
    torch.randn(7, 5, 33).bfloat16(), torch.randn(300, 64), torch.randint(-5, 49_152, (9, 11), dtype=torch.int32),
    torch.tensor(float("nan")), torch.zeros(0, 4), torch.tensor([True, False]), torch.full((3,), float("-inf")),
    torch.arange(-128, 128, dtype=torch.int8), torch.randn(4, 4, dtype=torch.float64)])
def test_a_packed_entry_loads_bit_for_bit(tmp_path, tensor):
    store, key = CaptureStore(tmp_path), CaptureKey("m" * 32, "i" * 32, "hook_embed", "any", "float32", 8)
    saved = {"value": tensor, "second": tensor.flip(0) if tensor.dim() else tensor}
    store.save(key, saved, {"model": "m"})
    loaded = store.load(key)
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), name


def test_entries_written_before_packing_still_load(tmp_path):
    """Packing is lossless, so it kept every key: a store filled by the earlier code is read as it is."""
    import json

    store, key = CaptureStore(tmp_path), CaptureKey("m" * 32, "i" * 32, "hook_embed", "tokens-bfloat16", "float32", 8)
    values = {"value": torch.randn(2, 8, 16).bfloat16()}
    store.path(key).parent.mkdir(parents=True)
    safetensors.torch.save_file(values, store.path(key), metadata={k: json.dumps(v) for k, v in asdict(key).items()})
    assert store.has(key) and torch.equal(store.load(key)["value"], values["value"])


def test_packed_store_gives_the_probe_and_similarity_tables_of_the_unpacked_one(tiny_family, tmp_path):
    """The same captures stored packed and unpacked (the earlier store's format): equal probe rows, probe items and
    functional similarity rows, from a store that is smaller on disk."""
    from polars.testing import assert_frame_equal

    from probing.similarity.functional import functional_features
    from probing.stage import probe_model

    models = [model_ref(name, tiny_family[name]) for name in ("a", "b")]
    paradigm = PairSelection("suite", str(BUNDLED_DIR), ("subject_verb_agreement", "tense_adverb_agreement"), 30)
    tasks = load_tasks(None, minimal_pairs=(paradigm,))
    jobs = probe_jobs(tasks, models[0].n_blocks) + functional_jobs(WINDOWS, models[0].n_blocks, top_k=32)
    packed = CaptureStore(tmp_path / "packed" / "captures")
    plain = CaptureStore(tmp_path / "plain" / "captures", packed=False)  # the store's format before packing
    for model in models:
        capture_model(HookRunner(*load_model(model.folder, LoadOptions())), model, jobs, packed, "float32",
                      log=lambda _: None)
        for key in (job.key(r, model.digest, "float32") for job in jobs for r in job.requests):
            plain.save(key, packed.load(key), {"model": model.name})
    tables = {}
    for name, store in (("packed", packed), ("plain", plain)):
        probes = [probe_model(model, tasks, store, "float32", [0, 1], log=lambda _: None) for model in models]
        tables[name] = (*(pl.concat(frames) for frames in zip(*probes)),
                        functional_features(models, WINDOWS, store, "float32", top_k=32))
    for packed_table, plain_table in zip(tables["packed"], tables["plain"]):
        assert packed_table.height > 0
        assert_frame_equal(packed_table, plain_table)

    def size(store: CaptureStore) -> int:
        return sum(path.stat().st_size for path in store.root.rglob("*.safetensors"))

    assert size(packed) < 0.9 * size(plain)
