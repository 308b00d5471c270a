"""`cortex up`: a gateway and one or more local neurons on this machine, started honestly.

What "honestly" means here (docs/fleet.md):

- every port is checked before anything starts, and a busy one is refused in one line, so `up` never
  attaches to a stranger that happens to answer on a port it meant to use;
- each model's load is shown as a progress bar fed by the neuron's own `load_progress` (the neurons
  run with Hugging Face's tqdm bars off, and their info lines are held back while models load);
- "ready in N s" is printed only once the gateway can route a request to a loaded model, followed by
  the next steps (both API URLs, the client variables, metrics, `cortex status`, the dashboard).

`--fleet N` starts N neurons on consecutive ports with this host's CPU cores, its CPU memory budget
and its GPUs split between them, so placement, eviction and failover can be seen on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn

from cortex.cli.console import CliError, console

DEFAULT_ALIAS = "smollm2"  # not `default`: Claude Code (and others) reserve that name for their own model
# Polls (0.25 s apart) to wait for the gateway to list a model a neuron reports loaded: many of its poll intervals.
UNSEEN_POLLS_LIMIT = 240

# Keep a daemon's stderr free of progress bars: `cortex up` draws its own from the neuron's /models.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",  # transformers' GGUF conversion uses tqdm directly
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


@dataclass(frozen=True)
class LocalNeuron:
    """One neuron `up` starts: its name in the gateway, where it listens, what it gets in its environment."""

    name: str
    listen: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{client_host(self.listen)}"


def client_host(listen: str) -> str:
    """HOST:PORT a client on this machine uses for a server listening on `listen` (wildcards → loopback)."""
    host, _, port = listen.rpartition(":")
    return f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]', '::') else host}:{port}"


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"'{listen}' is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


# ---- planning --------------------------------------------------------------------------------------
def plan_neurons(neuron_listen: str, count: int, neuron_config: Path | None) -> list[LocalNeuron]:
    """N neurons on consecutive ports; the first one loads the default model, the others start empty.

    Their shares: CPU cores (for torch threads), the CPU memory budget, and the GPUs when there are at
    least as many as neurons. A value already set in this environment is never overridden.
    """
    if count < 1:
        raise CliError("--fleet must be at least 1")
    host, port = split_listen(neuron_listen)
    if port + count - 1 > 65535:
        raise CliError(f"--fleet {count} needs ports {port}..{port + count - 1}: pick a lower --neuron-listen")
    shown_host = f"[{host}]" if ":" in host else host
    fraction, memory_mb = _cpu_budget(neuron_config)
    gpus = _gpu_count() if count > 1 else 0
    neurons = []
    for i in range(count):
        env = dict(QUIET_ENV)
        env.update(_core_share(i, count))
        if count > 1:
            if memory_mb is not None:
                env["NEURON_DEVICES__CPU_MEMORY_MB"] = str(max(1, memory_mb // count))
            else:
                env["NEURON_DEVICES__CPU_MEMORY_FRACTION"] = f"{fraction / count:.4f}"
            if gpus >= count:
                env["NEURON_DEVICES__USE"] = json.dumps(list(range(i, gpus, count)))
            if i > 0 and neuron_config is None:
                env["NEURON_DEFAULT_MODELS"] = "[]"  # the others start empty: room for cold loads
        env = {key: value for key, value in env.items() if key not in os.environ}
        name = "local" if count == 1 else f"local-{i + 1}"
        neurons.append(LocalNeuron(name, f"{shown_host}:{port + i}", env))
    return neurons


def _core_share(index: int, count: int) -> dict[str, str]:
    """This neuron's share of the host's cores, as the neuron's thread settings read it."""
    from cortex.neuron.threads import share_environment

    shared = share_environment(index, count, environ={})
    return {key: value for key, value in shared.items() if key.startswith("NEURON_")}


def _cpu_budget(neuron_config: Path | None) -> tuple[float, int | None]:
    from cortex.neuron.config import load_neuron_config

    try:
        devices = load_neuron_config(neuron_config).devices
    except Exception:  # the neuron itself reports a bad config, with the file and key
        return 0.5, None
    return devices.cpu_memory_fraction, devices.cpu_memory_mb


def _gpu_count() -> int:
    try:
        from cortex.neuron.nvml import Nvml

        return Nvml().device_count()
    except Exception:  # no NVML, no driver: a CPU host
        return 0


# ---- ports -----------------------------------------------------------------------------------------
def port_in_use(listen: str) -> bool:
    """Whether something already listens where we mean to (SO_REUSEADDR: a TIME_WAIT leftover is not busy)."""
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(wanted: list[tuple[str, str, str]]) -> None:
    """`(listen, what, option)` triples; the first busy one is refused in one line, before anything starts."""
    seen: dict[int, str] = {}
    for listen, what, option in wanted:
        _, port = split_listen(listen)
        if port in seen:
            raise CliError(f"port {port} is asked for twice ({seen[port]} and {what}): change {option}")
        seen[port] = what
        if port_in_use(listen):
            raise CliError(
                f"port {port} ({what}) is already in use by another process: stop it, or choose another port "
                f"with {option} HOST:PORT"
            )


# ---- neuron processes --------------------------------------------------------------------------------
class LogRelay:
    """Copies a neuron's output to our stderr, line by line; info lines wait until the fleet is ready.

    Lines are written to whatever `sys.stderr` is at that moment, so while a rich progress display
    is live they appear above it instead of tearing it.
    """

    def __init__(self, stream: IO[bytes], prefix: str, show_all: threading.Event) -> None:
        self.prefix = prefix
        self.show_all = show_all
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True, name=f"relay{prefix}")
        self.thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            if self.show_all.is_set() or not _is_routine(line):
                with contextlib.suppress(Exception):
                    sys.stderr.write(f"{self.prefix}{line}\n")
                    sys.stderr.flush()
        stream.close()


def _is_routine(line: str) -> bool:
    """A structured info/debug line (held back while models load); warnings, errors and tracebacks show."""
    return line.startswith("ts=") and (" level=info " in line or " level=debug " in line)


def start_neuron(
    neuron: LocalNeuron, neuron_config: Path | None, show_all: threading.Event, prefix: str
) -> tuple[subprocess.Popen[bytes], LogRelay]:
    args = [sys.executable, "-m", "cortex.cli.neuron_cmd", "serve", "--listen", neuron.listen]
    if neuron_config is not None:
        args += ["--config", str(neuron_config)]
    # Its own session: Ctrl-C reaches us only, and we stop the neurons after the gateway.
    proc = subprocess.Popen(
        args,
        start_new_session=True,
        preexec_fn=_stop_with_parent,
        env={**os.environ, **neuron.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    return proc, LogRelay(proc.stdout, prefix, show_all)


def _stop_with_parent() -> None:
    """In the child, before exec: if `cortex up` dies without stopping it (SIGKILL), the kernel sends SIGTERM."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_for_neurons(procs: list[tuple[LocalNeuron, subprocess.Popen[bytes]]], timeout: float = 300.0) -> None:
    """Until every neuron we started answers /version; one that exits first is an error."""
    deadline = time.monotonic() + timeout
    waiting = list(procs)
    while waiting:
        for neuron, proc in list(waiting):
            if proc.poll() is not None:
                raise CliError(f"neuron {neuron.name} exited with status {proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"{neuron.url}/version", timeout=1.0):
                    waiting.remove((neuron, proc))
            except OSError:
                pass
        if waiting:
            if time.monotonic() > deadline:
                names = ", ".join(n.name for n, _ in waiting)
                raise CliError(f"neuron(s) {names} did not answer within {timeout:.0f}s")
            time.sleep(0.2)


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float = 20.0) -> None:
    """SIGINT to all (a graceful stop: in-flight requests finish, models unload), then wait; kill stragglers."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- start-up report -----------------------------------------------------------------------------------
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


class _CurrentStderr:
    """A stream that writes to whatever `sys.stderr` is now (rich swaps it while a progress bar is live)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def route_logs_through_current_stderr() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(_CurrentStderr())  # type: ignore[arg-type]
