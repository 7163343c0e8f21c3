"""Benchmark the capture on the real embedded base model (SmolLM2-135M), baselines interleaved in the same run:

1. forward: our probe capture (every layer pooled, batches of `--batch-tokens` tokens) vs a plain forward pass
   of the same batches (nothing kept) vs HF `output_hidden_states=True` on them, vs our capture in the previous
   batches of 32 sentences, and across token budgets; tokens/s and GFLOP/s against the machine's matmul
   throughput (a [batch_tokens, d] x [d, mlp] product). 1 torch thread for all (the machine is shared).
2. similarity: the similarity capture (31 layers' token states in bf16, 30 blocks' attention patterns, top-k
   next-token log-probs) over the unlabeled windows vs a plain forward pass of them with logits (nothing kept).
3. bf16: the probe capture with the model at bfloat16 (`precision: bfloat16`) vs float32 on the same batches, and
   how far the pooled features move.
4. KL approximation: KL(p_a ‖ p_b) from top-k captures vs the exact KL from full log-softmax (torch.distributions)
   for the ordered pairs (base‖instruct, instruct‖math, math‖base): per-token error and relative error of the
   mean KL, for several k.

    python bench/bench_capture.py [--parts forward bf16 similarity kl] [--tasks subject_verb_agreement] [--top-k 64 256]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from merging.checkpoints import LoadOptions, load_model
from merging.family import build_family
from probing.capture import DEFAULT_BATCH_TOKENS, Batch, HookRequest, Pool, PooledInputs, TopK, run_capture
from probing.hooks import HookRunner, layer_hooks
from probing.minimal_pair_tasks import bundled_tasks
from probing.similarity.functional import topk_kl
from probing.similarity.unlabeled import TokenWindows
from probing.stage import probe_inputs


def full_logits(folder: Path, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    model, _ = load_model(folder, LoadOptions())
    with torch.inference_mode():
        return torch.cat([model(input_ids=ids[b:b + batch_size]).logits for b in range(0, len(ids), batch_size)])


class SentenceBatches:
    """The previous batching, as an input set: `size` texts per pass, sorted by length, padded to the longest."""

    def __init__(self, inputs: PooledInputs, size: int = 32):
        self.inputs, self.size = inputs, size
        self.name, self.digest, self.max_length, self.n_rows = inputs.name, "", inputs.max_length, inputs.n_rows

    def batches(self, tokenizer, _batch_tokens: int):
        whole = next(self.inputs.batches(tokenizer, 2**62))  # every text in one sorted, padded batch
        for b in range(0, len(whole.input_ids), self.size):
            seq = int(whole.attention_mask[b:b + self.size].sum(1).max())
            yield Batch(whole.input_ids[b:b + self.size, :seq], whole.attention_mask[b:b + self.size, :seq],
                        whole.rows[b:b + self.size], whole.weights[b:b + self.size, :, :seq])


class OneBatch:
    """One prepared batch as an input set (its rows index the whole set's buffers)."""

    def __init__(self, batch: Batch):
        self.batch, self.name, self.digest, self.max_length = batch, "one batch", "", batch.input_ids.shape[1]
        self.n_rows = int(batch.rows.max()) + 1

    def batches(self, tokenizer, _batch_tokens: int):
        yield self.batch


def matmul_gflops(tokens: int, d: int, hidden: int, seconds: float = 1.0) -> float:
    """Best GFLOP/s of a [tokens, d] x [d, hidden] float32 matmul (the MLP's shape) over ~`seconds`."""
    a, b = torch.randn(tokens, d), torch.randn(d, hidden)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * tokens * d * hidden / best / 1e9


def forward_rows(folder: Path, task_names: list[str], batch_tokens: int = DEFAULT_BATCH_TOKENS, reps: int = 3,
                 budgets: tuple[int, ...] = (256, 512, 1024), log=print) -> list[dict]:
    """Rows for bench/run_all.py: each method timed `reps` times interleaved with the others, best time kept."""
    model, tokenizer = load_model(folder, LoadOptions())
    hooks_runner = HookRunner(*load_model(folder, LoadOptions()), backend="torch-hooks")
    bridge_runner = HookRunner(*load_model(folder, LoadOptions()))
    tasks = bundled_tasks(task_names)
    inputs = [probe_inputs(task, "mean", 128)[0] for task in tasks]
    requests = [HookRequest(hook, Pool()) for hook in layer_hooks(hooks_runner.n_blocks)]
    batches = [b for i in inputs for b in i.batches(tokenizer, batch_tokens)]
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    padded = sum(b.input_ids.numel() for b in batches)

    def forward(b, **kwargs):
        with torch.inference_mode():
            model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask, **kwargs)

    def ours(runner, budget=batch_tokens, wrap=lambda i: i):
        return lambda: [run_capture(runner, wrap(i), requests, budget) for i in inputs]

    # Same batches: interleaved batch by batch, so all three see the same load on a shared machine.
    per_batch = {"plain": forward, "hidden_states": lambda b: forward(b, output_hidden_states=True),
                 "ours": lambda b: run_capture(hooks_runner, OneBatch(b), requests),
                 "ours_bridge": lambda b: run_capture(bridge_runner, OneBatch(b), requests)}
    # Other batchings: interleaved run by run.
    whole = {"ours_whole": ours(hooks_runner), "ours_32_sentences": ours(hooks_runner, wrap=SentenceBatches),
             **{f"ours_{n}_tokens": ours(hooks_runner, n) for n in budgets}}
    best = {name: float("inf") for name in [*per_batch, *whole]}
    forward(batches[0]), per_batch["ours"](batches[0])  # warm-up: first-call allocations and lazy imports
    for rep in range(reps):
        spent = dict.fromkeys(per_batch, 0.0)
        for i, b in enumerate(batches):
            methods = list(per_batch.items())
            for name, fn in methods[(rep + i) % 4:] + methods[:(rep + i) % 4]:  # each goes first in turn
                started = time.perf_counter()
                fn(b)
                spent[name] += time.perf_counter() - started
        for name, fn in whole.items():
            started = time.perf_counter()
            fn()
            spent[name] = time.perf_counter() - started
        best = {name: min(best[name], spent[name]) for name in best}
    config = model.config
    params = sum(p.numel() for n, p in model.base_model.named_parameters() if "embed" not in n)
    flops = 2 * params * padded  # the weight matmuls; attention at <= 128 tokens adds < 5%
    peak = matmul_gflops(min(batch_tokens, 4096), config.hidden_size, config.intermediate_size)
    achieved = flops / best["plain"] / 1e9
    workload = (f"{len(batches)} batches of <= {batch_tokens} tokens, {tokens} tokens ({padded} with padding), "
                f"{', '.join(task_names)}; 31 layers pooled; 1 thread")
    log(f"forward: {workload}; plain {tokens / best['plain']:.0f} tokens/s = {achieved:.1f} GFLOP/s, matmul "
        f"{peak:.1f} GFLOP/s ({achieved / peak:.0%})")

    def row(name, ours_label, baseline, baseline_label, quality="identical values (tests/test_capture.py)"):
        return {"section": "capture", "workload": workload, "ours": ours_label, "ours_s": best[name],
                "baseline": baseline_label, "baseline_s": best[baseline], "ratio": best[baseline] / best[name],
                "quality": quality, "tokens_per_s": tokens / best[name]}

    rows = [row("ours", "capture, torch hooks", "plain", "plain forward (SDPA, nothing kept)",
                f"plain forward: {achieved:.1f} GFLOP/s, {achieved / peak:.0%} of matmul {peak:.1f} GFLOP/s"),
            row("ours", "capture, torch hooks", "hidden_states", "output_hidden_states=True"),
            row("ours_bridge", "capture, transformer-lens bridge", "plain", "plain forward"),
            row("ours_whole", f"capture, {batch_tokens}-token batches", "ours_32_sentences",
                "capture, 32-sentence batches")]
    rows += [row(f"ours_{n}_tokens", f"capture, {n}-token batches", "ours_whole",
                 f"capture, {batch_tokens}-token batches") for n in budgets]
    return rows


def bf16_row(folder: Path, task_names: list[str], batch_tokens: int = DEFAULT_BATCH_TOKENS, reps: int = 3,
             log=print) -> dict:
    """The probe capture with the model loaded at bfloat16 (config `precision: bfloat16`) vs float32, on the same
    batches, interleaved; quality: the largest difference of a pooled feature relative to its vector's largest
    float32 entry (the residual norm grows to ~1e4 over the layers), over every layer and request."""
    runners = {p: HookRunner(*load_model(folder, LoadOptions(precision=p)), backend="torch-hooks")
               for p in ("float32", "bfloat16")}
    inputs = [probe_inputs(task, "mean", 128)[0] for task in bundled_tasks(task_names)]
    requests = [HookRequest(hook, Pool()) for hook in layer_hooks(runners["float32"].n_blocks)]
    best, pooled = dict.fromkeys(runners, float("inf")), {}
    for rep in range(reps):
        for precision, runner in (list(runners.items())[::-1] if rep % 2 else list(runners.items())):
            started = time.perf_counter()
            outs = [run_capture(runner, i, requests, batch_tokens) for i in inputs]
            best[precision] = min(best[precision], time.perf_counter() - started)
            pooled[precision] = torch.cat([torch.stack([out[r]["value"] for r in requests]) for out in outs], dim=1)
    exact, rounded = pooled["float32"], pooled["bfloat16"]
    relative = (rounded - exact).abs().amax(-1) / exact.abs().amax(-1)  # per layer and request
    worst, typical = relative.max().item(), relative.median().item()
    tokens = sum(int(b.attention_mask.sum()) for i in inputs for b in i.batches(runners["float32"].tokenizer,
                                                                                batch_tokens))
    workload = f"probe capture of {', '.join(task_names)}: {tokens} tokens, {batch_tokens}-token batches, 1 thread"
    log(f"bf16: {workload}; bfloat16 {best['bfloat16']:.2f} s vs float32 {best['float32']:.2f} s; pooled features "
        f"differ by up to {worst:.1e} (median {typical:.1e}) of their vector's largest entry")
    return {"section": "capture", "workload": workload, "ours": "capture, model at bfloat16",
            "ours_s": best["bfloat16"], "baseline": "capture, model at float32 (default)",
            "baseline_s": best["float32"], "ratio": best["float32"] / best["bfloat16"],
            "quality": f"pooled features differ from float32 by up to {worst:.1e} (median {typical:.1e}) of the "
                       "vector's largest entry",
            "tokens_per_s": tokens / best["bfloat16"]}


def similarity_row(folder: Path, windows: TokenWindows, reps: int = 2) -> dict:
    from probing.similarity.functional import functional_jobs

    model, tokenizer = load_model(folder, LoadOptions())
    runner = HookRunner(*load_model(folder, LoadOptions()))
    ids = windows.token_ids(tokenizer)
    job = functional_jobs(windows, runner.n_blocks)[0]
    per_pass = max(1, job.batch_tokens // windows.window)

    def plain():
        with torch.inference_mode():
            for b in range(0, len(ids), per_pass):
                model(input_ids=ids[b:b + per_pass])

    methods = {"plain": plain, "ours": lambda: run_capture(runner, windows, job.requests, job.batch_tokens)}
    best = {name: float("inf") for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return {"section": "capture", "workload": f"similarity set: {ids.numel()} tokens in windows of {windows.window}; "
            f"{job.batch_tokens}-token batches; {len(job.requests)} hooks; 1 thread",
            "ours": f"similarity capture ({runner.backend}, eager attention)", "ours_s": best["ours"],
            "baseline": "plain forward with logits (SDPA)", "baseline_s": best["plain"],
            "ratio": best["plain"] / best["ours"], "quality": "equal to HF outputs (tests/test_capture_store.py)",
            "tokens_per_s": ids.numel() / best["ours"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per pass for the KL logits")
    parser.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS)
    parser.add_argument("--tasks", nargs="+", default=["subject_verb_agreement"])
    parser.add_argument("--models", nargs="+", default=["base", "instruct", "math"])
    parser.add_argument("--top-k", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--parts", nargs="+", choices=["forward", "bf16", "similarity", "kl"],
                        default=["forward", "bf16", "similarity", "kl"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    family = build_family(tuple(dict.fromkeys(["base", *args.models])))
    if "forward" in args.parts:
        for r in forward_rows(family["base"], args.tasks, args.batch_tokens):
            print(f"  {r['ours']:40} {r['ours_s']:7.2f} s ({r['tokens_per_s']:6.0f} tokens/s)  vs "
                  f"{r['baseline']:40} {r['baseline_s']:7.2f} s  speed-up {r['ratio']:.2f}x")
    if "bf16" in args.parts:
        bf16_row(family["base"], args.tasks, args.batch_tokens)
    if "similarity" in args.parts:
        r = similarity_row(family["base"], TokenWindows(args.tokens, args.window))
        print(f"  {r['ours']} {r['ours_s']:.2f} s vs {r['baseline']} {r['baseline_s']:.2f} s: {r['ratio']:.2f}x")
    if "kl" in args.parts:
        kl_error(family, TokenWindows(args.tokens, args.window), args)


def kl_error(family: dict[str, Path], windows: TokenWindows, args) -> None:
    from transformers import AutoTokenizer

    ids = windows.token_ids(AutoTokenizer.from_pretrained(family["base"]))
    n = ids.numel()
    logits = {name: full_logits(family[name], ids, args.batch_size) for name in args.models}
    vocab = logits["base"].shape[-1]
    batch = Batch(ids, torch.ones_like(ids), torch.arange(len(ids))[:, None])
    reduced = {k: {name: {t: v[:, 0] for t, v in TopK(k)(value, batch).items()} for name, value in logits.items()}
               for k in args.top_k}
    for a, b in zip(args.models, args.models[1:] + args.models[:1]):
        exact = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=logits[a]),
                                                  torch.distributions.Categorical(logits=logits[b]))
        exact = exact.reshape(-1).double()
        print(f"KL({a} ‖ {b}) exact mean {exact.mean():.4f} nats over {n} tokens (vocab {vocab})")
        for k in args.top_k:
            approx = topk_kl(reduced[k][a], reduced[k][b], vocab)
            error = (approx - exact).abs()
            print(f"  top-{k:<5} mean {approx.mean():.4f}  relative error of the mean "
                  f"{(approx.mean() - exact.mean()) / exact.mean():+.2%}  |error| per token mean {error.mean():.2e} "
                  f"max {error.max():.2e}")


if __name__ == "__main__":
    main()
