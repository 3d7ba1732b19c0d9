"""The engine against independent references: sampling, local training, strategies, evaluation,
schedules, and the no-recompilation guarantee."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_lora.aggregation import fedavg_aggregator, local_aggregator
from fedjax_lora.algorithms import FedAvgOptions, centralized, fedavg, federated, local
from fedjax_lora.engine import OptimizerConfig, Strategy, one_cycle, sample_starts, windows_at
from tests.tiny import SEQ, compilations, tiny_problem


def leaves(tree):
    def plain(x):
        return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x

    return [np.asarray(plain(x)) for x in jax.tree.leaves(tree)]


def test_windows_match_numpy_slices():
    tokens = jnp.arange(100, dtype=jnp.int32)
    mask = (jnp.arange(100) % 3 != 0).astype(jnp.uint8)
    starts = jnp.array([0, 7, 83])
    batch = windows_at(tokens, starts, 16, mask)
    for row, s in enumerate([0, 7, 83]):
        np.testing.assert_array_equal(batch.inputs[row], np.arange(s, s + 16))
        np.testing.assert_array_equal(batch.targets[row], np.arange(s + 1, s + 17))
        np.testing.assert_array_equal(batch.weights[row], (np.arange(s + 1, s + 17) % 3 != 0))


def test_random_starts_stay_inside_the_stream():
    starts = sample_starts(
        jax.random.key(0),
        jnp.int32(50),
        jnp.int32(0),
        batch_size=4000,
        seq_len=16,
        max_windows=3,
        sampling="random",
    )
    assert int(starts.min()) == 0 and int(starts.max()) == 50 - 17


def test_epoch_sampling_visits_every_window_once_per_epoch():
    length, seq = 16 * 7 + 1, 16  # 7 full windows
    draw = lambda counter: sample_starts(
        jax.random.key(3),
        jnp.int32(length),
        jnp.int32(counter),
        batch_size=7,
        seq_len=seq,
        max_windows=10,
        sampling="epoch",
    )
    first, second = np.asarray(draw(0)), np.asarray(draw(7))
    assert sorted(first) == [16 * i for i in range(7)]
    assert sorted(second) == [16 * i for i in range(7)]
    assert not np.array_equal(first, second)  # a fresh order each epoch


def test_one_cycle_matches_the_trust_weighted_reference_values():
    sched = one_cycle(2e-3, 500, pct_start=0.02, div_factor=100, final_div_factor=0.05)
    expected = {
        0: 2.0e-5,
        5: 1.18e-3,
        9: 2.0e-3,
        100: 1.87e-3,
        250: 1.22e-3,
        400: 5.6e-4,
        499: 4.0e-4,
    }
    for step, lr in expected.items():
        np.testing.assert_allclose(float(sched(step)), lr, rtol=0.02, err_msg=f"step {step}")


def _reference_local_training(problem, clients, num_steps):
    """A Python loop over clients and steps with plain `jax.grad`, re-deriving the documented
    sampling keys: per step `rng, k_batch, k_drop = split(rng, 3)`, micro-batch i starts from
    `randint(fold_in(k_batch, i), (B,), 0, length - T)`."""
    cfg = problem.training
    tx = problem.tx()
    tokens = np.asarray(problem.train.tokens)
    lengths = np.asarray(problem.train.lengths)
    out = []
    for c in range(problem.num_clients):
        params = jax.tree.map(lambda x, c=c: x[c], clients.params)
        opt_state = jax.tree.map(lambda x, c=c: x[c], clients.opt_state)
        rng = clients.rng[c]

        def loss(p, inputs, targets, drop_key):
            model = nnx.merge(problem.graphdef, p, problem.base)
            logits = model(inputs, rngs=nnx.Rngs(dropout=drop_key))
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        for _ in range(num_steps):
            rng, k_batch, k_drop = jax.random.split(rng, 3)
            grads = None
            for i in range(cfg.grad_accum):
                starts = np.asarray(
                    jax.random.randint(
                        jax.random.fold_in(k_batch, i), (cfg.batch_size,), 0, lengths[c] - SEQ
                    )
                )
                win = np.stack([tokens[c, s : s + SEQ + 1] for s in starts])
                g = jax.grad(loss)(params, win[:, :-1], win[:, 1:], jax.random.fold_in(k_drop, i))
                grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            grads = jax.tree.map(lambda g: g / cfg.grad_accum, grads)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        out.append(params)
    return out


def _assert_clients_match(stacked, per_client, atol=2e-5):
    for c, ref in enumerate(per_client):
        got = jax.tree.map(lambda x, c=c: x[c], stacked)
        for a, b in zip(leaves(got), leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, atol=atol)


def test_local_round_equals_a_python_loop_reference():
    problem = tiny_problem(num_clients=3, steps=2, grad_accum=2)
    algo = local(problem)
    sim = algo.init(jax.random.key(0))
    expected = _reference_local_training(problem, sim.clients, 2)
    sim, metrics = algo.round(sim)
    _assert_clients_match(sim.clients.params, expected)
    chex.assert_shape(metrics["train"]["train_loss"], (3, 2))
    np.testing.assert_array_equal(sim.clients.step, [2, 2, 2])


def test_any_optax_transformation_with_a_schedule_runs_per_client():
    schedule = optax.linear_schedule(0.05, 0.0, transition_steps=4)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(schedule, momentum=0.9))
    problem = tiny_problem(num_clients=2, steps=3, optimizer=tx)
    algo = local(problem)
    sim = algo.init(jax.random.key(10))
    expected = _reference_local_training(problem, sim.clients, 3)
    sim, _ = algo.round(sim)
    _assert_clients_match(sim.clients.params, expected)


def test_shared_init_gives_identical_clients_and_independent_init_different_ones():
    problem = tiny_problem(num_clients=3)
    shared = fedavg(problem).init(jax.random.key(11)).clients.params
    independent = local(problem).init(jax.random.key(11)).clients.params
    for s, i in zip(leaves(shared), leaves(independent), strict=True):
        if np.any(i):  # A factors (B starts at zero in both)
            assert np.array_equal(s[0], s[1]) and np.array_equal(s[0], s[2])
            assert not np.array_equal(i[0], i[1])


@pytest.mark.parametrize(
    "strategy",
    [
        Strategy("vmap"),
        Strategy("chunked", chunk_size=2),
        Strategy("sharded"),
        Strategy("sharded", inner="vmap"),
    ],
    ids=["vmap", "chunked", "sharded-map", "sharded-vmap"],
)
def test_every_strategy_gives_the_same_numbers(strategy):
    ref = fedavg(tiny_problem(num_clients=4))
    ref_sim, ref_metrics = ref.round(ref.init(jax.random.key(1)))
    algo = fedavg(tiny_problem(num_clients=4, strategy=strategy))
    sim, metrics = algo.round(algo.init(jax.random.key(1)))
    for a, b in zip(leaves(sim.clients), leaves(ref_sim.clients), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(metrics["val"]["ppl"], ref_metrics["val"]["ppl"], rtol=1e-5)


def test_sharded_strategy_rejects_indivisible_client_counts():
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny_problem(num_clients=3, strategy=Strategy("sharded"))


def test_fedavg_round_is_the_mean_of_the_local_updates():
    problem = tiny_problem(num_clients=4)
    plain = federated("plain", problem, local_aggregator(), shared_init=True)
    averaged = federated("avg", problem, fedavg_aggregator(), shared_init=True)
    key = jax.random.key(2)
    local_sim, _ = plain.round(plain.init(key))
    avg_sim, _ = averaged.round(averaged.init(key))
    for trained, mixed in zip(
        leaves(local_sim.clients.params), leaves(avg_sim.clients.params), strict=True
    ):
        mean = trained.astype(np.float64).mean(axis=0)
        for c in range(4):
            np.testing.assert_allclose(mixed[c], mean, atol=1e-6)
    # optimizer states are untouched by aggregation
    for a, b in zip(
        leaves(local_sim.clients.opt_state), leaves(avg_sim.clients.opt_state), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_token_weighted_fedavg_uses_training_token_counts():
    problem = tiny_problem(num_clients=3)
    plain = federated("plain", problem, local_aggregator(), shared_init=True)
    weighted = fedavg(problem, FedAvgOptions(weighting="tokens"))
    key = jax.random.key(4)
    local_sim, _ = plain.round(plain.init(key))
    sim, _ = weighted.round(weighted.init(key))
    counts = np.asarray(problem.train.lengths, np.float64)
    w = counts / counts.sum()
    for trained, mixed in zip(
        leaves(local_sim.clients.params), leaves(sim.clients.params), strict=True
    ):
        expected = np.tensordot(w, trained.astype(np.float64), axes=1)
        np.testing.assert_allclose(mixed[0], expected, atol=1e-6)


def test_evaluation_equals_numpy_cross_entropy():
    problem = tiny_problem(num_clients=2)
    algo = local(problem)
    sim = algo.init(jax.random.key(5))
    sim, _ = algo.round(sim)
    metrics = algo.evaluate(sim)["val"]
    es = problem.eval_sets["val"]
    for c in range(2):
        params = jax.tree.map(lambda x, c=c: x[c], sim.clients.params)
        model = nnx.merge(problem.graphdef, params, problem.base)
        windows = np.asarray(es.windows[c])
        weights = np.asarray(es.weights[c])
        logits = np.asarray(model(jnp.asarray(windows[:, :-1])), np.float64)
        logp = logits - np.log(
            np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
        )
        logp -= logits.max(-1, keepdims=True)
        targets = windows[:, 1:]
        ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
        mean_ce = (ce * weights).sum() / weights.sum()
        acc = ((logits.argmax(-1) == targets) * weights).sum() / weights.sum()
        np.testing.assert_allclose(metrics["loss"][c], mean_ce, rtol=1e-5)
        np.testing.assert_allclose(metrics["ppl"][c], np.exp(mean_ce), rtol=1e-5)
        np.testing.assert_allclose(metrics["accuracy"][c], acc, atol=1e-6)


def test_loss_mask_excludes_prompt_tokens_from_the_gradient():
    streams_mask = [np.zeros(300 - 20 * (i % 3), np.uint8) for i in range(2)]
    problem = tiny_problem(num_clients=2, masks=streams_mask)
    algo = local(problem)
    sim = algo.init(jax.random.key(6))
    new, metrics = algo.round(sim)
    # Every target is masked: zero gradients, so Adam leaves the adapters where they were.
    for a, b in zip(leaves(sim.clients.params), leaves(new.clients.params), strict=True):
        np.testing.assert_allclose(a, b, atol=0)
    np.testing.assert_allclose(metrics["train"]["train_ce"], 0.0)


def test_no_recompilation_after_the_first_round():
    algo = fedavg(tiny_problem(num_clients=4))
    sim = algo.init(jax.random.key(7))
    sim, _ = algo.round(sim)
    with compilations() as compiles:
        for _ in range(3):
            sim, _ = algo.round(sim)
        jax.block_until_ready(sim)
    assert compiles == []
    assert int(sim.round) == 4


def test_centralized_trains_one_model_on_pooled_data():
    problem = tiny_problem(num_clients=3)
    algo = centralized(problem)
    sim = algo.init(jax.random.key(8))
    chex.assert_tree_shape_prefix(sim.clients.params, (1,))
    assert int(problem.train.pooled().lengths[0]) == int(np.sum(problem.train.lengths))
    sim, metrics = algo.round(sim)
    chex.assert_shape(metrics["val"]["ppl"], (3,))


def test_local_training_lowers_the_loss():
    problem = tiny_problem(num_clients=2, steps=20, lr=3e-2)
    algo = local(problem)
    sim = algo.init(jax.random.key(9))
    before = algo.evaluate(sim)["val"]["loss"]
    sim, _ = algo.round(sim)
    after = algo.evaluate(sim)["val"]["loss"]
    assert np.all(np.asarray(after) < np.asarray(before))
    assert isinstance(OptimizerConfig().build(), optax.GradientTransformation)


class _SowingDelta(nnx.Module):
    """A LoRA-like adapter that also sows an auxiliary loss `c · Σ a²` (as a mixture's load
    balancing loss would)."""

    def __init__(self, width):
        from fedjax_lora.lora import Adapter, Init

        self.a = Adapter(jnp.full((width,), 0.5), init=Init("zeros"))

    def __call__(self, x, rngs=None):
        self.sow(nnx.Intermediate, "aux_loss", 0.1 * jnp.sum(self.a[...] ** 2))
        return x[..., : self.a.shape[0]] * self.a[...]


def test_sown_auxiliary_losses_are_added_to_the_loss():
    from fedjax_lora import lora
    from fedjax_lora.engine import lm_loss
    from fedjax_lora.engine.batches import Batch
    from fedjax_lora.models.factory import from_config
    from tests.tiny import CONFIG, VOCAB

    model = from_config(CONFIG)
    for block in model.transformer.h:
        block.mlp.c_proj.lora = _SowingDelta(CONFIG.d_model)
    graphdef, adapters, base = lora.split(model)
    tokens = jnp.arange(2 * 9).reshape(2, 9) % VOCAB
    batch = Batch(tokens[:, :-1], tokens[:, 1:], jnp.ones((2, 8)))
    total, parts = lm_loss(graphdef, adapters, base, batch, None)
    expected_aux = CONFIG.n_layers * 0.1 * CONFIG.d_model * 0.25
    np.testing.assert_allclose(parts["aux"], expected_aux, rtol=1e-6)
    np.testing.assert_allclose(total, parts["ce"] + expected_aux, rtol=1e-6)
