"""Vectorized sweeps (every member equals its single run; `fedjax-lora sweep` writes the table)
and the multi-process launch detection of `fedjax_lora.distributed`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from fedjax_lora import cli
from fedjax_lora import config as config_lib
from fedjax_lora.algorithms import METHODS
from fedjax_lora.distributed import initialize_from_env, launcher
from fedjax_lora.experiment import build_problem, run_method
from fedjax_lora.sweep import run_sweep
from tests.tiny import compilations

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.vocab_size=64",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.max_positions=32",
    "lora.targets=[c_attn.q,c_attn.v]",
    "lora.rank=4",
    "data.num_groups=2",
    "data.clients_per_group=2",
    "data.tokens_per_client=600",
    "training.steps=2",
    "training.batch_size=2",
    "training.seq_len=16",
    "eval.max_windows=4",
    "eval.batch_size=4",
    "tracking.tensorboard=false",
    "tracking.progress=false",
    "rounds=2",
]


def test_sweep_members_equal_their_single_runs(tmp_path):
    """Seeds × learning rates × two heterogeneity levels, one compiled round: a member equals the
    single run of its seed, learning rate and overlap (checked on 4 of the 8 members, which hold
    every pair of values of any two of the three axes: a member given another's seed, rate or
    data shows); the method is built once per level."""
    config = config_lib.load(
        None,
        [
            *TINY,
            "methods=[fedavg]",
            "data.cohort_size=2",  # the members also draw their own cohorts
            "sweep.seeds=[0,1]",
            "sweep.lrs=[0.01,0.03]",
            "sweep.overlaps=[0.0,0.5]",
        ],
    )
    spec, built = METHODS["fedavg"], []
    counted = lambda problem, options: built.append(problem) or spec.factory(problem, options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(METHODS, "fedavg", dataclasses.replace(spec, factory=counted))
        doc = run_sweep(config, tmp_path)
    # built once per level, and traced once in each compiled program (round, evaluation)
    assert len(built) == 2 + 2
    members = doc["members"]
    assert [(m["overlap"], m["seed"], m["lr"]) for m in members] == [
        (overlap, seed, lr) for overlap in (0.0, 0.5) for seed in (0, 1) for lr in (0.01, 0.03)
    ]
    assert doc["programs"][0]["programs"] == 1  # the levels are one more mapped axis
    odd = lambda m: (m["overlap"] == 0.5) != (m["seed"] == 1)
    checked = [m for m in members if (m["lr"] == 0.03) == odd(m)]  # lr = level XOR seed
    assert len(checked) == 4
    for overlap in (0.0, 0.5):
        level = config_lib.merge_base(config, {"data": {"overlap": overlap}})
        problem, _ = build_problem(level)
        for m in (m for m in checked if m["overlap"] == overlap):
            single = config_lib.merge_base(level, {"seed": m["seed"], "optimizer": {"lr": m["lr"]}})
            records = run_method(
                "fedavg",
                dataclasses.replace(problem, optimizer=single.optimizer),
                single,
                lambda record: None,
                progress=False,
            )
            assert len(records) == len(m["records"]) == config.rounds + 1
            for want, got in zip(records, m["records"], strict=True):
                for key in ("val_ppl", "test_ppl", "train_loss", "cohort"):
                    if key in want:
                        np.testing.assert_allclose(
                            got[key], want[key], rtol=2e-5, err_msg=f"{m}: {key}"
                        )
    # the seeds and levels differ and the learning rates matter
    finals = {(m["overlap"], m["seed"], m["lr"]): m["final"]["val_mean_ppl"] for m in members}
    assert len(set(np.round(list(finals.values()), 6))) == 8
    row = {(r["overlap"], r["lr"]): r for r in doc["table"]}[(0.5, 0.03)]
    vals = [finals[(0.5, 0, 0.03)], finals[(0.5, 1, 0.03)]]
    np.testing.assert_allclose(row["val_mean_ppl"], (np.mean(vals), np.std(vals, ddof=1)))


def test_heterogeneity_levels_run_in_one_compiled_round(tmp_path):
    """Three overlap levels × 2 seeds compile the sweep's round and evaluation once (JAX's
    compilation events), `pcl-oracle`'s mixtures included; a method that reads its data on the
    host (`centralized`'s pooled stream: `Capabilities.data_axis` false) runs one program per
    level (two levels here)."""
    with compilations() as compiled:
        config = config_lib.load(
            None,
            [*TINY, "rounds=2", "methods=[pcl-val]", "sweep.seeds=[0,1]"]
            + ["sweep.overlaps=[0.0,0.5,1.0]"],
        )
        doc = run_sweep(config, tmp_path / "vectorized")
        assert compiled.count("jit(sweep_round)") == compiled.count("jit(sweep_evaluate)") == 1
        assert doc["programs"][0]["programs"] == 1 and len(doc["members"]) == 6
        assert len({m["final"]["val_mean_ppl"] for m in doc["members"]}) == 6
        compiled.clear()
        oracle = config_lib.merge_base(config, {"methods": ["pcl-oracle"]})
        doc = run_sweep(oracle, tmp_path / "oracle")
        assert compiled.count("jit(sweep_round)") == 1 and doc["programs"][0]["programs"] == 1
        compiled.clear()
        two = {"methods": ["centralized"], "sweep": {"overlaps": [0.0, 0.5]}}
        doc = run_sweep(config_lib.merge_base(config, two), tmp_path / "per-level")
        assert compiled.count("jit(sweep_round)") == 2 and doc["programs"][0]["programs"] == 2


def test_sweep_command_writes_the_table_over_heterogeneity_levels(tmp_path, capsys):
    """The shipped example, shrunk: 2 seeds x 1 learning rate x 2 heterogeneity levels."""
    path = ROOT / "experiments" / "configs" / "sweep_heterogeneity.yaml"
    out = tmp_path / "out"
    small = ["methods=[local]", "sweep.seeds=[0,1]", "sweep.lrs=[0.01]", "sweep.overlaps=[0.0,0.5]"]
    assert (
        cli.main(["sweep", str(path), "--out", str(out), "--set", *TINY, "rounds=1", *small]) == 0
    )
    table = (out / "sweep.md").read_text()
    assert table.count("±") >= 6 and "| local | 0 |" in table and "| local | 0.5 |" in table
    doc = json.loads((out / "sweep.json").read_text())
    assert len(doc["members"]) == 4 and len(doc["table"]) == 2
    assert doc["grid"]["overlaps"] == [0.0, 0.5]
    assert "wrote" in capsys.readouterr().out


def test_sweep_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match="sweep.lrs must be positive"):
        config_lib.load(None, ["sweep.lrs=[0.1,-1]"])
    with pytest.raises(ValueError, match=r"'sweep.seeds\[0\]' must be an integer"):
        config_lib.load(None, ["sweep.seeds=[a]"])
    with pytest.raises(ValueError, match="give at least 2"):
        run_sweep(config_lib.load(None, [*TINY, "sweep.seeds=[0]"]), tmp_path / "never")
    config = config_lib.load(None, [*TINY, "strategy.kind=sharded", "sweep.seeds=[0,1]"])
    with pytest.raises(ValueError, match="cannot nest the 'sharded' strategy"):
        run_sweep(config, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_a_method_without_sweeps_is_refused_before_any_method_runs(tmp_path):
    """`scaffold` (no vectorized sweeps) listed after `fedavg`: refused before `fedavg`'s sweep
    round is compiled, nothing written."""
    config = config_lib.load(None, [*TINY, "methods=[fedavg,scaffold]", "sweep.seeds=[0,1]"])
    with (
        compilations() as compiled,
        pytest.raises(ValueError, match="scaffold.* cannot be vectorized"),
    ):
        run_sweep(config, tmp_path / "never")
    assert "jit(sweep_round)" not in compiled and not (tmp_path / "never").exists()


def test_multi_process_launchers_are_detected_from_the_environment():
    assert launcher({}) is None
    assert launcher({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task
    assert launcher({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
    assert launcher({"OMPI_COMM_WORLD_SIZE": "2"}) == "ompi"
    assert launcher({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == "tpu"
    assert launcher({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single TPU VM
    assert launcher({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "explicit"
    assert (
        launcher({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "FEDJAX_LORA_DISTRIBUTED": "0"}) is None
    )
    assert launcher({"FEDJAX_LORA_DISTRIBUTED": "1"}) == "forced"
    with pytest.raises(ValueError, match="FEDJAX_LORA_DISTRIBUTED"):
        launcher({"FEDJAX_LORA_DISTRIBUTED": "yes"})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        initialize_from_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    # a single process: nothing is initialised
    assert initialize_from_env({}) is False
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1
