"""Fold $OUT/results.jsonl into $OUT/summary.json: the figures that matter, and the issue's GPU targets beside them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TARGETS = {  # from the engine issue, for an H100/H200-class GPU
    "qwen3-8b single_tok_s >= 130": ("bench qwen3-8b graphs", lambda r: r.get("single_tok_s", 0) >= 130),
    "qwen3-8b capture_s <= 15": (
        "bench qwen3-8b graphs",
        lambda r: (r.get("cuda_graph_stats") or {}).get("capture_s", 1e9) <= 15,
    ),
    "qwen3-8b 32 random arrivals >= 3000 tok/s": (
        "bench qwen3-8b graphs",
        lambda r: (r.get("random_arrivals") or {}).get("aggregate_tok_s", 0) >= 3000,
    ),
    "qwen3-0.6b single_tok_s >= 450": ("bench qwen3-0.6b graphs", lambda r: r.get("single_tok_s", 0) >= 450),
}


def main() -> None:
    out = Path(os.environ.get("OUT", "/tmp/cortex-gpu-out"))
    stages: dict[str, dict[str, Any]] = {}
    path = out / "results.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            stages.setdefault(row.get("stage", "?"), {}).update(row)
    summary: dict[str, Any] = {"stages": {name: _status(row) for name, row in stages.items()}}
    versions = stages.get("versions", {})
    summary["gpu"] = versions.get("gpu")
    summary["torch"] = (versions.get("neuron") or {}).get("torch")
    summary["transformers"] = versions.get("transformers")
    summary["cuda"] = versions.get("torch_cuda")
    for name in ("discovery", "discovery-visible-uuid"):
        row = stages.get(name, {})
        summary[name] = {"ok": row.get("ok"), "uuid_matched": row.get("all_matched_by_uuid"), "uuids": row.get("uuids")}
    engine = stages.get("engine", {})
    summary["engine"] = {
        key: engine.get(key)
        for key in (
            "ok",
            "load_s",
            "info",
            "memory_freed_ok",
            "leaked_after_unload_mb",
            "live_after_unload",
            "freed_mb",
            "graphs_match_eager",
            "bad_device",
        )
    }
    summary["engine"]["graphs"] = (engine.get("kv") or {}).get("cuda_graphs")
    serve = stages.get("serve", {})
    summary["serve"] = {key: serve.get(key) for key in ("ok", "ready_s", "chat_s", "chat", "exit_code")}
    bench: dict[str, Any] = {}
    for name, row in stages.items():
        if name.startswith("bench ") and row.get("ok"):
            bench[name] = {
                key: row.get(key)
                for key in (
                    "single_tok_s",
                    "ttft_s",
                    "aggregate_tok_s",
                    "random_arrivals",
                    "load_s",
                    "graph_replays",
                    "mixed_replays",
                    "eager_decodes",
                    "weights_mb",
                    "model_memory_mb",
                    "freed_mb",
                    "cuda_allocated_after_unload_mb",
                    "single_step_profile",
                    "compile_after_runs",
                )
            }
            graphs = row.get("cuda_graph_stats") or {}
            bench[name]["capture"] = {k: graphs.get(k) for k in ("enabled", "capture_s", "graphs", "memory_mb")}
    summary["bench"] = bench
    for shape in ("qwen3-8b", "qwen3-0.6b"):
        graphs = stages.get(f"bench {shape} graphs", {})
        for other in ("eager", "graphs+compile"):
            row = stages.get(f"bench {shape} {other}", {})
            if row.get("greedy") and graphs.get("greedy"):
                same = sum(a == b for a, b in zip(row["greedy"], graphs["greedy"], strict=False))
                summary[f"{shape} greedy identical {other} vs graphs"] = f"{same}/{len(graphs['greedy'])}"
    summary["targets"] = {
        f"{target} ({variant})": (check(stages[name]) if stages.get(name, {}).get("ok") else None)
        for target, (stage, check) in TARGETS.items()
        for variant, name in (("graphs", stage), ("graphs+compile", f"{stage}+compile"))
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def _status(row: dict[str, Any]) -> str:
    if row.get("skipped"):
        return "skipped"
    if row.get("timed_out"):
        return "timed out"
    if row.get("ok") is True:
        return "ok"
    return f"failed: {row.get('error') or row.get('rc')}"


if __name__ == "__main__":
    main()
