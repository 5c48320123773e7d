"""Multi-host studies: two CPU processes on jax.distributed give the single-process summary."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from recon_jax import distributed
from recon_jax.errors import ConfigError

from test_study import TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "RECON_JAX_JAX_CACHE": os.environ.get("RECON_JAX_TEST_JAX_CACHE", str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "recon_jax-tests-jax"))}


def test_two_processes_give_the_single_process_summary(tmp_path):
    raw = {**TINY, "inits": ["gt-noise:0.05", "gt-noise:0.5", "gaussian:0.1"], "landscape": {}}
    config = tmp_path / "study.json"
    config.write_text(json.dumps(raw))
    command = [sys.executable, "-m", "recon_jax", "study", "--config", str(config), "--no-figures"]
    subprocess.run(command + ["--out", str(tmp_path / "one")], check=True, env=_env(), capture_output=True)

    port = _free_port()
    processes = [subprocess.Popen(command + ["--out", str(tmp_path / "two"), "--coordinator", f"localhost:{port}",
                                             "--num-processes", "2", "--process-id", str(i)],
                                  env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    # Each process ran its own share of the 6 cells (index mod 2), and only process 0 wrote the outputs.
    for i, (_, err) in enumerate(outputs):
        ran = [line for line in err.splitlines() if ": running" in line]
        assert len(ran) == 3 and all(line.startswith(f"[process {i}/2]") for line in ran)
    assert "wrote" in outputs[0][0] and "wrote" not in outputs[1][0]
    assert (tmp_path / "two" / "summary.csv").read_text() == (tmp_path / "one" / "summary.csv").read_text()


@pytest.mark.parametrize("kwargs, env, message", [
    ({"coordinator": "localhost:1234"}, {}, "multi-host needs all three"),
    ({}, {distributed.ENV_NUM_PROCESSES: "2"}, "multi-host needs all three"),
    ({"coordinator": "localhost:1", "num_processes": 2, "process_id": 2}, {}, "--process-id must be in [0, 2)"),
    ({"coordinator": "localhost", "num_processes": 2, "process_id": 0}, {}, "--coordinator must be HOST:PORT"),
    ({}, {distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "two",
          distributed.ENV_PROCESS_ID: "0"}, "RECON_JAX_NUM_PROCESSES must be an integer"),
])
def test_bad_settings_are_refused_before_any_work(kwargs, env, message):
    with pytest.raises(ConfigError) as err:
        distributed.resolve(environ=env, **kwargs)
    assert message in str(err.value)


def test_environment_settings_and_single_process():
    env = {distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "4", distributed.ENV_PROCESS_ID: "3"}
    assert distributed.resolve(environ=env) == ("h:1", 4, 3)
    assert distributed.initialize() == distributed.Context()  # nothing asked: one process, JAX untouched
