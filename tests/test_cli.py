"""The product as a user runs it: the CLI, configs, clear errors, and the README example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fedjax_lora import config as config_lib
from fedjax_lora.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.d_model=32",
    "model.d_ff=64",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.vocab_size=64",
    "model.max_positions=32",
    "data.tokens_per_client=600",
    "training.steps=2",
    "training.batch_size=4",
    "training.seq_len=16",
    "eval.max_windows=4",
    "eval.batch_size=4",
]


def test_methods_lists_the_engine_baselines(capsys):
    assert main(["methods"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert {"local", "fedavg", "fedavg-tokens", "centralized", "pcl-val", "comigs"} <= names


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = [
        "demo",
        "--rounds",
        "2",
        "--methods",
        "local",
        "fedavg",
        "centralized",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        *TINY,
    ]
    assert main(argv) == 0
    return out


def test_demo_runs_and_writes_metrics_summary_and_plot(demo_run):
    out = demo_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in records] == [
        (m, r) for m in ("local", "fedavg", "centralized") for r in range(3)
    ]
    summary = json.loads((out / "summary.json").read_text())
    for method in ("local", "fedavg"):
        per_client = summary[method]["test_ppl"]
        assert len(per_client) == 12  # 4 groups x 3 clients
        np.testing.assert_allclose(summary[method]["test_mean_ppl"], np.mean(per_client))
        # the summary is the last logged round
        last = [r for r in records if r["method"] == method][-1]
        np.testing.assert_allclose(per_client, last["test_ppl"])
    assert "| local |" in (out / "results.md").read_text()
    assert (out / "ppl.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_report_holds_the_table_and_the_figures(demo_run, fmt, capsys):
    assert main(["report", str(demo_run), "--format", fmt]) == 0
    text = (demo_run / f"report.{fmt}").read_text()
    summary = json.loads((demo_run / "summary.json").read_text())
    for method in ("local", "fedavg"):
        assert f"{summary[method]['test_mean_ppl']:.3f}" in text
    assert "g3c11" in text  # per-client rows
    assert "tiny random gpt2 base (d_model 32, 1 layers" in text  # not "model gpt2"
    assert "Row i holds the weights client i gives each client j" in text  # trust.png's caption
    assert ("data:image/png;base64," if fmt == "html" else "](ppl.png)") in text


def test_report_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_report_of_a_grid_points_to_its_runs(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "cell" / "seed0").mkdir(parents=True)
    (tmp_path / "cell" / "seed0" / "metrics.jsonl").write_text("")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a grid" in err and str(tmp_path / "cell" / "seed0") in err


def test_run_reads_yaml_with_overrides(tmp_path):
    cfg = config_lib.load(
        ROOT / "experiments/configs/quickstart.yaml", ["rounds=1", "methods=[fedavg]", *TINY]
    )
    assert cfg.rounds == 1 and cfg.methods == ("fedavg",) and cfg.training.steps == 2
    assert cfg.lora.targets == ("c_attn.q", "c_attn.v", "mlp.c_fc")
    argv = [
        "run",
        str(ROOT / "experiments/configs/quickstart.yaml"),
        "--out",
        str(tmp_path),
        "--no-progress",
        "--set",
        "rounds=1",
        "methods=[fedavg]",
        *TINY,
    ]
    assert main(argv) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["fedavg"]["rounds"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["methods=[fedsgd]"], "unknown method 'fedsgd'"),
        (["strategy.kind=pmap"], "strategy.kind"),
        (["training.seq_len=64"], "longer than the model's context"),
        (["training.stepz=1"], "unknown config field"),
        (
            ["strategy.kind=sharded", "data.num_groups=3", "data.clients_per_group=1"],
            "divisible by 4",
        ),
        (["data.tokens_per_client=10"], "too short for one window"),
    ],
)
def test_bad_configs_fail_before_compute_with_a_clear_message(tmp_path, capsys, overrides, message):
    argv = ["demo", "--out", str(tmp_path), "--no-progress", "--set", *TINY, *overrides]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_vocabulary_mismatch_is_reported():
    from fedjax_lora.algorithms import Problem
    from fedjax_lora.data import stack_streams
    from fedjax_lora.engine import LocalTraining, OptimizerConfig
    from tests.tiny import VOCAB, tiny_model

    train = stack_streams([np.arange(100) % (VOCAB + 5)])
    with pytest.raises(ValueError, match="vocabulary"):
        Problem.create(
            tiny_model(), train, {}, training=LocalTraining(1, 2, 8), optimizer=OptimizerConfig()
        )


def test_missing_config_file_is_reported(capsys):
    assert main(["run", "no/such/config.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_readme_python_example_runs():
    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    code = code.replace("range(3)", "range(1)").replace("steps=5", "steps=1")
    exec(compile(code, "README.md", "exec"), {})


def test_shared_evaluation_set_is_reported_for_every_client(tmp_path):
    argv = [
        "demo",
        "--rounds",
        "1",
        "--methods",
        "fedavg",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--set",
        *TINY,
        "data.shared_eval_tokens=400",
    ]
    assert main(argv) == 0
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    shared = record["shared_uniform_ppl"]
    assert len(shared) == 12
    # FedAvg gives every client the same adapters, so on shared data they score the same
    np.testing.assert_allclose(shared, shared[0], rtol=1e-5)
    assert np.ptp(record["val_ppl"]) > 0  # while their own validation data differ


def test_fedamole_runs_through_the_cli_with_its_declared_aux_split(tmp_path, capsys):
    argv = [
        "demo",
        "--rounds",
        "1",
        "--methods",
        "fedamole",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--set",
        *TINY,
    ]
    assert main(argv) == 0  # RSEA's auxiliary split is the method's declared default
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["method"] == "fedamole" and len(record["fedamole/experts_held"]) == 12
    assert not any(key.startswith("aux_") for key in record)  # side data are not evaluated
    assert main([*argv, "data.aux_fraction=0", "--out", str(tmp_path / "none")]) == 2
    assert "data.aux_fraction" in capsys.readouterr().err


def test_problem_rejects_a_stream_shorter_than_one_window():
    from fedjax_lora.algorithms import Problem
    from fedjax_lora.data import stack_streams
    from fedjax_lora.engine import LocalTraining, OptimizerConfig
    from tests.tiny import tiny_model

    train = stack_streams([np.arange(40), np.arange(5)])
    with pytest.raises(ValueError, match=r"client 1: train stream has 5 tokens, too short"):
        Problem.create(
            tiny_model(), train, {}, training=LocalTraining(1, 2, 8), optimizer=OptimizerConfig()
        )
