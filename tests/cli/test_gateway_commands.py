"""`cortex status/models/load/unload` against a running gateway over fake neurons, run as subprocesses."""

from __future__ import annotations

from tests.support.cli import cortex
from tests.support.gateway_client import StartFake, StartGateway, fake_log, loads_on, models_toml
from tests.support.gateway_procs import GatewayDaemon


def fleet(start_fake: StartFake, start_gateway: StartGateway, **config) -> tuple[GatewayDaemon, object, object]:
    a = start_fake("a", devices=[{"vram_total_mb": 24000}], preloaded=["m1"], load_delay_s=1.0, fail_loads=["bad"])
    b = start_fake("b", devices=[{"vram_total_mb": 16000}, {"vram_total_mb": 16000}])
    catalogue = models_toml({"id": "m1"}, {"id": "m2", "vram_mb": 2000}, {"id": "bad"}, aliases={"two": "m2"})
    return start_gateway({"a": a, "b": b}, catalogue, **config), a, b


def test_status_and_models(start_fake: StartFake, start_gateway: StartGateway) -> None:
    front, _, _ = fleet(start_fake, start_gateway)
    done = cortex("status", "--url", front.url)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in ("Neurons", "healthy", "1000 MB / 23.4 GB", "22.5 GB", "1: Fake cuda", "Models", "m1", "loaded"):
        assert expected in out, expected
    done = cortex("models", "--url", front.url)
    assert done.returncode == 0, done.stderr
    for expected in ("m1", "m2", "two", "available", "2048"):
        assert expected in done.stdout, expected


def test_load_shows_progress_and_unload(start_fake: StartFake, start_gateway: StartGateway) -> None:
    front, a, _ = fleet(start_fake, start_gateway)
    done = cortex("load", "two", "--node", "a", "--url", front.url)
    assert done.returncode == 0, done.stderr
    assert "loaded m2 on a" in done.stdout
    assert "100%" in done.stdout
    assert loads_on(a) == ["m2"]
    done = cortex("load", "m2", "--url", front.url)
    assert (done.returncode, "already loaded on a" in done.stdout) == (0, True)
    done = cortex("unload", "m2", "--node", "a", "--url", front.url)
    assert done.returncode == 0, done.stderr
    assert "unloaded m2 from a" in done.stdout
    assert fake_log(a)["unloads"] == ["m2"]


def test_load_failures_exit_non_zero_with_the_reason(start_fake: StartFake, start_gateway: StartGateway) -> None:
    front, _, _ = fleet(start_fake, start_gateway)
    done = cortex("load", "bad", "--node", "a", "--url", front.url)
    assert done.returncode == 1
    assert "no weights found" in done.stderr
    done = cortex("load", "m2", "--node", "zz", "--url", front.url)
    assert done.returncode == 1
    assert "no neuron named 'zz'" in done.stderr
    done = cortex("unload", "m2", "--node", "b", "--url", front.url)
    assert done.returncode == 1
    assert "'m2' is not on neuron 'b'" in done.stderr
    done = cortex("status", "--url", "http://127.0.0.1:9")
    assert done.returncode == 1
    assert "cannot reach the gateway" in done.stderr


def test_admin_key_is_required_when_configured(start_fake: StartFake, start_gateway: StartGateway) -> None:
    front, _, _ = fleet(start_fake, start_gateway, extra_gateway='admin_key = "s3cret"')
    done = cortex("status", "--url", front.url)
    assert done.returncode == 1
    assert "401" in done.stderr
    assert cortex("status", "--url", front.url, "--admin-key", "s3cret").returncode == 0
    assert cortex("status", "--url", front.url, env={"CORTEX_ADMIN_KEY": "s3cret"}).returncode == 0
    assert cortex("models", "--url", front.url).returncode == 0  # a client route: no admin key needed
