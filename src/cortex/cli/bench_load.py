"""`cortex bench`'s load: the workload (prompts, conversations, arrivals) and the streams that carry it.

Workloads: N requests with at most C streams at once, sent back to back or at a fixed or Poisson
rate; prompts generated to a length (or read from a file); and agent-like conversations, where every
conversation shares a system prefix and each turn resends the whole history plus a new message —
the shape that prefix caching is for. Each request is timed at the client as its stream arrives
(TTFT, the gaps between text events, tokens from the reported usage); `bench_report.py` sums it up.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

# A generated prompt is `prompt_tokens` of these words, drawn with the seeded generator.
_WORDS = tuple(
    [
        "river",
        "stone",
        "cloud",
        "lamp",
        "garden",
        "engine",
        "paper",
        "window",
        "market",
        "silver",
        "orange",
        "forest",
        "signal",
        "harbor",
        "winter",
        "planet",
        "kettle",
        "bridge",
        "candle",
        "meadow",
        "rocket",
        "violin",
        "pencil",
        "castle",
        "desert",
        "mirror",
        "thunder",
        "saddle",
        "pepper",
        "compass",
        "lantern",
        "feather",
        "marble",
        "canyon",
        "ribbon",
        "anchor",
        "blanket",
        "cactus",
        "dolphin",
        "glacier",
        "hammer",
        "jacket",
    ]
)


@dataclass
class BenchConfig:
    url: str
    model: str
    dialect: Literal["openai", "anthropic"] = "openai"
    requests: int = 32
    concurrency: int = 4
    rate: float | None = None  # arrivals per second; None: back to back
    arrivals: Literal["fixed", "poisson"] = "fixed"
    prompt_tokens: int = 128
    max_tokens: int = 64
    prompts: list[str] | None = None
    shared_prefix_tokens: int = 0
    turns: int = 1
    api_key: str | None = None
    seed: int = 0
    timeout_s: float = 300.0


@dataclass
class Result:
    """One request, as the client saw it."""

    conversation: int
    turn: int
    ok: bool
    error: str | None = None
    ttft_s: float | None = None
    duration_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    text: str = ""

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed of this stream: tokens after the first, over the time after the first."""
        if self.ttft_s is None or self.output_tokens < 2 or self.duration_s <= self.ttft_s:
            return None
        return (self.output_tokens - 1) / (self.duration_s - self.ttft_s)


# ---- workload ------------------------------------------------------------------------------------
def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, n)))


class Workload:
    """Conversations of `turns` requests each, `requests` in all; prompts generated or from a file."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.prefix = (
            f"You are a careful assistant. Reference notes: {_words(self.rng, cfg.shared_prefix_tokens)}"
            if cfg.shared_prefix_tokens > 0
            else None
        )
        self.conversations = math.ceil(cfg.requests / max(1, cfg.turns))
        self._next_prompt = 0

    def turns_of(self, conversation: int) -> int:
        done = conversation * self.cfg.turns
        return max(0, min(self.cfg.turns, self.cfg.requests - done))

    def user_message(self) -> str:
        if self.cfg.prompts:
            prompt = self.cfg.prompts[self._next_prompt % len(self.cfg.prompts)]
            self._next_prompt += 1
            return prompt
        return f"Write about these words: {_words(self.rng, self.cfg.prompt_tokens)}"

    def arrival_gaps(self) -> list[float]:
        """Seconds to wait before starting each conversation."""
        rate = self.cfg.rate
        if not rate:
            return [0.0] * self.conversations
        if self.cfg.arrivals == "poisson":
            return [self.rng.expovariate(rate) for _ in range(self.conversations)]
        return [1.0 / rate] * self.conversations


# ---- one request -------------------------------------------------------------------------------------
def _request(cfg: BenchConfig, prefix: str | None, history: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
    if cfg.dialect == "anthropic":
        body: dict[str, Any] = {"model": cfg.model, "max_tokens": cfg.max_tokens, "messages": history, "stream": True}
        if prefix:
            body["system"] = prefix
        return "/v1/messages", body
    messages = ([{"role": "system", "content": prefix}] if prefix else []) + history
    body = {
        "model": cfg.model,
        "messages": messages,
        "max_tokens": cfg.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return "/v1/chat/completions", body


def _headers(cfg: BenchConfig) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if cfg.dialect == "anthropic":
        headers["anthropic-version"] = "2023-06-01"
        if cfg.api_key:
            headers["x-api-key"] = cfg.api_key
    elif cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    return headers


async def _one(http: Any, cfg: BenchConfig, body_path: tuple[str, dict[str, Any]], result: Result) -> None:
    path, body = body_path
    started = time.perf_counter()
    last: float | None = None
    pieces: list[str] = []
    events = 0
    try:
        async with http.post(cfg.url.rstrip("/") + path, json=body, headers=_headers(cfg)) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status} {_error_type(await resp.text())}".strip()
                return
            async for raw in resp.content:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                text, usage, error = _parse(cfg.dialect, event)
                if error:
                    result.error = f"stream error {error}"
                    return
                if usage:
                    result.output_tokens = usage.get("output", result.output_tokens)
                    result.prompt_tokens = usage.get("input", result.prompt_tokens)
                if text:
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - started
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    events += 1
                    pieces.append(text)
        result.ok = True
    except TimeoutError:
        result.error = "timeout"
    except Exception as exc:  # connection refused, reset, …: counted, never fatal to the run
        result.error = type(exc).__name__
    finally:
        result.duration_s = time.perf_counter() - started
        result.text = "".join(pieces)
        if not result.output_tokens:
            result.output_tokens = events  # no usage reported: one streamed event ≈ one token


def _parse(dialect: str, event: dict[str, Any]) -> tuple[str, dict[str, int], str | None]:
    if "error" in event and (dialect == "openai" or event.get("type") == "error"):
        err = event["error"]
        return "", {}, str(err.get("type") or err.get("code") or "error") if isinstance(err, dict) else "error"
    if dialect == "anthropic":
        kind = event.get("type")
        if kind == "content_block_delta":
            return str(event.get("delta", {}).get("text") or ""), {}, None
        if kind == "message_start":
            usage = event.get("message", {}).get("usage", {})
            return "", {"input": int(usage.get("input_tokens") or 0)}, None
        if kind == "message_delta":
            return "", {"output": int(event.get("usage", {}).get("output_tokens") or 0)}, None
        return "", {}, None
    usage: dict[str, int] = {}
    if event.get("usage"):
        usage = {
            "output": int(event["usage"].get("completion_tokens") or 0),
            "input": int(event["usage"].get("prompt_tokens") or 0),
        }
    choices = event.get("choices") or []
    text = (choices[0].get("delta") or {}).get("content") if choices else None
    return str(text or ""), usage, None


def _error_type(body: str) -> str:
    try:
        err = json.loads(body).get("error", {})
    except (ValueError, AttributeError):
        return ""
    return str(err.get("type") or err.get("code") or "") if isinstance(err, dict) else ""


# ---- the run -----------------------------------------------------------------------------------------
async def run(cfg: BenchConfig) -> tuple[list[Result], float]:
    """Run the workload: each request's result, and the wall time of the whole run in seconds."""
    import aiohttp

    workload = Workload(cfg)
    results: list[Result] = []
    slots = asyncio.Semaphore(max(1, cfg.concurrency))
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)

    async def conversation(index: int, http: Any) -> None:
        history: list[dict[str, str]] = []
        for turn in range(workload.turns_of(index)):
            history.append({"role": "user", "content": workload.user_message()})
            result = Result(conversation=index, turn=turn, ok=False)
            async with slots:
                await _one(http, cfg, _request(cfg, workload.prefix, history), result)
            results.append(result)
            if not result.ok:
                return  # a conversation cannot go on without its answer
            history.append({"role": "assistant", "content": result.text or "…"})

    connector = aiohttp.TCPConnector(limit=max(1, cfg.concurrency) * 2)
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        tasks = []
        for index, gap in enumerate(workload.arrival_gaps()):
            if gap and index:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(conversation(index, http)))
        await asyncio.gather(*tasks)
    return results, time.perf_counter() - started
