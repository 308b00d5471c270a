"""Sampling on the device: one vectorised pass over every row of a step, and validation of the parameters.

`sample_batch` takes the logits of all rows that sample in a step ([R, vocab]) and each row's own
parameters (as tensors), and returns the next token of every row without a host sync: penalties
(repetition, frequency, presence), temperature, top-k, top-p, min-p, then a Gumbel-max draw whose
noise is a counter-based hash of (seed, position, token id). A seeded request therefore draws the
same tokens whatever else shares its batch, and a preempted sequence resumes on the same draws.
Greedy rows are an argmax. The only sort is one batched sort over the rows that ask for top-p.

Grammar-constrained rows sample in the same pass: the scheduler masks their logits first (grammar.py).
`Sampler` is the older per-sequence path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Rows
from dataclasses import dataclass

import torch

from .types import EngineError, SamplingParams

# Below this a temperature is greedy: dividing logits by it would overflow to inf.
GREEDY_TEMPERATURE = 1e-5
MAX_STOP_STRINGS = 16
# Bounds that keep every intermediate finite in float32 (logits / temperature, logits / penalty).
MAX_TEMPERATURE = 1000.0
MIN_TOP_P = 1e-6
MIN_REPETITION_PENALTY = 1e-3
MAX_REPETITION_PENALTY = 1e3


def validate_sampling(params: SamplingParams) -> None:
    """Raise EngineError for parameters no sampler could honour (the client's fault, never a fault)."""
    checks = [
        (params.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
        (
            math.isfinite(params.temperature) and 0 <= params.temperature <= MAX_TEMPERATURE,
            f"temperature must be in [0, {MAX_TEMPERATURE:g}]",
        ),
        (math.isfinite(params.top_p) and MIN_TOP_P <= params.top_p <= 1, f"top_p must be in [{MIN_TOP_P:g}, 1]"),
        (params.top_k >= 0, "top_k must be >= 0"),
        (math.isfinite(params.min_p) and 0 <= params.min_p <= 1, "min_p must be in [0, 1]"),
        (
            math.isfinite(params.repetition_penalty)
            and MIN_REPETITION_PENALTY <= params.repetition_penalty <= MAX_REPETITION_PENALTY,
            f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]",
        ),
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


# Batched sampling.

_SIGNED = 1 << 64
_MIX_SEED = 0x9E3779B97F4A7C15 - _SIGNED
_MIX_POSITION = 0xD1B54A32D192ED03 - _SIGNED
_MIX_1 = 0xBF58476D1CE4E5B9 - _SIGNED
_MIX_2 = 0x94D049BB133111EB - _SIGNED


@dataclass(frozen=True)
class RowParams:
    """What one sampled row needs: the request's parameters, its seed, and the position it samples for."""

    params: SamplingParams
    seed: int  # the request's seed, or a random one drawn when the sequence started
    position: int  # index of the token being sampled in the sequence (prompt + output)
    seen: torch.Tensor | None = None  # [vocab] bool, prompt + output tokens (repetition penalty)
    counts: torch.Tensor | None = None  # [vocab] float, output token counts (frequency/presence)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] uniforms in (0, 1), a pure function of (seed, position, token id): splitmix64 on int64."""
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = (seeds * _MIX_SEED + positions * _MIX_POSITION)[:, None] + ids[None, :]
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX_1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX_2
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return (((x >> 40) & 0xFFFFFF).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


class SamplingBatch:
    """The rows that sample in one step. Built BEFORE the forward, so every host-to-device copy of the
    per-row parameters is queued ahead of the model's kernels; `sample` then runs without a host sync."""

    def __init__(self, rows: Rows[RowParams], device: torch.device) -> None:
        self.rows = list(rows)
        self._device = device
        self.penalised_logits: torch.Tensor | None = None  # set by `sample`: the logprobs' distribution
        greedy = [r.params.temperature < GREEDY_TEMPERATURE for r in rows]
        self.all_greedy = all(greedy)
        sampled = [i for i, g in enumerate(greedy) if not g]
        self._sampled = sampled
        self._sampled_index = None
        if sampled and len(sampled) < len(rows):
            self._sampled_index = torch.tensor(sampled, device=device)
        sub = [rows[i] for i in sampled]
        self._penalised = [i for i, r in enumerate(rows) if r.seen is not None]
        self._penalty_index = self._penalty_values = None
        if self._penalised:
            self._penalty_index = torch.tensor(self._penalised, device=device)
            self._penalty_values = torch.tensor(
                [
                    (
                        rows[i].params.repetition_penalty,
                        rows[i].params.frequency_penalty,
                        rows[i].params.presence_penalty,
                    )
                    for i in self._penalised
                ],
                dtype=torch.float32,
                device=device,
            )
        self._top_ks = [r.params.top_k for r in sub]
        self._top_p = any(r.params.top_p < 1.0 for r in sub)
        self._min_p = any(r.params.min_p > 0.0 for r in sub)
        if sub:
            # One float tensor for the per-row floats, one int64 tensor for seeds/positions/top-k.
            self._floats = torch.tensor(
                [(r.params.temperature, r.params.top_p, r.params.min_p) for r in sub],
                dtype=torch.float32,
                device=device,
            )
            self._ints = torch.tensor(
                [(r.seed, r.position, max(r.params.top_k, 0)) for r in sub], dtype=torch.int64, device=device
            )

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row, [R] long on the device. `logits` is [R, vocab]."""
        logits = self._penalise(logits.float())
        self.penalised_logits = logits  # what the logprobs are computed from (before temperature)
        if self.all_greedy:
            return logits.argmax(-1)
        index = self._sampled_index
        chosen = self._draw(logits if index is None else logits.index_select(0, index))
        if index is None:
            return chosen
        return logits.argmax(-1).index_copy(0, index, chosen)

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._penalised:
            return logits
        assert self._penalty_index is not None and self._penalty_values is not None
        sub = logits.index_select(0, self._penalty_index)
        seen = torch.stack([self.rows[i].seen for i in self._penalised])  # type: ignore[misc]
        counts = torch.stack([self.rows[i].counts for i in self._penalised])  # type: ignore[misc]
        values = self._penalty_values
        repetition, frequency, presence = values[:, 0:1], values[:, 1:2], values[:, 2:3]
        # HF's multiplicative penalty: shrink positive logits, push negative ones further down.
        sub = torch.where(seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)
        # OpenAI's additive penalties over the tokens generated so far.
        sub = sub - counts * frequency - (counts > 0).float() * presence
        return logits.index_copy(0, self._penalty_index, sub)

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[-1]
        temperature, top_p, min_p = self._floats[:, 0:1], self._floats[:, 1:2], self._floats[:, 2:3]
        seeds, positions, top_k = self._ints[:, 0], self._ints[:, 1], self._ints[:, 2:3]
        logits = logits / temperature
        ks = [k if 0 < k < vocab else 0 for k in self._top_ks]
        if any(ks):
            values = torch.topk(logits, max(ks), dim=-1).values  # [R, kmax], descending
            kth = (top_k.clamp(1, max(ks)) - 1).clamp(max=values.shape[-1] - 1)
            threshold = values.gather(1, kth)
            active = (top_k > 0) & (top_k < vocab)
            logits = logits.masked_fill(active & (logits < threshold), float("-inf"))
        if self._top_p:
            # Keep the smallest prefix (by probability) whose mass reaches top_p; the likeliest token survives.
            ordered, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            drop_sorted = (probs.cumsum(-1) - probs) >= top_p
            drop_sorted[:, 0] = False
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        if self._min_p:
            probs = torch.softmax(logits, dim=-1)
            logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
        # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits); -inf entries never win.
        gumbel = -torch.log(-torch.log(uniform_noise(seeds, positions, vocab)))
        return (logits + gumbel).argmax(-1)


def clamp_seed(seed: int) -> int:
    """A request seed as a non-negative int64 (any int is accepted)."""
    return seed & 0x7FFF_FFFF_FFFF_FFFF
