"""Server optimizers (Reddi et al. 2021) against NumPy loops of the optax formulas, over several
rounds with the state carried; the FedAvg identities; composition with a mask policy. On a tiny
language model: the named methods (`fedadam`, ...) against optax applied by hand to the mean
client delta, the `server_opt` option of FedAvg, FedSA-LoRA and FFA-LoRA, checkpoint resume."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lora import aggregation as agg
from fedjax_lora import config as config_lib
from fedjax_lora.aggregation.masks import global_mask, masked_aggregator, path_names
from fedjax_lora.aggregation.server_opt import (
    fedadagrad,
    fedadam,
    fedavgm,
    fedyogi,
    server_optimizer,
)
from fedjax_lora.algorithms import METHODS
from fedjax_lora.algorithms.base import RoundInputs
from fedjax_lora.checkpoint import Checkpointer
from fedjax_lora.experiment import method_factory
from fedjax_lora.prompt_tuning import PromptTuningConfig, PTuningConfig
from fedjax_lora.settings import ServerOptimizer
from tests.tiny import tiny_problem

N, ROUNDS = 4, 4


def _tree(rng):
    return {"lora": {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(2, 5))}}


def _rounds(aggregator, seed=0, weights=None):
    """Runs ROUNDS rounds: each client starts from what it received and moves by a random delta
    (a stand-in for local training). Returns the start (f64), the deltas and every output."""
    rng = np.random.default_rng(seed)
    start = jax.tree.map(
        lambda x: np.broadcast_to(x, (N,) + x.shape).astype(np.float32), _tree(rng)
    )
    deltas = [
        jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), start)
        for _ in range(ROUNDS)
    ]
    apply = jax.jit(aggregator.apply)
    state, received, outs = aggregator.init(start), start, []
    for d in deltas:
        inputs = None if weights is None else {"weights": weights}
        received, state = apply(jax.tree.map(np.add, received, d), state, inputs)
        outs.append(received)
    return start, deltas, outs


def _np_server(step, start, deltas, weights=None):
    """θ ← θ + step(−Δ) leaf by leaf with Δ = Σ_i p_i (θ + δ_i) − θ = Σ_i p_i δ_i (f64)."""
    p = np.full(N, 1 / N) if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    leaves = [np.asarray(x, np.float64)[0] for x in jax.tree.leaves(start)]
    states = [None] * len(leaves)
    outs = []
    for t, d in enumerate(deltas, start=1):
        new = []
        for k, (theta, dk) in enumerate(zip(leaves, jax.tree.leaves(d), strict=True)):
            g = -np.tensordot(p, np.asarray(dk, np.float64), axes=1)
            update, states[k] = step(g, states[k], t)
            new.append(theta + update)
        leaves = new
        outs.append(leaves)
    return outs


def np_sgd(lr, momentum):
    def step(g, m, t):
        m = g if m is None else g + momentum * m  # optax.trace
        return -lr * m, m

    return step


def np_adam(lr, b1, b2, eps):
    def step(g, s, t):
        m, v = s or (0.0, 0.0)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        return -lr * m_hat / (np.sqrt(v_hat) + eps), (m, v)

    return step


def np_yogi(lr, b1, b2, eps):
    def step(g, s, t):
        m, v = s or (1e-6, 1e-6)  # optax's initial accumulator for both moments
        m = b1 * m + (1 - b1) * g
        v = v - (1 - b2) * np.sign(v - g**2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        return -lr * m_hat / (np.sqrt(v_hat) + eps), (m, v)

    return step


def np_adagrad(lr, eps):
    def step(g, s, t):
        s = (eps**2 if s is None else s) + g**2  # Reddi et al.: v_{-1} = τ²
        return -lr * g / np.sqrt(s), s

    return step


@pytest.mark.parametrize(
    ("factory", "step"),
    [
        (lambda: fedavgm(0.7, 0.9), np_sgd(0.7, 0.9)),
        (lambda: fedadam(0.05, 0.9, 0.99, 1e-3), np_adam(0.05, 0.9, 0.99, 1e-3)),
        (lambda: fedyogi(0.05, 0.9, 0.99, 1e-3), np_yogi(0.05, 0.9, 0.99, 1e-3)),
        (lambda: fedadagrad(0.1, 1e-3), np_adagrad(0.1, 1e-3)),
    ],
    ids=["fedavgm", "fedadam", "fedyogi", "fedadagrad"],
)
def test_server_optimizer_matches_numpy_over_rounds(factory, step):
    start, deltas, outs = _rounds(factory())
    for t, (got, want) in enumerate(zip(outs, _np_server(step, start, deltas), strict=True)):
        for g, w in zip(jax.tree.leaves(got), want, strict=True):
            np.testing.assert_allclose(
                g, np.broadcast_to(w, g.shape), rtol=1e-4, atol=1e-5, err_msg=f"round {t + 1}"
            )


def test_sgd_one_without_momentum_is_fedavg_exactly():
    weights = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    _, _, plain = _rounds(agg.fedavg_aggregator(), weights=weights)
    for aggregator in (server_optimizer(agg.fedavg_aggregator(), optax.sgd(1.0)), fedavgm(1.0, 0)):
        _, _, outs = _rounds(aggregator, weights=weights)
        for got, want in zip(outs, plain, strict=True):
            chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)  # f32 rounding only


def test_fedadam_first_step_is_sign_like_not_fedavg():
    """Bias-corrected Adam's first step is θ + η Δ / (|Δ| + τ): about η per coordinate."""
    lr, eps = 0.05, 1e-3
    start, deltas, outs = _rounds(fedadam(lr, eps=eps))
    for got, s, d in zip(
        jax.tree.leaves(outs[0]), jax.tree.leaves(start), jax.tree.leaves(deltas[0]), strict=True
    ):
        mean = np.asarray(d, np.float64).mean(0)
        want = np.asarray(s, np.float64)[0] + lr * mean / (np.abs(mean) + eps)
        np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "aggregator",
    [
        server_optimizer(
            masked_aggregator("fedsa"), optax.adam(0.05, 0.9, 0.99, 1e-3), policy="fedsa"
        ),
        fedadam(0.05, policy="fedsa"),  # the default inner rule averages the global part only
    ],
    ids=["explicit", "default_inner"],
)
def test_server_optimizer_only_steps_the_global_part(aggregator):
    """FedSA-LoRA: `a` global through the server optimizer, each client's `b` its own."""
    start, deltas, outs = _rounds(aggregator)
    want = _np_server(np_adam(0.05, 0.9, 0.99, 1e-3), start, deltas)
    b = np.asarray(start["lora"]["b"], np.float64)
    for t, got in enumerate(outs):
        np.testing.assert_allclose(
            got["lora"]["a"], np.broadcast_to(want[t][0], (N, 3, 2)), rtol=1e-4, atol=1e-5
        )
        b = b + np.asarray(deltas[t]["lora"]["b"], np.float64)  # local: kept, never averaged
        np.testing.assert_allclose(got["lora"]["b"], b, rtol=1e-5, atol=1e-5)


def test_state_is_carried_and_checkpointable():
    aggregator = fedadam()
    start, _, _ = _rounds(aggregator)
    state = aggregator.init(start)
    assert isinstance(state, agg.ServerOptState)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


# --- the named methods and the `server_opt` option on a language model -------------------------


@pytest.fixture(scope="module")
def problem():
    return tiny_problem(steps=2)


def _np_leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(tree))]


def _by_hand(algo, tx, sim, problem, rounds=2):
    """`rounds` rounds of the method's own local training, each followed by `tx` applied by hand
    to the pseudo-gradient `θ − mean_i y_i` and `θ` sent to every client; returns `θ`."""
    theta = jax.tree.map(lambda x: jnp.mean(x, 0), sim.clients.params)
    state, clients = tx.init(theta), sim.clients
    update = jax.jit(algo.method.client.update)
    for r in range(rounds):
        inputs = RoundInputs(problem.train, problem.eval_sets, problem.base, jnp.int32(r))
        trained, _ = update(clients, inputs)
        grad = jax.tree.map(lambda t, y: t - jnp.mean(y, 0), theta, trained.params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes floats with its int32 counter
            updates, state = tx.update(grad, state, theta)
        theta = optax.apply_updates(theta, updates)
        sent = jax.tree.map(
            lambda t, y: jnp.broadcast_to(t, y.shape).astype(y.dtype), theta, trained.params
        )
        clients = trained._replace(params=sent)
    return theta


KINDS = {"fedavgm": "sgd", "fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}


@pytest.mark.parametrize(
    ("name", "options", "tx"),
    [
        ("fedavgm", {}, optax.sgd(1.0, 0.9)),
        ("fedadam", {}, optax.adam(1e-2, 0.9, 0.99, 1e-3)),
        ("fedyogi", {"lr": 0.03}, optax.yogi(0.03, 0.9, 0.99, 1e-3)),
        ("fedadagrad", {}, optax.adagrad(0.1, initial_accumulator_value=1e-6, eps=0.0)),
    ],
)
def test_named_method_is_optax_on_the_mean_delta(problem, name, options, tx):
    """Two rounds of `fedadam` & co. equal their optax transformation applied by hand to the mean
    of the clients' updates (defaults: Reddi et al.'s)."""
    algo = METHODS[name](problem, server_opt=ServerOptimizer(KINDS[name], **options))
    sim = algo.init(jax.random.key(0))
    want = _np_leaves(_by_hand(algo, tx, sim, problem))
    for _ in range(2):
        sim, _ = algo.round(sim)
    server = _np_leaves(sim.agg_state.global_tree)
    for got, w, g in zip(_np_leaves(sim.clients.params), want, server, strict=True):
        np.testing.assert_allclose(got, np.broadcast_to(w, got.shape), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_server_opt_sgd_one_is_the_method_itself(problem):
    """`server_opt = sgd(lr=1, momentum=0)` on FedAvg, FedSA-LoRA and FFA-LoRA changes nothing
    (the server state is a `ServerOptState`)."""
    unit = ServerOptimizer("sgd", 1.0, momentum=0.0)
    for name in ("fedavg", "fedsa-lora", "ffa-lora"):
        plain, stepped = METHODS[name](problem), METHODS[name](problem, server_opt=unit)
        a, b = plain.init(jax.random.key(0)), stepped.init(jax.random.key(0))
        for _ in range(2):
            (a, ma), (b, mb) = plain.round(a), stepped.round(b)
        assert isinstance(b.agg_state, agg.ServerOptState)
        for x, y in zip(
            _np_leaves((a.clients.params, ma["val"])),
            _np_leaves((b.clients.params, mb["val"])),
            strict=True,
        ):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", ["fedit", "fedit-ft", "fedprompt", "fedptuning"])
def test_fedavg_baselines_take_server_opt(problem, name):
    """`server_opt` on FedIT (its per-round re-created optimizer) and the soft-prompt baselines
    (every tensor global): two rounds equal `optax.adam` applied by hand to the mean client
    update."""
    options = {"server_opt": ServerOptimizer("adam", 0.05)}
    if name == "fedprompt":
        options["prompt"] = PromptTuningConfig(num_virtual_tokens=4, init="vocab")
    if name == "fedptuning":
        options["prompt"] = PTuningConfig(num_virtual_tokens=3, hidden_size=16)
    algo = METHODS[name](problem, **options)
    sim = algo.init(jax.random.key(0))
    want = _np_leaves(_by_hand(algo, optax.adam(0.05, 0.9, 0.99, 1e-3), sim, problem))
    for _ in range(2):
        sim, _ = algo.round(sim)
    for got, w in zip(_np_leaves(sim.clients.params), want, strict=True):
        np.testing.assert_allclose(got, np.broadcast_to(w, got.shape), rtol=1e-4, atol=1e-5)


def test_fedsa_server_adam_steps_a_and_keeps_b_local(problem):
    """FedSA-LoRA with `server_opt.kind=adam`: every client's `A` is the server's global `A`,
    each `B` its own."""
    algo = METHODS["fedsa-lora"](problem, server_opt=ServerOptimizer("adam", 0.05))
    sim, _ = algo.round(algo.init(jax.random.key(0)))
    paths = jax.tree_util.tree_leaves_with_path(sim.clients.params)
    theta = _np_leaves(sim.agg_state.global_tree)
    for (path, x), t in zip(paths, theta, strict=True):
        x = np.asarray(x)
        if path_names(path)[-1] == "a":
            np.testing.assert_allclose(x, np.broadcast_to(t, x.shape), rtol=1e-6, atol=1e-6)
        else:  # B: local, different on every client
            assert np.abs(x - x[:1]).max() > 0


def test_fedadam_checkpoint_resume_equals_uninterrupted(problem, tmp_path):
    """The server's Adam moments and global tree live in `SimState.agg_state`: saving after
    round 1 and resuming gives round 2 bit for bit."""
    algo = METHODS["fedadam"](problem)
    sim1, _ = algo.round(algo.init(jax.random.key(0)))
    checkpoints = Checkpointer(tmp_path)
    checkpoints.save(1, sim1, [])
    step, restored, _ = checkpoints.restore_latest(algo.init(jax.random.key(1)))
    checkpoints.close()
    assert step == 1
    assert int(restored.agg_state.opt_state[0].count) == 1  # Adam's step count
    (want, want_metrics), (got, got_metrics) = algo.round(sim1), algo.round(restored)
    want, got = (want.clients.params, want.agg_state), (got.clients.params, got.agg_state)
    for x, y in zip(_np_leaves((want, want_metrics)), _np_leaves((got, got_metrics)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_comigs_server_opt_steps_the_generalist_only(problem):
    """CoMiGS with `server_opt.kind=adam`: the generalist (`expert_0` policy's global part) of
    every client is the server's tree, the specialists stay each client's own."""
    algo = METHODS["comigs"](
        problem, router_batches="windows", server_opt=ServerOptimizer("adam", 0.05)
    )
    sim, metrics = algo.round(algo.init(jax.random.key(0)))
    assert all(np.isfinite(x).all() for x in _np_leaves(metrics["val"]))
    masks = global_mask(sim.clients.params, "expert_0")
    theta = _np_leaves(sim.agg_state.global_tree)
    shared, local = 0, 0.0
    for x, m, t in zip(_np_leaves(sim.clients.params), jax.tree.leaves(masks), theta, strict=True):
        m = np.broadcast_to(np.asarray(m), x.shape)
        np.testing.assert_allclose(x[m], np.broadcast_to(t, x.shape)[m], rtol=1e-6, atol=1e-6)
        shared += m.sum()
        local = max(local, np.abs(x - x[:1])[~m].max(initial=0.0))
    assert shared > 0 and local > 0  # the specialists differ between clients


def test_method_options_merge_over_the_named_method_defaults():
    """`method_options.fedadam.server_opt.lr=0.05` keeps fedadam's `kind = 'adam'` (the default
    `fedjax-lora methods` lists); a value out of range fails naming the option."""
    config = config_lib.load(None, ["method_options.fedadam.server_opt.lr=0.05"])
    assert method_factory("fedadam", config).keywords["options"].server_opt == ServerOptimizer(
        "adam", 0.05
    )
    config = config_lib.load(None, ["method_options.fedsa-lora.server_opt.kind=yogi"])
    assert method_factory("fedsa-lora", config).keywords["options"].server_opt == ServerOptimizer(
        "yogi"
    )
    config = config_lib.load(None, ["method_options.fedavgm.server_opt.momentum=1.5"])
    with pytest.raises(ValueError, match=r"server_opt.momentum must be in \[0, 1\), got 1.5"):
        method_factory("fedavgm", config)
