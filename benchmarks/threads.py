"""The neuron's CPU thread choice vs torch's defaults: decode speed of the default model, one process per setting.

    python benchmarks/threads.py                    # torch default, the neuron's choice, all cores passive
    python benchmarks/threads.py --new-tokens 64 --streams 4

Each setting runs in a fresh process (OpenMP reads its environment once, when torch loads):
- `torch default`: OMP_NUM_THREADS and OMP_WAIT_POLICY unset, torch's own thread count (all cores, spinning);
- `neuron`: what `neuron serve` chooses (cortex.neuron.threads: usable cores less one, passive waiting);
- `all cores, passive`: every usable core, passive waiting.
Prints one JSON object: single-stream decode tok/s and aggregate tok/s at `--streams`, per setting.
Run it on a quiet and on a busy machine: the point of the neuron's choice is that a busy one cannot collapse it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import asyncio, json, os, sys, time
mode, new_tokens, streams = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from cortex.neuron import threads
if mode == "neuron":
    choice = threads.choose()
elif mode == "all cores, passive":
    choice = threads.choose(threads.usable_cores())
else:
    choice = None
if choice is not None:
    threads.prepare_environment(choice)
    threads.apply(choice)
import torch
from cortex.neuron.default_model import DEFAULT_MODEL_ID, default_gguf_path
from cortex.neuron.engine import Engine, Finished, GenerationRequest, LoadSpec, ModelSource, SamplingParams

async def main():
    engine = Engine(["cpu"])
    gguf = default_gguf_path()
    model = await engine.load(LoadSpec(DEFAULT_MODEL_ID, ModelSource("gguf", str(gguf)), device="cpu"))
    prompt = model.render_chat([{"role": "user", "content": "Write a short poem about the sea."}])

    async def one(n):
        sampling = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        started, first = time.perf_counter(), 0.0
        async for event in model.generate(GenerationRequest("t", prompt, sampling)):
            first = first or time.perf_counter() - started
            if isinstance(event, Finished):
                return time.perf_counter() - started, first

    await one(4)
    total, first = await one(new_tokens)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(new_tokens) for _ in range(streams)))
    aggregate = streams * new_tokens / (time.perf_counter() - t0)
    engine.close()
    print(json.dumps({
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "single_tok_s": round((new_tokens - 1) / (total - first), 2),
        "aggregate_tok_s": round(aggregate, 2),
    }))

asyncio.run(main())
"""

MODES = ["torch default", "neuron", "all cores, passive"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--streams", type=int, default=4)
    args = parser.parse_args()
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    report: dict[str, object] = {"cores": os.cpu_count(), "new_tokens": args.new_tokens, "streams": args.streams}
    for mode in MODES:
        run = subprocess.run(
            [sys.executable, "-c", CHILD, mode, str(args.new_tokens), str(args.streams)],
            capture_output=True,
            text=True,
            env=clean,
            timeout=900,
        )
        lines = run.stdout.strip().splitlines()
        report[mode] = json.loads(lines[-1]) if run.returncode == 0 and lines else {"error": run.stderr[-2000:]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
