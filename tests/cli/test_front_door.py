"""What a new operator meets first, as subprocesses: versions, refused ports, warnings, config hints.

All of these answer before any model loads (no torch import on these paths), so they take seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import cortex
from tests.support.cli import run_cli
from tests.support.procs import free_port


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port a stranger listens on."""
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        yield stranger.getsockname()[1]


@pytest.mark.parametrize(("module", "name"), [("cortex_cmd", "cortex"), ("neuron_cmd", "neuron")])
def test_both_clis_print_their_version(module: str, name: str) -> None:
    done = run_cli(module, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{name} {cortex.__version__}"


@pytest.mark.parametrize("which", ["--listen", "--metrics-listen", "--neuron-listen"])
def test_up_refuses_a_busy_port_in_one_line_and_starts_nothing(busy_port: int, which: str) -> None:
    ports = {"--listen": free_port(), "--metrics-listen": free_port(), "--neuron-listen": free_port()}
    ports[which] = busy_port
    args = [arg for option, port in ports.items() for arg in (option, f"127.0.0.1:{port}")]
    done = run_cli("cortex_cmd", "up", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"port {busy_port}" in lines[0] and "already in use" in lines[0] and which in lines[0]
    assert "starting" not in done.stdout  # nothing was started, nothing attached to the stranger
    for option, port in ports.items():
        if option != which:
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                pass


def test_up_fleet_refuses_when_a_later_neuron_port_is_busy(busy_port: int) -> None:
    first = busy_port - 1
    args = ["--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}"]
    done = run_cli("cortex_cmd", "up", *args, "--neuron-listen", f"127.0.0.1:{first}", "--fleet", "2")
    assert done.returncode == 2
    assert f"port {busy_port} (neuron local-2) is already in use" in done.stderr


def _serve_until(config: Path, expected: str, timeout: float = 60) -> str:
    """Start `cortex serve`, read its stderr until `expected` shows, stop it; returns what it said."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortex.cli.cortex_cmd", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    said = ""
    deadline = time.monotonic() + timeout
    try:
        assert proc.stderr is not None
        while expected not in said and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            said += line
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    return said


def test_serve_without_neurons_warns(tmp_path: Path) -> None:
    config = tmp_path / "cortex.toml"
    config.write_text(f'[gateway]\nlisten = "127.0.0.1:{free_port()}"\nmetrics_listen = "127.0.0.1:{free_port()}"\n')
    said = _serve_until(config, "gateway.listening")
    assert "warning: no neurons configured" in said


def test_serve_warns_about_an_alias_clients_reserve(tmp_path: Path) -> None:
    (tmp_path / "models.toml").write_text('[[models]]\nid = "m"\n[aliases]\nsonnet = "m"\n')
    config = tmp_path / "cortex.toml"
    config.write_text(
        'models_config = "models.toml"\n'
        f'[gateway]\nlisten = "127.0.0.1:{free_port()}"\nmetrics_listen = "127.0.0.1:{free_port()}"\n'
        '[[neurons]]\nname = "a"\nendpoint = "http://127.0.0.1:9"\n'
    )
    said = _serve_until(config, "gateway.listening")
    assert "model name 'sonnet' is one Claude Code resolves itself" in said
    assert "no neurons configured" not in said


def refused_config(tmp_path: Path, module: str, toml: str) -> str:
    """`MODULE serve --config FILE` with this text in FILE exits 2, a configuration error: what it said."""
    config = tmp_path / "config.toml"
    config.write_text(toml)
    done = run_cli(module, "serve", "--config", str(config))
    assert done.returncode == 2, done.stderr
    return done.stderr


def test_config_typos_get_a_did_you_mean(tmp_path: Path) -> None:
    said = refused_config(
        tmp_path, "neuron_cmd", 'listen = "127.0.0.1:1"\n[admision]\nmax_in_flight = 2\n[devices]\nusee = "cpu"\n'
    )
    assert "key 'admision': Extra inputs are not permitted (did you mean 'admission'?)" in said
    assert "key 'devices.usee': Extra inputs are not permitted (did you mean 'use'?)" in said
    said = refused_config(tmp_path, "cortex_cmd", '[gateway]\nlisen = "127.0.0.1:1"\n')
    assert "key 'gateway.lisen': Extra inputs are not permitted (did you mean 'listen'?)" in said


def test_a_top_level_key_under_a_table_says_where_it_belongs(tmp_path: Path) -> None:
    said = refused_config(tmp_path, "neuron_cmd", '[[default_models]]\nmodel_id = "x"\nmodel_roots = ["/srv/models"]\n')
    assert "'model_roots' is a top-level key: in TOML, put it before the first [table] header" in said


def test_an_unreachable_hub_fails_a_load_in_one_line_with_the_offline_hint(tmp_path: Path) -> None:
    """The loader's own classification of a real connection failure (the hub at a closed local port)."""
    script = (
        "from huggingface_hub import snapshot_download\n"
        "from cortex.neuron.engine.loader import classify_load_failure\n"
        "try:\n"
        f"    snapshot_download('org/model', cache_dir={str(tmp_path)!r})\n"
        "except Exception as exc:\n"
        "    print(classify_load_failure(exc))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_ETAG_TIMEOUT": "2"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    line = done.stdout.strip()
    assert "\n" not in line and line.startswith("the Hugging Face hub cannot be reached"), done.stdout + done.stderr
    assert "HF_HUB_OFFLINE=1" in line and "hf download" in line


def test_serve_refuses_a_busy_port_in_one_line(busy_port: int, tmp_path: Path) -> None:
    # run_cli() exports CORTEX_ADMIN_KEY (a CLI client variable): serve must not read it as a config key.
    config = tmp_path / "cortex.toml"
    config.write_text(f'[gateway]\nlisten = "127.0.0.1:{busy_port}"\nmetrics_listen = "127.0.0.1:{free_port()}"\n')
    done = run_cli("cortex_cmd", "serve", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: cortex serve: port {busy_port} (gateway API) is already in use by another process: stop it, "
        "or choose another port with gateway.listen HOST:PORT"
    ]
    done = run_cli("neuron_cmd", "serve", "--listen", f"127.0.0.1:{busy_port}")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and f"port {busy_port} (neuron)" in done.stderr
