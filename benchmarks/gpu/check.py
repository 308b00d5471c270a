"""The neuron's GPU parts, for real, once: NVML discovery, the device worker, CUDA memory accounting, a served model.

    python benchmarks/gpu/check.py versions
    python benchmarks/gpu/check.py discovery                 # NVML + torch matched by UUID
    python benchmarks/gpu/check.py engine --device cuda:0    # load / generate / unload through Engine
    python benchmarks/gpu/check.py serve --device cuda:0     # a real `neuron serve` and one chat request

Each prints one JSON line (and appends it to $OUT/results.jsonl). `--device cpu` is the dry run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, build_tiny_model, emit, load_tokenizer, prompts

WORK = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/cortex-gpu-check"))


def versions() -> dict[str, Any]:
    import torch
    import transformers

    from cortex.neuron.versions import version_info

    result: dict[str, Any] = {"python": sys.version.split()[0], "neuron": version_info()}
    result["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name(0)
        result["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        result["bf16"] = torch.cuda.is_bf16_supported()
    result["transformers"] = transformers.__version__
    return result


def discovery() -> dict[str, Any]:
    from cortex.neuron import threads
    from cortex.neuron.config import DevicesConfig
    from cortex.neuron.hardware import Hardware

    threads.apply(threads.choose())
    hardware = Hardware(DevicesConfig())
    found = hardware.discovery()
    result: dict[str, Any] = {
        "discovery": found,
        "health": hardware.device_health(0),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if not hardware.is_cpu:
        # Every CUDA device must have matched an NVML unit by UUID (else no live figures).
        result["all_matched_by_uuid"] = all(d.nvml_index is not None for d in hardware.devices)
        result["uuids"] = [d.uuid for d in hardware.devices]
    return result


def live_blocks(limit: int = 8) -> list[dict[str, Any]]:
    """The largest CUDA blocks still allocated (size, private pool, where they were allocated); stops recording."""
    import torch

    try:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    except Exception as exc:
        return [{"error": f"{type(exc).__name__}: {exc}"[:200]}]
    blocks = []
    for segment in snapshot.get("segments", []):
        for block in segment.get("blocks", []):
            if block.get("state") != "active_allocated":
                continue
            frames = [
                f"{f.get('filename', '?').rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name')}"
                for f in block.get("frames", [])
                if "nn/modules/module.py" not in str(f.get("filename", ""))  # _call_impl wrappers: noise
            ]
            blocks.append(
                {
                    "mb": round(block.get("size", 0) / 2**20, 1),
                    "pool": str(segment.get("segment_pool_id")),
                    "stream": segment.get("stream"),
                    "frames": frames[:8],
                }
            )
    return sorted(blocks, key=lambda b: -b["mb"])[:limit]


async def engine_check(device: str, graphs: bool) -> dict[str, Any]:
    """Load a tiny model through the Engine, measure memory, generate, unload, check the memory came back."""
    import torch

    from cortex.neuron.engine import Engine, Finished, GenerationRequest, LoadSpec, ModelSource, SamplingParams

    model_dir = build_tiny_model(WORK / "tiny")
    tokenizer = load_tokenizer()
    prompt_ids = prompts(tokenizer)
    result: dict[str, Any] = {"device": device, "cuda_graphs": graphs}
    cuda = device.startswith("cuda")
    engine = Engine([device], cuda_graphs=graphs)
    if cuda:  # stack traces of allocations, so anything still allocated after the unload names its origin
        with contextlib.suppress(Exception):
            torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    try:
        before = await engine.memory(device)
        started = time.perf_counter()
        model = await engine.load(LoadSpec("tiny", ModelSource("local", str(model_dir)), device=device))
        result["load_s"] = round(time.perf_counter() - started, 3)
        result["info"] = {
            "memory_mb": round(model.info.memory_bytes / 2**20, 1),
            "held_mb": round(model.memory_bytes / 2**20, 1),  # weights + KV pool + graphs: /models vram_used_mb
            "dtype": model.info.dtype,
            "context": model.info.context_length,
        }
        result["kv"] = model.kv_stats()
        result["memory_loaded"] = await engine.memory(device)

        async def one(prompt: list[int]) -> dict[str, Any]:
            text = []
            sampling = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
            async for event in model.generate(GenerationRequest("check", prompt, sampling)):
                if isinstance(event, Finished):
                    return {
                        "text": "".join(text),
                        "tokens": event.completion_tokens,
                        "ttft": event.time_to_first_token_s,
                    }
                text.append(event.text)
            raise RuntimeError("no Finished event")

        started = time.perf_counter()
        answers = await asyncio.gather(*(one(p) for p in prompt_ids))
        result["generate_s"] = round(time.perf_counter() - started, 3)
        result["answers_tokens"] = [a["tokens"] for a in answers]
        result["answers"] = [a["text"][:80] for a in answers]
        full_texts = [a["text"] for a in answers]
        result["graph_stats_after"] = model.kv_stats().get("cuda_graphs")
        freed = await engine.unload(model)
        result["freed_mb"] = round(freed / 2**20, 1)
        result["memory_unloaded"] = await engine.memory(device)
        if cuda:
            leaked = result["memory_unloaded"]["allocated_bytes"] - before["allocated_bytes"]
            result["leaked_after_unload_mb"] = round(leaked / 2**20, 1)
            result["memory_freed_ok"] = leaked < 8 * 2**20
            result["live_after_unload"] = live_blocks()
    finally:
        engine.close()
    if graphs and cuda:
        # The same greedy requests with graphs off: how many answers the captured decode reproduces exactly.
        eager = Engine([device], cuda_graphs=False)
        try:
            model = await eager.load(LoadSpec("tiny", ModelSource("local", str(model_dir)), device=device))
            texts = await asyncio.gather(*(_greedy_text(model, p) for p in prompt_ids))
            same = sum(a == b for a, b in zip(texts, full_texts, strict=True))
            result["graphs_match_eager"] = f"{same}/{len(texts)}"
            await eager.unload(model)
        finally:
            eager.close()
    # A bad ordinal must fail fast with a clear reason (the device worker's bind error path).
    bad = f"cuda:{torch.cuda.device_count()}" if cuda else "cuda:0"
    engine = Engine([bad])
    started = time.perf_counter()
    try:
        await asyncio.wait_for(engine.load(LoadSpec("tiny", ModelSource("local", str(model_dir)), device=bad)), 30)
        result["bad_device"] = {"device": bad, "error": None}
    except Exception as exc:
        result["bad_device"] = {
            "device": bad,
            "error": f"{type(exc).__name__}: {exc}",
            "reason": getattr(exc, "reason", None),
            "seconds": round(time.perf_counter() - started, 3),
        }
    finally:
        engine.close()
    return result


async def _greedy_text(model: Any, prompt: list[int]) -> str:
    from cortex.neuron.engine import Finished, GenerationRequest, SamplingParams

    text = []
    sampling = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
    async for event in model.generate(GenerationRequest("check", prompt, sampling)):
        if isinstance(event, Finished):
            break
        text.append(event.text)
    return "".join(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, body: dict[str, Any] | None = None, timeout: float = 60) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def serve(device: str, graphs: bool, log_path: Path) -> dict[str, Any]:
    """A real `neuron serve` on `device` with the tiny model, and one chat request over HTTP."""
    model_dir = build_tiny_model(WORK / "tiny")
    port = free_port()
    use = '"cpu"' if device == "cpu" else f"[{device.partition(':')[2] or 0}]"
    config = WORK / "neuron.toml"
    config.write_text(
        f'model_roots = ["{model_dir.parent}"]\n'
        f"[devices]\nuse = {use}\n"
        f"[engine]\ncuda_graphs = {'true' if graphs else 'false'}\n"
        f'[[default_models]]\nmodel_id = "tiny"\nsource = "{model_dir}"\n'
    )
    args = [sys.executable, "-m", "cortex.cli.neuron_cmd", "serve", "--config", str(config)]
    args += ["--listen", f"127.0.0.1:{port}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"device": device, "cuda_graphs": graphs}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        started = time.monotonic()
        models: list[dict[str, Any]] = []
        while time.monotonic() - started < 150:
            if proc.poll() is not None:
                raise RuntimeError(f"neuron exited with {proc.returncode}; see {log_path}")
            try:
                models = get(f"{url}/models", timeout=5)
            except OSError:
                time.sleep(0.5)
                continue
            if models and models[0].get("status") in ("loaded", "failed"):
                break
            time.sleep(0.5)
        result["ready_s"] = round(time.monotonic() - started, 2)
        result["models"] = models
        result["discovery"] = get(f"{url}/discovery")
        result["health"] = get(f"{url}/health")
        if models and models[0].get("status") == "loaded":
            chat = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16,
                "temperature": 0,
            }
            t0 = time.perf_counter()
            answer = get(f"{url}/v1/chat/completions", chat)
            result["chat_s"] = round(time.perf_counter() - t0, 3)
            result["chat"] = {"content": answer["choices"][0]["message"]["content"], "usage": answer.get("usage")}
            result["models_after"] = get(f"{url}/models")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        result["exit_code"] = proc.returncode
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["versions", "discovery", "engine", "serve"])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--log", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "neuron.log")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        if args.what == "versions":
            result = versions()
        elif args.what == "discovery":
            result = discovery()
        elif args.what == "engine":
            result = asyncio.run(engine_check(args.device, not args.eager))
        else:
            result = serve(args.device, not args.eager, args.log)
        result["ok"] = True
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.perf_counter() - started, 2)
    emit(args.what, result)


if __name__ == "__main__":
    main()
