"""Generated requests against every route of both daemons: none may fail anything but itself.

`FUZZ_REQUESTS` sets how many (default 10,000: what CI runs), `FUZZ_SEED` which ones
(default: the same every run). Requests go concurrently over one session, to the neuron directly and
through the gateway in front of it. Passing means: no 5xx, no hang, every error body in its route's
dialect, no model poisoned, and a normal request served afterwards (tests/fuzz/harness.py).
"""

from __future__ import annotations

import os
import random

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from tests.fuzz.conftest import SERVED, FuzzFleet
from tests.fuzz.harness import report, send_all
from tests.fuzz.strategies import OTHER_MODELS, FuzzRequest, fuzz_requests, mutate

REQUESTS = int(os.environ.get("FUZZ_REQUESTS", "10000"))
SEED = int(os.environ.get("FUZZ_SEED", "0"))
CONCURRENCY = 24


def generate(count: int, seed: int) -> list[FuzzRequest]:
    """`count` requests: a tenth drawn by hypothesis, the rest random mutations of those.

    Hypothesis explores the shapes (generation only: the run itself is concurrent, not one request
    per example); mutating its draws is a thousand times cheaper per request, which is what lets
    10,000 requests run in a CI minute.
    """
    drawn: list[FuzzRequest] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=max(1, min(count, max(100, count // 10))),
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(fuzz_requests(SERVED))
    def collect(request: FuzzRequest) -> None:
        drawn.append(request)

    collect()
    rng = random.Random(seed)
    post_paths: dict[str, list[str]] = {}
    for request in drawn:
        if request.method == "POST" and request.use_json:
            post_paths.setdefault(request.daemon, [])
            if request.path not in post_paths[request.daemon]:
                post_paths[request.daemon].append(request.path)
    requests = list(drawn)
    while len(requests) < count:
        requests.append(mutate(rng, rng.choice(drawn), post_paths))
    rng.shuffle(requests)
    return [spare_served_model(r) for r in requests[:count]]


# Routes that load, unload or pin: the served model is never their target (strategies.py), but hypothesis also
# draws string constants it finds in the code under test, so a mutated field can still come out as SERVED.
LIFECYCLE_PATHS = frozenset({"/models/load", "/models/unload", "/admin/load", "/admin/unload", "/admin/pin"})


def spare_served_model(request: FuzzRequest) -> FuzzRequest:
    """`request`, with a lifecycle route's model field renamed when it names the served model."""
    body = request.json
    if request.path not in LIFECYCLE_PATHS or not isinstance(body, dict):
        return request
    for key in ("model_id", "model"):
        if body.get(key) == SERVED:
            request.json = body = {**body, key: OTHER_MODELS[0]}
    return request


async def normal_requests_served(http: aiohttp.ClientSession, fleet: FuzzFleet) -> None:
    body = {"model": SERVED, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    for base in (fleet.neuron.url, fleet.gateway.url):
        async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.timeout(1800)  # minutes on a busy shared machine; about two on an idle 2-core one
async def test_generated_requests_fail_only_themselves(fuzz_fleet: FuzzFleet, fuzz_http: aiohttp.ClientSession):
    requests = generate(REQUESTS, SEED)
    outcomes = await send_all(fuzz_http, fuzz_fleet.bases, requests, CONCURRENCY)
    failures, statuses = report(outcomes)
    print(f"fuzz: {len(outcomes)} requests, statuses {dict(sorted(statuses.items(), key=str))}")
    assert not failures, "\n".join(failures)
    assert not fuzz_fleet.model_problems()
    await normal_requests_served(fuzz_http, fuzz_fleet)
    daemons = {r.daemon for r in requests}
    assert {"neuron", "gateway"} <= daemons
