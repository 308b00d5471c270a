"""Real processes on loopback, hurt on purpose: helpers to start them with short, known timeouts and to time faults.

Every bound asserted here is generous (a shared, slow CI machine): a test checks that a fault costs
a client a clear error within the documented bound plus a margin, never how fast things are.
docs/reliability.md records the figures these tests measure, printed as `chaos:` lines (`pytest -s`).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.support.gateway_procs import cortex_toml
from tests.support.procs import cpu_neuron_toml as neuron_toml  # noqa: F401  (the chaos tests' name)

# The gateway's timeouts in these tests (production defaults are longer: docs/reliability.md).
STREAM_IDLE_S = 3.0
FIRST_BYTE_S = 10.0
CLIENT_WRITE_S = 3.0
# What a busy machine may add to any bound.
MARGIN_S = 15.0


def chaos_gateway_toml(neurons: dict[str, str], **extra: object) -> str:
    """A gateway over `neurons` with short per-phase timeouts and fast failure detection."""
    settings: dict[str, object] = {
        "stream_idle_timeout_s": STREAM_IDLE_S,
        "first_byte_timeout_s": FIRST_BYTE_S,
        "client_write_timeout_s": CLIENT_WRITE_S,
        **extra,
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return cortex_toml(neurons, models_config=None, extra_gateway="\n".join(lines))


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def resume(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def report(name: str, **figures: float) -> None:
    """One `chaos:` line per measured fault: what docs/reliability.md quotes."""
    values = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"chaos: {name} {values}")


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start
