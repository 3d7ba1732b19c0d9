"""The code in docs/adding_a_method.md runs and does what it says; docs/api.md is current."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from fedjax_lora import config as config_lib
from fedjax_lora.algorithms import METHODS, NoOptions
from fedjax_lora.experiment import method_factory
from tests.tiny import tiny_problem

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adding_a_method.md"


@pytest.fixture
def walkthrough():
    """Every `python` block of docs/adding_a_method.md executed in order in one namespace (`py`
    blocks are fragments of other files); the methods it registers are removed afterwards."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 4
    namespace: dict = {}
    try:
        for block in blocks:
            exec(block, namespace)
        yield namespace
    finally:
        METHODS.pop("ring", None)
        METHODS.pop("clipped-fedavg", None)


def test_the_ring_rule_is_one_function_and_one_registry_line(walkthrough):
    n = 5
    tree = {"a": np.random.default_rng(0).normal(size=(n, 3, 2)).astype(np.float32)}
    aggregator = walkthrough["ring_average"]()
    mixed, state = aggregator.apply(tree, aggregator.init(tree))
    expected = np.zeros((n, n))
    for i in range(n):
        for j in (i - 1, i, i + 1):
            expected[i, j % n] = 1 / 3
    np.testing.assert_allclose(state.matrix, expected, atol=1e-6)
    np.testing.assert_allclose(
        mixed["a"], np.einsum("ij,j...->i...", expected, tree["a"]), atol=1e-5
    )
    with pytest.raises(AssertionError, match="permutation equivariance"):
        walkthrough["check_aggregator"](walkthrough["ring_average"], walkthrough["np_ring"])
    spec = METHODS["ring"]
    assert spec.options == NoOptions() and spec.doc.startswith("Decentralised averaging")
    problem = tiny_problem(num_clients=3)
    algo = spec(problem)
    sim, metrics = algo.round(algo.init(jax.random.key(0)))
    assert algo.name == "ring" and np.all(np.isfinite(metrics["val"]["loss"]))
    np.testing.assert_allclose(metrics["aggregation"]["matrix"], np.full((3, 3), 1 / 3), atol=1e-6)


def test_the_clipped_method_is_one_file_and_clips_every_update(walkthrough):
    """Against a NumPy reference: the same local training without aggregation gives `θ_i'`; the
    round's result is the mean over clients of `θ + Δ_i · min(1, C/‖Δ_i‖)`."""
    from fedjax_lora.aggregation import local_aggregator
    from fedjax_lora.algorithms import federated

    problem = tiny_problem(num_clients=3, lr=5e-2)
    key = jax.random.key(1)
    plain = federated("plain", problem, local_aggregator(), shared_init=True)
    start = plain.init(key)
    trained, _ = plain.round(start)
    theta = [np.asarray(x, np.float64) for x in jax.tree.leaves(start.clients.params)]
    theta1 = [np.asarray(x, np.float64) for x in jax.tree.leaves(trained.clients.params)]
    norms = np.sqrt(
        sum(((b - a) ** 2).reshape(3, -1).sum(1) for a, b in zip(theta, theta1, strict=True))
    )
    clip = float(np.median(norms))  # clips some clients, not all
    config = config_lib.load(None, [f"method_options.clipped-fedavg.clip_norm={clip}"])
    algo = method_factory("clipped-fedavg", config)(problem)
    assert algo.name == "clipped-fedavg"
    sim, metrics = algo.round(algo.init(key))
    np.testing.assert_allclose(metrics["train"]["update_norm"], norms, rtol=1e-4)
    factor = np.minimum(1.0, clip / norms)
    for a, b, got in zip(theta, theta1, jax.tree.leaves(sim.clients.params), strict=True):
        want = (a + (b - a) * factor.reshape((-1,) + (1,) * (a.ndim - 1))).mean(0)
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-4, atol=1e-6)
    bad = config_lib.load(None, ["method_options.clipped-fedavg.clip=1"])
    with pytest.raises(
        ValueError, match=r"has no option\(s\) \['clip'\]; valid options: \['clip_norm'\]"
    ):
        method_factory("clipped-fedavg", bad)


def test_api_reference_is_current():
    """docs/api.md is what scripts/make_api_docs.py renders from the code (regenerate it with
    `python scripts/make_api_docs.py` after changing an aggregator or a method)."""
    spec = importlib.util.spec_from_file_location(
        "make_api_docs", ROOT / "scripts/make_api_docs.py"
    )
    make_api_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_api_docs)
    text = make_api_docs.render()
    assert (ROOT / "docs" / "api.md").read_text() == text, (
        "docs/api.md is stale: run `python scripts/make_api_docs.py` and commit the result"
    )
    # every registered method and every registered aggregator's factory is documented
    for name in METHODS:
        assert f"### `{name}`" in text
    assert "#### `check_aggregator`" in text and "#### `trust_aggregator`" in text
