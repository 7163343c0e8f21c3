"""On a CUDA GPU (scripts/gpu_check.sh): captures equal HF's hidden states computed on the same device, in float32
and bfloat16, and probes fitted on captures taken on the GPU equal the probes of CPU captures within float noise.

Marked `gpu`; skipped where CUDA is absent. MERGE_EVAL_GPU_TEST_DEVICE=cpu (`scripts/gpu_check.sh --cpu-dry-run`)
runs the same tests on the CPU with the tiny family, which checks everything but CUDA itself; the last test runs
that dry run of the whole script.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from merging.checkpoints import LoadOptions, load_model
from probing.capture import Request, capture
from probing.hooks import HookRunner

DEVICE = os.environ.get("MERGE_EVAL_GPU_TEST_DEVICE", "cuda")
gpu = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                         reason="needs a CUDA GPU (scripts/gpu_check.sh runs these where one is lent; --cpu-dry-run "
                                "runs them on the CPU)")
ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["the cat sat on the mat", "a bird sings in the tall tree", "we walked home in the park today"]
# Relative to each vector's largest entry: float32 on a GPU differs from itself batched by ~1e-6; bf16 keeps 8 bits.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


@pytest.fixture(scope="module")
def folder(request):
    """The real embedded base on a GPU; the tiny family's `a` on the CPU dry run."""
    if DEVICE == "cuda":
        return request.getfixturevalue("real_family")["base"]
    return request.getfixturevalue("tiny_family")["a"]


def hf_reference(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """[layers, texts, d] masked means of HF `output_hidden_states`, one text at a time on the model's device;
    the last layer from a hook on the last block (HF's last hidden state comes after the final norm)."""
    last = {}
    model.base_model.layers[-1].register_forward_hook(
        lambda mod, args, out: last.update(h=out[0] if isinstance(out, tuple) else out))
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
        with torch.inference_mode():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        out.append(torch.stack([h[0].float().mean(0) for h in [*hidden[:-1], last["h"]]]).cpu())
    return torch.stack(out, 1)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_capture_equals_hf_hidden_states_on_the_device(folder, precision):
    options = LoadOptions(precision=precision, device=DEVICE)
    model, tokenizer = load_model(folder, options, attn_implementation="eager")
    pooled = capture(HookRunner(model, tokenizer), [Request(t, "mean") for t in TEXTS], batch_tokens=64)
    expected = hf_reference(model, tokenizer, TEXTS)
    assert pooled.shape == expected.shape and pooled.device.type == "cpu"
    scale = expected.abs().amax(-1, keepdim=True)
    assert ((pooled - expected).abs() / scale).max() < TOLERANCE[precision]


@pytest.mark.gpu
@gpu
def test_probes_on_device_captures_equal_cpu_probes(folder):
    """One bundled minimal-pair paradigm captured in float32 on the device and on the CPU, probed alike: the same
    scores within
    float noise (an item near the boundary may flip; one flip moves a macro-F1 by up to ~2/n_test)."""
    from probing.capture import probe_inputs, task_features
    from probing.minimal_pair_tasks import bundled_tasks
    from probing.stage import probe_task

    task = bundled_tasks()[0]
    inputs, index = probe_inputs(task, "mean", 128)
    features = {}
    for device in ("cpu", DEVICE):
        model, tokenizer = load_model(folder, LoadOptions(device=device))
        pooled = capture(HookRunner(model, tokenizer), inputs.requests, batch_tokens=512)
        features[device] = task_features(pooled, index)
    scale = features["cpu"].abs().amax(-1, keepdim=True).clamp_min(1e-6)
    assert ((features[DEVICE] - features["cpu"]).abs() / scale).max() < 1e-4
    rows = {device: probe_task(features[device], task, [0], True, False).rows.sort(["layer", "metric", "seed"])
            for device in features}
    n_test = int(task.split_mask("test").sum())
    differences = (rows[DEVICE]["value"] - rows["cpu"]["value"]).abs()
    assert differences.max() <= 3.0 / n_test, differences.max()


@pytest.mark.slow
def test_gpu_check_script_dry_run_on_the_cpu(tmp_path):
    """Every step of scripts/gpu_check.sh but CUDA: the gpu tests on the CPU, the timed embedded run (bf16 on a GPU,
    float32 in the dry run; two probing tasks, 2 behaviour items per task), and its stages planned beside measured
    with tokens per second."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MERGE_EVAL_GPU"))}
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-dry-run"], capture_output=True, text=True,
                          timeout=1800, env=env | {"GPU_CHECK_DIR": str(tmp_path)})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "3 passed" in output and "gpu_check: timed run done" in output
    assert (tmp_path / "run" / "tables" / "probes.parquet").is_file()
    table = output[output.index("planned  measured"):].splitlines()
    captures = next(line for line in table if line.startswith("captures"))
    assert float(captures.split()[-1].replace(",", "")) > 0, "captures report their tokens per second"
