"""`experiments/fedamole/evidence.py`: the expert-sharing statistics against a loop reference, and
the `--quick` run end to end."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "fedamole" / "evidence.py"


@pytest.fixture(scope="module")
def evidence():
    spec = importlib.util.spec_from_file_location("fedamole_evidence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loop_sharing(X: np.ndarray, groups: list[int]) -> tuple[float, float]:
    """Mean shared experts of same- and different-group client pairs, by explicit loops."""
    same, different = [], []
    for i in range(X.shape[1]):
        for j in range(i + 1, X.shape[1]):
            shared = sum(int(X[e, i]) * int(X[e, j]) for e in range(X.shape[0]))
            (same if groups[i] == groups[j] else different).append(shared)
    mean = lambda v: sum(v) / len(v) if v else math.nan
    return mean(same), mean(different)


def test_pair_sharing_matches_loop(evidence):
    X = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1],
            [0, 0, 1, 1, 0],
            [0, 1, 1, 0, 0],
            [1, 0, 0, 1, 1],
            [0, 0, 1, 0, 1],
        ]
    )
    for groups in ([0, 0, 1, 1, 2], [0, 1, 0, 1, 1], [2, 2, 2, 0, 1]):
        assert evidence.pair_sharing(X, np.array(groups)) == pytest.approx(loop_sharing(X, groups))
    rng = np.random.default_rng(0)
    for _ in range(20):
        X = rng.integers(0, 2, size=(7, 6))
        groups = rng.integers(0, 3, size=6).tolist()
        got = evidence.pair_sharing(X, np.array(groups))
        assert got == pytest.approx(loop_sharing(X, groups), nan_ok=True)
    # No same-group pair: NaN.
    assert math.isnan(evidence.pair_sharing(X[:, :3], np.array([0, 1, 2]))[0])


def test_chance_sharing_is_group_blind(evidence):
    """Random assignments do not see the groups: same- and different-group pairs share the same
    number of experts on average, `E·k(k-1) / (C(C-1))` in total over pairs."""
    groups = np.array([0, 0, 1, 1, 2, 2])
    options = {"clients_per_expert": 2, "min_experts": 2, "max_experts": 4}
    null = evidence.chance_sharing(8, groups, options, draws=300)
    assert null.shape == (300, 2)
    overall = (null[:, 0] * 3 + null[:, 1] * 12) / 15  # 3 same-group pairs of 15
    assert overall == pytest.approx(8 * 2 * 1 / (6 * 5))  # every expert gives exactly one pair
    assert null[:, 0].mean() == pytest.approx(null[:, 1].mean(), abs=0.08)


def test_task_rows_follow_their_task(evidence):
    rows = evidence.task_rows(evidence.TASKS, 3, words=3, seed=0)
    assert len(rows) == 3 * len(evidence.TASKS)
    for row in rows:
        words = row["instruction"].split(": ")[1].split()
        assert row["response"] == evidence.TASKS[row["category"]][1](words)
    by_task = {r["category"]: r["response"] for r in rows[:4]}
    assert by_task["reverse"].split() == rows[1]["instruction"].split(": ")[1].split()[::-1]


def test_quick_run_writes_the_evidence(evidence, tmp_path):
    out = tmp_path / "evidence"
    assert evidence.main(["--quick", "--out", str(out), "--draws", "5"]) == 0
    result = json.loads((out / "evidence.json").read_text())
    assert len(result["groups"]) == 4 and set(result["runs"]) == {"0"}
    run = result["runs"]["0"]
    assert set(run["scores"]) == {"fedamole", "fedit-ft"} and set(run["sharing"]) == {"fedamole"}
    sharing = run["sharing"]["fedamole"]
    assert 0.0 < sharing["p_value"] <= 1.0 and sharing["chance_different"] >= 0.0
    for scores in run["scores"].values():
        assert 0.0 <= scores["rouge_l"] <= 100.0 and scores["test_ppl"] > 1.0
    assert "fedit-ft" in (out / "evidence.md").read_text()
    assert (out / "base" / "model.safetensors").is_file()
