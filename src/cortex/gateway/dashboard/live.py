"""Live per-model figures for the dashboard, from the gateway's own Prometheus metrics.

The gateway already counts every request (requests, errors, tokens, time to first token, cold
starts, evictions). This module samples that text each time the dashboard asks, keeps the last
samples for a short window, and turns the differences into what an operator watches: requests/s,
tok/s, TTFT (mean and percentiles from the histogram buckets), error rate, and the cold loads and
evictions that happened lately. No new bookkeeping on the request path: a dashboard nobody opens
costs nothing.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

WINDOW_S = 30.0  # rates are over (at most) the last 30 s of samples
MAX_EVENTS = 50

Key = tuple[str, ...]


@dataclass
class Sample:
    """One reading of the counters, summed per model (and per (model, node) for the events)."""

    at: float  # monotonic
    wall: float  # epoch seconds, for the page
    counters: dict[str, dict[Key, float]] = field(default_factory=dict)
    buckets: dict[str, dict[str, dict[float, float]]] = field(default_factory=dict)  # metric → model → le → count


_COUNTERS = {
    "cortex_requests": ("model",),
    "cortex_errors": ("model",),
    "cortex_completion_tokens": ("model",),
    "cortex_cold_starts": ("model", "node"),
    "cortex_evictions": ("model", "node"),
}
_HISTOGRAMS = ("cortex_time_to_first_token_seconds", "cortex_inter_token_latency_seconds", "cortex_cold_start_seconds")


def read_sample(text: str, at: float | None = None, wall: float | None = None) -> Sample:
    sample = Sample(time.monotonic() if at is None else at, time.time() if wall is None else wall)
    for family in text_string_to_metric_families(text):
        if family.name in _COUNTERS:
            labels = _COUNTERS[family.name]
            into = sample.counters.setdefault(family.name, {})
            for s in family.samples:
                if s.name.endswith("_total"):
                    key = tuple(s.labels.get(label, "") for label in labels)
                    into[key] = into.get(key, 0.0) + s.value
        elif family.name in _HISTOGRAMS:
            sums = sample.counters.setdefault(f"{family.name}_sum", {})
            counts = sample.counters.setdefault(f"{family.name}_count", {})
            per_model = sample.buckets.setdefault(family.name, {})
            for s in family.samples:
                model = (s.labels.get("model", ""),)
                if s.name.endswith("_sum"):
                    sums[model] = sums.get(model, 0.0) + s.value
                elif s.name.endswith("_count"):
                    counts[model] = counts.get(model, 0.0) + s.value
                elif s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    buckets = per_model.setdefault(model[0], {})
                    buckets[le] = buckets.get(le, 0.0) + s.value
    return sample


def quantile(q: float, now: dict[float, float], before: dict[float, float]) -> float | None:
    """The q-quantile of the observations between two readings of a cumulative histogram."""
    bounds = sorted(now)
    deltas = [now[b] - before.get(b, 0.0) for b in bounds]
    total = deltas[-1] if deltas else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, deltas, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its edge is all we know
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


class LiveFigures:
    """Keeps recent samples of the metrics text and derives per-model rates and recent events."""

    def __init__(self, metrics_text: Callable[[], bytes | str], window_s: float = WINDOW_S) -> None:
        self._metrics_text = metrics_text
        self.window_s = window_s
        self._samples: deque[Sample] = deque()
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        raw = self._metrics_text()
        sample = read_sample(raw.decode() if isinstance(raw, bytes) else raw)
        with self._lock:
            return self._add(sample)

    def _add(self, sample: Sample) -> dict[str, Any]:
        previous = self._samples[-1] if self._samples else None
        if previous is not None:
            self._note_events(previous, sample)
        self._samples.append(sample)
        while len(self._samples) > 2 and sample.at - self._samples[1].at >= self.window_s:
            self._samples.popleft()
        oldest = self._samples[0]
        return {
            "window_s": round(sample.at - oldest.at, 1),
            "models": self._models(oldest, sample),
            "events": list(reversed(self._events)),
        }

    def _note_events(self, before: Sample, now: Sample) -> None:
        for metric, kind in (("cortex_cold_starts", "cold_load"), ("cortex_evictions", "eviction")):
            old = before.counters.get(metric, {})
            for (model, node), value in sorted(now.counters.get(metric, {}).items()):
                grew = value - old.get((model, node), 0.0)
                if grew > 0:
                    self._events.append({"at": now.wall, "kind": kind, "model": model, "node": node, "count": grew})

    def _models(self, oldest: Sample, now: Sample) -> dict[str, dict[str, Any]]:
        dt = now.at - oldest.at
        models = {key[0] for key in now.counters.get("cortex_requests", {})}
        out: dict[str, dict[str, Any]] = {}
        for model in sorted(models):
            key = (model,)

            def total(metric: str, sample: Sample, key: Key = key) -> float:
                return sample.counters.get(metric, {}).get(key, 0.0)

            def delta(metric: str) -> float:
                return total(metric, now) - total(metric, oldest)

            def per_node_total(metric: str, model: str = model) -> float:
                return sum(v for (m, _), v in now.counters.get(metric, {}).items() if m == model)

            requests, errors = delta("cortex_requests"), delta("cortex_errors")
            ttft_n = delta("cortex_time_to_first_token_seconds_count")
            itl_n = delta("cortex_inter_token_latency_seconds_count")
            ttft_now = now.buckets.get("cortex_time_to_first_token_seconds", {}).get(model, {})
            ttft_before = oldest.buckets.get("cortex_time_to_first_token_seconds", {}).get(model, {})
            out[model] = {
                "requests_per_s": _rate(requests, dt),
                "errors_per_s": _rate(errors, dt),
                "error_rate": round(errors / requests, 4) if requests > 0 else None,
                "tokens_per_s": _rate(delta("cortex_completion_tokens"), dt),
                "ttft_mean_s": _mean(delta("cortex_time_to_first_token_seconds_sum"), ttft_n),
                "ttft_p50_s": _round(quantile(0.5, ttft_now, ttft_before)),
                "ttft_p95_s": _round(quantile(0.95, ttft_now, ttft_before)),
                "itl_mean_s": _mean(delta("cortex_inter_token_latency_seconds_sum"), itl_n),
                "requests_total": total("cortex_requests", now),
                "errors_total": total("cortex_errors", now),
                "cold_starts_total": per_node_total("cortex_cold_starts"),
                "evictions_total": per_node_total("cortex_evictions"),
            }
        return out


def _rate(delta: float, dt: float) -> float | None:
    return round(delta / dt, 3) if dt > 0 else None


def _mean(total: float, count: float) -> float | None:
    return round(total / count, 4) if count > 0 else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
