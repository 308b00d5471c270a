"""Closed by default, open on purpose: loopback listeners, no network exposure without credentials,
credentials given as hashes or read from the environment or a file."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.core.gateway_config import (
    GatewayConfig,
    GatewaySection,
    check_exposure,
    exposure_warnings,
    load_fleet_config,
)
from cortex.core.secrets import KeySet, is_loopback, resolve_secret
from cortex.core.settings import ConfigError, load_settings
from cortex.neuron.config import NeuronConfig
from cortex.neuron.config import check_exposure as check_neuron_exposure


def sha256(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def gateway(toml: str, tmp_path: Path) -> GatewaySection:
    path = tmp_path / "cortex.toml"
    path.write_text(toml)
    return load_fleet_config(path, {}).gateway.gateway


def test_both_daemons_listen_on_loopback_by_default() -> None:
    gw = load_settings(GatewayConfig, None, "CORTEX_", environ={})
    assert gw.gateway.listen == "127.0.0.1:31313"
    assert gw.gateway.metrics_listen == "127.0.0.1:31314"
    assert load_settings(NeuronConfig, None, "NEURON_", environ={}).listen == "127.0.0.1:13131"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("beast.internal", False),
        ("", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_gateway_refuses_the_network_without_client_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.listen.*without client keys.*api_keys.*allow_anonymous"):
        gateway('[gateway]\nlisten = "0.0.0.0:31313"\n', tmp_path)


def test_gateway_serves_the_network_with_keys_or_on_purpose_anonymous(tmp_path: Path) -> None:
    keyed = gateway('[gateway]\nlisten = "0.0.0.0:31313"\napi_keys = ["sk-1"]\n', tmp_path)
    assert keyed.client_key_set().matches("sk-1")
    assert exposure_warnings(GatewayConfig(gateway=keyed)) == []
    anonymous = gateway('[gateway]\nlisten = "0.0.0.0:31313"\nallow_anonymous = true\n', tmp_path)
    check_exposure(GatewayConfig(gateway=anonymous), "x")
    assert any("allow_anonymous" in w for w in exposure_warnings(GatewayConfig(gateway=anonymous)))


def test_keys_from_hashes_environment_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIENT_KEY", "sk-from-env")
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# clients\nsk-from-file\n\n{sha256('sk-hashed-in-file')}\n")
    (tmp_path / "admin").write_text("admin-secret\n")
    toml = f"""
[gateway]
api_keys = ["{sha256("sk-hashed")}", "env:CLIENT_KEY"]
api_keys_file = "{keys_file}"
admin_key = "file:{tmp_path / "admin"}"
"""
    section = gateway(toml, tmp_path)
    keys = section.client_key_set()
    for key in ("sk-hashed", "sk-from-env", "sk-from-file", "sk-hashed-in-file"):
        assert keys.matches(key), key
    assert not keys.matches(sha256("sk-hashed"))  # the digest itself is not a key
    assert not keys.matches("") and not keys.matches("sk-other")
    assert section.admin_key == "admin-secret"
    assert all(
        "sk-" not in k or k.startswith("sha256:") or k in ("sk-from-env", "sk-from-file") for k in section.api_keys
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('api_keys = ["env:MISSING_KEY"]', "MISSING_KEY"),
        ('api_keys = ["sha256:abc"]', "64 hex digits"),
        ('api_keys = [""]', "empty"),
        ('api_keys_file = "/nonexistent/keys"', "cannot read"),
        ('admin_key = "file:/nonexistent/admin"', "cannot read"),
        ('api_keys = ["same"]\nadmin_key = "same"', "admin_key must differ"),
        ('neuron_token = "sha256:' + "0" * 64 + '"', "not a hash"),
    ],
)
def test_bad_credentials_are_config_errors(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        gateway(f"[gateway]\n{toml}\n", tmp_path)


def test_gateway_sends_a_token_to_every_neuron(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_TOKEN", "fleet-secret")
    toml = """
[gateway]
neuron_token = "env:FLEET_TOKEN"
[[neurons]]
name = "a"
endpoint = "http://a:13131"
[[neurons]]
name = "b"
endpoint = "http://b:13131"
token = "b-own"
"""
    path = tmp_path / "cortex.toml"
    path.write_text(toml)
    neurons = load_fleet_config(path, {}).gateway.neurons
    assert {n.name: n.token for n in neurons} == {"a": "fleet-secret", "b": "b-own"}


def test_neuron_refuses_the_network_without_a_token() -> None:
    open_config = NeuronConfig(listen="0.0.0.0:13131")
    with pytest.raises(ValueError, match=r"without a token: set token in neuron\.toml"):
        check_neuron_exposure(open_config)
    check_neuron_exposure(NeuronConfig(listen="0.0.0.0:13131", token="t"))
    check_neuron_exposure(NeuronConfig(listen="127.0.0.1:13131"))


def test_neuron_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_SECRET", "s3cret")
    assert NeuronConfig(token="env:NODE_SECRET").token == "s3cret"


def test_neuron_serve_exits_with_one_clear_line(tmp_path: Path) -> None:
    cfg = tmp_path / "neuron.toml"
    cfg.write_text("default_models = []\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cortex.cli.neuron_cmd", "serve", "--config", str(cfg), "--listen", "0.0.0.0:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0:1" in proc.stderr and "token" in proc.stderr


def test_keyset_compares_digests() -> None:
    keys = KeySet(["plain", sha256("hashed")])
    assert keys.matches("plain") and keys.matches("hashed")
    assert not keys.matches("Plain") and not keys.matches("hashe") and not keys.matches("")
    assert len(keys) == 2 and bool(keys) and not KeySet([])
    assert resolve_secret("literal") == "literal"
