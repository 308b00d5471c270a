"""Per-key limits through a real gateway: requests and tokens per minute (429 + Retry-After in the route's
dialect), and a model allow-list (403), while other keys go on unhindered."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from cortex.gateway.limits import KeyPolicy, Limiter, check_model
from tests.support.gateway_procs import GatewayDaemon, cortex_toml, run_fake_neuron, run_gateway

GPU = [{"vram_total_mb": 24000}]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def post(url: str, key: str, body: dict[str, Any], **headers: str) -> tuple[int, Any, dict[str, str]]:
    request = urllib.request.Request(
        url,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {key}", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayDaemon]:
    tmp = tmp_path_factory.mktemp("limits")
    spec = {"name": "a", "devices": GPU, "preloaded": ["m", "other"], "stream_events": 3}
    limited = """
[[gateway.client_keys]]
key = "sk-three"
requests_per_minute = 3
[[gateway.client_keys]]
key = "sk-tokens"
tokens_per_minute = 12
[[gateway.client_keys]]
key = "sk-only-m"
models = ["m"]
"""
    with run_fake_neuron(tmp, spec) as fake:
        toml = cortex_toml({"a": fake.url}, models_config=None, extra_gateway='api_keys = ["sk-free"]') + limited
        with run_gateway(tmp, toml, wait_healthy=1) as daemon:
            yield daemon


def test_requests_per_minute(gateway: GatewayDaemon) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    assert [post(url, "sk-three", {"model": "m", **CHAT})[0] for _ in range(3)] == [200, 200, 200]
    status, body, headers = post(url, "sk-three", {"model": "m", **CHAT})
    assert (
        status == 429 and body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "rate_limit_exceeded"
    )
    assert 1 <= int(headers["Retry-After"]) <= 60
    status, body, _ = post(
        f"{gateway.url}/v1/messages", "sk-three", {"model": "m", **CHAT}, **{"anthropic-version": "1"}
    )
    assert status == 429 and body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert post(url, "sk-free", {"model": "m", **CHAT})[0] == 200  # other keys are not affected


def test_tokens_per_minute(gateway: GatewayDaemon) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    statuses = [post(url, "sk-tokens", {"model": "m", **CHAT})[0] for _ in range(3)]
    assert statuses[0] == 200 and statuses[-1] == 429, statuses  # each answer costs the fake's usage (8 tokens)


def test_model_allow_list(gateway: GatewayDaemon) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    assert post(url, "sk-only-m", {"model": "m", **CHAT})[0] == 200
    status, body, _ = post(url, "sk-only-m", {"model": "other", **CHAT})
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    assert post(url, "sk-free", {"model": "other", **CHAT})[0] == 200


def test_limiter_windows_and_identity() -> None:
    limiter = Limiter({b"k": KeyPolicy(requests_per_minute=2, models=frozenset({"a"}))}, KeyPolicy())
    limiter.use_key(b"k")
    limiter.use_key(b"k")
    with pytest.raises(Exception, match="2 requests per minute") as refused:
        limiter.use_key(b"k")
    assert refused.value.status == 429 and refused.value.retry_after >= 1  # type: ignore[attr-defined]
    check_model("a")
    with pytest.raises(Exception, match="may not use"):
        check_model("b")
    limiter.use_key(b"unlimited")  # the default policy: no limits, every model
    check_model("b")
