"""Robust reductions beyond the battery: resistance to outliers, scipy's trimmed mean, the
preconditions, and composition with a mask policy."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import stats

from fedjax_lora import aggregation as agg

N = 7


def _with_outliers(rng, bad=2):
    """N clients near 1.0 and `bad` of them replaced by huge values (Byzantine)."""
    x = 1.0 + 0.01 * rng.normal(size=(N, 4, 3))
    x[:bad] = 1e3 * rng.normal(size=(bad, 4, 3))
    return {"w": x.astype(np.float32)}


@pytest.mark.parametrize(
    "aggregator",
    [
        agg.median_aggregator(),
        agg.trimmed_mean_aggregator(0.3),
        agg.krum_aggregator(f=2),
        agg.krum_aggregator(f=2, m=3),
    ],
    ids=["median", "trimmed", "krum", "multi_krum"],
)
def test_robust_rules_ignore_byzantine_clients(aggregator):
    tree = _with_outliers(np.random.default_rng(0))
    out, _ = jax.jit(aggregator.apply)(tree, aggregator.init(tree))
    np.testing.assert_allclose(out["w"], 1.0, atol=0.05)
    assert np.abs(agg.fedavg(tree)["w"] - 1.0).max() > 10  # the mean does not


def test_trimmed_mean_equals_scipy():
    x = np.random.default_rng(1).normal(size=(N, 5)).astype(np.float32)
    for beta in (0.0, 0.15, 0.3, 0.45):
        aggregator = agg.trimmed_mean_aggregator(beta)
        out, _ = aggregator.apply({"w": x}, aggregator.init({"w": x}))
        np.testing.assert_allclose(out["w"][0], stats.trim_mean(x, beta, axis=0), rtol=1e-5)


def test_krum_selects_the_nearest_cluster_and_reports_it():
    tree = _with_outliers(np.random.default_rng(2))
    aggregator = agg.krum_aggregator(f=2, m=None)  # multi-Krum over N - f = 5 clients
    _, state = aggregator.apply(tree, aggregator.init(tree))
    assert np.all(state.matrix[:, :2] == 0)  # the two outliers are never selected
    np.testing.assert_allclose(state.matrix.sum(axis=1), 1.0)


def test_preconditions_are_named():
    with pytest.raises(ValueError, match="beta"):
        agg.trimmed_mean_aggregator(0.5)
    with pytest.raises(ValueError, match=r"N > 2f \+ 2"):
        agg.krum_scores({"w": np.zeros((4, 2))}, f=1)
    with pytest.raises(ValueError, match="mask policy"):
        agg.median_aggregator("nope")


def test_median_keeps_local_leaves():
    rng = np.random.default_rng(3)
    tree = {"lora": {k: rng.normal(size=(N, 2, 2)).astype(np.float32) for k in "ab"}}
    aggregator = agg.median_aggregator("fedsa")
    out, _ = aggregator.apply(tree, aggregator.init(tree))
    np.testing.assert_array_equal(out["lora"]["b"], tree["lora"]["b"])
    np.testing.assert_allclose(out["lora"]["a"][3], np.median(tree["lora"]["a"], axis=0), rtol=1e-6)


@pytest.mark.parametrize("beta", [None, 0.0, 0.2, 0.3])
def test_median_and_trimmed_mean_over_the_holders(beta):
    """`inputs["present"]`: each coordinate reduced over the clients holding it (`np.median`,
    `scipy.stats.trim_mean` of those values, a loop), 0 where nobody holds it; a mask of all
    clients gives the plain rule."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N, 4, 3)).astype(np.float32)
    present = rng.uniform(size=(N, 4, 1)) < 0.6
    present[:, 0] = False  # nobody holds row 0
    present[:, 1] = True
    aggregator = agg.median_aggregator() if beta is None else agg.trimmed_mean_aggregator(beta)
    reduce = np.median if beta is None else lambda v: stats.trim_mean(v, beta)
    out, _ = jax.jit(aggregator.apply)({"w": x}, (), {"present": {"w": present}})
    want = np.zeros((4, 3))
    for j, k in np.ndindex(4, 3):
        held = x[present[:, j, 0], j, k]
        want[j, k] = reduce(held.astype(np.float64)) if held.size else 0.0
    np.testing.assert_allclose(out["w"], np.broadcast_to(want, x.shape), rtol=1e-5, atol=1e-6)
    everyone, _ = jax.jit(aggregator.apply)(
        {"w": x}, (), {"present": {"w": np.ones((N, 1, 1), bool)}}
    )
    plain, _ = jax.jit(aggregator.apply)({"w": x}, ())
    np.testing.assert_allclose(everyone["w"], plain["w"], rtol=1e-6, atol=1e-7)
