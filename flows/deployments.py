"""Prefect deployments: `merge-eval/qwen` (the seed paper's setup, weekly) and `merge-eval/smollm2` (the embedded
default, on demand), served by one long-running process (`merge-eval serve`)."""

from __future__ import annotations

from pathlib import Path

from prefect import serve

from flows.pipeline import merge_eval

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QWEN_CRON = "0 3 * * 1"  # Mondays 03:00: a week of upstream checkpoint updates per run


def deployments() -> list:
    return [
        merge_eval.to_deployment(name="qwen", cron=QWEN_CRON, tags=["paper"],
                                 parameters={"config_path": str(CONFIGS / "qwen.yaml")},
                                 description="Qwen2.5-7B Instruct + Math / Coder merges (seed paper setup)."),
        merge_eval.to_deployment(name="smollm2", tags=["embedded"],
                                 parameters={"config_path": str(CONFIGS / "smollm2.yaml")},
                                 description="The embedded SmolLM2-135M family; runs on a CPU without a hub."),
    ]


def serve_deployments() -> None:
    serve(*deployments())
