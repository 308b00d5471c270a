"""`cortex`: run the gateway, and operate a running one (status, models, load, unload), or `up` for a laptop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from cortex.cli.console import (
    CliError,
    GatewayClient,
    add_version_option,
    console,
    err_console,
    models_table,
    nodes_table,
    replicas_table,
)
from cortex.core.settings import ConfigError

app = typer.Typer(help="cortex gateway: one OpenAI/Anthropic API over a fleet of neurons.", no_args_is_help=True)

DEFAULT_URL = "http://127.0.0.1:31313"
UrlOption = Annotated[str, typer.Option("--url", envvar="CORTEX_URL", help="The gateway's base URL")]
AdminKeyOption = Annotated[
    str | None, typer.Option("--admin-key", envvar="CORTEX_ADMIN_KEY", help="gateway.admin_key, when set")
]
ApiKeyOption = Annotated[str | None, typer.Option("--api-key", envvar="CORTEX_API_KEY", help="A client API key")]


add_version_option(app, "cortex")


CLIENT_VARIABLES = ("CORTEX_URL", "CORTEX_ADMIN_KEY", "CORTEX_API_KEY")  # for `cortex status`, `bench`, …

# Names that major clients resolve themselves (Claude Code's model aliases): a model or alias by one of
# these names is never reached from that client, so `cortex serve` warns about it.
CLIENT_RESERVED_NAMES = frozenset({"default", "sonnet", "opus", "haiku", "best", "opusplan", "sonnet[1m]"})


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


# ---- serve -----------------------------------------------------------------------------------------
@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="cortex.toml")] = None,
) -> None:
    """Run the gateway (config from cortex.toml, CORTEX_* environment overrides)."""
    from cortex.core.gateway_config import load_fleet_config
    from cortex.core.logs import setup_logging

    if config is None and Path("cortex.toml").is_file():
        config = Path("cortex.toml")
    # The CLI's own client variables share the CORTEX_ prefix with config overrides: not config keys.
    for name in CLIENT_VARIABLES:
        os.environ.pop(name, None)
    try:
        fleet = load_fleet_config(config)
    except ConfigError as exc:
        err_console.print(f"[red]cortex: configuration error[/red]\n{exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    from cortex.cli.up import check_ports

    section = fleet.gateway.gateway
    wanted = [(section.listen, "gateway API", "gateway.listen")]
    if section.metrics_listen:
        wanted.append((section.metrics_listen, "gateway metrics", "gateway.metrics_listen"))
    try:
        check_ports(wanted)  # one line, not a traceback from deep inside the server
    except CliError as exc:
        raise _fail(f"cortex serve: {exc}", 2) from None
    setup_logging(fleet.gateway.gateway.log_level)
    _warn_about(fleet)
    from cortex.gateway.app import run

    run(fleet)


def _warn_about(fleet: Any) -> None:
    """Start anyway, but say what will surprise: no neurons, names that clients keep for themselves."""
    if not fleet.gateway.neurons:
        err_console.print(
            "[yellow]warning:[/yellow] no neurons configured: every request will fail until [[neurons]] entries "
            "are added to cortex.toml (or CORTEX_NEURONS is set)",
            highlight=False,
        )
    names = {m.id for m in fleet.catalogue.models} | set(fleet.catalogue.aliases)
    for name in sorted(names & CLIENT_RESERVED_NAMES):
        err_console.print(
            f"[yellow]warning:[/yellow] model name '{name}' is one Claude Code resolves itself: it never reaches the "
            "gateway from that client; choose another alias (docs/clients.md)",
            highlight=False,
        )


# ---- operator commands ---------------------------------------------------------------------------
@app.command()
def status(url: UrlOption = DEFAULT_URL, admin_key: AdminKeyOption = None) -> None:
    """Nodes with health and per-device memory; models with status, node, in-flight and last use."""
    try:
        _, state = GatewayClient(url, admin_key).get("/admin/state")
    except CliError as exc:
        raise _fail(str(exc)) from None
    console.print(nodes_table(state))
    console.print(replicas_table(state))
    for load in state["loads"]:
        console.print(f"loading [bold]{load['model']}[/bold] on {load['node'] or '?'}: {load['phase']}")


@app.command()
def models(url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None) -> None:
    """Every model the fleet serves or can load (GET /v1/models)."""
    try:
        _, listing = GatewayClient(url, api_key=api_key).get("/v1/models")
    except CliError as exc:
        raise _fail(str(exc)) from None
    console.print(models_table(listing["data"]))


@app.command()
def load(
    model: Annotated[str, typer.Argument(help="Model id or alias")],
    node: Annotated[str | None, typer.Option("--node", "-n", help="Load on this neuron")] = None,
    timeout: Annotated[float, typer.Option(help="Give up waiting after this many seconds")] = 900.0,
    url: UrlOption = DEFAULT_URL,
    admin_key: AdminKeyOption = None,
) -> None:
    """Load a model (on a chosen neuron, or where placement puts it), with a progress bar."""
    client = GatewayClient(url, admin_key)
    body: dict[str, Any] = {"model": model}
    if node is not None:
        body["node"] = node
    try:
        code, answer = client.post("/admin/load", body)
        if code == 200:
            console.print(f"[green]{answer['model']}[/green] is already loaded on {answer['node']}")
            return
        _follow_load(client, answer["model"], answer["node"], timeout)
    except CliError as exc:
        raise _fail(str(exc)) from None


def _follow_load(client: GatewayClient, model: str, node: str, timeout: float) -> None:
    """Poll /admin/state, feeding the neuron's reported load progress into a progress bar."""
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    deadline = time.monotonic() + timeout
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"loading {model} on {node}", total=1.0)
        while time.monotonic() < deadline:
            replica = _replica(client.get("/admin/state")[1], model, node)
            status = replica["status"] if replica else "pending"
            if status == "loaded":
                progress.update(task, completed=1.0, description=f"loaded {model} on {node}")
                break
            if status == "failed":
                raise CliError(f"loading {model} on {node} failed: {replica.get('error') if replica else '?'}")
            fraction = (replica or {}).get("load_progress")
            progress.update(task, completed=fraction or 0.0, description=f"{status} {model} on {node}")
            time.sleep(0.25)
        else:
            raise CliError(f"{model} was not loaded on {node} within {timeout:.0f}s")
    replica = _replica(client.get("/admin/state")[1], model, node) or {}
    console.print(f"[green]{model}[/green] loaded on {node} ({replica.get('vram_used_mb', 0)} MB)")


def _replica(state: dict[str, Any], model: str, node: str) -> dict[str, Any] | None:
    for n in state["nodes"]:
        if n["name"] == node:
            return next((m for m in n["models"] if m["id"] == model), None)
    return None


@app.command()
def unload(
    model: Annotated[str, typer.Argument(help="Model id or alias")],
    node: Annotated[str, typer.Option("--node", "-n", help="The neuron to unload it from")],
    url: UrlOption = DEFAULT_URL,
    admin_key: AdminKeyOption = None,
) -> None:
    """Unload a model from a neuron (a pinned model is loaded again: this says so, and how to keep it out)."""
    client = GatewayClient(url, admin_key)
    try:
        _, state = client.get("/admin/state")
        _, answer = client.post("/admin/unload", {"model": model, "node": node})
    except CliError as exc:
        raise _fail(str(exc)) from None
    console.print(f"unloaded [bold]{answer['model']}[/bold] from {answer['node']}")
    pin = _pin_of(state, answer["model"], answer["node"])
    if pin == "catalogue":
        console.print(
            f"[yellow]note:[/yellow] {answer['model']} is pinned on {answer['node']} (pinned_on in models.toml), "
            "so the gateway loads it there again at its next poll. To keep it unloaded, remove "
            f"'{answer['node']}' from its pinned_on and restart the gateway.",
            highlight=False,
        )
    elif pin == "runtime":
        console.print(
            f"[yellow]note:[/yellow] {answer['model']} is pinned on {answer['node']} (cortex pin), so the gateway "
            f"loads it there again at its next poll. To keep it unloaded: cortex pin {answer['model']} "
            f"--node {answer['node']} --off, then unload it.",
            highlight=False,
        )


def _pin_of(state: dict[str, Any], model: str, node: str) -> str | None:
    """How the replica is pinned before the unload: "catalogue", "runtime", or None."""
    for entry in state.get("catalogue", []):
        if entry["id"] == model and node in (entry.get("pinned_on") or []):
            return "catalogue"
    replica = _replica(state, model, node)
    return "runtime" if replica is not None and replica.get("pinned") else None


@app.command()
def pin(
    model: Annotated[str, typer.Argument(help="Model id or alias")],
    node: Annotated[str, typer.Option("--node", "-n", help="The neuron to pin it on")],
    off: Annotated[bool, typer.Option("--off", help="Unpin instead (run-time pins only)")] = False,
    url: UrlOption = DEFAULT_URL,
    admin_key: AdminKeyOption = None,
) -> None:
    """Pin a model on a neuron at run time (never evicted there, preferred for placement), or unpin it."""
    body = {"model": model, "node": node, "pinned": not off}
    try:
        _, answer = GatewayClient(url, admin_key).post("/admin/pin", body)
    except CliError as exc:
        raise _fail(str(exc)) from None
    verb = "pinned" if answer["pinned"] else "unpinned"
    console.print(f"{verb} [bold]{answer['model']}[/bold] on {answer['node']} (until the gateway restarts)")


# ---- bench -----------------------------------------------------------------------------------------
def _bench_command() -> None:
    from cortex.cli.bench import bench

    app.command(name="bench")(bench)


_bench_command()


# ---- up --------------------------------------------------------------------------------------------
@app.command()
def up(
    listen: Annotated[str, typer.Option(help="Gateway HOST:PORT")] = "127.0.0.1:31313",
    metrics_listen: Annotated[str, typer.Option(help="Prometheus HOST:PORT")] = "127.0.0.1:31314",
    neuron_listen: Annotated[
        str, typer.Option(help="The (first) local neuron's HOST:PORT; with --fleet the others take the next ports")
    ] = "127.0.0.1:13131",
    neuron_config: Annotated[
        Path | None, typer.Option(help="neuron.toml for the local neurons (default: the embedded model)")
    ] = None,
    fleet: Annotated[
        int, typer.Option("--fleet", min=1, help="Start N neurons on this machine (cores and memory split)")
    ] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every log line while models load")] = False,
) -> None:
    """Start a gateway and local neuron(s) serving the default model; Ctrl-C stops them all."""
    import threading

    from cortex.cli import up as local
    from cortex.core.logs import setup_logging

    started = time.monotonic()
    try:
        neurons = local.plan_neurons(neuron_listen, fleet, neuron_config)
        wanted = [(listen, "gateway API", "--listen"), (metrics_listen, "gateway metrics", "--metrics-listen")]
        wanted += [(n.listen, f"neuron {n.name}", "--neuron-listen") for n in neurons]
        local.check_ports(wanted)
    except local.CliError as exc:
        raise _fail(f"cortex up: {exc}", 2) from None
    config = _local_fleet(listen, metrics_listen, neurons, with_default_model=neuron_config is None)
    setup_logging("info")
    local.route_logs_through_current_stderr()
    show_all = threading.Event()
    if verbose:
        show_all.set()
    procs: list[subprocess.Popen[bytes]] = []
    relays = []
    exit_code = 0
    try:
        for i, neuron in enumerate(neurons):
            prefix = f"[{neuron.name}] " if fleet > 1 else ""
            proc, relay = local.start_neuron(neuron, neuron_config, show_all, prefix)
            procs.append(proc)
            relays.append(relay)
            if i == 0:
                names = ", ".join(f"{n.name} ({n.url})" for n in neurons)
                console.print(f"starting {len(neurons)} neuron(s): {names} …", highlight=False, soft_wrap=True)
        waiting = console.status("waiting for the neurons to answer (loading torch) …") if console.is_terminal else None
        with waiting or contextlib.nullcontext():
            local.wait_for_neurons(list(zip(neurons, procs, strict=True)))
        exit_code = _run_until_stopped(config, neurons, procs, listen, metrics_listen, started, show_all)
    except local.CliError as exc:
        show_all.set()
        err_console.print(f"[red]error:[/red] cortex up: {exc}", highlight=False)
        exit_code = 1
    except KeyboardInterrupt:
        pass
    finally:
        show_all.set()  # whatever the neurons say while stopping is shown
        local.stop_processes(procs)
        for relay in relays:
            relay.thread.join(timeout=5)
    raise typer.Exit(exit_code)


def _local_fleet(listen: str, metrics_listen: str, neurons: list[Any], *, with_default_model: bool) -> Any:
    from cortex.cli.up import DEFAULT_ALIAS
    from cortex.core.catalogue import Catalogue, CatalogueModel
    from cortex.core.gateway_config import GatewayConfig, fleet_config_from
    from cortex.neuron.default_model import DEFAULT_MODEL_ID

    try:
        config = GatewayConfig.model_validate(
            {
                "gateway": {"listen": listen, "metrics_listen": metrics_listen},
                "neurons": [{"name": n.name, "endpoint": n.url} for n in neurons],
            }
        )
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    first = neurons[0].name
    models = [CatalogueModel(id=DEFAULT_MODEL_ID, pinned_on=[first])] if with_default_model else []
    aliases = {DEFAULT_ALIAS: DEFAULT_MODEL_ID} if with_default_model else {}
    return fleet_config_from(config, Catalogue(models=models, aliases=aliases))


def _run_until_stopped(
    fleet: Any,
    neurons: list[Any],
    procs: list[subprocess.Popen[bytes]],
    listen: str,
    metrics_listen: str,
    started: float,
    show_all: Any,
) -> int:
    import logging

    from cortex.cli.up import StartupReport, client_host
    from cortex.gateway.app import serve

    async def main() -> int:
        stop = asyncio.Event()
        exited: list[tuple[str, int]] = []
        tasks: list[asyncio.Task[None]] = []

        async def watch_neurons() -> None:
            # A child's exit has no awaitable here (it was started before the loop): look twice a second.
            while all(p.poll() is None for p in procs):  # noqa: ASYNC110
                await asyncio.sleep(0.5)
            exited.extend((n.name, p.returncode) for n, p in zip(neurons, procs, strict=True) if p.poll() is not None)
            stop.set()

        def now_ready() -> None:
            logging.getLogger().setLevel(logging.INFO)
            show_all.set()

        report = StartupReport(
            neurons=neurons,
            gateway_url=f"http://{client_host(listen)}",
            metrics_url=f"http://{client_host(metrics_listen)}" if metrics_listen else None,
            started=started,
            on_ready=now_ready,
        )

        def ready() -> None:
            tasks.append(asyncio.create_task(report.run()))

        if not show_all.is_set():
            logging.getLogger().setLevel(logging.WARNING)  # the progress bars say what the info lines would
        tasks.append(asyncio.create_task(watch_neurons()))
        try:
            await serve(fleet, stop=stop, on_ready=ready)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if exited:
            name, code = exited[0]
            err_console.print(f"[red]neuron {name} exited with status {code}[/red]; stopping")
            return 1
        return 0

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
