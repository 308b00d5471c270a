"""The engine on a GPU, random weights in real Qwen3 shapes: capture time, TTFT, single-stream and aggregate decode.

    python benchmarks/gpu/bench.py --device cuda:0 --shape qwen3-8b            # CUDA graphs (the default)
    python benchmarks/gpu/bench.py --device cuda:0 --shape qwen3-8b --eager    # [engine] cuda_graphs = false

Engine only (no `generate()` baseline: on a GPU its serial runs would take minutes; the anchors in
docs/engine.md are the comparison). Measures, in one process:
- load: random init, KV pool, warm-up and capture on the device worker, and the capture stats
  (graph count, buckets, seconds, pool memory);
- ttft_s: median time to one token of the first prompt (5 samples);
- single_tok_s: one stream, (N-1) / (time for N tokens - ttft);
- aggregate_tok_s: K streams started together (and `random`: the largest K arriving uniformly over
  `--arrival-s`), total tokens / wall time;
- greedy: the 8 prompts' first 32 greedy tokens as text, to compare eager and graph runs across processes.
Prints one JSON line (appended to $OUT/results.jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import QWEN3_SHAPES, build_shape, emit, load_tokenizer, prompts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--shape", choices=list(QWEN3_SHAPES), default="qwen3-0.6b")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decoder layers through torch.compile before capture ([engine] cuda_compile)",
    )
    parser.add_argument("--new-tokens", type=int, default=None, help="per request (default 256 CUDA, 16 CPU)")
    parser.add_argument("--streams", default=None, help="concurrent streams (default 8,32 CUDA, 4 CPU)")
    parser.add_argument("--arrival-s", type=float, default=0.5, help="spread of the random arrivals")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (CPU dry runs)")
    return parser.parse_args()


async def request(model: Any, prompt: list[int], new_tokens: int, delay: float = 0.0) -> tuple[float, float, str]:
    """(seconds from its start to the end, ttft, text) of one greedy request of exactly `new_tokens`."""
    from cortex.neuron.engine import Finished, GenerationRequest, SamplingParams

    if delay:
        await asyncio.sleep(delay)
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    first = 0.0
    text = []
    async for event in model.generate(GenerationRequest("bench", prompt, sampling)):
        if not first:
            first = time.perf_counter() - started
        if isinstance(event, Finished):
            assert event.completion_tokens == new_tokens, event
            return time.perf_counter() - started, first, "".join(text)
        text.append(event.text)
    raise RuntimeError("stream ended without Finished")


class StepTimer:
    """Where a single-stream step's time goes, from the host: the whole step job, the forward call
    (launch only, on a GPU), the sync on the sampled tokens, and the gap between one step's end and
    the next one's start (queueing on the worker, GIL hand-overs with the event loop)."""

    def __init__(self, model: Any) -> None:
        self.scheduler = model._scheduler
        self.runner = self.scheduler.runner
        self.steps: list[float] = []
        self.forwards: list[float] = []
        self.gaps: list[float] = []
        self._ended = 0.0

    def __enter__(self) -> StepTimer:
        step, forward = self.scheduler._step, self.runner.forward

        def timed_step() -> None:
            started = time.perf_counter()
            if self._ended:
                self.gaps.append(started - self._ended)
            step()
            self._ended = time.perf_counter()
            self.steps.append(self._ended - started)

        def timed_forward(batch: Any) -> Any:
            started = time.perf_counter()
            try:
                return forward(batch)
            finally:
                self.forwards.append(time.perf_counter() - started)

        self.scheduler._step, self.runner.forward = timed_step, timed_forward
        return self

    def __exit__(self, *exc: object) -> None:
        del self.scheduler._step, self.runner.forward  # back to the class's methods

    def summary(self) -> dict[str, Any]:
        def ms(values: list[float]) -> float | None:
            return round(statistics.median(values) * 1e3, 3) if values else None

        return {
            "steps": len(self.steps),
            "step_ms": ms(self.steps[2:]),
            "forward_call_ms": ms(self.forwards[2:]),
            "gap_ms": ms(self.gaps[2:]),
        }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cortex.neuron.engine import Engine

    device = args.device
    cuda = device.startswith("cuda")
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    new_tokens = args.new_tokens or (256 if cuda else 16)
    streams = [int(s) for s in (args.streams or ("8,32" if cuda else "4")).split(",")]
    if args.layers:
        QWEN3_SHAPES[args.shape] = {**QWEN3_SHAPES[args.shape], "num_hidden_layers": args.layers}
    tokenizer = load_tokenizer()
    prompt_ids = prompts(tokenizer)
    result: dict[str, Any] = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": dtype_name,
        "cuda_graphs": not args.eager,
        "cuda_compile": args.compile,
        "new_tokens": new_tokens,
        "prompt_tokens_median": statistics.median(len(p) for p in prompt_ids),
    }
    engine = Engine([device], cuda_graphs=not args.eager, cuda_compile=args.compile, cpu_compile=args.compile)
    try:
        # Built on the device worker, so the engine measures the weights' memory as a load does.
        started = time.perf_counter()
        model = await engine.adopt(
            "bench", device, lambda: (build_shape(args.shape, device, getattr(torch, dtype_name)), tokenizer)
        )
        result["load_s"] = round(time.perf_counter() - started, 2)  # random init + KV pool + warm-up + capture
        kv = model.kv_stats()
        result["cuda_graph_stats"] = kv.pop("cuda_graphs", None)
        result["compile_stats"] = kv.pop("compile", None)
        result["kv"] = kv
        result["weights_mb"] = round(model.info.memory_bytes / 2**20)
        result["model_memory_mb"] = round(model.memory_bytes / 2**20)  # /models vram_used_mb: weights + KV + graphs
        if cuda:
            result["cuda_memory_allocated_mb"] = round(torch.cuda.memory_allocated(device) / 2**20)
            result["cuda_memory_reserved_mb"] = round(torch.cuda.memory_reserved(device) / 2**20)

        ttfts = [(await request(model, prompt_ids[0], 1))[0] for _ in range(5)]
        result["ttft_s"] = round(statistics.median(ttfts), 4)
        with StepTimer(model) as timer:
            total, first, _ = await request(model, prompt_ids[0], new_tokens)
        result["single_step_profile"] = timer.summary()
        result["single_tok_s"] = round((new_tokens - 1) / (total - first), 1)
        aggregate: dict[str, float] = {}
        for count in streams:
            batch = [prompt_ids[i % len(prompt_ids)] for i in range(count)]
            t0 = time.perf_counter()
            await asyncio.gather(*(request(model, p, new_tokens) for p in batch))
            aggregate[str(count)] = round(count * new_tokens / (time.perf_counter() - t0), 1)
        result["aggregate_tok_s"] = aggregate
        count = max(streams)
        rng = random.Random(0)
        delays = sorted(rng.uniform(0, args.arrival_s) for _ in range(count))
        t0 = time.perf_counter()
        timed = await asyncio.gather(
            *(request(model, prompt_ids[i % len(prompt_ids)], new_tokens, d) for i, d in enumerate(delays))
        )
        result["random_arrivals"] = {
            "streams": count,
            "over_s": args.arrival_s,
            "aggregate_tok_s": round(count * new_tokens / (time.perf_counter() - t0), 1),
            "ttft_median_s": round(statistics.median(t[1] for t in timed), 4),
            "ttft_max_s": round(max(t[1] for t in timed), 4),
        }
        greedy = await asyncio.gather(*(request(model, p, 32) for p in prompt_ids))
        result["greedy"] = [g[2] for g in greedy]
        after = model.kv_stats().get("cuda_graphs") or {}
        result["graph_replays"] = after.get("replays")
        result["eager_decodes"] = after.get("eager_decodes")
        result["mixed_replays"] = after.get("mixed_replays")
        result["decode_tok_s_reported"] = round(model.tok_s_decode, 1)
        result["compile_after_runs"] = model.kv_stats().get("compile")  # steps run compiled, recompiles
        freed = await engine.unload(model)
        result["freed_mb"] = round(freed / 2**20)
        if cuda:
            torch.cuda.synchronize(device)
            result["cuda_allocated_after_unload_mb"] = round(torch.cuda.memory_allocated(device) / 2**20)
    finally:
        engine.close()
    return result


def main() -> None:
    args = parse_args()
    label = f"bench {args.shape} {'eager' if args.eager else 'graphs'}{'+compile' if args.compile else ''}"
    started = time.perf_counter()
    try:
        result = asyncio.run(run(args))
        result["ok"] = True
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.perf_counter() - started, 2)
    emit(label, result)


if __name__ == "__main__":
    main()
