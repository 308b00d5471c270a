"""The dashboard's live figures from the gateway's metrics text: rates, percentiles, recent events."""

from __future__ import annotations

from cortex.gateway.dashboard.live import LiveFigures, quantile
from cortex.gateway.metrics import Metrics


def test_quantile_interpolates_within_the_bucket_of_the_rank() -> None:
    before = {0.1: 0.0, 0.5: 0.0, 1.0: 0.0, float("inf"): 0.0}
    now = {0.1: 2.0, 0.5: 6.0, 1.0: 10.0, float("inf"): 10.0}
    assert quantile(0.5, now, before) == 0.1 + (0.5 - 0.1) * (5 - 2) / (6 - 2)
    assert quantile(0.1, now, before) == 0.05
    assert quantile(0.5, before, before) is None
    assert quantile(0.99, {1.0: 0.0, float("inf"): 3.0}, {}) == 1.0  # beyond the last bucket: its edge


def test_live_figures_follow_the_gateways_own_counters() -> None:
    metrics = Metrics()
    live = LiveFigures(metrics.render, window_s=1000)
    first = live.snapshot()
    assert first["models"] == {} and first["events"] == []

    series = metrics.series("m", "a")
    for ttft in (0.02, 0.04, 0.2, 0.3):
        series.requests.inc()
        series.completion_tokens.inc(50)
        series.ttft.observe(ttft)
    metrics.errors.labels("m", "a", "upstream_unreachable").inc()
    metrics.cold_starts.labels("m", "a").inc()
    metrics.evictions.labels("old", "a").inc()
    second = live.snapshot()

    m = second["models"]["m"]
    assert (m["requests_total"], m["errors_total"], m["cold_starts_total"]) == (4.0, 1.0, 1.0)
    assert m["error_rate"] == 0.25
    assert m["ttft_mean_s"] == round((0.02 + 0.04 + 0.2 + 0.3) / 4, 4)
    assert 0.025 <= m["ttft_p50_s"] <= 0.25
    assert m["tokens_per_s"] is not None and m["tokens_per_s"] > 0
    kinds = {(e["kind"], e["model"], e["node"]) for e in second["events"]}
    assert kinds == {("cold_load", "m", "a"), ("eviction", "old", "a")}
    assert live.snapshot()["events"] == second["events"]  # nothing new: the same recent events
