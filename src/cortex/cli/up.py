"""`cortex up`: a gateway and one or more local neurons on this machine, started honestly.

What "honestly" means here (docs/fleet.md):

- every port is checked before anything starts, and a busy one is refused in one line, so `up` never
  attaches to a stranger that happens to answer on a port it meant to use;
- each model's load is shown as a progress bar fed by the neuron's own `load_progress` (the neurons
  run with Hugging Face's tqdm bars off, and their info lines are held back while models load);
- "ready in N s" is printed only once the gateway can route a request to a loaded model, followed by
  the next steps (both API URLs, the client variables, metrics, `cortex status`, the dashboard).

This module plans and runs the processes; `up_report.py` follows the loads and prints the report.

`--fleet N` starts N neurons on consecutive ports with this host's CPU cores, its CPU memory budget
and its GPUs split between them, so placement, eviction and failover can be seen on one machine.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cortex.cli.console import CliError

DEFAULT_ALIAS = "smollm2"  # not `default`: Claude Code (and others) reserve that name for their own model

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
