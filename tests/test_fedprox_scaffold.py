"""FedProx and SCAFFOLD against NumPy loops of the papers' updates: the drift-corrected local
step (Li et al. 2020: `g + μ(θ − θ_global)`) and SCAFFOLD's option II control variates
(Karimireddy et al. 2020, Algorithm 1) over 2 rounds, with a cohort; on the language model,
FedProx with `μ = 0` is FedAvg and its anchor is the adapters received."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lora.aggregation import fedavg_aggregator, fedavgm
from fedjax_lora.aggregation.masks import masked_aggregator, path_names
from fedjax_lora.algorithms import METHODS
from fedjax_lora.algorithms.base import (
    ClientProgram,
    DriftState,
    RoundInputs,
    aggregating,
    anchored,
    drift_corrected,
)
from fedjax_lora.algorithms.scaffold import (
    CONTROL,
    CONTROL_DELTA,
    controlled,
    scaffold_client,
    scaffold_server,
)
from fedjax_lora.checkpoint import Checkpointer
from fedjax_lora.engine import cohort as cohorts
from fedjax_lora.engine.state import ClientState
from fedjax_lora.errors import ConfigError
from fedjax_lora.prompt_tuning import PromptTuningConfig, PTuningConfig
from fedjax_lora.settings import GlobalRule, ServerOptimizer
from tests.tiny import tiny_problem

N, D, K, ETA = 4, 3, 5, 0.1


def _quadratic(rng):
    """Client i's objective `f_i(y) = ½ Σ_d a_id (y_d − b_id)²`: curvatures `a`, targets `b`."""
    return rng.uniform(0.5, 2.0, (N, D)), rng.normal(size=(N, D))


def quadratic_client(tx: optax.GradientTransformation) -> ClientProgram:
    """K steps of `tx` on each drawn client's quadratic; `inputs.data = (a, b)` of the drawn
    clients."""

    def init(key):
        params = {"w": jnp.zeros((N, D), jnp.float32)}
        zeros = jnp.zeros((N,), jnp.int32)
        keys = jax.random.split(key, N)
        return ClientState(params, jax.vmap(tx.init)(params), keys, keys, zeros, zeros, {})

    def update(clients, inputs):
        def one(params, opt_state, a, b):
            def step(carry, _):
                p, s = carry
                updates, s = tx.update({"w": a * (p["w"] - b)}, s, p)
                return (optax.apply_updates(p, updates), s), None

            return jax.lax.scan(step, (params, opt_state), None, length=K)[0]

        a, b = inputs.data
        params, opt_state = jax.vmap(one)(clients.params, clients.opt_state, a, b)
        return clients._replace(params=params, opt_state=opt_state), {}

    return ClientProgram(init, update)


def _np_sgd(g, state, t):
    return -ETA * g, state


def _np_adam(g, state, t, b1=0.9, b2=0.999, eps=1e-8):
    m, v = state or (0.0, 0.0)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
    return -ETA * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps), (m, v)


@pytest.mark.parametrize(
    ("tx", "np_step"), [(optax.sgd(ETA), _np_sgd), (optax.adam(ETA), _np_adam)], ids=["sgd", "adam"]
)
def test_drift_corrected_step_matches_numpy(tx, np_step):
    """K steps `θ ← θ + tx(g(θ) + μ(θ − anchor)) + δ` from a point away from the anchor: the
    proximal gradient goes through the optimizer, the correction `δ` is added to its update."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 2.0, D), rng.normal(size=D)
    theta, anchor, corr = rng.normal(size=D), rng.normal(size=D), 0.01 * rng.normal(size=D)
    mu = 0.3
    tx = drift_corrected(tx, mu)
    params = {"w": jnp.asarray(theta, jnp.float32)}
    f32 = lambda x: {"w": jnp.asarray(x, jnp.float32)}
    state = (DriftState(f32(anchor), f32(corr)), tx.init(params)[1])
    np_state = None
    for t in range(1, K + 1):
        updates, state = tx.update({"w": a * (params["w"] - b)}, state, params)
        params = optax.apply_updates(params, updates)
        step, np_state = np_step(a * (theta - b) + mu * (theta - anchor), np_state, t)
        theta = theta + step + corr
    np.testing.assert_allclose(params["w"], theta, rtol=1e-4, atol=1e-5)  # f32 against f64


def test_fedprox_rounds_match_numpy():
    """FedProx with FedAvg over 2 rounds: each round's anchor is the average just received."""
    rng = np.random.default_rng(1)
    a, b = _quadratic(rng)
    mu = 0.5
    client = anchored(quadratic_client(drift_corrected(optax.sgd(ETA), mu)))
    agg = fedavg_aggregator()
    clients = client.init(jax.random.key(0))
    x = np.zeros(D)
    for r in range(2):
        inputs = RoundInputs(
            (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)), {}, None, jnp.int32(r)
        )
        trained, _ = client.update(clients, inputs)
        params, _ = agg.apply(trained.params, agg.init(trained.params))
        clients = trained._replace(params=params)
        ys = []
        for i in range(N):
            y = x.copy()
            for _ in range(K):
                y = y - ETA * (a[i] * (y - b[i]) + mu * (y - x))
            ys.append(y)
        np.testing.assert_allclose(
            trained.opt_state[0].anchor["w"], np.broadcast_to(x, (N, D)), atol=1e-6
        )
        x = np.mean(ys, axis=0)
        np.testing.assert_allclose(params["w"], np.broadcast_to(x, (N, D)), rtol=1e-5, atol=1e-6)


def np_scaffold_round(x, c, ci, a, b, cohort, server_lr=1.0):
    """One round of Algorithm 1 (option II) in NumPy, from the global `x`, server control `c` and
    client controls `ci [N, D]` (updated in place) over the drawn `cohort`: `(x, c)` after it."""
    dy, dc = [], []
    for i in cohort:
        y = x.copy()
        for _ in range(K):
            y = y - ETA * (a[i] * (y - b[i]) - ci[i] + c)
        new = ci[i] - c + (x - y) / (K * ETA)
        dy.append(y - x)
        dc.append(new - ci[i])
        ci[i] = new
    return x + server_lr * np.mean(dy, axis=0), c + len(cohort) / N * np.mean(dc, axis=0)


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_scaffold_matches_numpy_option_two(server_lr):
    """Two rounds of Algorithm 1 (option II): all clients, then the cohort {1, 3} of N = 4
    (`c ← c + |S|/N · mean Δc_i`); server step `η_g` (`server_opt` sgd without momentum)."""
    rng = np.random.default_rng(2)
    a, b = _quadratic(rng)
    client = scaffold_client(quadratic_client(drift_corrected(optax.sgd(ETA), 0.0)), K, ETA)
    inner = fedavg_aggregator() if server_lr == 1.0 else fedavgm(server_lr, 0.0)
    server = scaffold_server(inner, N)
    clients = client.init(jax.random.key(0))
    state = server.init(jax.random.key(0), clients)
    x, c, ci = np.zeros(D), np.zeros(D), np.zeros((N, D))
    for r, cohort in enumerate([[0, 1, 2, 3], [1, 3]]):
        idx = jnp.asarray(cohort, jnp.int32)
        data = (jnp.asarray(a[cohort], jnp.float32), jnp.asarray(b[cohort], jnp.float32))
        inputs = RoundInputs(data, {}, None, jnp.int32(r), state)
        trained, _ = client.update(cohorts.take(clients, idx), inputs)
        aggregated, state, _, _ = server.apply(trained, state, inputs)
        clients = cohorts.merge(clients, idx, aggregated, True)
        x, c = np_scaffold_round(x, c, ci, a, b, cohort, server_lr)

        np.testing.assert_allclose(
            clients.params["w"], np.broadcast_to(x, (N, D)), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(state.control["w"], c, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(clients.aux[CONTROL]["w"], ci, rtol=1e-4, atol=1e-5)


def two_part_client(tx: optax.GradientTransformation) -> ClientProgram:
    """`quadratic_client` over two leaves, `g` (global) and `l` (local), each client's quadratic
    on both; the local leaves start from different values per client."""
    one = quadratic_client(tx)

    def init(key):
        clients = one.init(key)
        local = jnp.arange(N * D, dtype=jnp.float32).reshape(N, D) / 10
        params = {"g": clients.params["w"], "l": local}
        return clients._replace(params=params, opt_state=jax.vmap(tx.init)(params))

    def update(clients, inputs):
        a, b = inputs.data

        def one_client(params, opt_state, a, b):
            def step(carry, _):
                p, s = carry
                grads = {k: a * (p[k] - b) for k in p}
                updates, s = tx.update(grads, s, p)
                return (optax.apply_updates(p, updates), s), None

            return jax.lax.scan(step, (params, opt_state), None, length=K)[0]

        params, opt_state = jax.vmap(one_client)(clients.params, clients.opt_state, a, b)
        return clients._replace(params=params, opt_state=opt_state), {}

    return ClientProgram(init, update)


def test_scaffold_over_a_global_part_matches_numpy_option_two():
    """The `scaffold` option's combinators (`scaffold_client` and `controlled` over the mean of a
    policy's global part, as FFA-LoRA's `B` and FedSA-LoRA's `A`): the global leaf follows
    Algorithm 1 (`np_scaffold_round`) over 2 rounds, cohort {1, 3} in round 2; the local leaf
    takes K plain SGD steps per round from each client's own value, never averaged, and has no
    control variates (`c_i = c = 0`)."""
    rng = np.random.default_rng(3)
    a, b = _quadratic(rng)
    policy = lambda names: names[-1] == "g"
    tx = drift_corrected(optax.sgd(ETA), 0.0)
    client = scaffold_client(two_part_client(tx), K, ETA, policy)
    server = controlled(aggregating(masked_aggregator(policy), policy=policy), N)
    clients = client.init(jax.random.key(0))
    state = server.init(jax.random.key(0), clients)
    x, c, ci = np.zeros(D), np.zeros(D), np.zeros((N, D))
    local = np.asarray(clients.params["l"], np.float64)
    for r, cohort in enumerate([[0, 1, 2, 3], [1, 3]]):
        idx = jnp.asarray(cohort, jnp.int32)
        data = (jnp.asarray(a[cohort], jnp.float32), jnp.asarray(b[cohort], jnp.float32))
        inputs = RoundInputs(data, {}, None, jnp.int32(r), state)
        trained, _ = client.update(cohorts.take(clients, idx), inputs)
        aggregated, state, _, _ = server.apply(trained, state, inputs)
        clients = cohorts.merge(clients, idx, aggregated, False)
        x, c = np_scaffold_round(x, c, ci, a, b, cohort)
        for i in cohort:
            for _ in range(K):
                local[i] = local[i] - ETA * a[i] * (local[i] - b[i])

        np.testing.assert_allclose(
            clients.params["g"][idx], np.broadcast_to(x, (len(cohort), D)), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(state.control["g"], c, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(clients.aux[CONTROL]["g"], ci, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(clients.params["l"], local, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(clients.aux[CONTROL]["l"], 0)
        np.testing.assert_array_equal(state.control["l"], 0)


@pytest.fixture(scope="module")
def problem():
    return tiny_problem(steps=3)


def _leaves(tree):
    """Every leaf as NumPy (PRNG keys as their key data)."""
    key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    return [
        np.asarray(jax.random.key_data(x) if key(x) else x)
        for x in jax.tree.leaves(jax.device_get(tree))
    ]


def test_fedprox_with_mu_zero_is_fedavg(problem):
    fedavg = METHODS["fedavg"](problem)
    fedprox = METHODS["fedprox"](problem, proximal_mu=0.0)
    a, b = fedavg.init(jax.random.key(0)), fedprox.init(jax.random.key(0))
    for _ in range(2):
        (a, ma), (b, mb) = fedavg.round(a), fedprox.round(b)
    for x, y in zip(_leaves((a.clients.params, ma)), _leaves((b.clients.params, mb)), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("name", "prompt"),
    [
        ("fedprompt", PromptTuningConfig(num_virtual_tokens=4, init="vocab")),
        ("fedptuning", PTuningConfig(num_virtual_tokens=3, hidden_size=16)),
    ],
)
def test_prompt_baselines_take_proximal_mu(problem, name, prompt):
    """`proximal_mu` on the soft-prompt baselines: `μ = 0` is the method itself; `μ > 0` anchors
    the local steps at the prompt received (`DriftState.anchor`) and changes the training."""
    plain = METHODS[name](problem, prompt=prompt)
    zero = METHODS[name](problem, prompt=prompt, proximal_mu=0.0)
    strong = METHODS[name](problem, prompt=prompt, proximal_mu=10.0)
    a, b, c = (m.init(jax.random.key(0)) for m in (plain, zero, strong))
    sim0 = c
    (a, _), (b, _), (c, _) = plain.round(a), zero.round(b), strong.round(c)
    for x, y in zip(_leaves(a.clients.params), _leaves(b.clients.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert isinstance(c.clients.opt_state[0], DriftState)
    for anchor, x0 in zip(
        _leaves(c.clients.opt_state[0].anchor), _leaves(sim0.clients.params), strict=True
    ):
        np.testing.assert_array_equal(anchor, x0)
    pairs = zip(_leaves(a.clients.params), _leaves(c.clients.params), strict=True)
    assert max(np.abs(x - y).max() for x, y in pairs) > 1e-6


def test_fedprox_anchors_at_the_received_adapters(problem):
    """After a round the anchor is what the clients received at its start; `μ > 0` changes the
    training."""
    fedprox = METHODS["fedprox"](problem, proximal_mu=10.0)
    sim0 = fedprox.init(jax.random.key(0))
    sim1, _ = fedprox.round(sim0)
    sim2, _ = fedprox.round(sim1)
    for got, want in zip(
        _leaves(sim2.clients.opt_state[0].anchor), _leaves(sim1.clients.params), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    fedavg = METHODS["fedavg"](problem)
    plain, _ = fedavg.round(fedavg.round(fedavg.init(jax.random.key(0)))[0])
    moved = [
        np.abs(x - y).max()
        for x, y in zip(_leaves(plain.clients.params), _leaves(sim2.clients.params), strict=True)
    ]
    assert max(moved) > 1e-6


def test_scaffold_on_the_model_keeps_c_the_mean_of_the_client_controls(problem):
    """Full participation: `c = mean_i c_i` after every round (both start at 0)."""
    algo = METHODS["scaffold"](problem)
    sim = algo.init(jax.random.key(0))
    for _ in range(2):
        sim, metrics = algo.round(sim)
        assert all(np.isfinite(x).all() for x in _leaves(metrics["val"]))
    means = jax.tree.map(lambda x: x.mean(0), sim.clients.aux[CONTROL])
    for got, want in zip(_leaves(sim.agg_state.control), _leaves(means), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert max(np.abs(x).max() for x in _leaves(sim.agg_state.control)) > 0


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("fedprox", {"proximal_mu": -0.1}, "proximal_mu must be >= 0"),
        ("fedavg", {"proximal_mu": -1.0}, "proximal_mu must be >= 0"),
        ("fedadam", {"server_opt": ServerOptimizer("sgd")}, "server_opt.kind"),
        ("scaffold", {"local_lr": 0.0}, "method_options.scaffold.local_lr"),
    ],
)
def test_bad_options_fail_naming_the_option(problem, name, options, match):
    with pytest.raises(ValueError, match=match):
        METHODS[name](problem, **options)


def test_scaffold_without_a_known_learning_rate_asks_for_it(problem):
    custom = dataclasses.replace(problem, optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="set method_options.scaffold.local_lr"):
        METHODS["scaffold"](custom)


def test_ffa_lora_proximal_keeps_a_frozen(problem):
    """FFA-LoRA's `proximal_mu`: the proximal term reaches only the trained `B`; every `A` stays
    at the shared init."""
    algo = METHODS["ffa-lora"](problem, proximal_mu=1.0)
    sim0 = algo.init(jax.random.key(0))
    sim, _ = algo.round(algo.round(sim0)[0])
    assert isinstance(sim.clients.opt_state[0], DriftState)
    paths = jax.tree_util.tree_leaves_with_path(sim.clients.params)
    for (path, x), x0 in zip(paths, jax.tree.leaves(sim0.clients.params), strict=True):
        if path_names(path)[-1] == "a":
            np.testing.assert_array_equal(np.asarray(x), np.asarray(x0))
        else:
            assert np.isfinite(np.asarray(x)).all() and np.abs(np.asarray(x - x0)).max() > 0


@pytest.mark.parametrize(("name", "global_leaf"), [("ffa-lora", "b"), ("fedsa-lora", "a")])
def test_scaffold_option_controls_only_the_global_part(problem, name, global_leaf, tmp_path):
    """`method_options.<name>.scaffold`: one round's control updates are option II's
    `(x − y_i)/(K η_l) − c` on the global part (NumPy from the adapters received and trained),
    zero elsewhere; the server's `c` is their mean; FFA-LoRA's `A` stays at the shared init; the
    state round-trips through a checkpoint and the resumed round equals the uninterrupted one."""
    algo = METHODS[name](problem, scaffold=True)
    sim0 = algo.init(jax.random.key(0))
    sim1, _ = algo.round(sim0)
    inputs = RoundInputs(problem.train, problem.eval_sets, problem.base, sim0.round, sim0.agg_state)
    trained, _ = jax.jit(algo.method.client.update)(sim0.clients, inputs)
    k, lr = problem.training.steps, problem.optimizer.lr
    paths = jax.tree_util.tree_leaves_with_path(sim0.clients.params)
    for (path, x), y, d, c in zip(
        paths,
        _leaves(trained.params),
        _leaves(trained.aux[CONTROL_DELTA]),
        _leaves(sim1.agg_state.control),
        strict=True,
    ):
        x = np.asarray(x, np.float64)
        if path_names(path)[-1] == global_leaf:
            want = (x - y) / (k * lr)  # c = 0 in the first round
            np.testing.assert_allclose(d, want, rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(c, want.mean(0), rtol=1e-3, atol=1e-4)
            assert np.abs(d).max() > 0
        else:
            np.testing.assert_array_equal(d, 0)
            np.testing.assert_array_equal(c, 0)
            if name == "ffa-lora":
                np.testing.assert_array_equal(y, x)
    exchange = algo.method.server.comm(jax.device_get(sim0.clients))
    plain = METHODS[name](problem).method.server.comm(jax.device_get(sim0.clients))
    assert exchange.upload.tolist() == (2 * plain.upload).tolist() and plain.upload[0] > 0
    assert exchange.download.tolist() == (2 * plain.download).tolist()

    checkpoints = Checkpointer(tmp_path)
    checkpoints.save(1, sim1, [])
    _, restored, _ = checkpoints.restore_latest(sim1)
    checkpoints.close()
    sim2, _ = algo.round(sim1)
    resumed, _ = algo.round(restored)
    for u, v in zip(_leaves(sim2), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(u, v)


def test_scaffold_option_refuses_the_global_rule(problem):
    """SCAFFOLD's server also averages the control updates: a robust reduction or DP is refused
    with that reason, in one line."""
    ruled = dataclasses.replace(problem, global_rule=GlobalRule("median"))
    with pytest.raises(ConfigError, match="control-variate updates") as info:
        METHODS["fedsa-lora"](ruled, scaffold=True)
    assert "\n" not in str(info.value)
