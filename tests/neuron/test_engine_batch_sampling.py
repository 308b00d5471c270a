"""The batched sampler: one pass over rows with their own parameters, counter-based seeded noise."""

from __future__ import annotations

import math

import torch

from cortex.neuron.engine.sampling import RowParams, SamplingBatch, uniform_noise
from cortex.neuron.engine.types import SamplingParams

torch.set_num_threads(1)
VOCAB = 64


def row(seed: int = 7, position: int = 0, **params: float) -> RowParams:
    return RowParams(SamplingParams(max_new_tokens=1, **params), seed, position)  # type: ignore[arg-type]


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_noise_is_a_pure_function_of_seed_position_and_token() -> None:
    seeds, positions = torch.tensor([1, 1, 2]), torch.tensor([5, 5, 5])
    noise = uniform_noise(seeds, positions, VOCAB)
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert float(noise.min()) > 0.0 and float(noise.max()) < 1.0
    assert abs(float(uniform_noise(torch.arange(64), torch.zeros(64, dtype=torch.long), 4096).mean()) - 0.5) < 0.01


def test_greedy_and_degenerate_filters_take_the_argmax() -> None:
    x = logits(4)
    rows = [row(temperature=0.0), row(temperature=0.8, top_k=1), row(temperature=0.8, top_p=1e-6), row(min_p=1.0)]
    assert torch.equal(SamplingBatch(rows, torch.device("cpu")).sample(x), x.argmax(-1))


def test_a_row_draws_the_same_token_whatever_else_is_in_the_batch() -> None:
    x = logits(5)
    target = row(seed=42, position=9, temperature=0.9, top_p=0.8, top_k=20)
    alone = SamplingBatch([target], torch.device("cpu")).sample(x[2:3])
    others = [row(seed=i, temperature=1.3, min_p=0.1) for i in range(4)]
    mixed = SamplingBatch([others[0], others[1], target, others[2], row(temperature=0.0)], torch.device("cpu"))
    assert int(mixed.sample(x)[2]) == int(alone[0])


def test_draws_follow_the_filtered_softmax() -> None:
    x = torch.full((1, VOCAB), -30.0)
    x[0, 3], x[0, 5] = 0.0, math.log(3.0)  # p = 1/4, 3/4
    draws = [int(SamplingBatch([row(seed=1, position=p)], torch.device("cpu")).sample(x)[0]) for p in range(2000)]
    assert set(draws) <= {3, 5}
    assert abs(draws.count(5) / len(draws) - 0.75) < 0.04
    # top_k=1 keeps only the likelier one; temperature 0.5 sharpens to 1/10, 9/10.
    assert {int(SamplingBatch([row(position=p, top_k=1)], torch.device("cpu")).sample(x)[0]) for p in range(50)} == {5}
    sharp = [
        int(SamplingBatch([row(seed=2, position=p, temperature=0.5)], torch.device("cpu")).sample(x)[0])
        for p in range(2000)
    ]
    assert abs(sharp.count(5) / len(sharp) - 0.9) < 0.03


def test_penalties_apply_per_row() -> None:
    x = torch.zeros(2, VOCAB)
    x[:, 0], x[:, 1] = 2.0, 1.9
    seen = torch.zeros(VOCAB, dtype=torch.bool)
    seen[0] = True
    counts = torch.zeros(VOCAB)
    counts[0] = 1.0
    penalised = RowParams(SamplingParams(max_new_tokens=1, temperature=0.0, repetition_penalty=1.5), 0, 0, seen, counts)
    plain = row(temperature=0.0)
    assert SamplingBatch([penalised, plain], torch.device("cpu")).sample(x).tolist() == [1, 0]
