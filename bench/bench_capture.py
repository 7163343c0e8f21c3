"""Benchmark the similarity capture on the real embedded base model (SmolLM2-135M), baselines in the same run:

1. cost: one capture pass of every similarity request (31 layers' token states in bf16, 30 blocks' attention
   patterns, top-k next-token log-probs) over the unlabeled set vs a plain HF forward pass of the same token
   windows (default SDPA attention, logits computed, nothing kept): time ratio, peak RSS growth, stored bytes.
2. KL approximation: KL(p_a ‖ p_b) from top-k captures vs the exact KL from full log-softmax (torch.distributions)
   for the ordered pairs (base‖instruct, instruct‖math, math‖base): per-token error and relative error of the
   mean KL, for several k.

    python bench/bench_capture.py [--tokens 2048] [--window 128] [--parts cost kl] [--top-k 64 256 1024]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from measure import timed
from merging.checkpoints import LoadOptions, load_model
from merging.family import build_family
from probing.capture import Batch, TopK
from probing.hooks import HookRunner
from probing.similarity.functional import functional_jobs, topk_kl
from probing.similarity.unlabeled import TokenWindows
from probing.store import CaptureStore, capture_model, model_ref


def plain_forward(model, ids: torch.Tensor, batch_size: int) -> None:
    with torch.inference_mode():
        for begin in range(0, len(ids), batch_size):
            model(input_ids=ids[begin:begin + batch_size])


def full_logits(folder: Path, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    model, _ = load_model(folder, LoadOptions())
    with torch.inference_mode():
        return torch.cat([model(input_ids=ids[b:b + batch_size]).logits for b in range(0, len(ids), batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=["base", "instruct", "math"])
    parser.add_argument("--top-k", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--parts", nargs="+", choices=["cost", "kl"], default=["cost", "kl"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    family = build_family(tuple(dict.fromkeys(["base", *args.models])))
    windows = TokenWindows(args.tokens, args.window)
    if "cost" in args.parts:
        capture_cost(family["base"], windows, args.batch_size)
    if "kl" in args.parts:
        kl_error(family, windows, args)


def capture_cost(folder: Path, windows: TokenWindows, batch_size: int) -> None:
    plain_model, tokenizer = load_model(folder, LoadOptions())
    ids = windows.token_ids(tokenizer)
    plain_forward(plain_model, ids[:1], 1)  # warm-up
    _, plain_s, plain_mb = timed(lambda: plain_forward(plain_model, ids, batch_size))
    del plain_model

    model = model_ref("base", folder)
    runner = HookRunner(*load_model(folder, LoadOptions()))
    jobs = functional_jobs(windows, model.n_blocks, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as scratch:
        store = CaptureStore(Path(scratch))
        _, capture_s, capture_mb = timed(lambda: capture_model(runner, model, jobs, store, "float32", log=print))
        stored = sum(p.stat().st_size for p in Path(scratch).rglob("*.safetensors"))
    n = ids.numel()
    print(f"similarity capture [{runner.backend}] on {n} tokens ({len(ids)} windows of {windows.window}):")
    print(f"  plain forward  {plain_s:7.2f} s  peak RSS +{plain_mb:6.1f} MB")
    print(f"  capture pass   {capture_s:7.2f} s  peak RSS +{capture_mb:6.1f} MB  time ratio "
          f"{capture_s / plain_s:.2f}x  stored {stored / 2**20:.1f} MB ({stored / n / 1024:.1f} KiB/token)")


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
