"""neuron.toml validation and environment overrides; errors name the file, the key and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cortex.core.settings import ConfigError, load_settings
from cortex.neuron.config import NeuronConfig, load_neuron_config
from cortex.neuron.default_model import DEFAULT_MODEL_ID


def test_no_file_loads_the_default_model() -> None:
    config = load_settings(NeuronConfig, None, "NEURON_", environ={})
    assert [m.model_id for m in config.models_to_load()] == [DEFAULT_MODEL_ID]
    assert config.listen == "127.0.0.1:13131"


def test_empty_default_models_loads_nothing(tmp_path: Path) -> None:
    path = tmp_path / "neuron.toml"
    path.write_text("default_models = []\n")
    assert load_neuron_config(path).models_to_load() == []


def test_env_overrides_nested_keys(tmp_path: Path) -> None:
    path = tmp_path / "neuron.toml"
    path.write_text("[admission]\nmax_in_flight = 2\n")
    environ = {"NEURON_ADMISSION__MAX_IN_FLIGHT": "9", "NEURON_LISTEN": "127.0.0.1:9999", "NEURON_DEFAULT_MODELS": "[]"}
    config = load_settings(NeuronConfig, path, "NEURON_", environ=environ)
    assert config.admission.max_in_flight == 9
    assert config.listen == "127.0.0.1:9999"
    assert config.default_models == []


def test_per_model_admission_override() -> None:
    data = {"admission": {"max_in_flight": 4, "models": {"m": {"max_queue_depth": 3}}}}
    config = NeuronConfig.model_validate(data)
    limits = config.admission.limits_for("m")
    assert (limits.max_in_flight, limits.max_queue_depth) == (4, 3)
    assert config.admission.limits_for("other").max_queue_depth == 64


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[admission]\nmax_in_flight = 0\n", "admission.max_in_flight"),
        ("listen = 'nowhere'\n", "listen"),
        ("lisen = '0.0.0.0:1'\n", "lisen"),
        ("[[default_models]]\nsource = 'x'\n", "default_models.0.model_id"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "neuron.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_settings(NeuronConfig, path, "NEURON_", environ={})
    assert str(path) in str(err.value)
    assert f"'{key}'" in str(err.value)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "neuron.toml"
    path.write_text("listen = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_neuron_config(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_neuron_config(tmp_path / "absent.toml")


def test_serve_refuses_bad_config_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "neuron.toml"
    path.write_text("[admission]\nmax_wait_secs = -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cortex.cli.neuron_cmd", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "admission.max_wait_secs" in proc.stderr and str(path) in proc.stderr
