"""deploy/: the Grafana dashboard queries only metrics the gateway really exports; the units and recipes hold.

The metrics are read from a real gateway's /metrics after real traffic (a cold load, a streamed
answer, an unknown model), in front of a fake neuron.
"""

from __future__ import annotations

import configparser
import json
import re
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway_client import models_toml
from tests.support.gateway_procs import cortex_toml, run_fake_neuron, run_gateway, wait_until

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\b(cortex_[a-z_]+)\b")
BY = re.compile(r"by \(([^)]*)\)")
SELECTOR = re.compile(r"\{([^}]*)\}")


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "cortex.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert exprs
    return exprs


def _post(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        exc.read()


def test_every_metric_the_grafana_dashboard_queries_is_exported(tmp_path: Path) -> None:
    spec = {"name": "a", "devices": [{"vram_total_mb": 24000}], "preloaded": ["hot"], "load_delay_s": 0.3}
    with run_fake_neuron(tmp_path, spec) as neuron:
        catalogue = models_toml({"id": "hot"}, {"id": "cold", "vram_mb": 1000})
        with run_gateway(tmp_path, cortex_toml({"a": neuron.url}), catalogue, wait_healthy=1) as gateway:
            for model in ("hot", "cold", "no-such-model"):  # a streamed answer, a cold load, an error
                body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                _post(f"{gateway.url}/v1/chat/completions", body)
            wait_until(lambda: "cortex_model_vram_used_mb{" in gateway.metrics())
            text = gateway.metrics()

    families = {f.name: f for f in text_string_to_metric_families(text)}
    sample_labels: dict[str, set[str]] = {}
    for family in families.values():
        for sample in family.samples:
            sample_labels.setdefault(sample.name, set()).update(sample.labels)

    for expr in _dashboard_exprs():
        labels = {x.strip() for group in BY.findall(expr) for x in group.split(",") if x.strip()}
        labels |= {m.split("=")[0].strip() for sel in SELECTOR.findall(expr) for m in sel.split(",") if "=" in m}
        for name in set(METRIC.findall(expr)):
            base, kind = name, "gauge"
            for suffix, family_kind in (("_bucket", "histogram"), ("_total", "counter")):
                if name.endswith(suffix):
                    base, kind = name[: -len(suffix)], family_kind
            assert base in families, f"{name} (in {expr!r}) is not in the gateway's /metrics"
            assert families[base].type == kind, f"{name}: the gateway exports {base} as a {families[base].type}"
            if name in sample_labels:  # its labels, where traffic produced samples
                missing = labels - sample_labels[name] - {"le"}
                assert not missing, f"{expr!r} groups {name} by {missing}, which it does not carry"


def test_prometheus_scrapes_the_gateways_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets and all(t.endswith(":31314") for t in targets)


@pytest.mark.parametrize("unit", ["neuron", "cortex"])
def test_systemd_units_run_as_a_user_from_a_config_and_stop_gracefully(unit: str) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / f"{unit}.service").read_text())
    service = parser["Service"]
    assert service["User"] == "cortex" and service["Group"] == "cortex"
    assert service["ExecStart"] == f"/opt/cortex/.venv/bin/{unit} serve --config /etc/cortex/{unit}.toml"
    assert service["KillSignal"] == "SIGINT" and int(service["TimeoutStopSec"]) >= 30
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def test_container_recipes_build_from_the_repository_and_stop_gracefully() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    expected = {"gateway": ("cortex", ["31313", "31314"]), "neuron": ("neuron", ["13131"])}
    for name, (program, ports) in expected.items():
        lines = [
            line.strip()
            for line in (DEPLOY / "containers" / f"Containerfile.{name}").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        assert any(line.startswith("FROM ") for line in lines)
        for line in lines:
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"Containerfile.{name} copies {source}, not in the repository"
        assert f'ENTRYPOINT ["{program}", "serve"]' in lines and program in scripts
        assert "STOPSIGNAL SIGINT" in lines
        assert f"EXPOSE {' '.join(ports)}" in lines
        assert any("/etc/cortex/" in line for line in lines if line.startswith("CMD "))
