"""`cortex status|models|load|unload|pin`: operate a running gateway through its /admin API and /v1/models.

Each command is one blocking HTTP exchange (`GatewayClient`) and a table or a line; `load` follows the
neuron's reported progress with a bar. A failure is one error line and a non-zero exit.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from cortex.cli.console import (
    CliError,
    GatewayClient,
    console,
    fail,
    models_table,
    nodes_table,
    replicas_table,
)

DEFAULT_URL = "http://127.0.0.1:31313"
UrlOption = Annotated[str, typer.Option("--url", envvar="CORTEX_URL", help="The gateway's base URL")]
AdminKeyOption = Annotated[
    str | None, typer.Option("--admin-key", envvar="CORTEX_ADMIN_KEY", help="gateway.admin_key, when set")
]
ApiKeyOption = Annotated[str | None, typer.Option("--api-key", envvar="CORTEX_API_KEY", help="A client API key")]


def status(url: UrlOption = DEFAULT_URL, admin_key: AdminKeyOption = None) -> None:
    """Nodes with health and per-device memory; models with status, node, in-flight and last use."""
    try:
        _, state = GatewayClient(url, admin_key).get("/admin/state")
    except CliError as exc:
        raise fail(str(exc)) from None
    console.print(nodes_table(state))
    console.print(replicas_table(state))
    for load in state["loads"]:
        console.print(f"loading [bold]{load['model']}[/bold] on {load['node'] or '?'}: {load['phase']}")


def models(url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None) -> None:
    """Every model the fleet serves or can load (GET /v1/models)."""
    try:
        _, listing = GatewayClient(url, api_key=api_key).get("/v1/models")
    except CliError as exc:
        raise fail(str(exc)) from None
    console.print(models_table(listing["data"]))


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
        raise fail(str(exc)) from None


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
        raise fail(str(exc)) from None
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
        raise fail(str(exc)) from None
    verb = "pinned" if answer["pinned"] else "unpinned"
    console.print(f"{verb} [bold]{answer['model']}[/bold] on {answer['node']} (until the gateway restarts)")
