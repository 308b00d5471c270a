"""Every example configuration in examples/ starts, as documented (docs/fleet.md).

The neuron example is started as `neuron serve --config examples/neuron.toml` and the gateway
example as `cortex serve --config examples/cortex.toml` (with its models.toml), each with only its
port moved to a free one and the secrets it names by `env:` set in the environment.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from tests.support.gateway_procs import wait_until
from tests.support.procs import free_port, spawn, wait_http

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SECRETS = {"FLEET_TOKEN": "example-fleet-token", "GATEWAY_API_KEY": "example-api-key"}


def _moved(listen: str) -> str:
    host = listen.rpartition(":")[0]
    return f"{host}:{free_port()}"


def test_the_examples_are_all_covered() -> None:
    assert {p.name for p in EXAMPLES.glob("*.toml")} == {"neuron.toml", "cortex.toml", "models.toml"}


def test_the_neuron_example_starts(tmp_path: Path) -> None:
    config = EXAMPLES / "neuron.toml"
    listen = _moved(tomllib.loads(config.read_text())["listen"])
    env = {**SECRETS, "NEURON_LISTEN": listen, "NEURON_DEFAULT_MODELS": "[]"}  # start, don't load a model
    log = tmp_path / "neuron.log"
    proc = spawn([sys.executable, "-m", "cortex.cli.neuron_cmd", "serve", "--config", str(config)], log, env)
    try:
        wait_http(f"http://127.0.0.1:{listen.rpartition(':')[2]}/version", proc, log, timeout=120)
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_gateway_example_starts_with_its_catalogue(tmp_path: Path) -> None:
    config = EXAMPLES / "cortex.toml"
    gateway = tomllib.loads(config.read_text())["gateway"]
    listen, metrics = _moved(gateway["listen"]), _moved(gateway["metrics_listen"])
    env = {**SECRETS, "CORTEX_GATEWAY__LISTEN": listen, "CORTEX_GATEWAY__METRICS_LISTEN": metrics}
    log = tmp_path / "cortex.log"
    proc = spawn([sys.executable, "-m", "cortex.cli.cortex_cmd", "serve", "--config", str(config)], log, env)
    try:
        wait_http(f"http://127.0.0.1:{listen.rpartition(':')[2]}/health", proc, log, timeout=60)
        wait_until(lambda: "event=gateway.listening" in log.read_text(), timeout=30)
        assert "configuration error" not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)
