"""Who gets in: client keys (hashed too), an admin key distinct from them, /metrics behind a key, a /health
that tells strangers nothing internal, and a neuron that only answers the gateway holding its token."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_procs import GatewayDaemon, cortex_toml, run_fake_neuron, run_gateway, wait_until
from tests.support.procs import Daemon, get_json, run_neuron

GPU = [{"vram_total_mb": 24000}]
CLIENT = "sk-client"
ADMIN = "admin-secret"
METRICS = "metrics-secret"


def call(url: str, key: str | None = None, *, body: Any = None, header: str = "Authorization") -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "Authorization" else key
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with run_fake_neuron(tmp_path_factory.mktemp("fake"), {"name": "a", "devices": GPU, "preloaded": ["m"]}) as d:
        yield d


def gateway(tmp: Path, fake: Daemon, extra: str) -> Any:
    return run_gateway(tmp, cortex_toml({"a": fake.url}, models_config=None, extra_gateway=extra), wait_healthy=1)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, fake: Daemon) -> Iterator[GatewayDaemon]:
    hashed = "sha256:" + hashlib.sha256(CLIENT.encode()).hexdigest()
    extra = f'api_keys = ["{hashed}"]\nadmin_key = "{ADMIN}"\nmetrics_key = "{METRICS}"'
    with gateway(tmp_path_factory.mktemp("keyed"), fake, extra) as daemon:
        yield daemon


def test_a_hashed_client_key_opens_client_routes(keyed: GatewayDaemon) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert call(f"{keyed.url}/v1/chat/completions", body=chat)[0] == 401
    assert call(f"{keyed.url}/v1/chat/completions", CLIENT, body=chat)[0] == 200
    assert call(f"{keyed.url}/v1/chat/completions", CLIENT, body=chat, header="x-api-key")[0] == 200
    digest = "sha256:" + hashlib.sha256(CLIENT.encode()).hexdigest()
    assert call(f"{keyed.url}/v1/chat/completions", digest, body=chat)[0] == 401  # the digest is not the key


def test_admin_routes_need_the_admin_key_never_a_client_key(keyed: GatewayDaemon) -> None:
    for key in (None, CLIENT, "wrong"):
        status, body = call(f"{keyed.url}/admin/state", key)
        assert status == 401 and body["error"]["code"] == "invalid_admin_key", (key, body)
    assert call(f"{keyed.url}/admin/state", ADMIN)[0] == 200
    assert call(f"{keyed.url}/admin/state", ADMIN, header="x-admin-key")[0] == 200


def test_metrics_need_the_metrics_or_admin_key(keyed: GatewayDaemon) -> None:
    assert call(f"{keyed.metrics_url}/metrics")[0] == 401
    assert call(f"{keyed.metrics_url}/metrics", CLIENT)[0] == 401
    assert call(f"{keyed.metrics_url}/metrics", METRICS)[0] == 200
    assert call(f"{keyed.metrics_url}/metrics", ADMIN)[0] == 200


def test_health_tells_strangers_nothing_internal(keyed: GatewayDaemon, fake: Daemon) -> None:
    status, body = call(f"{keyed.url}/health")
    assert status == 200 and body["status"] == "ok" and body["healthy_neurons"] == 1
    text = json.dumps(body)
    assert fake.url.split("//")[1] not in text and "error" not in text


def test_client_keys_without_an_admin_key_close_the_admin_api(tmp_path: Path, fake: Daemon) -> None:
    with gateway(tmp_path, fake, f'api_keys = ["{CLIENT}"]') as daemon:
        for key in (None, CLIENT):
            status, body = call(f"{daemon.url}/admin/state", key)
            assert status == 403 and body["error"]["code"] == "admin_key_not_configured", body


@pytest.fixture(scope="module")
def guarded_neuron(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with run_neuron(tmp_path_factory.mktemp("guarded"), 'default_models = []\ntoken = "fleet-secret"\n') as daemon:
        yield daemon


def test_the_gateway_sends_the_neuron_its_token(tmp_path: Path, guarded_neuron: Daemon) -> None:
    toml = cortex_toml({"n": guarded_neuron.url}, models_config=None, extra_gateway='neuron_token = "fleet-secret"')
    with run_gateway(tmp_path, toml, wait_healthy=1) as daemon:
        node = get_json(f"{daemon.url}/admin/state")["nodes"][0]
        assert node["healthy"] and node["failures"] == 0


def test_a_gateway_without_the_token_is_refused(tmp_path: Path, guarded_neuron: Daemon) -> None:
    toml = cortex_toml({"n": guarded_neuron.url}, models_config=None)
    with run_gateway(tmp_path, toml) as daemon:
        state = wait_until(lambda: (s := get_json(f"{daemon.url}/admin/state"))["nodes"][0]["failures"] and s)
        assert not state["nodes"][0]["healthy"] or state["nodes"][0]["failures"] > 0
        assert "401" in (state["nodes"][0]["last_error"] or "") or "token" in (state["nodes"][0]["last_error"] or "")
