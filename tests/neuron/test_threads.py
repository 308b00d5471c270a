"""The neuron chooses its CPU threads from the cores it may use, and reports the choice in /discovery."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cortex.neuron import threads
from cortex.neuron.config import NeuronConfig
from tests.support.procs import get_json, run_neuron


def test_default_leaves_a_core_for_the_event_loop() -> None:
    assert [threads.default_threads(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]


def test_config_beats_omp_num_threads_beats_cores() -> None:
    cores = threads.usable_cores()
    assert threads.choose(3, environ={"OMP_NUM_THREADS": "2"}) == threads.ThreadChoice(3, 1, cores, "config")
    assert threads.choose(None, environ={"OMP_NUM_THREADS": "2"}).source == "OMP_NUM_THREADS"
    assert threads.choose(None, environ={"OMP_NUM_THREADS": "2"}).threads == 2
    chosen = threads.choose(None, environ={"OMP_NUM_THREADS": "junk"})
    assert (chosen.threads, chosen.source) == (threads.default_threads(cores), "cores")


def test_a_share_of_cores_shapes_only_the_default() -> None:
    assert threads.choose(None, cores=1, environ={}).threads == 1
    assert threads.choose(None, cores=10_000, environ={}).cores == threads.usable_cores()  # capped by affinity
    assert threads.choose(4, cores=1, environ={}).threads == 4


def test_core_shares_split_evenly_and_never_to_zero() -> None:
    assert threads.core_shares(8, 3) == [3, 3, 2]
    assert threads.core_shares(2, 1) == [2]
    assert threads.core_shares(1, 3) == [1, 1, 1]
    assert threads.core_shares(4, 0) == []


def test_share_environment_keeps_a_share_already_given() -> None:
    assert threads.share_environment(0, 1, {})["NEURON_ENGINE__CORES"] == str(threads.usable_cores())
    assert threads.share_environment(0, 2, {"NEURON_ENGINE__CORES": "7"})["NEURON_ENGINE__CORES"] == "7"


def test_cgroup_quota_caps_the_cores(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert threads.usable_cores(cpu_max) == min(2, len(os.sched_getaffinity(0)))
    cpu_max.write_text("max 100000\n")
    assert threads.usable_cores(cpu_max) == len(os.sched_getaffinity(0))
    assert threads.usable_cores(tmp_path / "absent") == len(os.sched_getaffinity(0))


def test_environment_defaults_never_override_the_user() -> None:
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    changed = threads.prepare_environment(threads.ThreadChoice(2, 1, 2, "cores"), environ)
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": "0", "OMP_NUM_THREADS": "2"}
    assert sorted(changed) == ["KMP_BLOCKTIME", "OMP_NUM_THREADS"]


def test_engine_config_keys_and_environment_override() -> None:
    config = NeuronConfig.model_validate({"engine": {"threads": 2, "cuda_graphs": False}})
    assert (config.engine.threads, config.engine.cuda_graphs) == (2, False)
    assert NeuronConfig().engine.cuda_graphs is True
    with pytest.raises(ValueError):
        NeuronConfig.model_validate({"engine": {"threads": 0}})


def test_device_worker_threads_run_with_the_applied_count() -> None:
    """In a fresh process (torch's thread state is process-wide): the worker thread sees the count set at start."""
    script = textwrap.dedent(
        """
        from cortex.neuron import threads
        choice = threads.choose(3, cores=1)
        threads.prepare_environment(choice)
        threads.apply(choice)
        import torch
        from cortex.neuron.engine.worker import DeviceWorker
        worker = DeviceWorker("cpu")
        print(worker.submit(torch.get_num_threads).result(timeout=30), torch.get_num_interop_threads())
        worker.close()
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "1"]


def test_neuron_applies_and_reports_its_threads(tmp_path: Path) -> None:
    toml = 'default_models = []\n[devices]\nuse = "cpu"\n[engine]\nthreads = 3\n'
    with run_neuron(tmp_path, toml) as neuron:
        engine = get_json(f"{neuron.url}/discovery")["engine"]
        log = neuron.log()
    assert engine["threads"] == 3
    assert engine["interop_threads"] == 1
    assert engine["source"] == "config"
    assert "event=neuron.threads request_id=- threads=3 interop_threads=1" in log
    if "OMP_WAIT_POLICY" not in os.environ:
        assert "omp_wait_policy=PASSIVE" in log
