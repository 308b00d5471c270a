"""`cortex up`'s start-up report: load progress from the neurons' own figures, then "ready" and what next.

"ready in N s" is printed only once the gateway lists a loaded model, so a request to it is routed now;
a load that fails is said in one line with the neuron's reason, and a start with nothing to load says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn

from cortex.cli.console import console
from cortex.cli.up import LocalNeuron

# Polls (0.25 s apart) to wait for the gateway to list a model a neuron reports loaded: many of its poll intervals.
UNSEEN_POLLS_LIMIT = 240


class LoadView:
    """One progress bar per (node, model) on a terminal; elsewhere one plain line per change of stage."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.live = out.is_terminal
        self.progress: Progress | None = None
        self.tasks: dict[tuple[str, str], TaskID] = {}
        self.last: dict[tuple[str, str], str] = {}

    def update(self, node: str, model: str, fraction: float | None, stage: str) -> None:
        key = (node, model)
        if not self.live:
            percent = "" if fraction is None else f" {fraction * 100:.0f}%"
            line = f"loading {model} on {node}:{percent} {stage}".rstrip()
            if self.last.get(key) != stage:
                self.last[key] = stage
                self.out.print(line, highlight=False, markup=False, soft_wrap=True)
            return
        if self.progress is None:
            columns = (
                TextColumn("loading [bold]{task.fields[model]}[/bold] on {task.fields[node]}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[stage]}"),
                TimeElapsedColumn(),
            )
            self.progress = Progress(*columns, console=self.out, redirect_stderr=True, redirect_stdout=True)
            self.progress.start()
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task("", total=1.0, model=escape(model), node=escape(node), stage="")
        self.progress.update(self.tasks[key], completed=fraction or 0.0, stage=escape(stage))

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@dataclass
class StartupReport:
    """Follows the fleet from the gateway's first poll until a model can answer, then prints what next."""

    neurons: list[LocalNeuron]
    gateway_url: str
    metrics_url: str | None
    started: float
    on_ready: Callable[[], None]
    out: Console = field(default_factory=lambda: console)

    async def run(self) -> None:
        import aiohttp

        view = LoadView(self.out)
        reported_failures: set[tuple[str, str]] = set()
        idle_polls = unseen_polls = 0
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                while True:
                    entries = await self._neuron_models(http)
                    loading = 0
                    for node, model in entries:
                        key = (node, model.id)
                        if model.status in ("loading", "recovering"):
                            loading += 1
                            progress = model.load_progress
                            view.update(
                                node,
                                model.id,
                                progress.fraction if progress else None,
                                (progress.stage if progress else None) or model.status,
                            )
                        elif model.status == "loaded" and key in view.tasks | dict.fromkeys(view.last, 0):
                            view.update(node, model.id, 1.0, "loaded")
                        elif model.status == "failed" and key not in reported_failures:
                            reported_failures.add(key)
                            reason = model.error.text() if model.error else "unknown reason"
                            view.out.print(
                                f"[red]could not load {escape(model.id)} on {escape(node)}:[/red] {escape(reason)}",
                                highlight=False,
                                soft_wrap=True,
                            )
                    ready = await self._routable(http)
                    if ready is not None:
                        view.stop()
                        self._print_ready(ready)
                        return
                    # A model a neuron has loaded is routable once the gateway's next poll sees it (every
                    # `poll.interval_s`): wait for that, and give up only when nothing is loading or loaded.
                    settled = loading == 0 and not any(model.status == "loaded" for _, model in entries)
                    idle_polls = idle_polls + 1 if settled else 0
                    unseen_polls = unseen_polls + 1 if loading == 0 and not settled else 0
                    if idle_polls >= 8 or unseen_polls >= UNSEEN_POLLS_LIMIT:  # say so, don't hang
                        view.stop()
                        self._print_ready(None, failed=bool(reported_failures), unseen=not settled)
                        return
                    await asyncio.sleep(0.25)
        finally:
            view.stop()

    async def _neuron_models(self, http: Any) -> list[tuple[str, Any]]:
        from cortex.core.neuron_api import parse_models

        found: list[tuple[str, Any]] = []
        for neuron in self.neurons:
            try:
                async with http.get(f"{neuron.url}/models") as resp:
                    raw = await resp.json()
            except Exception:
                continue
            with contextlib.suppress(Exception):
                found.extend((neuron.name, entry) for entry in parse_models(raw))
        return found

    async def _routable(self, http: Any) -> dict[str, Any] | None:
        """The first model the gateway lists as loaded (so a request to it is routed now), if any."""
        try:
            async with http.get(f"{self.gateway_url}/v1/models") as resp:
                listing = await resp.json()
        except Exception:
            return None
        data = listing.get("data", [])
        for model in data:
            if model.get("status") == "loaded" and not model.get("alias_of"):
                aliases = [m["id"] for m in data if m.get("alias_of") == model["id"]]
                return {**model, "aliases": aliases}
        return None

    def _print_ready(self, model: dict[str, Any] | None, failed: bool = False, unseen: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        out = self.out
        aliases = _aliases(model) if model is not None else []
        if model is not None:
            where = ", ".join(model.get("loaded_on") or []) or "?"
            also = f" (alias {', '.join(aliases)})" if aliases else ""
            out.print(
                f"[green bold]ready in {elapsed:.0f} s[/green bold] — {escape(model['id'] + also)} answers on "
                f"{escape(where)}",
                highlight=False,
                soft_wrap=True,
            )
        elif unseen:
            out.print(
                f"[yellow]up in {elapsed:.0f} s, but the gateway does not list the loaded model yet[/yellow]: "
                "check `cortex status` and the gateway's log for its polls of the neuron",
                highlight=False,
                soft_wrap=True,
            )
        elif failed:
            out.print(
                f"[yellow]up in {elapsed:.0f} s, but no model could be loaded[/yellow] (see above); "
                "load one with `cortex load MODEL --node NODE`",
                highlight=False,
                soft_wrap=True,
            )
        else:
            out.print(
                f"[green]up in {elapsed:.0f} s[/green] — no model loaded yet: `cortex load MODEL --node NODE`",
                highlight=False,
                soft_wrap=True,
            )
        url = self.gateway_url
        model_name = (aliases[0] if aliases else model["id"]) if model is not None else "MODEL"
        flag = "" if url == "http://127.0.0.1:31313" else f" --url {url}"
        lines = [
            f"  OpenAI API      {url}/v1          export OPENAI_BASE_URL={url}/v1",
            f"  Anthropic API   {url}             export ANTHROPIC_BASE_URL={url}",
        ]
        if self.metrics_url:
            lines.append(f"  metrics         {self.metrics_url}/metrics")
        lines += [
            f"  dashboard       {url}/ui",
            f"  the fleet       cortex status{flag}  ·  cortex models{flag}  ·  cortex bench{flag}",
            "  clients         docs/clients.md (Claude Code, Codex, SDKs)",
            f"  try             curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{model_name}", "messages": [{{"role": "user", "content": "What is the capital of '
            "France?\"}]}'",
            "  stop            Ctrl-C",
        ]
        for line in lines:
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        self.on_ready()


def _aliases(model: dict[str, Any]) -> list[str]:
    aliases = model.get("aliases")
    return list(aliases) if isinstance(aliases, list) else []
