"""The engine benchmark runs end to end on a tiny config and writes the documented JSON schema
and figure: contenders, scaling with N, round breakdown (no timing assertions: numbers on a
shared CI machine mean nothing)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "benchmarks" / "engine.py"
CONTENDERS = {"vmap", "map", "chunked", "python_loop", "python_loop_scan", "big_batch"}


def test_engine_benchmark_quick_writes_the_schema(tmp_path):
    out = tmp_path / "engine.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "steps/s" in proc.stdout  # the readable table

    doc = json.loads(out.read_text())
    assert {"machine", "config", "results"} <= set(doc)
    machine = doc["machine"]
    for key in ("cpu", "cores", "jax_version", "devices"):
        assert key in machine
    assert isinstance(machine["cores"], int) and machine["cores"] >= 1

    config = doc["config"]
    for key in ("vocab_size", "d_model", "n_layers", "seq_len", "batch_size", "rank", "steps"):
        assert isinstance(config[key], int) and config[key] >= 1
    assert config["quick"] is True

    results = doc["results"]
    assert {r["strategy"] for r in results} == CONTENDERS
    for row in results:
        assert row["num_clients"] in config["num_clients"]
        for key in ("client_steps_per_s", "peak_rss_gb", "compile_s"):
            value = row[key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, row)
        assert math.isfinite(row["final_loss"])
        assert row["client_steps_per_call"] == row["num_clients"] * config["steps"]
        assert row["model_tflops_per_s"] > 0 and row["mfu"] is None  # no --peak-tflops given
    for summary in doc["summary"].values():
        assert summary["best_strategy"] in {"vmap", "map", "chunked", "sharded"}

    # scaling with N (chunked), one round's breakdown, and the figure
    assert {r["num_clients"] for r in doc["scaling"]} == set(config["scaling_clients"])
    for row in doc["scaling"]:
        assert row["strategy"] == "chunked"
        assert row["client_steps_per_s"] > 0 and row["peak_rss_gb"] > 0
    (breakdown,) = doc["breakdown"]
    pieces = {"local_steps", "aggregation_fedavg", "aggregation_trust", "evaluation"}
    assert set(breakdown["seconds"]) == pieces | {"cross_evaluation"}
    assert all(math.isfinite(v) and v > 0 for v in breakdown["seconds"].values())
    # Timings are compared in the benchmark's own report, never here (they flake on a busy host).
    for key in ("trust_round_s", "fedavg_round_s"):
        assert math.isfinite(breakdown[key]) and breakdown[key] > 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_model_flops_per_token_of_gpt2_124m():
    """The MFU numerator on the GPU preset (GPT-2 124M, T=256), by hand: matmul parameters
    P = 12·(4·768² + 2·768·3072) + 768·50257 = 123,532,032; 4·P + 12·12·256·768."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("engine_benchmark", SCRIPT)
    engine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine)
    assert engine.model_flops_per_token(engine.GPU) == 4 * 123_532_032 + 12 * 12 * 256 * 768


GPU_SCRIPT = REPO / "experiments" / "benchmarks" / "gpu.py"


def test_gpu_benchmark_smoke_runs_every_section(tmp_path):
    """The accelerator script's dry run: every section on the tiny model, the JSON schema, the
    goals with their targets, the Markdown table and the figure (no timing comparison)."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(GPU_SCRIPT),
            "--smoke",
            "--json",
            str(out),
            "--trace-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["device"]["device_kind"] and doc["config"]["preset"] == "smoke"
    sections = doc["sections"]
    assert set(sections) == {"contenders", "scaling", "methods", "reference"}
    for name, section in sections.items():
        assert section["status"] == "complete", (name, section["error"])
        assert section["rows_finished"] == len(section["rows"]) > 0

    rows = sections["contenders"]["rows"]
    assert {r["strategy"] for r in rows} == {"chunked", "vmap", "big_batch", "python_loop"}
    for row in rows + sections["scaling"]["rows"]:
        assert "error" not in row, row
        for key in ("client_steps_per_s", "tokens_per_s", "model_tflops_per_s", "compile_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert math.isfinite(row["final_loss"])
        assert {"argument", "temp", "output"} <= set(row["xla_memory_gb"])
    assert (tmp_path / rows[0]["trace"]).stat().st_size > 0  # the first contender's profile
    assert rows[0]["trace_top"] and all(t["ms"] >= 0 for t in rows[0]["trace_top"])
    scaling_n = [r["num_clients"] for r in sections["scaling"]["rows"]]
    assert scaling_n == doc["config"]["scaling_clients"]

    methods = {r["method"]: r for r in sections["methods"]["rows"]}
    assert set(methods) == {"fedavg", "pcl-val", "comigs", "fedamole", "hetlora", "flexlora"}
    for row in methods.values():
        assert "error" not in row, row
        assert math.isfinite(row["round_s"]) and row["round_s"] > 0
    (reference,) = sections["reference"]["rows"]
    assert reference["skipped"].startswith("not carried")  # no reference code in the checkout

    goals = {g["goal"]: g for g in doc["goals"]}
    assert len(goals) == 12
    for goal in goals.values():
        assert goal["met"] in (True, False, None) and goal["target"] > 0
        if goal["met"] is not None:
            assert math.isfinite(goal["measured"])
    assert goals["MFU (N=4)"]["met"] is None  # no peak for a CPU
    assert goals["8 clients fit (1 = ran)"]["met"] is True
    assert "more_work_by_definition" in goals["pcl-val round ÷ fedavg round"]
    assert "| goal | target | measured | met |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
