"""cortex.toml / models.toml: validation errors name the file, the key and the problem."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.core.gateway_config import load_fleet_config
from cortex.core.settings import ConfigError

EXAMPLES = Path(__file__).parents[2] / "examples"

NEURONS = """
[[neurons]]
name = "a"
endpoint = "http://127.0.0.1:13131"
"""


def write(tmp_path: Path, cortex: str, models: str | None = None) -> Path:
    path = tmp_path / "cortex.toml"
    path.write_text(cortex)
    if models is not None:
        (tmp_path / "models.toml").write_text(models)
    return path


def error_of(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load_fleet_config(path, environ or {})
    return str(err.value)


def test_examples_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_API_KEY", "sk-example")  # the credentials the example reads from the environment
    monkeypatch.setenv("FLEET_TOKEN", "fleet-example")
    fleet = load_fleet_config(EXAMPLES / "cortex.toml", {})
    assert fleet.gateway.neurons
    assert fleet.catalogue.models
    for alias, target in fleet.catalogue.aliases.items():
        assert fleet.catalogue.resolve(alias) == target


def test_models_config_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'models_config = "models.toml"\n' + NEURONS, '[[models]]\nid = "m"\n[aliases]\nfast = "m"\n')
    fleet = load_fleet_config(path, {})
    assert fleet.catalogue.ids() == ["m"]
    assert fleet.catalogue.resolve("fast") == "m"


def test_env_overrides_reach_nested_keys(tmp_path: Path) -> None:
    path = write(tmp_path, NEURONS)
    env = {"CORTEX_GATEWAY__LISTEN": "127.0.0.1:8080", "CORTEX_EVICTION__STRATEGY": "priority"}
    fleet = load_fleet_config(path, env)
    assert fleet.gateway.gateway.listen == "127.0.0.1:8080"
    assert fleet.gateway.eviction.strategy == "priority"


@pytest.mark.parametrize(
    ("cortex", "key", "problem"),
    [
        ("[gateway]\nlisten = 'nope'\n", "gateway.listen", "is not HOST:PORT"),
        ("[eviction]\nstrategy = 'fifo'\n", "eviction.strategy", "'lru' or 'priority'"),
        ("[eviction]\nmin_residency_s = -1\n", "eviction.min_residency_s", "greater than or equal to 0"),
        ("[poll]\nintervall_s = 1\n", "poll.intervall_s", "Extra inputs are not permitted"),
        ("[[neurons]]\nname = 'a'\nendpoint = 'ftp://x'\n", "neurons.0.endpoint", "is not an http(s):// URL"),
        (NEURONS + NEURONS.replace("13131", "13132"), "neurons.1.name", "duplicate neuron name 'a'"),
    ],
)
def test_cortex_toml_errors_name_file_key_and_problem(tmp_path: Path, cortex: str, key: str, problem: str) -> None:
    message = error_of(write(tmp_path, cortex))
    assert str(tmp_path / "cortex.toml") in message
    assert f"'{key}'" in message
    assert problem in message


def test_bad_env_override_is_reported_as_coming_from_the_environment(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, NEURONS), {"CORTEX_GATEWAY__MAX_BODY_BYTES": "small"})
    assert "CORTEX_* environment" in message
    assert "'gateway.max_body_bytes'" in message


@pytest.mark.parametrize(
    ("models", "key", "problem"),
    [
        ("[[models]]\nid = 'm'\nvram_mb = -5\n", "models.0.vram_mb", "greater than 0"),
        ("[[models]]\nid = 'm'\n[[models]]\nid = 'm'\n", "models.1.id", "duplicate model id 'm'"),
        ("[[models]]\nid = 'm'\npinned_on = ['zz']\n", "models.0.pinned_on", "'zz' is not a neuron in cortex.toml"),
        ("[[models]]\nid = 'm'\n[aliases]\nx = 'missing'\n", "aliases.x", "target 'missing' is not a model id"),
        ("[[models]]\nid = 'm'\nmin_devise = 2\n", "models.0.min_devise", "Extra inputs are not permitted"),
    ],
)
def test_models_toml_errors_name_file_key_and_problem(tmp_path: Path, models: str, key: str, problem: str) -> None:
    message = error_of(write(tmp_path, 'models_config = "models.toml"\n' + NEURONS, models))
    assert str(tmp_path / "models.toml") in message
    assert f"'{key}'" in message
    assert problem in message


def test_missing_models_file_and_broken_toml(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, 'models_config = "nowhere.toml"\n' + NEURONS))
    assert "'models_config'" in message
    assert "nowhere.toml is not a file" in message
    assert "not valid TOML" in error_of(write(tmp_path, "[gateway\n"))


def test_cortex_serve_refuses_a_bad_config_with_exit_status_2(tmp_path: Path) -> None:
    path = write(tmp_path, "[eviction]\nstrategy = 'random'\n")
    cortex = shutil.which("cortex") or sys.executable
    args = [cortex] if cortex.endswith("cortex") else [cortex, "-m", "cortex.cli.cortex_cmd"]
    done = subprocess.run([*args, "serve", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "configuration error" in done.stderr
    assert "'eviction.strategy'" in done.stderr
    assert str(path) in done.stderr.replace("\n", "")
