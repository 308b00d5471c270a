"""`cortex status`, `unload` and `pin` say what is true: stale state as stale, pins and what they cause."""

from __future__ import annotations

from tests.support.cli import cortex
from tests.support.gateway_client import StartFake, StartGateway, models_toml
from tests.support.gateway_procs import wait_until

GPU = [{"vram_total_mb": 24000}]


def test_status_shows_an_unreachable_nodes_models_as_stale(start_fake: StartFake, start_gateway: StartGateway) -> None:
    a = start_fake("a", devices=GPU, preloaded=["m1"])
    b = start_fake("b", devices=GPU, preloaded=["m2"])
    gw = start_gateway({"a": a, "b": b}, models_toml({"id": "m1"}, {"id": "m2"}))
    a.kill()
    wait_until(lambda: not next(n for n in gw.state()["nodes"] if n["name"] == "a")["healthy"])
    done = cortex("status", "--url", gw.url)
    assert done.returncode == 0, done.stderr
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if line.count("│") > 5}
    assert "stale (was loaded)" in rows["m1"] and "node unhealthy" in rows["m1"]
    assert "loaded" in rows["m2"] and "stale" not in rows["m2"]


def test_unloading_a_pinned_model_says_it_will_come_back(start_fake: StartFake, start_gateway: StartGateway) -> None:
    a = start_fake("a", devices=GPU, preloaded=["m1", "m2"])
    gw = start_gateway({"a": a}, models_toml({"id": "m1", "pinned_on": ["a"]}, {"id": "m2"}))
    done = cortex("unload", "m1", "--node", "a", "--url", gw.url)
    assert done.returncode == 0, done.stderr
    assert "unloaded m1 from a" in done.stdout
    assert "m1 is pinned on a (pinned_on in models.toml)" in done.stdout and "loads it there again" in done.stdout

    done = cortex("pin", "m2", "--node", "a", "--url", gw.url)
    assert (done.returncode, "pinned m2 on a" in done.stdout) == (0, True)
    done = cortex("unload", "m2", "--node", "a", "--url", gw.url)
    assert "m2 is pinned on a (cortex pin)" in done.stdout and "cortex pin m2 --node a --off" in done.stdout


def test_unpinned_unload_has_no_note(start_fake: StartFake, start_gateway: StartGateway) -> None:
    a = start_fake("a", devices=GPU, preloaded=["m2"])
    gw = start_gateway({"a": a}, models_toml({"id": "m2"}))
    assert cortex("pin", "m2", "--node", "a", "--url", gw.url).returncode == 0
    done = cortex("pin", "m2", "--node", "a", "--off", "--url", gw.url)
    assert (done.returncode, "unpinned m2 on a" in done.stdout) == (0, True)
    done = cortex("unload", "m2", "--node", "a", "--url", gw.url)
    assert done.returncode == 0 and "note" not in done.stdout
