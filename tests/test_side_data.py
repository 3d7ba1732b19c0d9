"""Side data owned by methods (`SideData`, declared with `register(..., side=...)`) and every
method's metrics in `metrics.jsonl`: `fedjax-lora demo --methods <every registered method>
--rounds 2` runs with no other flag (the demo's model and data made tiny, nothing
method-specific), FDLoRA's fusion weights and FedAMoLE's `experts_held` reach the records
namespaced by the method, and a method that declares side data gets it without a flag."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedjax_lora import config as config_lib
from fedjax_lora.algorithms import METHODS, MethodSpec, NoOptions, SideData, local
from fedjax_lora.cli import main
from fedjax_lora.errors import ConfigError
from fedjax_lora.experiment import SOURCES, build_problem

# Sizing only (the vocabulary stays the demo's, so pcl-pred's top-100 fits; the validation
# stream fits eval.max_windows, as CoMiGS's random router batches need).
TINY = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.max_positions=64",
    "training.steps=2",
    "training.batch_size=4",
    "training.seq_len=32",
]
CLIENTS = 12  # the demo's 4 groups of 3


@pytest.fixture(scope="module")
def every_method(tmp_path_factory):
    out = tmp_path_factory.mktemp("every_method")
    argv = ["demo", "--rounds", "2", "--methods", *sorted(METHODS), "--out", str(out)]
    assert main([*argv, "--no-progress", "--set", *TINY]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {(r["method"], r["round"]): r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_demo_runs_every_registered_method_without_flags(every_method):
    assert sorted(every_method) == [(m, r) for m in sorted(METHODS) for r in (0, 1, 2)]
    for record in every_method.values():
        assert np.all(np.isfinite(record["val_loss"]))
        assert not any(key.startswith("aux_") for key in record)  # side data are not evaluated


@pytest.mark.slow
def test_method_metrics_reach_metrics_jsonl_namespaced(every_method):
    # FDLoRA fuses from round 2 on (local_rounds = 1): every client's weights are the candidate
    # of lowest score, all within the bound.
    fd = every_method["fdlora", 2]
    w = np.asarray(fd["fdlora/fusion_weights"])
    cands = np.asarray(fd["fdlora/fusion_candidates"])
    scores = np.asarray(fd["fdlora/fusion_scores"])
    assert w.shape == (CLIENTS, 2) and cands.shape == (CLIENTS, 5, 2)
    np.testing.assert_array_equal(w, cands[np.arange(CLIENTS), scores.argmin(1)])
    assert np.all(np.abs(cands) <= 1.5) and np.any(cands != 0)
    # FedAMoLE: every expert of every module is held by 2 clients, so a client holds 30 · 2 / 12
    # experts on average; every client holds 2 … 8.
    for r in (1, 2):
        held = np.asarray(every_method["fedamole", r]["fedamole/experts_held"])
        assert held.shape == (CLIENTS,) and np.all((held >= 2) & (held <= 8))
        np.testing.assert_allclose(held.mean(), 30 * 2 / CLIENTS)
    final = every_method["fedamole", 2]["experts"]
    for x in final.values():
        np.testing.assert_array_equal(np.asarray(x).sum(1), 2)
    assert "routing" in every_method["comigs", 2] and "experts" not in every_method["comigs", 2]
    ce = np.asarray(every_method["comigs", 1]["comigs/train_ce"])
    assert ce.shape == (CLIENTS, 2) and np.all(ce > 0)


_NEEDS_ALL = MethodSpec(
    "needs-all",
    lambda problem, options: local(problem),
    NoOptions(),
    "local training that declares every kind of side data",
    SideData(aux=0.05, reference=True, mixtures=True),
)


SMALL = [
    "data.num_groups=2",
    "data.clients_per_group=2",
    "data.tokens_per_client=1000",
    "model.d_model=16",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.d_ff=32",
    "model.max_positions=64",
    "training.seq_len=16",
    "eval.max_windows=4",
]


def test_declared_side_data_reaches_the_problem_without_flags(monkeypatch):
    monkeypatch.setitem(METHODS, "needs-all", _NEEDS_ALL)
    plain, data = build_problem(config_lib.load(None, [*SMALL, "methods=[local]"]))
    problem, _ = build_problem(config_lib.load(None, [*SMALL, "methods=[local,needs-all]"]))
    assert plain.side == {}  # nothing a selected method does not read
    assert sorted(problem.side) == ["aux", "mixtures", "reference"]
    np.testing.assert_array_equal(problem.side["reference"], data.reference)
    np.testing.assert_allclose(problem.side["mixtures"], data.mixtures)
    # The declared 5 % of every client's training stream is held out of every method's
    # training (at least one token), and the auxiliary windows start where training stops.
    full = np.asarray(plain.train.lengths)
    kept = np.asarray(problem.train.lengths)
    np.testing.assert_array_equal(kept, full - np.maximum(np.round(full * 0.05), 1))
    tokens, aux = np.asarray(plain.train.tokens), np.asarray(problem.side["aux"].windows)
    for i, cut in enumerate(kept):
        np.testing.assert_array_equal(aux[i, 0], tokens[i, cut : cut + 17])
    # An explicit data.aux_fraction wins over the declared default.
    explicit, _ = build_problem(
        config_lib.load(None, [*SMALL, "methods=[needs-all]", "data.aux_fraction=0.2"])
    )
    np.testing.assert_array_equal(explicit.train.lengths, full - np.round(full * 0.2))


def test_side_data_a_source_does_not_provide_is_refused_before_anything_is_built(
    monkeypatch, tmp_path
):
    # dolly provides neither a reference set nor mixtures (`SourceSpec.provides`): the refusal
    # comes before its file (absent here) is read or a model is built.
    monkeypatch.setitem(METHODS, "needs-all", _NEEDS_ALL)
    missing = tmp_path / "absent.jsonl"
    config = config_lib.load(
        None, [*SMALL, "methods=[needs-all]", "data.source=dolly", f"data.paths=[{missing}]"]
    )
    with pytest.raises(ConfigError) as refused:
        build_problem(config)
    message = str(refused.value)
    assert "\n" not in message and "['needs-all'] need the data's reference" in message
    assert "data.source='dolly' does not provide" in message
    providers = [name for name, spec in SOURCES.items() if "reference" in spec.provides]
    assert providers and f"({', '.join(providers)})" in message
    # A source that declares it but builds none (no reference windows asked for) still says so.
    empty = config_lib.load(None, [*SMALL, "methods=[needs-all]", "data.reference_sequences=0"])
    with pytest.raises(ValueError, match="need the data's reference.*reference_sequences > 0"):
        build_problem(empty)
