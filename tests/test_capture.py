"""Capture: pooled layer ℓ equals HF output_hidden_states[ℓ] pooled (fp32, 1e-5), on both hook backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.checkpoints import LoadOptions, load_model
from probing.capture import CaptureError, PooledInputs, Request, capture, task_features, task_requests, token_batches
from probing.holmes import write_task
from probing.hooks import HookRunner

TEXTS = ["the cat sat on the mat", "a bird sings", "we walked home in the park today"]
REQUESTS = [Request(TEXTS[0], "mean"), Request(TEXTS[0], "last"), Request(TEXTS[0], "span", 4, 7),
            Request(TEXTS[1], "span", 2, 12), Request(TEXTS[2], "mean"), Request(TEXTS[2], "span", 10, 21)]


def reference(folder, requests, options=LoadOptions()):
    """Pool HF output_hidden_states one text at a time (no padding); layer L from a hook on the last block, since
    HF's last hidden state is after the final norm and ours (by definition) is before it."""
    model, tokenizer = load_model(folder, options, attn_implementation="eager")
    last_block = {}
    model.base_model.layers[-1].register_forward_hook(
        lambda mod, args, out: last_block.update(h=out[0] if isinstance(out, tuple) else out))
    out = []
    for r in requests:
        enc = tokenizer(r.text, return_offsets_mapping=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(input_ids=enc.input_ids, output_hidden_states=True).hidden_states
        offsets = enc.offset_mapping[0]
        if r.kind == "mean":
            mask = offsets[:, 1] > offsets[:, 0]
        elif r.kind == "last":
            mask = torch.zeros(len(offsets), dtype=torch.bool)
            mask[-1] = True
        else:
            mask = (offsets[:, 0] < r.end) & (offsets[:, 1] > r.start)
        layers = [*hidden[:-1], last_block["h"]]
        out.append(torch.stack([h[0][mask].mean(0) for h in layers]))
        final = model.base_model.norm(last_block["h"])
        assert torch.allclose(final, hidden[-1], atol=1e-5)  # the documented caveat: HF's last = normed last block
    return torch.stack(out, 1)


@pytest.mark.parametrize("backend", ["transformer-lens", "torch-hooks"])
def test_capture_equals_hf_hidden_states(tiny_family, backend):
    runner = HookRunner(*load_model(tiny_family["a"], LoadOptions()), backend=backend)
    assert runner.backend == backend
    pooled = capture(runner, REQUESTS, batch_tokens=16)
    expected = reference(tiny_family["a"], REQUESTS)
    assert pooled.shape == (4, len(REQUESTS), 32)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_capture_equals_hf_on_real_model():
    from merging.family import build_family

    base = build_family(("base",))["base"]
    requests = REQUESTS[:4]
    runner = HookRunner(*load_model(base, LoadOptions()))
    pooled = capture(runner, requests, batch_tokens=64)
    assert pooled.shape == (31, len(requests), 576)
    expected = reference(base, requests)
    scale = expected.abs().amax(-1, keepdim=True)  # the residual norm grows to ~1e4: compare relative to it
    assert ((pooled - expected).abs() / scale).max() < 1e-5


def test_token_batches_keep_order_and_budget():
    lengths = np.array([2, 3, 3, 5, 8, 8, 30])
    items = np.array([6, 0, 5, 1, 4, 2, 3])
    batches = list(token_batches(lengths, 16, items))
    assert np.concatenate(batches).tolist() == items.tolist()  # every item once, in length order
    assert [b.tolist() for b in batches] == [[6, 0, 5], [1, 4], [2], [3]]  # 3 × 3 (4 × 5 > 16); 2 × 8; 8; 30 alone
    assert all(len(b) * lengths[np.isin(items, b)].max() <= 16 for b in batches[:-1])


def test_capture_by_token_budget_equals_unbatched_capture(tiny_family):
    """Per-request pooled vectors, in request order, do not depend on the batching: one text per pass (no
    padding), a budget that pads several texts per pass, and one pass for all (the old 32-sentence batches)."""
    from tests.conftest import TINY_TEXT

    requests = [Request(t, kind) for kind in ("mean", "last") for t in TINY_TEXT]
    requests.append(Request(TINY_TEXT[4], "span", 10, 25))
    runner = HookRunner(*load_model(tiny_family["base"], LoadOptions()), backend="torch-hooks")
    shapes = [tuple(b.input_ids.shape) for b in PooledInputs(requests, 128, "").batches(runner.tokenizer, 64)]
    assert len(shapes) > 1 and any(rows > 1 for rows, _ in shapes) and all(r * s <= 64 for r, s in shapes)
    alone = capture(runner, requests, batch_tokens=1)
    for budget in (64, 100_000):
        torch.testing.assert_close(capture(runner, requests, batch_tokens=budget), alone, atol=1e-5, rtol=1e-5)


def test_span_cut_off_by_max_length_is_a_clear_error(tiny_family):
    runner = HookRunner(*load_model(tiny_family["base"], LoadOptions()))
    with pytest.raises(CaptureError, match="no token covers span"):
        capture(runner, [Request(TEXTS[2], "span", 25, 30)], max_length=3)


def test_pair_items_concatenate(tmp_path, tiny_family):
    items = [{"inputs": [("cat", 0, 4, 7), ("mat", 1, 2, 5)], "context": ["the cat sat", "a mat"], "label": i % 2,
              "split": "train"} for i in range(2)]
    from probing.holmes import read_task

    task = read_task(write_task(tmp_path / "t", "t", "syntax", "SENTENCE_PAIR_TOKENS_BI", ["a", "b"], items))
    requests, index = task_requests(task)
    assert len(requests) == 2 and index.tolist() == [[0, 1], [0, 1]]  # identical items share their requests
    pooled = capture(HookRunner(*load_model(tiny_family["base"], LoadOptions())), requests)
    features = task_features(pooled, index)
    assert features.shape == (4, 2, 64)
    np.testing.assert_array_equal(features[:, 0, 32:], pooled[:, 1])


def test_probe_inputs_are_built_once_per_task_content_and_settings(tmp_path, monkeypatch):
    """A warm run asks for every task's inputs twice per model: the same content (a task read again) and settings
    build them once; other settings or content build their own."""
    import probing.capture as capture_module
    from probing.holmes import read_task

    built = []
    monkeypatch.setattr(capture_module, "task_requests", lambda task, pooling: built.append(task.name) or
                        task_requests(task, pooling))
    items = [{"inputs": [TEXTS[i % 3]], "context": [], "label": i % 2, "split": "train"} for i in range(4)]
    folder = write_task(tmp_path / "t", "t", "syntax", "SENTENCE", ["a", "b"], items)
    inputs, index = capture_module.probe_inputs(read_task(folder), "mean", 128)
    again = capture_module.probe_inputs(read_task(folder), "mean", 128)
    assert again[0] is inputs and again[1] is index and built == ["t"]
    assert capture_module.probe_inputs(read_task(folder), "last", 128)[0].digest != inputs.digest
    assert capture_module.probe_inputs(read_task(folder), "mean", 64)[0].max_length == 64 and len(built) == 3
    other = read_task(write_task(tmp_path / "u", "t", "syntax", "SENTENCE", ["a", "b"], items[::-1]))
    assert [r.text for r in capture_module.probe_inputs(other, "mean", 128)[0].requests] == [
        TEXTS[0], TEXTS[2], TEXTS[1]] and len(built) == 4


def test_each_distinct_text_runs_once_with_every_request_pooled_from_it(tmp_path, tiny_family):
    """Bundled tasks ask several spans of one text (antonym_pair: 400 requests over 200 texts): the capture runs
    each distinct text through the model once, and every request pooled from that pass equals the request
    captured alone."""
    from probing.capture import run_capture
    from probing.holmes import read_task
    from probing.stage import probe_jobs

    contexts = ["the cat sat on the mat", "a bird sings in a tree", "the dogs run in the park"]
    items = [{"inputs": [(c.split()[i], 0, *span(c, i)), (c.split()[-1], 0, *span(c, -1))], "context": [c],
              "label": i % 2, "split": "train"} for c in contexts for i in range(3)]
    task = read_task(write_task(tmp_path / "t", "t", "semantics", "SENTENCE_PAIR_TOKENS_BI", ["a", "b"], items))
    runner = HookRunner(*load_model(tiny_family["base"], LoadOptions()), backend="torch-hooks")
    (job,) = probe_jobs([task], runner.n_blocks, batch_tokens=10_000)
    inputs = job.inputs
    assert inputs.n_rows == 12 and len({r.text for r in inputs.requests}) == 3  # 4 distinct spans per text
    seen: list[tuple[int, ...]] = []

    def count(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen.extend(tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask))

    handle = runner.model.base_model.register_forward_pre_hook(count, with_kwargs=True)
    out = run_capture(runner, job.inputs, job.requests, job.batch_tokens)
    handle.remove()
    expected = sorted(tuple(runner.tokenizer(c)["input_ids"]) for c in contexts)
    assert sorted(seen) == expected  # every distinct text once, nothing else
    pooled = torch.stack([out[r]["value"] for r in job.requests])
    alone = torch.cat([capture(runner, [r], batch_tokens=1) for r in inputs.requests], dim=1)
    torch.testing.assert_close(pooled, alone, atol=1e-5, rtol=1e-5)


def span(text: str, word: int) -> tuple[int, int]:
    """Character span of the word-th word of `text` (words split on single spaces)."""
    words = text.split(" ")
    start = sum(len(w) + 1 for w in words[:word % len(words)])
    return start, start + len(words[word])
