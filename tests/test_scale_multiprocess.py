"""A real multi-process run: `fedjax-lora run` started as two processes on this host (two forced
CPU devices each, `jax.distributed` over localhost via the `JAX_COORDINATOR_ADDRESS` launch
recipe), one `(clients=2, model=2)` mesh across both processes, client cohorts on; its metrics
equal a one-device run's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedjax_lora import cli

REPO = Path(__file__).resolve().parents[1]
CONFIG = """\
methods: [fedavg, local]
rounds: 2
model: {vocab_size: 64, d_model: 32, n_layers: 1, n_heads: 2, d_ff: 64, max_positions: 32}
lora: {targets: [c_attn.q, c_attn.v], rank: 4}
data: {num_groups: 2, clients_per_group: 2, tokens_per_client: 600, cohort_size: 2,
       cohort_sampling: tokens}
training: {steps: 2, batch_size: 2, seq_len: 16}
eval: {max_windows: 4, batch_size: 4}
tracking: {tensorboard: false, progress: false}
strategy: {kind: sharded, model_devices: 2}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_give_the_one_device_numbers(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "multi"
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ)
        env.update(
            XLA_FLAGS="--xla_force_host_platform_device_count=2 "
            "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        )
        command = [sys.executable, "-m", "fedjax_lora.cli", "run", str(config), "--out", str(out)]
        procs.append(
            subprocess.Popen(
                [*command, "--no-progress"],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert "process 1/2: 2 local of 4 devices" in err

    single = tmp_path / "single"
    argv = ["run", str(config), "--out", str(single), "--no-progress"]
    assert cli.main([*argv, "--set", "strategy.kind=map", "strategy.model_devices=1"]) == 0

    want = _records(single / "metrics.jsonl")
    for got_path in (out / "metrics.jsonl", out / "process_1" / "metrics.jsonl"):
        got = _records(got_path)
        assert [(r["method"], r["round"]) for r in got] == [(r["method"], r["round"]) for r in want]
        for g, w in zip(got, want, strict=True):
            assert g.get("cohort") == w.get("cohort")
            for key in ("val_ppl", "test_ppl", "train_loss"):
                if key in w:
                    np.testing.assert_allclose(g[key], w[key], rtol=2e-5, err_msg=key)
