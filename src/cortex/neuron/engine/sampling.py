"""Per-sequence sampling on the device: penalties, temperature, top-k/top-p/min-p, a private RNG.

Everything stays on the device with no host sync: the scheduler copies all next tokens to the host
once per step. Each sequence owns its `torch.Generator`, so a seeded request draws the same tokens
whatever else the model is serving at the time.
"""

from __future__ import annotations

import math

import torch

from .types import EngineError, SamplingParams

# Below this a temperature is greedy: dividing logits by it would overflow to inf.
GREEDY_TEMPERATURE = 1e-5
MAX_STOP_STRINGS = 16


def validate_sampling(params: SamplingParams) -> None:
    """Raise EngineError for parameters no sampler could honour (the client's fault, never a fault)."""
    checks = [
        (params.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
        (math.isfinite(params.temperature) and params.temperature >= 0, "temperature must be >= 0"),
        (0 < params.top_p <= 1, "top_p must be in (0, 1]"),
        (params.top_k >= 0, "top_k must be >= 0"),
        (0 <= params.min_p <= 1, "min_p must be in [0, 1]"),
        (math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0, "repetition_penalty must be > 0"),
        (-2 <= params.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        (-2 <= params.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
        (len(params.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings"),
        (all(isinstance(s, str) and s for s in params.stop), "stop strings must be non-empty strings"),
    ]
    for ok, message in checks:
        if not ok:
            raise EngineError(message)


class Sampler:
    """Picks each next token for one sequence; `__call__` takes the last position's logits, shape [vocab]."""

    def __init__(self, params: SamplingParams, prompt_ids: torch.Tensor, device: torch.device) -> None:
        self._params = params
        self._greedy = params.temperature < GREEDY_TEMPERATURE
        self._generator = None if self._greedy else _generator(device, params.seed)
        self._prompt_ids = prompt_ids
        self._repetition = params.repetition_penalty != 1.0
        self._additive = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        self._seen: torch.Tensor | None = None  # tokens in prompt + output (repetition penalty)
        self._counts: torch.Tensor | None = None  # output token counts (frequency/presence penalties)
        self._one: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token id as a one-element long tensor on the device."""
        token = self.draw(self.penalised(logits.float()))
        self.record(token)
        return token

    # The three steps apart, for samplers that must reject some draws (constrained output).

    def penalised(self, logits: torch.Tensor) -> torch.Tensor:
        return self._penalise(logits) if self._repetition or self._additive else logits

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1, keepdim=True) if self._greedy else self._draw(logits)

    def record(self, token: torch.Tensor) -> None:
        """Count the token that was finally chosen (the penalties' statistics)."""
        if self._repetition or self._additive:
            self._record(token)

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        if self._seen is None:
            self._start_statistics(logits)
        assert self._seen is not None and self._counts is not None
        if self._repetition:
            # HF's multiplicative penalty: shrink positive logits, push negative ones further down.
            penalty = self._params.repetition_penalty
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(self._seen, penalised, logits)
        if self._additive:
            # OpenAI's additive penalties over the tokens generated so far.
            logits = logits - self._counts * self._params.frequency_penalty
            logits = logits - (self._counts > 0).float() * self._params.presence_penalty
        return logits

    def _start_statistics(self, logits: torch.Tensor) -> None:
        vocab = logits.shape[-1]
        self._seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        prompt = self._prompt_ids[self._prompt_ids < vocab]
        self._seen[prompt] = True
        self._counts = torch.zeros(vocab, dtype=torch.float32, device=logits.device)
        self._one = torch.ones(1, dtype=torch.float32, device=logits.device)

    def _record(self, token: torch.Tensor) -> None:
        assert self._seen is not None and self._counts is not None and self._one is not None
        self._seen.index_fill_(0, token, True)
        self._counts.index_add_(0, token, self._one)

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        params = self._params
        logits = logits / params.temperature
        candidates: torch.Tensor | None = None  # vocab ids of `logits` when narrowed/sorted
        if 0 < params.top_k < logits.shape[-1]:
            logits, candidates = torch.topk(logits, params.top_k)
        elif params.top_p < 1.0 or params.min_p > 0.0:
            logits, candidates = torch.sort(logits, descending=True)
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
            mass_before = probs.cumsum(-1) - probs
            probs = probs.masked_fill(mass_before >= params.top_p, 0.0)
        if params.min_p > 0.0:
            probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        choice = torch.multinomial(probs, 1, generator=self._generator)
        return candidates[choice] if candidates is not None else choice


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # fresh entropy: unseeded requests must not share a stream
    else:
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator
