"""Loading and unloading: sources, refusals with reason codes, measured memory, the real SmolLM2."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest

from cortex.neuron.engine import (
    Engine,
    EngineError,
    Finished,
    GenerationRequest,
    LoadedModel,
    LoadError,
    LoadSpec,
    ModelSource,
    SamplingParams,
    TextDelta,
)


def local(path: Path | str, **kwargs: Any) -> LoadSpec:
    return LoadSpec("m", ModelSource("local", str(path)), **kwargs)


async def answer(model: LoadedModel, question: str, max_new_tokens: int = 24) -> str:
    ids = model.render_chat([{"role": "user", "content": question}])
    request = GenerationRequest("q", ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
    return "".join([e.text async for e in model.generate(request) if isinstance(e, TextDelta)])


async def reason_of(engine: Engine, spec: LoadSpec) -> str:
    with pytest.raises(LoadError) as failure:
        await engine.load(spec)
    message = str(failure.value)
    assert "Traceback" not in message and "\n" not in message
    return failure.value.reason


async def test_missing_files(engine: Engine, tmp_path: Path) -> None:
    assert await reason_of(engine, local(tmp_path / "nowhere")) == "missing_files"
    (tmp_path / "empty").mkdir()
    assert await reason_of(engine, local(tmp_path / "empty")) == "missing_files"
    gguf = LoadSpec("g", ModelSource("gguf", str(tmp_path / "absent.gguf")))
    assert await reason_of(engine, gguf) == "missing_files"


async def test_pickled_checkpoints_are_forbidden(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    assert await reason_of(engine, local(tmp_path)) == "forbidden"


async def test_unknown_and_non_causal_architectures(engine: Engine, tmp_path: Path) -> None:
    for model_type in ("frobnicator", "t5"):
        directory = tmp_path / model_type
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
        (directory / "model.safetensors").write_bytes(b"")
        assert await reason_of(engine, local(directory)) == "unsupported_architecture"


async def test_offline_hub_without_a_cached_copy(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = LoadSpec("h", ModelSource("hub", "HuggingFaceTB/SmolLM2-135M-Instruct"), cache_dir=tmp_path)
    assert await reason_of(engine, spec) == "missing_files"


async def test_bad_device_and_dtype(engine: Engine, tiny_model: Path) -> None:
    assert await reason_of(engine, local(tiny_model, device="cuda:7")) == "error"
    assert await reason_of(engine, local(tiny_model, dtype="float8")) == "error"


async def test_load_reports_progress_and_measured_info(engine: Engine, tiny_model: Path) -> None:
    stages: list[tuple[float, str]] = []
    spec = local(tiny_model, context_length=256, dtype="bfloat16", device="CPU")  # device names are normalised
    model = await engine.load(spec, lambda f, s: stages.append((f, s)))
    fractions = [f for f, _ in stages]
    assert fractions == sorted(fractions) and stages[-1] == (1.0, "loaded")
    assert {"resolving", "reading weights", "warming up"} <= {s for _, s in stages}
    info = model.info
    assert (info.context_length, info.dtype, info.architecture) == (256, "bfloat16", "LlamaForCausalLM")
    assert info.device == "cpu"
    module = model._scheduler.runner.module  # type: ignore[union-attr]
    weights = sum(p.numel() for p in module.parameters()) * 2  # bf16; tied embeddings listed (and counted) once
    buffers = sum(b.nbytes for name, b in module.named_buffers() if not name.endswith("cortex_layer"))  # not ours
    assert info.memory_bytes == weights + buffers
    assert info.tool_call_format == "generic" and info.chat_template  # no tools in its template: generic mode
    await engine.unload(model)


async def test_unload_frees_the_weights(engine: Engine, tiny_model: Path) -> None:
    before = await engine.memory("cpu")
    model = await engine.load(local(tiny_model))
    loaded = await engine.memory("cpu")
    held = model.info.memory_bytes + model.pack_stats.extra_bytes  # weights + a tied head's packed copy
    assert loaded["allocated_bytes"] - before["allocated_bytes"] == held > 0
    assert await answer(model, "hi", 4)

    freed = await engine.unload(model)
    gc.collect()
    assert freed == held
    assert not model.module_alive  # no reference to the nn.Module survived
    assert (await engine.memory("cpu"))["allocated_bytes"] == before["allocated_bytes"]
    assert await engine.unload(model) == 0
    with pytest.raises(EngineError):
        model.render_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(EngineError):
        await answer(model, "hi")
    report = await engine.defragment("cpu")
    assert report["after"]["rss_bytes"] > 0


async def test_unload_ends_running_streams_as_cancelled(engine: Engine, tiny_model: Path) -> None:
    model = await engine.load(local(tiny_model))
    endless = SamplingParams(max_new_tokens=100_000, temperature=0, ignore_eos=True)
    stream = model.generate(GenerationRequest("u", model.render_chat([{"role": "user", "content": "go"}]), endless))
    assert isinstance(await anext(stream), TextDelta)
    await engine.unload(model)
    events = [e async for e in stream]
    assert isinstance(events[-1], Finished) and events[-1].reason == "cancelled"
    assert not model.module_alive and model.in_flight == 0


async def test_closing_the_engine_fails_running_streams(tiny_model: Path) -> None:
    engine = Engine(["cpu"])
    model = await engine.load(local(tiny_model))
    endless = SamplingParams(max_new_tokens=100_000, temperature=0, ignore_eos=True)
    stream = model.generate(GenerationRequest("c", model.render_chat([{"role": "user", "content": "go"}]), endless))
    await anext(stream)
    engine.close()
    with pytest.raises(EngineError, match="shutting down"):
        async for _ in stream:
            pass


async def test_adopt_serves_an_in_process_module(engine: Engine, tiny_model: Path) -> None:
    def build() -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)

    model = await engine.adopt("adopted", "cpu", build, context_length=128)
    assert model.info.context_length == 128 and await answer(model, "hello", 4)
    assert await engine.unload(model) > 0 and not model.module_alive


async def test_tool_template_model_reports_hermes(engine: Engine, tiny_tool_model: Path) -> None:
    model = await engine.load(local(tiny_tool_model))
    assert model.info.tool_call_format == "native:hermes" and model.reasoning_parser() is None
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "find it"}]
    assert model.count_chat_tokens(messages, tools) > model.count_chat_tokens(messages)
    assert model.tool_parser().tool_format == "hermes"
    assert model.sampling_defaults() == {"temperature": 0.0}  # its generation_config does not sample
    await engine.unload(model)


async def test_smollm2_gguf_knows_the_capital_of_france(engine: Engine, smollm_path: Path) -> None:
    model = await engine.load(LoadSpec("smollm2", ModelSource("gguf", str(smollm_path))))
    assert model.info.architecture == "LlamaForCausalLM" and model.info.context_length == 8192
    assert "Paris" in await answer(model, "What is the capital of France?")
    await engine.unload(model)
