"""Prometheus metrics (labels `model`, `node`), served as text on `metrics_listen` at `/metrics`.

Per-request numbers are gathered by accounting.py while a request runs and published here once,
when it ends: nothing touches prometheus-client per streamed event. Gauges are set from each poll.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cortex.gateway.state import Node

UNKNOWN_MODEL = "unknown"  # label for requests whose model is not one we serve (bounded cardinality)

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2.5)
_COLD_START_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Series:
    """The labelled children for one (model, node), resolved once and cached."""

    __slots__ = ("completion_tokens", "duration", "itl", "prompt_tokens", "requests", "tps", "ttft")

    def __init__(self, m: Metrics, model: str, node: str) -> None:
        self.requests = m.requests.labels(model, node)
        self.prompt_tokens = m.prompt_tokens.labels(model, node)
        self.completion_tokens = m.completion_tokens.labels(model, node)
        self.duration = m.duration.labels(model, node)
        self.ttft = m.ttft.labels(model, node)
        self.tps = m.tokens_per_second.labels(model, node)
        self.itl = m.inter_token_latency.labels(model, node)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        mn = ("model", "node")
        self.requests = Counter("cortex_requests", "Requests received, by model and serving node", mn, registry=r)
        self.errors = Counter("cortex_errors", "Requests that failed, by error type", (*mn, "type"), registry=r)
        self.cold_starts = Counter("cortex_cold_starts", "Model loads started to serve a request", mn, registry=r)
        self.evictions = Counter("cortex_evictions", "Models unloaded to make room for another", mn, registry=r)
        self.defragmentations = Counter(
            "cortex_defragmentations", "Device memory defragmentations", ["node"], registry=r
        )
        self.prompt_tokens = Counter("cortex_prompt_tokens", "Prompt tokens processed", mn, registry=r)
        self.completion_tokens = Counter("cortex_completion_tokens", "Completion tokens generated", mn, registry=r)
        self.duration = Histogram(
            "cortex_request_duration_seconds", "Request duration", mn, buckets=_DURATION_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "cortex_time_to_first_token_seconds", "Time to first streamed token", mn, buckets=_TTFT_BUCKETS, registry=r
        )
        self.tokens_per_second = Histogram(
            "cortex_tokens_per_second", "Completion tokens per second of decoding", mn, buckets=_TPS_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "cortex_inter_token_latency_seconds", "Gap between streamed tokens", mn, buckets=_ITL_BUCKETS, registry=r
        )
        self.cold_start_duration = Histogram(
            "cortex_cold_start_seconds", "Cold load duration", mn, buckets=_COLD_START_BUCKETS, registry=r
        )
        self.in_flight = Gauge("cortex_in_flight", "Requests running on a replica (polled)", mn, registry=r)
        self.queue_depth = Gauge("cortex_queue_depth", "Requests queued on a replica (polled)", mn, registry=r)
        self.model_vram = Gauge("cortex_model_vram_used_mb", "Measured memory of a loaded model", mn, registry=r)
        dn = ("node", "device")
        self.vram_used = Gauge("cortex_device_vram_used_mb", "Device memory used (polled)", dn, registry=r)
        self.vram_free = Gauge("cortex_device_vram_free_mb", "Device memory free (polled)", dn, registry=r)
        self.utilization = Gauge("cortex_device_utilization_pct", "Device utilisation (polled)", dn, registry=r)
        self.temperature = Gauge("cortex_device_temperature_c", "Device temperature (polled)", dn, registry=r)
        self.node_healthy = Gauge("cortex_node_healthy", "1 when the node answers its polls", ["node"], registry=r)
        self._series: dict[tuple[str, str], Series] = {}
        self._gauge_models: dict[str, set[str]] = {}
        self._gauge_devices: dict[str, set[str]] = {}

    def series(self, model: str, node: str) -> Series:
        key = (model, node)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(self, model, node)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- gauges from polling ---------------------------------------------------------------
    def observe_node(self, node: Node) -> None:
        self.node_healthy.labels(node.name).set(1 if node.healthy else 0)
        if not node.healthy:
            return
        self._observe_devices(node)
        self._observe_models(node)

    def _observe_devices(self, node: Node) -> None:
        current = {str(i) for i in node.devices}
        for gone in self._gauge_devices.get(node.name, set()) - current:
            for gauge in (self.vram_used, self.vram_free, self.utilization, self.temperature):
                _remove(gauge, node.name, gone)
        self._gauge_devices[node.name] = current
        for dev in node.devices.values():
            index = str(dev.index)
            self.vram_used.labels(node.name, index).set(dev.vram_used_mb)
            self.vram_free.labels(node.name, index).set(dev.vram_free_mb)
            if dev.utilization_pct is not None:
                self.utilization.labels(node.name, index).set(dev.utilization_pct)
            if dev.temp_c is not None:
                self.temperature.labels(node.name, index).set(dev.temp_c)

    def _observe_models(self, node: Node) -> None:
        current = set(node.replicas)
        for gone in self._gauge_models.get(node.name, set()) - current:
            for gauge in (self.in_flight, self.queue_depth, self.model_vram):
                _remove(gauge, gone, node.name)
        self._gauge_models[node.name] = current
        for replica in node.replicas.values():
            self.in_flight.labels(replica.model_id, node.name).set(replica.polled_in_flight)
            self.queue_depth.labels(replica.model_id, node.name).set(replica.polled_queue_depth)
            self.model_vram.labels(replica.model_id, node.name).set(replica.vram_used_mb)


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set for this label set
        gauge.remove(*labels)
