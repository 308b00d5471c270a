"""A loaded model's memory figure counts what it really holds: weights, KV pool, CUDA graphs, packed copies.

The gateway places and evicts models by `/models` `vram_used_mb`, so a model must not report its
weights alone while its KV pool (and on CUDA its captured graphs) take many times more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cortex.neuron.config import EngineConfig
from cortex.neuron.engine import Engine, GenerationRequest, LoadSpec, ModelSource, SamplingParams
from cortex.neuron.engine.memory import KVBudget, kv_pool_bytes


async def test_cpu_model_counts_weights_and_the_kv_blocks_it_committed(tiny_model: Path) -> None:
    engine = Engine(["cpu"])
    try:
        model = await engine.load(LoadSpec("tiny", ModelSource("local", str(tiny_model)), device="cpu"))
        pool = model._kv_pool
        assert pool is not None
        weights, packed = model.info.memory_bytes, model.pack_stats.extra_bytes
        assert packed > 0  # the tiny model's head is tied to its embedding: its oneDNN copy is extra
        assert model.memory_bytes == weights + packed + pool.committed_bytes
        assert model.kv_stats()["bytes_committed"] == pool.committed_bytes < pool.bytes  # CPU: committed lazily
        before = model.memory_bytes
        sampling = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
        async for _ in model.generate(GenerationRequest("r", list(range(1, 41)), sampling)):
            pass
        assert model.memory_bytes - before >= 3 * pool.block_bytes  # 44 tokens in blocks of 16
        await engine.unload(model)
        assert model.memory_bytes == 0
    finally:
        engine.close()


def test_cuda_kv_share_is_a_fraction_of_free_memory_with_a_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * gib, 140 * gib))
    assert kv_pool_bytes("cuda:0", KVBudget(cuda_fraction=0.5)) == 32 * gib  # the default cap
    assert kv_pool_bytes("cuda:0", KVBudget(cuda_fraction=0.2, cuda_max_bytes=None)) == 20 * gib
    assert kv_pool_bytes("cuda:0", KVBudget(cuda_fraction=0.5, cuda_max_bytes=8 * gib)) == 8 * gib


def test_engine_config_kv_share_keys() -> None:
    config = EngineConfig.model_validate({"kv_memory_fraction": 0.3, "kv_memory_max_mb": 4096})
    assert (config.kv_memory_fraction, config.kv_memory_max_mb) == (0.3, 4096)
    assert (EngineConfig().kv_memory_fraction, EngineConfig().kv_memory_max_mb) == (0.5, 32768)
    with pytest.raises(ValueError):
        EngineConfig.model_validate({"kv_memory_fraction": 0})
