"""`cortex up`'s start-up report, on a terminal and off one, and its plan for a one-machine fleet."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

from cortex.cli.up import CliError, check_ports, client_host, plan_neurons
from cortex.cli.up_report import LoadView


def test_a_terminal_gets_progress_bars() -> None:
    out = io.StringIO()
    view = LoadView(Console(file=out, force_terminal=True, width=120))
    view.update("local", "m[1m]", 0.3, "reading weights")
    view.update("local", "m[1m]", 1.0, "loaded")
    view.stop()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "loading m[1m] on local" in text and "100%" in text and "loaded" in text


def test_elsewhere_one_line_per_stage() -> None:
    out = io.StringIO()
    view = LoadView(Console(file=out, force_terminal=False, width=200))
    for fraction, stage in ((0.0, "resolving"), (0.1, "resolving"), (0.3, "reading weights"), (1.0, "loaded")):
        view.update("local", "m", fraction, stage)
    assert out.getvalue().splitlines() == [
        "loading m on local: 0% resolving",
        "loading m on local: 30% reading weights",
        "loading m on local: 100% loaded",
    ]


def test_a_fleet_plan_splits_ports_memory_and_models(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NEURON_DEVICES__CPU_MEMORY_FRACTION", "NEURON_DEFAULT_MODELS", "NEURON_DEVICES__USE"):
        monkeypatch.delenv(name, raising=False)
    neurons = plan_neurons("127.0.0.1:20000", 3, None)
    assert [(n.name, n.listen) for n in neurons] == [
        ("local-1", "127.0.0.1:20000"),
        ("local-2", "127.0.0.1:20001"),
        ("local-3", "127.0.0.1:20002"),
    ]
    assert {n.env["NEURON_DEVICES__CPU_MEMORY_FRACTION"] for n in neurons} == {f"{0.5 / 3:.4f}"}
    assert "NEURON_DEFAULT_MODELS" not in neurons[0].env
    assert [json.loads(n.env["NEURON_DEFAULT_MODELS"]) for n in neurons[1:]] == [[], []]
    assert all(n.env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and "NEURON_ENGINE__CORES" in n.env for n in neurons)
    (single,) = plan_neurons("0.0.0.0:13131", 1, None)
    assert single.name == "local" and single.url == "http://127.0.0.1:13131"
    assert "NEURON_DEVICES__CPU_MEMORY_FRACTION" not in single.env


def test_an_operator_setting_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEURON_DEVICES__CPU_MEMORY_FRACTION", "0.9")
    assert all("NEURON_DEVICES__CPU_MEMORY_FRACTION" not in n.env for n in plan_neurons("127.0.0.1:20000", 2, None))


def test_plans_that_cannot_work_are_refused() -> None:
    with pytest.raises(CliError, match=r"needs ports 65535\.\.65536"):
        plan_neurons("127.0.0.1:65535", 2, None)
    with pytest.raises(CliError, match="is not HOST:PORT"):
        plan_neurons("nowhere", 1, None)
    with pytest.raises(CliError, match="asked for twice"):
        check_ports([("127.0.0.1:1", "gateway API", "--listen"), ("127.0.0.1:1", "neuron", "--neuron-listen")])
    assert client_host("[::]:31313") == "127.0.0.1:31313"


async def _report_against(gateway_lists_after_s: float, monkeypatch: pytest.MonkeyPatch, unseen_limit: int) -> str:
    """Run the start-up report against one loopback server that is both the neuron and the gateway: the neuron
    has the model loaded from the start, the gateway lists it only `gateway_lists_after_s` later (its next poll)."""
    import asyncio
    import time

    from aiohttp import web

    from cortex.cli import up, up_report

    monkeypatch.setattr(up_report, "UNSEEN_POLLS_LIMIT", unseen_limit)
    started = time.monotonic()

    async def neuron_models(_: web.Request) -> web.Response:
        return web.json_response([{"id": "m", "status": "loaded"}])

    async def gateway_models(_: web.Request) -> web.Response:
        seen = time.monotonic() - started >= gateway_lists_after_s
        data = [{"id": "m", "object": "model", "status": "loaded", "loaded_on": ["local"]}] if seen else []
        return web.json_response({"object": "list", "data": data})

    app = web.Application()
    app.router.add_get("/models", neuron_models)
    app.router.add_get("/v1/models", gateway_models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    out = io.StringIO()
    try:
        report = up_report.StartupReport(
            neurons=[up.LocalNeuron("local", f"127.0.0.1:{port}")],
            gateway_url=f"http://127.0.0.1:{port}",
            metrics_url=None,
            started=started,
            on_ready=lambda: None,
            out=Console(file=out, force_terminal=False, width=400),
        )
        await asyncio.wait_for(report.run(), timeout=60)
    finally:
        await runner.cleanup()
    return out.getvalue()


def test_ready_waits_for_the_gateway_to_list_a_loaded_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway sees a load at its next poll, seconds after the neuron finished: "ready" must still come."""
    import asyncio

    text = asyncio.run(_report_against(3.0, monkeypatch, unseen_limit=240))
    assert "ready in" in text and "no model" not in text, text


def test_a_gateway_that_never_lists_the_model_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    text = asyncio.run(_report_against(3600.0, monkeypatch, unseen_limit=4))
    assert "the gateway does not list the loaded model" in text and "ready in" not in text, text
