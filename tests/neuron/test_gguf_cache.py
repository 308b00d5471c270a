"""A GGUF is dequantized once: the first load keeps the converted model, later loads read it, same model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from cortex.neuron.engine import gguf_cache
from cortex.neuron.engine.loader import LoadedWeights, load_weights
from cortex.neuron.engine.types import LoadSpec, ModelSource


def _load(smollm_path: Path, cache: Path | None) -> tuple[LoadedWeights, list[str]]:
    stages: list[str] = []
    spec = LoadSpec("smollm2", ModelSource("gguf", str(smollm_path)), gguf_cache_dir=cache)
    return load_weights(spec, lambda _, stage: stages.append(stage)), stages


def test_a_converted_gguf_is_kept_and_read_back_as_the_same_model(smollm_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "gguf"
    (cache / "half-written").mkdir(parents=True)  # a crash mid-save, or another neuron still saving: ignored
    first, stages = _load(smollm_path, cache)
    assert "saving converted weights" in stages and "reading weights" in stages
    [entry] = [p for p in cache.iterdir() if (p / gguf_cache.MARKER).is_file()]
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]  # the staging directory is gone

    second, stages = _load(smollm_path, cache)
    assert "reading converted weights" in stages and "saving converted weights" not in stages
    assert replace(second.info, memory_bytes=0) == replace(first.info, memory_bytes=0)
    assert second.eos_ids == first.eos_ids
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = first.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    again = second.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = getattr(ids, "input_ids", ids)
    assert torch.equal(ids, getattr(again, "input_ids", again))
    with torch.no_grad():
        assert torch.equal(first.module(ids).logits, second.module(ids).logits)

    entry.joinpath(gguf_cache.MARKER).unlink()  # an entry that is not complete is never read
    assert gguf_cache.lookup(cache, smollm_path, torch.float32) is None


def test_an_unwritable_cache_costs_only_the_speed_up(smollm_path: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    assert gguf_cache.lookup(blocked, smollm_path, torch.float32) is None
    assert gguf_cache.store(blocked / "gguf", smollm_path, torch.float32, torch.nn.Linear(1, 1), None) is None
