"""Host time of one engine step, on CPU, with a 1-layer model whose forward is negligible.

On a GPU a decode step replays one captured graph, so what the host does around it (building the
step's inputs, sampling bookkeeping, turning tokens into text events) sets the pace of small models
and much of large ones. This measures that host side here: a tiny random Llama (1 layer, hidden 64,
SmolLM2's 49k vocabulary), B greedy streams decoding together, and for each step the wall time of
the scheduler's step minus the time inside the model's forward.

    python benchmarks/host_step.py                    # B = 1 and 32, JSON on stdout
    python benchmarks/host_step.py --batch 32 --profile 25   # and the top 25 functions by own time

Figures are per step: `step_us` (the whole step job), `forward_us` (inside `ModelRunner.forward`),
`host_us` (= step - forward). Timing only: never a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))


def build(tokenizer: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


async def measure(batch: int, new_tokens: int, profile: int) -> dict[str, Any]:
    from common import load_tokenizer, prompts

    from cortex.neuron.engine import Engine, Finished, GenerationRequest, SamplingParams

    tokenizer = load_tokenizer()
    prompt_ids = prompts(tokenizer)
    engine = Engine(["cpu"])
    try:
        model = await engine.adopt("host", "cpu", lambda: (build(tokenizer), tokenizer))
        scheduler = model._scheduler
        runner = scheduler.runner
        assert runner is not None
        forward_s: list[float] = []
        step_s: list[float] = []
        inner_forward = runner.forward
        inner_step = scheduler._step

        def timed_forward(step_batch: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner_forward(step_batch)
            finally:
                forward_s.append(time.perf_counter() - t0)

        decode_steps: list[tuple[float, float]] = []

        def timed_step() -> None:
            before = len(forward_s)
            t0 = time.perf_counter()
            inner_step()
            took = time.perf_counter() - t0
            step_s.append(took)
            if len(forward_s) == before + 1 and len(scheduler._running) == batch:
                decode_steps.append((took, forward_s[-1]))

        runner.forward = timed_forward  # type: ignore[method-assign]
        scheduler._step = timed_step  # type: ignore[method-assign]
        sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)

        async def one(prompt: list[int]) -> None:
            async for event in model.generate(GenerationRequest("host", prompt, sampling)):
                if isinstance(event, Finished):
                    return

        await asyncio.gather(*(one(prompt_ids[i % len(prompt_ids)]) for i in range(batch)))  # warm-up
        decode_steps.clear()
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            await model._worker.call(profiler.enable)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(prompt_ids[i % len(prompt_ids)]) for i in range(batch)))
        wall = time.perf_counter() - t0
        if profiler is not None:
            await model._worker.call(profiler.disable)
        steps = decode_steps[5:]  # full-batch decode steps only
        result: dict[str, Any] = {
            "batch": batch,
            "new_tokens": new_tokens,
            "decode_steps": len(steps),
            "step_us": round(statistics.median(s for s, _ in steps) * 1e6),
            "forward_us": round(statistics.median(f for _, f in steps) * 1e6),
            "host_us": round(statistics.median(s - f for s, f in steps) * 1e6),
            "tok_s": round(batch * new_tokens / wall, 1),
        }
        if profiler is not None:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(profile)
            result["profile"] = out.getvalue()
        await engine.unload(model)
        return result
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--profile", type=int, default=0, help="print the top N functions by own time")
    parser.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (seconds)")
    args = parser.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    import torch

    torch.set_num_threads(1)
    for batch in args.batch:
        result = asyncio.run(measure(batch, args.new_tokens, args.profile))
        profile = result.pop("profile", None)
        print(json.dumps({**result, "switch_interval_s": sys.getswitchinterval()}), flush=True)
        if profile:
            print(profile, file=sys.stderr)


if __name__ == "__main__":
    main()
