"""Benchmark the capture pass on the real embedded base model (SmolLM2-135M, 31 layers), baseline in the same run:
our hooked pass that pools every layer (transformer-lens bridge) vs a plain HF forward pass of the same batches
(no hidden states kept): time ratio and peak RSS growth of each. The probes have their own: bench/bench_probes.py.

    python bench/bench_probing.py [--task noun_number] [--batch-size 32]
"""

from __future__ import annotations

import argparse

import torch

from measure import timed
from merging.checkpoints import LoadOptions, load_model
from merging.family import build_family
from probing.capture import capture, task_requests
from probing.hooks import HookRunner
from probing.stage import load_tasks


def plain_forward(model, tokenizer, texts: list[str], batch_size: int, max_length: int) -> None:
    texts = sorted(texts, key=lambda t: len(tokenizer(t).input_ids))
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            model.base_model(**enc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="noun_number")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = build_family(("base",))["base"]
    task = load_tasks("bundled", [args.task])[0]
    requests, index = task_requests(task)
    texts = sorted({r.text for r in requests})

    plain_model, tokenizer = load_model(folder, LoadOptions())
    plain_forward(plain_model, tokenizer, texts[:8], args.batch_size, args.max_length)  # warm-up
    _, plain_s, plain_mb = timed(lambda: plain_forward(plain_model, tokenizer, texts, args.batch_size,
                                                       args.max_length))
    runner = HookRunner(*load_model(folder, LoadOptions()))
    capture(runner, requests[:8], args.batch_size, args.max_length)  # warm-up
    pooled, capture_s, capture_mb = timed(lambda: capture(runner, requests, args.batch_size, args.max_length))
    hooks_runner = HookRunner(*load_model(folder, LoadOptions()), backend="torch-hooks")  # HF module map, eager
    _, hooks_s, hooks_mb = timed(lambda: capture(hooks_runner, requests, args.batch_size, args.max_length))
    print(f"capture [{runner.backend}] {task.name}: {len(texts)} texts, {pooled.shape[0]} layers pooled")
    print(f"  plain forward   {plain_s:7.2f} s   peak RSS +{plain_mb:6.1f} MB")
    print(f"  capture pass    {capture_s:7.2f} s   peak RSS +{capture_mb:6.1f} MB   "
          f"time ratio {capture_s / plain_s:.2f}x   stored pooled: {pooled.numel() * 4 / 2**20:.1f} MB (fp32)")
    print(f"  capture, torch  {hooks_s:7.2f} s   peak RSS +{hooks_mb:6.1f} MB   time ratio {hooks_s / plain_s:.2f}x "
          "(fallback backend: HF module map, eager attention)")


if __name__ == "__main__":
    main()
