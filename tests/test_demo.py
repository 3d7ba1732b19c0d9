"""The default `fedjax-lora demo` shows what the project is for: on the synthetic client groups,
the papers' personalised methods (trust-weighted `pcl-val`, `comigs`) beat both `local` and
`fedavg` on mean validation perplexity, and the trust matrix recovers the groups. The demo runs
once (the module's fixture), exactly as a user runs it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedjax_lora.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, summary, records


def test_personalised_methods_beat_local_and_fedavg(demo):
    _, summary, _ = demo
    assert {"local", "fedavg", "pcl-val", "comigs"} <= set(summary)
    baseline = min(summary["local"]["val_mean_ppl"], summary["fedavg"]["val_mean_ppl"])
    for method in ("pcl-val", "comigs"):
        assert summary[method]["val_mean_ppl"] < baseline, (method, summary[method])


def test_trust_matrix_recovers_the_groups(demo):
    """Every client puts (almost) all its trust on clients of its own group: the groups of the
    synthetic corpus (4 groups of 3 clients, client i in group i // 3)."""
    out, summary, records = demo
    groups = np.arange(12) // 3
    assert len(groups) == len(summary["pcl-val"]["client_names"])
    trust = np.asarray(
        [r["trust"] for r in records if r["method"] == "pcl-val" and "trust" in r][-1]
    )
    same = groups[:, None] == groups[None, :]
    np.testing.assert_allclose(trust.sum(1), 1.0, rtol=1e-5)
    assert (np.where(same, trust, 0.0).sum(1) > 0.9).all()
    assert (out / "trust.png").is_file() and (out / "ppl.png").is_file()
