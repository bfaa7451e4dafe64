"""`Sampler`: one token per sampled request from the step's logits, with the request's own rules.

Built on the batched primitives of `gptoss.sampling` (temperature, top-k, top-p, min-p; a seeded
request's noise from its seed and output position alone, so it resumes exactly on another engine); adds
penalties, logprobs and the greedy fast paths: rows that want nothing but the argmax
(greedy, no logprobs, no penalties) take the model's screened argmax where it has one, without logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprobs
from engine.request import Request
from gptoss.sampling import argmax_rows, sample


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]  # one per request, in order
    logprobs: list[TokenLogprobs | None] | None  # None when no request asked for logprobs


class Sampler:
    def __init__(self, seed: int):
        # Noise of sampled requests without a seed of their own: the engine's runs are reproducible.
        self.generator = torch.Generator().manual_seed(seed)

    def sample_hidden(self, hidden: torch.Tensor, requests: list[Request],
                      logits_of: Callable[[torch.Tensor], torch.Tensor],
                      argmax_of: Callable[[torch.Tensor], torch.Tensor | None] | None) -> SamplerOutput:
        """hidden [B, H], row i for requests[i] -> the sampled tokens (and logprobs). Rows that want
        only the argmax go to `argmax_of` (tokens, -1 where undecided; None: no answer); the others,
        the undecided, and every row where `argmax_of` is None, to `logits_of` and then the sampling
        rules (`__call__`)."""
        if argmax_of is None:
            return self(logits_of(hidden), requests)
        token_ids = [-1] * len(requests)
        argmax_only = [i for i, r in enumerate(requests)
                       if r.sampling.is_greedy and r.sampling.logprobs is None and not r.sampling.has_penalties]
        found = argmax_of(hidden[argmax_only]) if argmax_only else None
        if found is not None:
            for i, token in zip(argmax_only, found.tolist(), strict=True):
                token_ids[i] = token
        rest = [i for i, token in enumerate(token_ids) if token < 0]
        if not rest:
            return SamplerOutput(token_ids, None)
        if len(rest) == len(requests):
            return self(logits_of(hidden), requests)
        sampled = self(logits_of(hidden[rest]), [requests[i] for i in rest])
        logprobs = None if sampled.logprobs is None else [None] * len(requests)
        for j, i in enumerate(rest):
            token_ids[i] = sampled.token_ids[j]
            if logprobs is not None:
                logprobs[i] = sampled.logprobs[j]
        return SamplerOutput(token_ids, logprobs)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits [B, V] float32, row i for requests[i] -> the sampled tokens (and logprobs)."""
        if not requests:
            return SamplerOutput([], None)
        logprob_rows = [i for i, r in enumerate(requests) if r.sampling.logprobs is not None]
        # Logprobs describe the model's distribution, before penalties and sampling rules.
        raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None
        if any(r.output_token_counts for r in requests):
            logits = self._apply_penalties(logits.clone(), requests)
        if all(r.sampling.is_greedy for r in requests):
            tokens = argmax_rows(logits)
        else:
            tokens = self._sample(logits, requests)
        token_ids = tokens.tolist()
        logprobs = None
        if raw_logprobs is not None:
            logprobs = [None] * len(requests)
            chosen = raw_logprobs.gather(1, tokens[logprob_rows, None])[:, 0].tolist()
            most = max(requests[i].sampling.logprobs for i in logprob_rows)
            top_values, top_ids = raw_logprobs.topk(most, dim=-1) if most else (None, None)
            for j, i in enumerate(logprob_rows):
                n = requests[i].sampling.logprobs
                logprobs[i] = TokenLogprobs(
                    token_id=token_ids[i], logprob=chosen[j],
                    top_token_ids=tuple(top_ids[j, :n].tolist()) if n else (),
                    top_logprobs=tuple(top_values[j, :n].tolist()) if n else ())
        return SamplerOutput(token_ids, logprobs)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """logit -= presence * [count > 0] + frequency * count, over each request's generated tokens."""
        rows, token_ids, amounts = [], [], []
        for row, request in enumerate(requests):
            counts = request.output_token_counts
            if not counts:
                continue
            s = request.sampling
            rows.append(torch.full((len(counts),), row, dtype=torch.long))
            token_ids.append(torch.tensor(list(counts), dtype=torch.long))
            amounts.append(torch.tensor(list(counts.values()), dtype=torch.float32) * s.frequency_penalty
                           + s.presence_penalty)
        index = (torch.cat(rows).to(logits.device), torch.cat(token_ids).to(logits.device))
        logits.index_put_(index, -torch.cat(amounts).to(logits.device), accumulate=True)
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling for r in requests]

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=logits.device)

        vocab = logits.shape[-1]  # a top_k past the vocabulary keeps every token (and fits a long)
        top_k = column([min(p.top_k, vocab) for p in params], torch.long) if any(p.top_k for p in params) else None
        top_p = column([p.top_p for p in params], torch.float32) if any(p.top_p < 1 for p in params) else None
        min_p = column([p.min_p for p in params], torch.float32) if any(p.min_p for p in params) else None
        # is_greedy decides, not the float32 rounding of a temperature near MIN_TEMPERATURE.
        temperature = column([0.0 if p.is_greedy else p.temperature for p in params], torch.float32)
        # A seeded request's noise comes from (seed, output position); the others' from the engine's
        # generator (greedy and seeded rows draw nothing from it).
        seeds = [(p.seed, r.num_output_tokens) if p.seed is not None else None for p, r in zip(params, requests,
                                                                                                strict=True)]
        uniform = torch.tensor([float(torch.rand((), generator=self.generator, dtype=torch.float64))
                                if not p.is_greedy and p.seed is None else 0.0 for p in params], dtype=torch.float64)
        return sample(logits, temperature, uniform, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds)
