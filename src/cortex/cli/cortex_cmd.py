"""`cortex`: run the gateway, and operate a running one (status, models, load, unload), or `up` for a laptop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from cortex.cli.console import (
    CliError,
    GatewayClient,
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
    try:
        fleet = load_fleet_config(config)
    except ConfigError as exc:
        err_console.print(f"[red]cortex: configuration error[/red]\n{exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    setup_logging(fleet.gateway.gateway.log_level)
    from cortex.gateway.app import run

    run(fleet)


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
    """Unload a model from a neuron."""
    try:
        _, answer = GatewayClient(url, admin_key).post("/admin/unload", {"model": model, "node": node})
    except CliError as exc:
        raise _fail(str(exc)) from None
    console.print(f"unloaded [bold]{answer['model']}[/bold] from {answer['node']}")


# ---- up --------------------------------------------------------------------------------------------
@app.command()
def up(
    listen: Annotated[str, typer.Option(help="Gateway HOST:PORT")] = "127.0.0.1:31313",
    metrics_listen: Annotated[str, typer.Option(help="Prometheus HOST:PORT")] = "127.0.0.1:31314",
    neuron_listen: Annotated[str, typer.Option(help="Local neuron HOST:PORT")] = "127.0.0.1:13131",
    neuron_config: Annotated[
        Path | None, typer.Option(help="neuron.toml for the local neuron (default: the embedded model)")
    ] = None,
) -> None:
    """Start a gateway and a local neuron serving the default model; Ctrl-C stops both."""
    from cortex.core.logs import setup_logging

    fleet = _local_fleet(listen, metrics_listen, neuron_listen, with_default_model=neuron_config is None)
    setup_logging("info")
    args = [sys.executable, "-m", "cortex.cli.neuron_cmd", "serve", "--listen", neuron_listen]
    if neuron_config is not None:
        args += ["--config", str(neuron_config)]
    # Its own session: Ctrl-C reaches us only, and we stop the neuron in order after the gateway.
    from cortex.neuron.threads import share_environment  # its share of this host's cores for its threads

    neuron = subprocess.Popen(args, start_new_session=True, env=share_environment(0, 1))
    exit_code = 0
    try:
        exit_code = _run_until_stopped(fleet, neuron, listen)
    except KeyboardInterrupt:
        pass
    finally:
        _stop_process(neuron)
    raise typer.Exit(exit_code)


def _local_fleet(listen: str, metrics_listen: str, neuron_listen: str, *, with_default_model: bool) -> Any:
    from cortex.core.catalogue import Catalogue, CatalogueModel
    from cortex.core.gateway_config import GatewayConfig, fleet_config_from
    from cortex.neuron.default_model import DEFAULT_MODEL_ID

    try:
        config = GatewayConfig.model_validate(
            {
                "gateway": {"listen": listen, "metrics_listen": metrics_listen},
                "neurons": [{"name": "local", "endpoint": f"http://{_client_host(neuron_listen)}"}],
            }
        )
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    models = [CatalogueModel(id=DEFAULT_MODEL_ID, pinned_on=["local"])] if with_default_model else []
    aliases = {"default": DEFAULT_MODEL_ID} if with_default_model else {}
    return fleet_config_from(config, Catalogue(models=models, aliases=aliases))


def _client_host(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    return f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{port}"


def _run_until_stopped(fleet: Any, neuron: subprocess.Popen[bytes], listen: str) -> int:
    from cortex.gateway.app import serve

    neuron_url = fleet.gateway.neurons[0].endpoint
    console.print(f"starting neuron at {neuron_url} …")
    _wait_for_neuron(neuron, neuron_url)

    async def main() -> int:
        stop = asyncio.Event()
        exited: list[int] = []

        async def watch_neuron() -> None:
            # A child's exit has no awaitable here (it was started before the loop): look twice a second.
            while neuron.poll() is None:  # noqa: ASYNC110
                await asyncio.sleep(0.5)
            exited.append(neuron.returncode)
            stop.set()

        def ready() -> None:
            url = f"http://{_client_host(listen)}"
            console.print(
                f"[green]cortex is up[/green] at {url} — try:\n"
                f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
                '-d \'{"model": "default", "messages": [{"role": "user", '
                '"content": "What is the capital of France?"}]}\'',
                highlight=False,
            )

        watcher = asyncio.create_task(watch_neuron())
        try:
            await serve(fleet, stop=stop, on_ready=ready)
        finally:
            watcher.cancel()
        if exited:
            err_console.print(f"[red]the neuron exited with status {exited[0]}[/red]; stopping")
            return 1
        return 0

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def _wait_for_neuron(neuron: subprocess.Popen[bytes], url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if neuron.poll() is not None:
            raise _fail(f"the neuron exited with status {neuron.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/version", timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise _fail(f"the neuron at {url} did not answer within {timeout:.0f}s")


def _stop_process(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGINT)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
