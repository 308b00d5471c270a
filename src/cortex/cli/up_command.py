"""`cortex up`: start a gateway and local neuron(s) on this machine, and stop them all together.

The parts live in `cli/up.py` (port checks, neuron processes) and `cli/up_report.py` (the start-up
report); this is the command and the loop that serves the gateway until Ctrl-C or until a neuron exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cortex.cli.console import console, err_console, fail


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
        raise fail(f"cortex up: {exc}", 2) from None
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
        raise fail(str(exc), 2) from None
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

    from cortex.cli.up import client_host
    from cortex.cli.up_report import StartupReport
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
