"""Prometheus metrics on metrics_listen: counters, histograms and polled gauges, labelled model/node."""

from __future__ import annotations

from cortex.gateway.access_log import requested_name
from tests.support.gateway_client import (
    StartFake,
    StartGateway,
    chat,
    chat_body,
    metric_value,
    models_toml,
    read_events,
)


async def test_metrics_cover_requests_tokens_timing_lifecycle_and_fleet(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=[{"vram_total_mb": 5000}], default_size_mb=4000, preloaded=["m1"])
    gateway = start_gateway({"a": a}, models_toml({"id": "m1", "vram_mb": 4000}, {"id": "m2", "vram_mb": 4000}))
    url = f"{gateway.url}/v1/chat/completions"
    assert (await chat(http, gateway, "m1"))[0] == 200
    async with http.post(url, json=chat_body("m1", stream=True)) as resp:  # usage not asked by the client
        await read_events(resp)
    async with http.post(url, json=chat_body("m1", stream=True, fake={"die_after": 1})) as resp:
        await read_events(resp)
    assert (await chat(http, gateway, "nope"))[0] == 404
    assert (await chat(http, gateway, "m2"))[0] == 200  # cold start, evicting m1

    text = gateway.metrics()
    m1 = {"model": "m1", "node": "a"}
    assert metric_value(text, "cortex_requests_total", **m1) == 3
    assert metric_value(text, "cortex_request_duration_seconds_count", **m1) == 3
    assert metric_value(text, "cortex_prompt_tokens_total", **m1) == 14  # the stream's from its usage chunk
    assert metric_value(text, "cortex_completion_tokens_total", **m1) == 10
    assert metric_value(text, "cortex_time_to_first_token_seconds_count", **m1) == 2
    assert metric_value(text, "cortex_inter_token_latency_seconds_count", **m1) == 4  # 5 tokens, 4 gaps
    assert metric_value(text, "cortex_tokens_per_second_count", **m1) == 2
    assert metric_value(text, "cortex_errors_total", type="stream_interrupted", **m1) == 1
    assert metric_value(text, "cortex_errors_total", model="unknown", type="model_not_found") == 1
    # The metrics keep one label for models nobody serves; the access log names the one asked for.
    assert "status=404 model=nope " in gateway.log_path.read_text()
    assert metric_value(text, "cortex_cold_starts_total", model="m2", node="a") == 1
    assert metric_value(text, "cortex_cold_start_seconds_count", model="m2", node="a") == 1
    assert metric_value(text, "cortex_evictions_total", **m1) == 1
    # Gauges from polling.
    assert metric_value(text, "cortex_node_healthy", node="a") == 1
    assert metric_value(text, "cortex_device_vram_used_mb", node="a", device="0") == 4000
    assert metric_value(text, "cortex_device_vram_free_mb", node="a", device="0") == 1000
    assert metric_value(text, "cortex_device_utilization_pct", node="a", device="0") == 7
    assert metric_value(text, "cortex_device_temperature_c", node="a", device="0") == 41
    assert 'cortex_in_flight{model="m2",node="a"}' in text
    assert 'cortex_queue_depth{model="m2",node="a"}' in text
    assert 'cortex_in_flight{model="m1",node="a"}' not in text  # evicted: its gauges go too


def test_the_log_shows_a_requested_model_name_printable_and_bounded() -> None:
    assert requested_name("a\nb\x1b") == "a?b?"
    assert requested_name("x" * 500) == "x" * 80 + "..."
    assert requested_name(42) == "-"
