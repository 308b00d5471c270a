"""The sampler against hand-computed expectations and transformers' own logits processors."""

from __future__ import annotations

import pytest
import torch

from cortex.neuron.engine import EngineError, SamplingParams
from cortex.neuron.engine.sampling import Sampler, validate_sampling

CPU = torch.device("cpu")


def sampler(prompt: list[int] | None = None, **params: float) -> Sampler:
    return Sampler(SamplingParams(max_new_tokens=8, **params), torch.tensor(prompt or [0], dtype=torch.long), CPU)  # type: ignore[arg-type]


def draws(s: Sampler, logits: torch.Tensor, n: int = 200) -> set[int]:
    return {int(s(logits).item()) for _ in range(n)}


LOGITS = torch.tensor([1.0, 3.0, 2.9, -1.0, 0.5, 2.0])


def test_greedy_is_argmax() -> None:
    assert draws(sampler(temperature=0.0), LOGITS, 5) == {1}


def test_filters_narrow_the_candidates() -> None:
    assert draws(sampler(temperature=1.0, top_k=1, seed=1), LOGITS) == {1}
    assert draws(sampler(temperature=1.0, top_k=2, seed=1), LOGITS) == {1, 2}
    assert draws(sampler(temperature=1.0, top_p=0.01, seed=1), LOGITS) == {1}
    # min_p 0.5: keep tokens with at least half the top probability (3.0 and 2.9; exp(-1) < 0.5 drops 2.0).
    assert draws(sampler(temperature=1.0, min_p=0.5, seed=1), LOGITS) == {1, 2}
    assert len(draws(sampler(temperature=5.0, seed=1), LOGITS, 400)) == len(LOGITS)


def test_seeded_draws_repeat_and_unseeded_ones_differ() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    one = sampler(temperature=1.0, seed=42)
    two = sampler(temperature=1.0, seed=42)
    assert [int(one(logits).item()) for _ in range(20)] == [int(two(logits).item()) for _ in range(20)]
    free = [sampler(temperature=1.0) for _ in range(2)]
    assert [int(free[0](logits).item()) for _ in range(20)] != [int(free[1](logits).item()) for _ in range(20)]


def test_repetition_penalty_matches_transformers() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, -0.5])
    prompt = [0, 1]
    expected = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt]), logits.clone().unsqueeze(0))[0]
    s = sampler(prompt, repetition_penalty=1.5)
    assert torch.allclose(s._penalise(logits), expected)
    s._record(torch.tensor([3]))  # generated tokens count too
    assert s._penalise(logits)[3].item() == pytest.approx(0.5 / 1.5)


def test_frequency_and_presence_penalties_follow_openai() -> None:
    logits = torch.zeros(4)
    s = sampler(frequency_penalty=0.5, presence_penalty=0.25)
    s._penalise(logits)
    for token in (2, 2, 3):
        s._record(torch.tensor([token]))
    assert s._penalise(logits).tolist() == pytest.approx([0.0, 0.0, -(2 * 0.5 + 0.25), -(0.5 + 0.25)])


@pytest.mark.parametrize(
    "params",
    [
        {"max_new_tokens": 0},
        {"temperature": float("nan")},
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": 2.0},
        {"repetition_penalty": 0.0},
        {"frequency_penalty": 3.0},
        {"presence_penalty": -2.5},
        {"stop": tuple(str(i) for i in range(17))},
    ],
)
def test_invalid_parameters(params: dict[str, object]) -> None:
    with pytest.raises(EngineError):
        validate_sampling(SamplingParams(**{"max_new_tokens": 4, **params}))  # type: ignore[arg-type]


def test_sampling_defaults_come_from_generation_config() -> None:
    from types import SimpleNamespace

    from cortex.neuron.engine.model import generation_defaults

    greedy = SimpleNamespace(generation_config=SimpleNamespace(do_sample=False, temperature=0.7))
    assert generation_defaults(greedy) == {"temperature": 0.0}
    assert generation_defaults(SimpleNamespace()) == {"temperature": 0.0}
    sampling = SimpleNamespace(generation_config=SimpleNamespace(do_sample=True, temperature=0.6, top_p=0.95, top_k=20))
    assert generation_defaults(sampling) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
