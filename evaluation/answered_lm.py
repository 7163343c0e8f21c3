"""lm-eval's HF model, answering the log-likelihood requests that the capture pass has already scored.

Minimal pairs are scored by lm-eval as empty-context continuations, and the same sentences are the probes' inputs.
The per-model capture pass encodes them as lm-eval does (prefix token, then the sentence) and keeps each
sentence's summed log-likelihood and greedy flag beside the hidden states (`probing.capture.TextLogLik`), so one
forward pass per sentence serves both stages. Everything else (the task machinery, the other requests, metrics,
aggregation, per-item samples) stays lm-eval's: only a request whose answer is known skips the model, and the
answers equal HFLM's own within float32 rounding (tests/test_one_pass.py).
"""

from __future__ import annotations

from collections.abc import Mapping

from lm_eval.models.huggingface import HFLM


class AnsweredHFLM(HFLM):
    """HFLM whose `loglikelihood` takes (log-likelihood, is_greedy) from `answers` (sentence -> answer) for
    requests with an empty context, and runs the model for the rest."""

    def __init__(self, *args, answers: Mapping[str, tuple[float, bool]], **kwargs):
        super().__init__(*args, **kwargs)
        self.answers = answers
        self.answered = 0  # how many requests the last call took from `answers` (the bench and logs report it)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        known = [request.args[0] == "" and request.args[1] in self.answers for request in requests]
        rest = [request for request, answered in zip(requests, known) if not answered]
        computed = iter(super().loglikelihood(rest, disable_tqdm=disable_tqdm) if rest else [])
        self.answered = sum(known)
        return [self.answers[request.args[1]] if answered else next(computed)
                for request, answered in zip(requests, known)]
