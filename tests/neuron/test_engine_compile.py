"""Compiled CPU decode steps (compile.py): the eager answers, batch-invariant, no compile after load, reported.

One engine compiles the tiny model once for the whole module (compiling takes seconds even for it);
the tests share it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import torch

from cortex.neuron.engine import Engine, GenerationRequest, LoadedModel, SamplingParams, TextDelta
from tests.support.procs import cpu_neuron_toml, run_neuron, wait_model_status

torch.set_num_threads(1)

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = ["Name a colour.", "Count to three.", "What is a neuron?", "Say hello.", "List two fruits.", "Why?"]


def _load(directory: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    return module, AutoTokenizer.from_pretrained(directory)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pair(tiny_model: Path) -> AsyncIterator[tuple[LoadedModel, LoadedModel]]:
    """The tiny model twice: decode compiled, and eager."""
    compiled_engine, eager_engine = Engine(["cpu"], cpu_compile=True), Engine(["cpu"])
    try:
        compiled = await compiled_engine.adopt("tiny-compiled", "cpu", lambda: _load(tiny_model))
        eager = await eager_engine.adopt("tiny-eager", "cpu", lambda: _load(tiny_model))
        yield compiled, eager
    finally:
        compiled_engine.close()
        eager_engine.close()


async def answer(model: LoadedModel, prompt: str, sampling: SamplingParams = GREEDY) -> str:
    request = GenerationRequest("compiled", model.encode(prompt), sampling)
    return "".join([e.text async for e in model.generate(request) if isinstance(e, TextDelta)])


async def test_compiled_decode_answers_what_eager_decode_does(pair: tuple[LoadedModel, LoadedModel]) -> None:
    compiled, eager = pair
    report = compiled.kv_stats()["compile"]
    assert report["compiled"] is True and report["reason"] is None
    assert report["graphs"] >= 2 and report["compile_s"] > 0  # one row, and a row count that varies
    before = report["steps"]
    for prompt in PROMPTS[:3]:
        assert await answer(compiled, prompt) == await answer(eager, prompt)
    assert compiled.kv_stats()["compile"]["steps"] >= before + 3 * (GREEDY.max_new_tokens - 1)
    assert eager.kv_stats()["compile"]["compiled"] is False


async def test_concurrent_compiled_answers_equal_serial_ones_with_no_compile_after_load(
    pair: tuple[LoadedModel, LoadedModel],
) -> None:
    """Batches of 1..6 rows, sequences joining mid-generation (mixed steps): the same tokens, the load's graphs."""
    compiled, _ = pair
    serial = [await answer(compiled, p) for p in PROMPTS]

    async def late(index: int) -> str:
        await asyncio.sleep(0.05 * index)  # arrivals spread over the others' decoding
        return await answer(compiled, PROMPTS[index])

    assert await asyncio.gather(*(answer(compiled, p) for p in PROMPTS)) == serial
    assert await asyncio.gather(*(late(i) for i in range(len(PROMPTS)))) == serial
    assert compiled.kv_stats()["compile"]["recompiles"] == 0


async def test_sampled_and_constrained_requests_run_through_the_compiled_step(
    pair: tuple[LoadedModel, LoadedModel],
) -> None:
    """Sampling and grammars act on the logits after the forward: seeded answers match the eager engine's."""
    compiled, eager = pair
    seeded = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    assert await answer(compiled, PROMPTS[0], seeded) == await answer(eager, PROMPTS[0], seeded)


def _perturbed(directory: Path) -> tuple[torch.nn.Module, Any]:
    """The tiny model with other norm and embedding weights: tensors the compiled graph reads as inputs."""
    module, tokenizer = _load(directory)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "norm" in name or "embed" in name:
                parameter.mul_(1 + torch.rand(parameter.shape, generator=generator))
    return module, tokenizer


async def test_a_second_model_of_the_same_shape_is_computed_with_its_own_weights(
    tiny_model: Path, pair: tuple[LoadedModel, LoadedModel]
) -> None:
    """The compiled graphs are reused for another load of the architecture (nothing recompiles), and
    read that model's weights: its answers are its eager twin's, not the first model's."""
    first, _ = pair
    compiled_engine, eager_engine = Engine(["cpu"], cpu_compile=True), Engine(["cpu"])
    try:
        compiled = await compiled_engine.adopt("tiny-other", "cpu", lambda: _perturbed(tiny_model))
        eager = await eager_engine.adopt("tiny-other-eager", "cpu", lambda: _perturbed(tiny_model))
        assert compiled.kv_stats()["compile"]["compiled"] is True
        answers = [await answer(compiled, p) for p in PROMPTS[:3]]
        assert answers == [await answer(eager, p) for p in PROMPTS[:3]]
        assert answers != [await answer(first, p) for p in PROMPTS[:3]]
        assert compiled.kv_stats()["compile"]["recompiles"] == 0
    finally:
        compiled_engine.close()
        eager_engine.close()


@pytest.mark.parametrize(
    ("dtype", "options", "reason"),
    [
        (torch.float32, {}, "disabled by config ([engine] cpu_compile = false)"),
        (torch.float64, {"cpu_compile": True}, "the projections are not oneDNN-packed (see cpu_onednn)"),
        (torch.float32, {"cpu_compile": True, "cpu_onednn": False}, "the projections are not oneDNN-packed"),
    ],
)
async def test_what_is_not_compiled_says_why(
    tiny_model: Path, dtype: torch.dtype, options: dict[str, bool], reason: str
) -> None:
    engine = Engine(["cpu"], **options)
    try:
        model = await engine.adopt("tiny-not-compiled", "cpu", lambda: _load(tiny_model, dtype))
        report = model.kv_stats()["compile"]
        assert report["compiled"] is False and report["reason"].startswith(reason)
        assert await answer(model, PROMPTS[0])  # and it serves, eagerly
    finally:
        engine.close()


async def test_unload_drops_the_compiled_step_and_the_packed_weights(tiny_model: Path) -> None:
    engine = Engine(["cpu"], cpu_compile=True)
    try:
        model = await engine.adopt("tiny-unload", "cpu", lambda: _load(tiny_model))
        table = model.pack_stats.table
        assert table is not None and table.entries
        assert model.kv_stats()["compile"]["compiled"] is True
        await answer(model, PROMPTS[0])
        await engine.unload(model)
        assert table.entries == []
        assert not model.module_alive  # nothing the compiler keeps holds the module
    finally:
        engine.close()


async def test_a_neuron_that_cannot_compile_serves_eagerly_and_says_why(tmp_path: Path, tiny_model: Path) -> None:
    """`[engine] cpu_compile = true` in neuron.toml, through a real neuron process and its HTTP API, on a
    host without a C++ compiler (inductor needs one; its cache is empty here): the model still loads
    and answers, eagerly, and /models and the log say why. (Compiled serving: the tests above.)"""
    toml = cpu_neuron_toml(tiny_model) + "[engine]\ncpu_compile = true\n"
    env = {"CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    with run_neuron(tmp_path, toml, env=env) as daemon:
        wait_model_status(daemon.url, "tiny", timeout=240)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            request = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
            async with http.post(f"{daemon.url}/v1/chat/completions", json=request) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["usage"]["completion_tokens"] >= 1
            models = await (await http.get(f"{daemon.url}/models")).json()
        log = daemon.log_path.read_text()
    report = next(m for m in models if m["id"] == "tiny")["kv"]["compile"]
    assert report["compiled"] is False and report["reason"].startswith("compile failed:")
    assert "event=model.compile.failed" in log
