"""The global rule (`aggregation.reduction`, `aggregation.dp`) and `server_opt` on methods whose
server is its own but has a global part: FedAMoLE's shared expert and `W_tok`, FDLoRA's global
LoRA; HetLoRA's and FlexLoRA's rule in a run (their servers' NumPy references:
`tests/test_ranked_rules.py`). References: NumPy loops (median, clipping, holder averages), the
noise drawn from the documented key, an optax step computed outside the round."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_lora import amole
from fedjax_lora import config as config_lib
from fedjax_lora.aggregation.masks import path_names
from fedjax_lora.algorithms.base import DP_KEY_STREAM, RoundInputs
from fedjax_lora.checkpoint import Checkpointer
from fedjax_lora.errors import ConfigError
from fedjax_lora.experiment import build_problem, method_factory
from fedjax_lora.settings import DPOptions, GlobalRule
from tests.test_global_rule import OVERRIDES
from tests.test_methods import AMOLE

N = 4


@pytest.fixture(scope="module")
def setup():
    amole_options = [f"method_options.fedamole.{o}" for o in AMOLE]
    config = config_lib.load(None, [*OVERRIDES, *amole_options, "methods=[fedamole, fdlora]"])
    problem, _ = build_problem(config)
    return config, problem


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(tree))]


def _first_round(config, problem, name: str, rule: GlobalRule | None = None, options=None):
    """`(sim0, trained, sim1)`: the initial state, the clients after their local training (the
    method's own client program, outside the round) and the state after one round."""
    if options is not None:
        merged = {**config.method_options.get(name, {}), **options}
        config = dataclasses.replace(config, method_options={name: merged})
    if rule is not None:
        problem = dataclasses.replace(problem, global_rule=rule)
    algo = method_factory(name, config)(problem)
    sim0 = algo.init(jax.random.key(7))
    inputs = RoundInputs(problem.train, problem.eval_sets, problem.base, sim0.round)
    trained, _ = jax.jit(algo.method.client.update)(sim0.clients, inputs)
    sim1, _ = algo.round(sim0)
    return sim0, trained, sim1


def _holder_means(trained) -> list[np.ndarray]:
    """Per leaf, NumPy: each slot's mean over the clients holding it (`amole.holders`), given to
    every client."""
    out = []
    holders = _leaves(amole.holders(trained.params, trained.frozen))
    for x, h in zip(_leaves(trained.params), holders, strict=True):
        h = h.reshape(h.shape + (1,) * (x.ndim - h.ndim))
        out.append(np.broadcast_to((h * x).sum(0) / h.sum(0), x.shape))
    return out


def _shared_flags(params) -> list[bool]:
    """Per leaf: whether it is FedAMoLE's global part (not a domain-expert pool)."""
    paths = jax.tree_util.tree_leaves_with_path(params)
    experts = ("experts_a", "experts_b")
    return [not any(getattr(k, "key", None) in experts for k in p) for p, _ in paths]


def test_fedamole_dp_on_the_shared_expert_matches_a_numpy_reference(setup):
    """DP-FedAvg on FedAMoLE's shared expert and `W_tok`: their updates clipped to C over that
    part alone (NumPy), averaged, plus z·C/N times the draws of the documented key; the domain
    experts are their holders' mean, untouched by clipping and noise."""
    config, problem = setup
    c, z = 0.02, 0.7
    rule = GlobalRule(dp=DPOptions(clip_norm=c, noise_multiplier=z))
    sim0, trained, sim1 = _first_round(config, problem, "fedamole", rule)
    flags = _shared_flags(sim0.clients.params)
    assert any(flags) and not all(flags)
    theta = [x[0] for x in _leaves(sim0.clients.params)]  # shared init
    rows = _leaves(trained.params)
    shared = [(x, t) for x, t, g in zip(rows, theta, flags, strict=True) if g]
    norms = [np.sqrt(sum(np.sum((x[i] - t) ** 2) for x, t in shared)) for i in range(N)]
    assert min(norms) > c  # the clipping bites on every client
    scale = [min(1.0, c / norm) for norm in norms]
    key = jax.random.fold_in(jax.random.key(7), DP_KEY_STREAM)
    keys = jax.random.split(jax.random.split(key, 3)[1], len(theta))
    experts = _holder_means(trained)
    got = _leaves(sim1.clients.params)
    for leaf, x, t, g, k, e in zip(got, rows, theta, flags, keys, experts, strict=True):
        if not g:
            np.testing.assert_allclose(leaf, e, rtol=1e-5, atol=1e-7)
            continue
        clipped = [t + scale[i] * (x[i] - t) for i in range(N)]
        assert max(np.sqrt(np.sum((ci - t) ** 2)) for ci in clipped) <= c * (1 + 1e-6)
        want = np.mean(clipped, 0) + z * c / N * np.asarray(jax.random.normal(k, t.shape))
        np.testing.assert_allclose(leaf, np.broadcast_to(want, leaf.shape), rtol=1e-4, atol=1e-6)
    assert sim1.agg_state.key.shape == sim0.agg_state.key.shape  # the architecture key stays


def test_fedamole_server_adam_on_the_shared_expert_is_an_optax_step(setup):
    """`method_options.fedamole.server_opt = adam`: the shared expert and `W_tok` move by one
    `optax.adam` step on the pseudo-gradient `θ − mean_i θ_i` (computed here, outside the
    round); the domain experts are their holders' mean."""
    config, problem = setup
    opt = {"kind": "adam", "lr": 0.05, "b1": 0.9, "b2": 0.99, "eps": 1e-3}
    sim0, trained, sim1 = _first_round(config, problem, "fedamole", options={"server_opt": opt})
    flags = _shared_flags(sim0.clients.params)
    theta = [x[0] for x in _leaves(sim0.clients.params)]
    grad = [t - x.mean(0) for t, x in zip(theta, _leaves(trained.params), strict=True)]
    tx = optax.adam(0.05, 0.9, 0.99, 1e-3)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats with its int32 count
        updates, _ = tx.update(grad, tx.init(theta), theta)
    experts = _holder_means(trained)
    got = _leaves(sim1.clients.params)
    for leaf, t, u, g, e in zip(got, theta, updates, flags, experts, strict=True):
        want = np.broadcast_to(t + np.asarray(u), leaf.shape) if g else e
        np.testing.assert_allclose(leaf, want, rtol=1e-4, atol=1e-6)


def test_fedamole_median_on_the_shared_expert(setup):
    """A coordinate median of the global part (`np.median` over the clients), the domain experts
    their holders' mean."""
    config, problem = setup
    sim0, trained, sim1 = _first_round(config, problem, "fedamole", GlobalRule("median"))
    flags = _shared_flags(sim0.clients.params)
    experts = _holder_means(trained)
    got, rows = _leaves(sim1.clients.params), _leaves(trained.params)
    for leaf, x, g, e in zip(got, rows, flags, experts, strict=True):
        want = np.broadcast_to(np.median(x, 0), x.shape) if g else e
        np.testing.assert_allclose(leaf, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["median", "trimmed_mean"])
def test_fdlora_global_lora_is_the_robust_consensus(setup, reduction):
    """FDLoRA (its first round averages, `local_rounds = 1`): the global LoRA `θ_s` is the
    coordinate median (`np.median`) or the β-trimmed mean (NumPy sort) of the trained shared
    LoRAs, and every client receives it."""
    config, problem = setup
    rule = GlobalRule(reduction, beta=0.25)
    _, trained, sim1 = _first_round(config, problem, "fdlora", rule)
    server = _leaves(sim1.agg_state.params)
    for s, x, c in zip(server, _leaves(trained.params), _leaves(sim1.clients.params), strict=True):
        trimmed = np.sort(x, 0)[1 : N - 1].mean(0)  # ⌊0.25 · 4⌋ = 1 dropped at each end
        want = np.median(x, 0) if reduction == "median" else trimmed
        np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(c, np.broadcast_to(want, c.shape), rtol=1e-5, atol=1e-7)


def test_fdlora_dp_clips_relative_to_the_global_lora(setup):
    """DP on FDLoRA: `θ_s` after the first average is `θ_0 + mean(clipped Δ_i) + noise`, with the
    updates relative to the shared initial LoRA and the noise of the documented key."""
    config, problem = setup
    c, z = 0.05, 0.5
    rule = GlobalRule(dp=DPOptions(clip_norm=c, noise_multiplier=z))
    sim0, trained, sim1 = _first_round(config, problem, "fdlora", rule)
    theta = [x[0] for x in _leaves(sim0.clients.params)]
    rows = _leaves(trained.params)
    norms = [
        np.sqrt(sum(np.sum((x[i] - t) ** 2) for x, t in zip(rows, theta, strict=True)))
        for i in range(N)
    ]
    assert max(norms) > c
    scale = [min(1.0, c / norm) for norm in norms]
    key = jax.random.fold_in(jax.random.key(7), DP_KEY_STREAM)
    keys = jax.random.split(jax.random.split(key, 3)[1], len(theta))
    for s, x, t, k in zip(_leaves(sim1.agg_state.params), rows, theta, keys, strict=True):
        mean = t + sum(scale[i] * (x[i] - t) for i in range(N)) / N
        want = mean + z * c / N * np.asarray(jax.random.normal(k, t.shape))
        np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-6)


RANKED = ["method_options.{m}.ranks=[2,4,3,4]", "method_options.{m}.ranked.rank=4"]


def _ranked(method: str, *extra: str):
    """`(config, problem)` of a run of `method` with ranks 2, 4, 3, 4 on the MLP projections."""
    options = [o.format(m=method) for o in RANKED]
    config = config_lib.load(None, [*OVERRIDES, f"methods=[{method}]", *options, *extra])
    return config, build_problem(config)[0]


def _ranked_modules(params) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per ranked module path: `(a, b, rank_scale)` as float64 arrays."""
    flat = {
        ".".join(path_names(p)): np.asarray(x, np.float64)
        for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(params))
    }
    return {
        path[: -len(".rank_scale")]: tuple(flat[path.replace("rank_scale", n)] for n in "ab")
        + (flat[path],)
        for path in flat
        if path.endswith(".rank_scale")
    }


def test_flexlora_median_in_a_run_is_the_median_of_the_products():
    """`aggregation.reduction=median` on FlexLoRA: every client's `s_i A_i B_i` after the round is
    the rank-`r_i` SVD truncation of `np.median` over the trained clients' `ΔW_i`."""
    config, problem = _ranked("flexlora")
    _, trained, sim1 = _first_round(config, problem, "flexlora", GlobalRule("median"))
    merged = lambda clients: nnx.merge_state(clients.params, clients.frozen)
    before, after = _ranked_modules(merged(trained)), _ranked_modules(merged(sim1.clients))
    assert before
    for path, (a, b, scale) in before.items():
        deltas = np.einsum("nir,nr,nro->nio", a, scale, b)
        u, sv, vt = np.linalg.svd(np.median(deltas, 0), full_matrices=False)
        new_a, new_b, _ = after[path]
        for i, r in enumerate([2, 4, 3, 4]):
            got = scale[i, 0] * new_a[i] @ new_b[i]
            want = u[:, :r] @ np.diag(sv[:r]) @ vt[:r]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["hetlora", "flexlora"])
def test_ranked_methods_take_dp_and_report_it(method, tmp_path):
    """`aggregation.dp` on HetLoRA and FlexLoRA: the server carries the DP options (the run's `ε`),
    the noise key of the documented stream; a round stays finite and resumes from a checkpoint
    bit for bit (the round-start clients and the DP state in `RuledState`)."""
    config, problem = _ranked(method)
    rule = GlobalRule(dp=DPOptions(clip_norm=0.5, noise_multiplier=1.0))
    problem = dataclasses.replace(problem, global_rule=rule)
    algo = method_factory(method, config)(problem)
    assert algo.method.server.dp == rule.dp
    sim0 = algo.init(jax.random.key(7))
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(7), DP_KEY_STREAM))
    np.testing.assert_array_equal(sim0.agg_state.rule.key, key)
    sim1, _ = algo.round(sim0)
    assert all(np.isfinite(x).all() for x in _leaves(sim1.clients.params))
    checkpoints = Checkpointer(tmp_path)
    checkpoints.save(1, sim1, [])
    _, restored, _ = checkpoints.restore_latest(sim1)
    checkpoints.close()
    state = lambda sim: _leaves((sim.clients.params, sim.agg_state))
    for a, b in zip(state(algo.round(sim1)[0]), state(algo.round(restored)[0]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("method", "option"),
    [("hetlora", "reference_weights"), ("flexlora", "reference_accumulator")],
)
def test_ranked_reference_weights_refuse_a_rule(method, option):
    config, problem = _ranked(method, f"method_options.{method}.{option}=true")
    problem = dataclasses.replace(problem, global_rule=GlobalRule("median"))
    with pytest.raises(ConfigError, match=f"method_options.{method}.{option}") as info:
        method_factory(method, config)(problem)
    assert "\n" not in str(info.value)
