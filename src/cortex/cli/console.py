"""Rich rendering and a small blocking HTTP client shared by the command-line tools."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


def add_version_option(app: typer.Typer, program: str) -> None:
    """`PROGRAM --version` on a Typer app: prints the package version and exits before any command runs."""

    def show(value: bool) -> None:
        if value:
            import cortex

            typer.echo(f"{program} {cortex.__version__}")
            raise typer.Exit()

    # The option is a default value, not an `Annotated` type: annotations are strings here, and `show` is local.
    option = typer.Option(False, "--version", callback=show, is_eager=True, help="Print the version and exit")

    @app.callback(help=app.info.help)
    def _main(version: bool = option) -> None:
        pass


class CliError(Exception):
    """A failure to show the operator as one line, then exit non-zero."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `message` as one error line; the exit to raise (`raise fail(...) from None`: no traceback)."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


class GatewayClient:
    """JSON over HTTP to a running gateway (stdlib only: the CLI needs no event loop)."""

    def __init__(self, url: str, admin_key: str | None = None, api_key: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.admin_key = admin_key
        self.api_key = api_key
        self.timeout = timeout

    def get(self, path: str) -> tuple[int, Any]:
        return self._call("GET", path, None)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        key = self.admin_key if path.startswith("/admin/") else self.api_key
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise CliError(f"{method} {path} → {exc.code}: {_error_message(exc.read())}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach the gateway at {self.url}: {reason}") from None


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:300]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return str(body)[:300]


# ---- rendering ------------------------------------------------------------------------------------
_STATUS_STYLE = {
    "loaded": "green",
    "loading": "yellow",
    "recovering": "yellow",
    "poisoned": "red",
    "failed": "red",
    "unloading": "dim",
    "available": "cyan",
}


def styled_status(status: str) -> Text:
    return Text(status, style=_STATUS_STYLE.get(status, ""))


def _mb(value: float | int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1024:.1f} GB" if value >= 1024 else f"{value:.0f} MB"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def nodes_table(state: dict[str, Any]) -> Table:
    table = Table(title="Neurons", title_justify="left")
    for column in ("node", "health", "endpoint", "device", "memory used / total", "free", "util", "temp"):
        table.add_column(column)
    for node in state["nodes"]:
        health = Text("healthy", style="green") if node["healthy"] else Text("unhealthy", style="red")
        devices = node["devices"] or [None]
        for i, dev in enumerate(devices):
            first = i == 0
            row = [node["name"] if first else "", health if first else "", node["endpoint"] if first else ""]
            if dev is None:
                row += [Text(node.get("last_error") or "no devices reported", style="dim"), "", "", "", ""]
            else:
                row += [
                    f"{dev['index']}: {dev['name'] or dev['kind']}",
                    f"{_mb(dev['vram_used_mb'])} / {_mb(dev['vram_total_mb'])}",
                    _mb(dev["vram_free_mb"]),
                    "-" if dev["utilization_pct"] is None else f"{dev['utilization_pct']:.0f}%",
                    "-" if dev["temp_c"] is None else f"{dev['temp_c']:.0f}°C",
                ]
            table.add_row(*row)
    return table


def replicas_table(state: dict[str, Any]) -> Table:
    table = Table(title="Models", title_justify="left")
    for column in ("model", "node", "status", "memory", "in flight", "queued", "last use", "resident", "pinned"):
        table.add_column(column)
    for node in state["nodes"]:
        for m in node["models"]:
            if not node["healthy"]:
                # What an unreachable node last reported is history, not state: never show it as loaded.
                status = Text(f"stale (was {m['status']})", style="dim red")
                last = node.get("last_ok_s_ago")
                seen = "" if last is None else f", last answered {_ago(last)}"
                status.append(f" — node unhealthy{seen}", style="dim")
                in_flight, queued = "-", "-"
            else:
                status = styled_status(m["status"])
                if m["status"] == "loading" and m.get("load_progress") is not None:
                    status.append(f" {m['load_progress'] * 100:.0f}%")
                if m.get("error"):
                    status.append(f" ({m['error']})", style="dim")
                in_flight, queued = str(max(m["in_flight"], m["neuron_in_flight"])), str(m["queue_depth"])
            table.add_row(
                m["id"],
                m["node"],
                status,
                _mb(m["vram_used_mb"]) if m["vram_used_mb"] else "-",
                in_flight,
                queued,
                _ago(m["last_used_s_ago"]),
                "-" if m["resident_for_s"] is None else f"{m['resident_for_s']:.0f}s",
                "yes" if m["pinned"] else "",
            )
    return table


def models_table(models: list[dict[str, Any]]) -> Table:
    table = Table(title="Models served by the fleet", title_justify="left")
    for column in ("id", "status", "loaded on", "context", "tools", "alias of"):
        table.add_column(column)
    for m in models:
        table.add_row(
            m["id"],
            styled_status(m.get("status", "")),
            ", ".join(m.get("loaded_on") or []) or "-",
            str(m.get("context_length") or "-"),
            {True: "yes", False: "no"}.get(m.get("tool_call"), "-") if m.get("status") == "loaded" else "-",
            m.get("alias_of") or "",
        )
    return table
