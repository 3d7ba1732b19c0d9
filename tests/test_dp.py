"""Client-level DP: clipping against a NumPy loop, the noise's standard deviation z·C/n measured
over many draws, adaptive clipping (Andrew et al. 2021), and the accountant against
`dp_accounting` called directly."""

from __future__ import annotations

import dp_accounting
import jax
import numpy as np
import optax
import pytest
from dp_accounting import rdp

from fedjax_lora import aggregation as agg
from fedjax_lora.aggregation import privacy
from fedjax_lora.aggregation.dp import update_noise_multiplier
from fedjax_lora.errors import ConfigError

N = 5


def _clients(rng, scales):
    """A global tree θ and N clients θ + δ_i with update norms of about `scales[i]`."""
    theta = {"x": {"a": rng.normal(size=(4, 3)), "b": rng.normal(size=(6,))}}
    theta = jax.tree.map(lambda x: x.astype(np.float32), theta)
    clients = jax.tree.map(
        lambda x: np.stack([x + s * rng.normal(size=x.shape) / 4 for s in scales]).astype(
            np.float32
        ),
        theta,
    )
    return theta, clients


def np_update_norms(theta, clients):
    """‖θ_i − θ‖ over all leaves, client by client."""
    t, x = jax.tree.leaves(theta), [np.asarray(v, np.float64) for v in jax.tree.leaves(clients)]
    return [
        np.sqrt(sum(np.sum((v[i] - g) ** 2) for v, g in zip(x, t, strict=True))) for i in range(N)
    ]


def np_clip(theta, clients, c):
    """Per client: Δ_i over all leaves, scaled by min(1, C / ‖Δ_i‖)."""
    t, x = jax.tree.leaves(theta), [np.asarray(v, np.float64) for v in jax.tree.leaves(clients)]
    out = [v.copy() for v in x]
    for i, norm in enumerate(np_update_norms(theta, clients)):
        for k in range(len(x)):
            out[k][i] = t[k] + min(1.0, c / norm) * (x[k][i] - t[k])
    return out


def test_clipping_matches_numpy_and_never_exceeds_the_bound():
    theta, clients = _clients(np.random.default_rng(0), [0.1, 0.5, 2.0, 5.0, 20.0])
    c = 1.0
    aggregator = agg.dp_aggregator(agg.local_aggregator(), clip_norm=c, noise_multiplier=0.0)
    out, _ = jax.jit(aggregator.apply)(clients, aggregator.init(clients), {"global": theta})
    want = np_clip(theta, clients, c)
    for g, w in zip(jax.tree.leaves(out), want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    norms = np_update_norms(theta, out)
    assert np.all(np.array(norms) <= c * (1 + 1e-5)), norms


def test_dp_fedavg_mean_of_clipped_updates_under_a_server_optimizer():
    """`server_optimizer(dp(fedavg), sgd(1))` without noise: θ + mean_i clip(Δ_i), clipped
    relative to the server's global tree (passed as `inputs["global"]`)."""
    theta, clients = _clients(np.random.default_rng(1), [0.1, 3.0, 0.2, 4.0, 1.0])
    inner = agg.dp_aggregator(clip_norm=0.5, noise_multiplier=0.0)
    aggregator = agg.server_optimizer(inner, optax.sgd(1.0))
    stacked = jax.tree.map(lambda x: np.broadcast_to(x, (N,) + x.shape), theta)
    state = aggregator.init(stacked)
    out, _ = jax.jit(aggregator.apply)(clients, state)
    want = [np.mean(v, axis=0) for v in np_clip(theta, clients, 0.5)]
    for g, w in zip(jax.tree.leaves(out), want, strict=True):
        np.testing.assert_allclose(g, np.broadcast_to(w, g.shape), rtol=1e-5, atol=1e-6)


def test_dp_keeps_local_leaves():
    """FedSA-LoRA's `b` is local: neither clipped, averaged nor noised."""
    theta, clients = _clients(np.random.default_rng(4), [0.1, 3.0, 0.2, 4.0, 1.0])
    aggregator = agg.dp_aggregator(clip_norm=0.5, noise_multiplier=1.0, policy="fedsa")
    out, _ = jax.jit(aggregator.apply)(clients, aggregator.init(clients), {"global": theta})
    np.testing.assert_array_equal(out["x"]["b"], clients["x"]["b"])
    np.testing.assert_array_equal(out["x"]["a"], np.broadcast_to(out["x"]["a"][0], (N, 4, 3)))


def test_noise_std_is_z_c_over_n_and_shared_by_clients():
    z, c = 1.5, 0.4
    theta = {"w": np.zeros((100, 100), np.float32)}
    clients = {"w": np.zeros((N, 100, 100), np.float32)}  # zero updates: the output is the noise
    aggregator = agg.dp_aggregator(clip_norm=c, noise_multiplier=z, seed=3)
    apply = jax.jit(aggregator.apply)
    state, draws = aggregator.init(clients), []
    for _ in range(20):
        out, state = apply(clients, state, {"global": theta})
        np.testing.assert_array_equal(out["w"], np.broadcast_to(out["w"][0], out["w"].shape))
        draws.append(np.asarray(out["w"][0], np.float64))
    draws = np.stack(draws)  # 200,000 draws
    assert abs(draws.mean()) < 4 * z * c / N / np.sqrt(draws.size)
    np.testing.assert_allclose(draws.std(), z * c / N, rtol=0.01)
    assert not np.allclose(draws[0], draws[1])  # the key advances


def test_adaptive_clipping_follows_the_geometric_update():
    """Andrew et al. 2021: C ← C exp(−η (b̄ − γ)), b̄ the fraction of unclipped clients (count
    noise made negligible here; z = 0)."""
    rng = np.random.default_rng(2)
    theta, clients = _clients(rng, [0.2, 0.5, 1.0, 2.0, 4.0])
    gamma, eta, c = 0.5, 0.2, 0.1
    aggregator = agg.dp_aggregator(
        agg.local_aggregator(),
        clip_norm=c,
        noise_multiplier=0.0,
        adaptive_quantile=gamma,
        clip_lr=eta,
        count_noise_std=1e-9,
    )
    apply = jax.jit(aggregator.apply)
    state = aggregator.init(clients)
    norms = np_update_norms(theta, clients)
    for _ in range(6):
        _, state = apply(clients, state, {"global": theta})
        c = c * np.exp(-eta * (np.mean([n <= c for n in norms]) - gamma))
        np.testing.assert_allclose(state.clip_norm, c, rtol=1e-5)


def test_update_noise_multiplier_splits_the_budget():
    np.testing.assert_allclose(update_noise_multiplier(1.0, 5.0), (1 - 1 / 100) ** -0.5)
    assert update_noise_multiplier(1.3, None) == 1.3
    with pytest.raises(ValueError, match="count_noise_std"):
        update_noise_multiplier(1.0, 0.25)  # n = 5 clients: the paper's n/20 is too small


@pytest.mark.parametrize(
    ("cohort", "sampling"), [(None, "poisson"), (10, "poisson"), (10, "fixed")]
)
def test_epsilon_equals_dp_accounting(cohort, sampling):
    z, n, rounds, delta = 1.1, 100, 50, 1e-5
    gaussian = dp_accounting.GaussianDpEvent(z)
    if cohort is None:
        accountant, event = rdp.RdpAccountant(), gaussian
    elif sampling == "poisson":
        accountant = rdp.RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(cohort / n, gaussian)
    else:
        accountant = rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
        )
        event = dp_accounting.SampledWithoutReplacementDpEvent(n, cohort, gaussian)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    want = accountant.get_epsilon(delta)
    assert privacy.epsilon(z, n, cohort, rounds, delta, sampling) == pytest.approx(want, rel=1e-9)
    assert privacy.epsilon(z, n, cohort, rounds // 2, delta, sampling) < want


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"delta": 0.01}, "delta"),
        ({"delta": 0.0}, "delta"),
        ({"cohort_size": 200}, "cohort_size"),
        ({"rounds": 0}, "rounds"),
        ({"sampling": "shuffle"}, "sampling"),
    ],
)
def test_accountant_refuses_what_it_cannot_certify(kwargs, field):
    args = {
        "noise_multiplier": 1.0,
        "num_clients": 100,
        "cohort_size": 10,
        "rounds": 5,
        "delta": 1e-5,
        **kwargs,
    }
    with pytest.raises(ConfigError, match=f"dp: {field}"):
        privacy.epsilon(**args)
