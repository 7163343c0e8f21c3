"""One forward pass per minimal-pair sentence serves probes and behaviour: the capture pass's log-likelihoods equal
lm-eval's own `loglikelihood` answers on the real embedded base model, lm-eval's scores are unchanged when it reads
them, and the probes' pooled states leave the prefix token out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.minimal_pairs import PairSelection
from merging.checkpoints import LoadOptions, load_model
from probing.capture import prefix_token_id, run_capture
from probing.hooks import HookRunner
from probing.minimal_pair_tasks import BUNDLED_DIR, minimal_pair_tasks
from probing.stage import LOGLIK_REQUEST, probe_jobs, scored_sentences
from probing.store import CaptureStore

PARADIGMS = ("subject_verb_agreement", "determiner_noun_agreement")


@pytest.fixture(scope="module")
def base(real_family):
    return load_model(real_family["base"], LoadOptions(precision="float32", device="cpu"))


def _tasks(pairs: int = 12):
    return minimal_pair_tasks([PairSelection("suite", str(BUNDLED_DIR), PARADIGMS, pairs)])


def test_capture_loglikelihoods_equal_lm_evals(base):
    """Per sentence, within 1e-5 per scored token in float32, and the same greedy flags, against
    HFLM.loglikelihood itself. A sentence's sum (~-50 over ~10 tokens) cannot be asked to agree within 1e-5: that is
    2-3 float32 ulps, and lm-eval disagrees with itself by 1.5e-5 between batch sizes 7 and 1 on these sentences
    (the pass differs by up to 3e-5: it also feeds the last token, so its matrix shapes differ)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = base
    tasks = _tasks()
    jobs = probe_jobs(tasks, model.config.num_hidden_layers)
    ours: dict[str, tuple[float, bool]] = {}
    attention = model.config._attn_implementation
    for job in jobs:
        values = run_capture(HookRunner(model, tokenizer), job.inputs, [LOGLIK_REQUEST], batch_tokens=256)
        ours |= {r.text: (v[0].item(), bool(v[1])) for r, v in zip(job.inputs.requests, values[LOGLIK_REQUEST]["value"])}
    assert model.config._attn_implementation == attention, "the runner gives the model its attention back"
    sentences = sorted(ours)
    assert len(sentences) == 2 * 2 * 12
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=7)
    requests = [Instance("loglikelihood", {}, ("", s), i) for i, s in enumerate(sentences)]
    theirs = lm.loglikelihood(requests, disable_tqdm=True)
    got = np.array([ours[s][0] for s in sentences])
    want = np.array([answer[0] for answer in theirs])
    tokens = np.array([len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sentences])
    assert (np.abs(got - want) / tokens).max() < 1e-5, (np.abs(got - want) / tokens).max()
    assert [ours[s][1] for s in sentences] == [answer[1] for answer in theirs]
    assert want.min() < -10, "whole sentences, not one token"


def test_behaviour_reads_the_pass_and_keeps_lm_evals_scores(base, tmp_path):
    """lm-eval run with the pass's answers: same per-item accuracies as lm-eval computing them, every minimal-pair
    request answered, the answers read back from the capture store."""
    from evaluation.behavior import BehaviorSettings, evaluate, sample_items
    from probing.store import capture_model, model_ref

    model, tokenizer = base
    tasks = _tasks(pairs=10)
    jobs = probe_jobs(tasks, model.config.num_hidden_layers)
    store = CaptureStore(tmp_path / "captures")
    ref = model_ref("base", model.name_or_path, tmp_path)
    attention = model.config._attn_implementation
    capture_model(HookRunner(model, tokenizer), ref, jobs, store, "float32", log=lambda _: None)
    assert model.config._attn_implementation == attention
    answers = scored_sentences(jobs, store, ref.digest, "float32")
    assert len(answers) == 2 * 2 * 10
    settings = BehaviorSettings(suites=(), batch_size=8,
                                minimal_pairs=(PairSelection("suite", str(BUNDLED_DIR), PARADIGMS, 10),))
    served, computed = evaluate(model, tokenizer, settings, answers=answers), evaluate(model, tokenizer, settings)
    assert served["merge_eval_answered"] == 2 * 2 * 10 and computed["merge_eval_answered"] == 0
    for raw in (served, computed):
        raw["merge_eval"] = {"settings": {"suites": [], "minimal_pairs": [{"source": "suite"}]}}
    a, b = (sample_items(raw, "base").sort("task", "doc_id", "metric") for raw in (served, computed))
    assert a.equals(b) and a.height == 2 * 10  # acc per pair
    loglik = {s["doc_id"]: s["resps"] for s in served["samples"][f"suite-{PARADIGMS[0]}"]}
    expected = {s["doc_id"]: s["resps"] for s in computed["samples"][f"suite-{PARADIGMS[0]}"]}
    assert max(abs(float(x[0][0]) - float(y[0][0])) for d in loglik for x, y in zip(loglik[d], expected[d])) < 1e-4


def test_pooled_states_leave_out_the_prefix_token(base):
    """Layer 0 of a scored sentence is the mean of its own tokens' embeddings: the prefix token lm-eval conditions
    on is in the pass (layer 1 onwards attends to it) but never in a pooled vector."""
    model, tokenizer = base
    task = _tasks(pairs=10)[0]
    (job,) = probe_jobs([task], model.config.num_hidden_layers)
    assert job.inputs.scored and LOGLIK_REQUEST in job.requests
    out = run_capture(HookRunner(model, tokenizer), job.inputs, job.requests[:1])
    pooled = out[job.requests[0]]["value"]
    embed = model.get_input_embeddings().weight
    for row, request in enumerate(job.inputs.requests):
        ids = tokenizer(request.text, add_special_tokens=False)["input_ids"]
        assert ids[0] != prefix_token_id(tokenizer)
        torch.testing.assert_close(pooled[row], embed[ids].mean(0), rtol=1e-5, atol=1e-6)
