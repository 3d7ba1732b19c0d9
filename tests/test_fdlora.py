"""FDLoRA: outer optimizer, private-adapter synchronisation, and the adaptive-fusion search."""

from __future__ import annotations

import dataclasses
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny import SEQ, client_streams, tiny_model

from fedjax_lora.algorithms import Problem
from fedjax_lora.algorithms.fdlora import (
    COMIGS,
    FDLoRAOptions,
    fdlora,
    fusion_candidates,
    fusion_search,
)
from fedjax_lora.cli import main
from fedjax_lora.data.streams import eval_windows, stack_streams
from fedjax_lora.engine import LocalTraining, OptimizerConfig

N = 3


def test_fusion_search_picks_the_lowest_score_of_a_brute_force_grid():
    """A quadratic loss of the fused tree: the search's scores and choice against NumPy."""
    rng = np.random.default_rng(0)
    shared = {"a": rng.standard_normal((2, 3)), "b": rng.standard_normal(4)}
    private = {"a": rng.standard_normal((2, 3)), "b": rng.standard_normal(4)}
    target = {
        "a": 0.7 * shared["a"] - 0.4 * private["a"],
        "b": 0.7 * shared["b"] - 0.4 * private["b"],
    }
    options = FDLoRAOptions(fusion_search="grid", fusion_budget=25, fusion_bound=1.5, l1=0.05)
    cands = np.asarray(fusion_candidates(jax.random.key(0), 1, options))[0]
    chex.assert_shape(cands, (25, 2))
    np.testing.assert_allclose(sorted(set(cands[:, 0].round(6))), np.linspace(-1.5, 1.5, 5))

    def loss(tree):
        return sum(jnp.sum((tree[k] - target[k]) ** 2) for k in tree)

    as_jnp = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
    w, scores = jax.jit(fusion_search, static_argnums=(0, 4))(
        loss, as_jnp(shared), as_jnp(private), jnp.asarray(cands), 0.05
    )
    want = np.array(
        [
            sum(np.sum((c[0] * shared[k] + c[1] * private[k] - target[k]) ** 2) for k in shared)
            + 0.05 * np.abs(c).mean()
            for c in cands
        ]
    )
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    np.testing.assert_array_equal(w, cands[np.argmin(want)])


def test_random_candidates_start_at_zero_and_stay_in_bounds():
    options = FDLoRAOptions(fusion_budget=6, fusion_bound=1.5)
    cands = np.asarray(fusion_candidates(jax.random.key(1), 4, options))
    chex.assert_shape(cands, (4, 6, 2))
    np.testing.assert_array_equal(cands[:, 0], 0.0)
    assert np.all(np.abs(cands) <= 1.5)
    assert not np.allclose(cands[0, 1:], cands[1, 1:])  # drawn per client
    with pytest.raises(ValueError, match="square fusion_budget"):
        FDLoRAOptions(fusion_search="grid", fusion_budget=5)


@pytest.fixture(scope="module")
def problem() -> Problem:
    streams = client_streams(N)
    val = stack_streams([s[::-1].copy() for s in streams])
    aux = stack_streams([s[50:].copy() for s in streams])
    return Problem.create(
        tiny_model(),
        stack_streams(streams),
        {"val": eval_windows(val, SEQ, 4)},
        training=LocalTraining(steps=2, batch_size=2, seq_len=SEQ),
        optimizer=OptimizerConfig(lr=2e-2),
        eval_batch_size=2,
        side={"aux": eval_windows(aux, SEQ, 4)},
    )


def _np(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, base, tokens):
    return nnx.merge(graphdef, params, base)(tokens)


def _numpy_scores(problem, shared, private, client, cands, num_windows, l1, fusion_set):
    """Brute force: every candidate's fused adapters in NumPy, the model's logits, and the
    token-weighted cross-entropy over the client's first `num_windows` windows in NumPy."""
    es = problem.windows(fusion_set)
    win = np.asarray(es.windows[client, :num_windows])
    wt = np.asarray(es.weights[client, :num_windows])
    treedef = jax.tree.structure(problem.template)
    scores = []
    for w in cands:
        leaves = [
            (w[0] * s + w[1] * p).astype(np.float32) for s, p in zip(shared, private, strict=True)
        ]
        params = jax.tree.unflatten(treedef, leaves)
        logits = np.asarray(
            _forward(problem.graphdef, params, problem.base, win[:, :-1]), np.float64
        )
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        ce = -np.take_along_axis(logp, win[:, 1:, None], -1)[..., 0]
        scores.append((ce * wt).sum() / wt.sum() + l1 * np.abs(w).mean())
    return np.array(scores)


def _check_fusion(problem, sim, agg, num_windows, fusion_set="aux"):
    """The chosen pair is the brute-force argmin of the NumPy scores, and the personal LoRA is
    `w₀ θ_s + w₁ π_c`."""
    server, private = _np(sim.agg_state.params), _np(sim.clients.aux["private"])
    cands = np.asarray(agg["fusion_candidates"], np.float64)
    for c in range(N):
        mine = [p[c] for p in private]
        want = _numpy_scores(problem, server, mine, c, cands[c], num_windows, 0.05, fusion_set)
        np.testing.assert_allclose(agg["fusion_scores"][c], want, rtol=2e-4)
        np.testing.assert_array_equal(agg["fusion_weights"][c], cands[c][np.argmin(want)])
    w = np.asarray(agg["fusion_weights"], np.float64)
    for got, s, p in zip(_np(sim.clients.aux["personal"]), server, private, strict=True):
        shape = (N,) + (1,) * s.ndim
        want = w[:, 0].reshape(shape) * s + w[:, 1].reshape(shape) * p
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_fdlora_rounds_against_numpy(problem):
    """Round 0 (L = 1) averages the local LoRAs; round 1 synchronises the private LoRAs (the
    trained shared ones) and takes the first Nesterov step; round 2 keeps the private LoRAs
    (`sync_every=2`). Every fused round's search is replayed by brute force."""
    algo = fdlora(problem, FDLoRAOptions(sync_every=2, fusion_windows=3, fusion_budget=4))
    sim = algo.init(jax.random.key(0))
    for r in range(3):
        before = sim
        sim, metrics = algo.round(sim)
        agg = metrics["aggregation"]
        server = _np(sim.agg_state.params)
        for c, s in zip(_np(sim.clients.params), server, strict=True):
            np.testing.assert_array_equal(c, np.broadcast_to(s, c.shape))  # all hold θ_s
        if r == 0:  # the reference's round -1: local training, then the plain average
            for s, x in zip(server, _np(sim.clients.aux["personal"]), strict=True):
                np.testing.assert_allclose(s, x.mean(0), rtol=1e-5, atol=1e-7)
            np.testing.assert_array_equal(agg["fusion_weights"], 0.0)
            continue
        private = _np(sim.clients.aux["private"])
        if r == 1:
            assert not np.allclose(private[0], private[0][:1])  # the clients' own trained LoRAs
            # PyTorch SGD(lr=1, momentum=0.5, nesterov=True), first step on g = θ_s - mean_c θ_c:
            # buf = g, θ_s -= g + 0.5 buf.
            for new, old, t in zip(server, _np(before.agg_state.params), private, strict=True):
                g = old - t.mean(0)
                np.testing.assert_allclose(new, old - 1.5 * g, rtol=1e-4, atol=1e-6)
        else:
            for a, b in zip(private, _np(before.clients.aux["private"]), strict=True):
                np.testing.assert_array_equal(a, b)
        _check_fusion(problem, sim, agg, 3)
        np.testing.assert_allclose(
            algo.evaluate(sim)["val"]["loss"], metrics["val"]["loss"], rtol=1e-6
        )
    assert int(sim.round) == 3
    # The optimizer was re-created for round r = 2 with the step scaled by 0.99².
    _, scale = sim.clients.opt_state
    np.testing.assert_allclose(scale.hyperparams["step_size"], np.full(N, 0.99**2), rtol=1e-6)
    np.testing.assert_array_equal(optax.tree_utils.tree_get(sim.clients.opt_state[0], "count"), 2)


def test_fdlora_comigs_is_fedavg_then_fusion(problem):
    options = dataclasses.replace(COMIGS, fusion_windows=4, fusion_budget=3)
    algo = fdlora(problem, options)
    sim = algo.init(jax.random.key(0))
    sim, metrics = algo.round(sim)
    private = _np(sim.clients.aux["private"])  # the clients' trained LoRAs (sync every round)
    assert not np.allclose(private[0], private[0][:1])
    for s, p in zip(_np(sim.agg_state.params), private, strict=True):  # plain FedAvg
        np.testing.assert_allclose(s, p.mean(0), rtol=1e-5, atol=1e-6)
    assert bool(metrics["aggregation"]["applied"])
    assert np.all(np.abs(metrics["aggregation"]["fusion_candidates"]) <= 1.0)
    _check_fusion(problem, sim, metrics["aggregation"], 4, "val")


def test_fdlora_needs_its_fusion_set(problem):
    bare = dataclasses.replace(problem, side={})
    with pytest.raises(ValueError, match="data.aux_fraction"):
        fdlora(bare)


def test_fdlora_methods_run_through_the_demo(tmp_path):
    methods = ["fdlora", "fdlora-comigs"]
    overrides = [
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
    argv = ["demo", "--rounds", "1", "--methods", *methods, "--out", str(tmp_path)]
    assert main([*argv, "--no-progress", "--set", *overrides]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in records] == [(m, r) for m in methods for r in (0, 1)]
    assert all(np.isfinite(r["val_mean_loss"]) for r in records)
