"""Paper presets (issue 14, point 11) and the paper's evaluation attention dropout (point 12): a
preset sits under the config file and the overrides, holds the papers' numbers (spec notes), and
`eval.attention_dropout` reaches the trust-weighted methods' evaluation."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from flax import nnx

from fedjax_lora import config as config_lib
from fedjax_lora.engine.crosseval import attention_dropout_only
from fedjax_lora.experiment import method_factory
from fedjax_lora.grid import cell_config, load_grid
from fedjax_lora.presets import PRESETS
from tests.test_comigs_tables import COMIGS
from tests.tiny import tiny_problem


def test_preset_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"preset": "trust-weighted-paper", "lora": {"rank": 8}}))
    config = config_lib.load(path, ["optimizer.lr=0.01"])
    assert config.preset == "trust-weighted-paper"
    assert config.lora.rank == 8 and config.lora.alpha == 32.0  # file over preset
    assert config.optimizer.lr == 0.01 and config.optimizer.weight_decay == 1e-3
    same = config_lib.load(path, ["optimizer.lr=0.01"], preset="trust-weighted-paper")
    assert same == config
    with pytest.raises(ValueError, match="names preset"):
        config_lib.load(path, preset="comigs-paper")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        config_lib.load(None, ["preset=nope"])


def test_presets_hold_the_papers_settings():
    """The numbers of the spec notes (trust-weighted §3.2-3.3, CoMiGS §2.3, FedAMoLE §3)."""
    tw = config_lib.load(preset="trust-weighted-paper")
    lora = tw.lora
    assert (lora.rank, lora.alpha, lora.scaling, lora.dropout) == (4, 32.0, "alpha/r", 0.1)
    assert tw.lora.init_fan == "rank" and tw.model.attn_dropout == 0.2
    assert (tw.optimizer.lr, tw.optimizer.weight_decay, tw.optimizer.schedule) == (
        2e-3,
        1e-3,
        "one_cycle",
    )
    assert tw.rounds * tw.training.steps == 500 and tw.trust.first_aggregation_round == 4
    assert tw.training.batch_size * tw.training.grad_accum == 200
    assert tw.eval.attention_dropout == 0.2
    cm = config_lib.load(preset="comigs-paper")
    assert (cm.lora.rank, cm.lora.scaling, cm.optimizer.lr, cm.optimizer.weight_decay) == (
        8,
        "alpha/sqrt(r)",
        2e-3,
        0.01,
    )
    assert cm.rounds * cm.training.steps == 200 and cm.training.batch_size == 64
    assert cm.method_options["fedavg"]["evaluate"] == "local"
    fa = config_lib.load(preset="fedamole-paper")
    assert (fa.rounds, fa.training.steps, fa.optimizer.lr, fa.lora.rank) == (30, 200, 5e-5, 8)
    # FedAMoLE §3.3 and issue 14 points 6-9: one example per row cut at max_length 1024, the
    # reshuffled loader, the RSEA aux split, every aux/eval example, the PyPI rouge package.
    assert (fa.training.batch_size, fa.training.seq_len, fa.training.sampling) == (1, 1024, "epoch")
    assert (fa.data.instruction_packing, fa.data.aux_fraction) == ("examples", 0.05)
    assert (fa.eval.max_windows, fa.eval.rouge) == (200, "rouge")
    assert set(PRESETS) == {"trust-weighted-paper", "comigs-paper", "fedamole-paper"}


def test_the_paper_grids_use_the_presets():
    from pathlib import Path

    tw = load_grid(Path(COMIGS).parent / "trust_weighted" / "grid.yaml")
    config = cell_config(tw, tw["cells"][0], 1, ["pcl-val"], [])
    assert config.preset == "trust-weighted-paper" and config.eval.attention_dropout == 0.2
    cm = load_grid(COMIGS / "table1.yaml")
    assert cell_config(cm, cm["cells"][0], 42, ["fedavg"], []).preset == "comigs-paper"
    fa = yaml.safe_load((Path(COMIGS).parent / "fedamole" / "grid.yaml").read_text())
    cell = cell_config({**fa, "cells": fa["scenarios"]}, fa["scenarios"][3], 42, ["fedamole"], [])
    assert cell.preset == "fedamole-paper" and cell.training.seq_len == 1024


def test_eval_attention_dropout_reaches_the_trust_methods():
    config = config_lib.load(None, ["eval.attention_dropout=0.3", "methods=[pcl-val]"])
    factory = method_factory("pcl-val", config)
    assert factory.keywords["options"].eval_attention_dropout == 0.3
    both = ["eval.attention_dropout=0.3", "trust.eval_attention_dropout=0.2"]
    clash = config_lib.load(None, both)
    with pytest.raises(ValueError, match="disagree"):
        method_factory("pcl-val", clash)
    # the old boolean switch is refused by the config type check, naming the field
    with pytest.raises(ValueError, match="trust.eval_attention_dropout. must be a number"):
        config_lib.load(None, ["trust.eval_attention_dropout=true"])


def test_attention_dropout_only_sets_the_rate():
    problem = tiny_problem(num_clients=2)
    graphdef = attention_dropout_only(problem.graphdef, problem.template, problem.base, 0.2)
    model = nnx.merge(graphdef, problem.template, problem.base)
    cfgs = [
        v
        for _, m in nnx.iter_graph(model)
        if isinstance(m, nnx.Module)
        for v in vars(m).values()
        if dataclasses.is_dataclass(v) and hasattr(v, "attn_dropout")
    ]
    assert cfgs and all(c.attn_dropout == 0.2 and c.dropout == 0.0 for c in cfgs)


def test_cli_preset_flag(tmp_path, capsys):
    from fedjax_lora.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"preset": "comigs-paper"}))
    argv = ["run", str(path), "--preset", "trust-weighted-paper", "--out", str(tmp_path / "o")]
    assert main(argv) == 2  # the file's preset and the flag's disagree: stops before compute
    assert "names preset 'comigs-paper'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(path), "--preset", "nope"])
